namespace Gateway.Backends.Qcow2;

/// <summary>What one layer of an image chain holds for a run of guest bytes.</summary>
internal enum RunKind : byte
{
    /// <summary>Not in this layer: the backing file shows through.</summary>
    Unallocated,

    /// <summary>Reads as zeros, decided in this layer (a zero cluster or subcluster, or past a backing file's end).</summary>
    Zero,

    /// <summary>Stored uncompressed at <see cref="LayerRun.HostOffset"/> of the layer's data file.</summary>
    Data,

    /// <summary>One compressed cluster (<see cref="LayerRun.HostOffset"/> is its L2 descriptor).</summary>
    Compressed,
}

/// <summary>A run of guest bytes from the offset that was asked, all of one kind in one layer.</summary>
internal readonly record struct LayerRun(long Length, RunKind Kind, long HostOffset = 0);

/// <summary>One file of an image chain: a qcow2 image or a raw file.</summary>
internal abstract class ImageLayer : IDisposable
{
    public required string Path { get; init; }

    public abstract string Format { get; }

    public abstract long VirtualSize { get; }

    /// <summary>The run from <paramref name="offset"/> (below <see cref="VirtualSize"/>), at most <paramref name="length"/> bytes long.</summary>
    public abstract LayerRun Map(long offset, long length);

    /// <summary>Reads the bytes of a <see cref="RunKind.Data"/> or <see cref="RunKind.Compressed"/> run that <see cref="Map"/> gave for <paramref name="guestOffset"/>.</summary>
    public abstract void Read(LayerRun run, long guestOffset, Span<byte> destination);

    /// <summary>
    /// <see cref="Map"/> from what is in memory only (the L2 tables cached): false when it would
    /// have to read the file.
    /// </summary>
    public abstract bool TryMapNoWait(long offset, long length, out LayerRun run);

    /// <summary><see cref="Read"/> without waiting (a page-cache hit of a local file's uncompressed data), or false.</summary>
    public abstract bool TryReadNoWait(LayerRun run, long guestOffset, Span<byte> destination);

    public abstract void Dispose();
}
