namespace Gateway.Backends.S3;

/// <summary>How an S3 export is cut into objects and cached.</summary>
public sealed record S3DeviceOptions
{
    public const int DefaultObjectSize = 4 << 20;
    public const long DefaultCacheBytes = 256L << 20;
    public const int DefaultParallelism = 16;

    /// <summary>Bytes per object, a power of two (nbdkit's S3 plugin calls it object-size).</summary>
    public int ObjectSize { get; init; } = DefaultObjectSize;

    /// <summary>Memory for cached chunks, clean and dirty; writers wait for write-back beyond it.</summary>
    public long CacheBytes { get; init; } = DefaultCacheBytes;

    /// <summary>Most store calls in flight at once for this export.</summary>
    public int Parallelism { get; init; } = DefaultParallelism;

    /// <summary>A dirty chunk not written for this long is written back without waiting for a FLUSH.</summary>
    public TimeSpan WritebackDelay { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>The object key of chunk <paramref name="index"/>: nbdkit's <c>KEY/%016x</c>.</summary>
    public static string Key(string prefix, long index) => $"{prefix}/{index:x16}";
}
