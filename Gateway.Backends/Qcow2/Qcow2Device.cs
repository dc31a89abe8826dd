using Gateway.Backends.Overlay;

namespace Gateway.Backends.Qcow2;

/// <summary>
/// A qcow2 image (with its backing chain), or a raw S3 object, as the read-only bottom of an overlay. Every device
/// opened on the same file shares one <see cref="Qcow2Image"/> (its L2 cache and file handles);
/// the image closes with the last device. A file replaced since (another length or write time)
/// opens afresh. A bad L2 entry met by a read fails that read with an I/O error, naming the image.
/// </summary>
public sealed class Qcow2Device : IBlockDevice, IImageChain, INonBlockingIo
{
    private static readonly Dictionary<(string Path, long Length, DateTime Written), Shared> s_open = [];
    private static readonly Lock s_lock = new();

    private readonly Shared _shared;
    private int _disposed;

    private Qcow2Device(Shared shared) => _shared = shared;

    public Qcow2Image Image => _shared.Image;

    public long Size => _shared.Image.VirtualSize;

    public bool IsReadOnly => true;

    public BlockCapabilities Capabilities => BlockCapabilities.Cache;

    /// <summary>Opens (or shares) the image at <paramref name="path"/>; refusals are <see cref="Qcow2Exception"/>s.</summary>
    public static Qcow2Device Open(string path)
    {
        var file = new FileInfo(Path.GetFullPath(path));
        var key = (file.FullName, file.Exists ? file.Length : -1, file.Exists ? file.LastWriteTimeUtc : default);
        lock (s_lock)
        {
            if (!s_open.TryGetValue(key, out Shared? shared))
            {
                shared = new Shared(key, Qcow2Image.Open(file.FullName));
                s_open[key] = shared;
            }
            shared.Users++;
            return new Qcow2Device(shared);
        }
    }

    /// <summary>
    /// Opens (or shares) the image <paramref name="name"/> (<c>s3://BUCKET/KEY</c>) as
    /// <paramref name="format"/> (qcow2 with its chain, or raw), read by range. Shared by store,
    /// name and format: an object replaced meanwhile is not noticed until every export on it has
    /// closed. Takes ownership of <paramref name="location"/>.
    /// </summary>
    public static Qcow2Device Open(S3ImageLocation location, string name, string format)
    {
        using (location)
        {
            var key = ($"{location.Endpoint} {format} {name}", -1L, default(DateTime));
            lock (s_lock)
            {
                if (!s_open.TryGetValue(key, out Shared? shared))
                {
                    Qcow2Image image = format == ImageFormat.Raw ? Qcow2Image.OpenRaw(name, location) : Qcow2Image.Open(name, location);
                    shared = new Shared(key, image);
                    s_open[key] = shared;
                }
                shared.Users++;
                return new Qcow2Device(shared);
            }
        }
    }

    /// <summary>
    /// The fast path of a read that needs no I/O but a page-cache hit: its L2 tables are cached, so
    /// an allocated uncompressed cluster is one <c>preadv2(RWF_NOWAIT)</c> at a known offset.
    /// </summary>
    public bool TryReadNoWait(long offset, Span<byte> destination) =>
        Volatile.Read(ref _disposed) == 0 && TryReadImage(offset, destination);

    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source) => false;

    private bool TryReadImage(long offset, Span<byte> destination)
    {
        try
        {
            return _shared.Image.TryReadNoWait(offset, destination);
        }
        catch (Exception e) when (e is Qcow2Exception or ObjectDisposedException)
        {
            return false; // the blocking path reads it again and reports the error
        }
    }

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }
        try
        {
            DeviceBounds.ThrowIfClosed(Volatile.Read(ref _disposed) != 0);
            DeviceBounds.Check(offset, destination.Length, Size, BlockErrorKind.InvalidArgument);
            _shared.Image.Read(offset, destination.Span);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(Translate(e, offset));
        }
    }

    /// <summary>base:allocation: data where a file of the chain holds data; a hole that reads zeros where it holds zeros or nothing.</summary>
    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled<int>(cancellationToken);
        }
        try
        {
            DeviceBounds.ThrowIfClosed(Volatile.Read(ref _disposed) != 0);
            DeviceBounds.CheckQuery(offset, length, Size, extents.Length);
            Span<ImageExtent> runs = stackalloc ImageExtent[32];
            Span<Extent> output = extents.Span;
            int count = 0;
            long end = offset + length;
            while (offset < end)
            {
                int n = _shared.Image.GetAllocation(offset, end - offset, runs);
                for (int i = 0; i < n; i++)
                {
                    ExtentFlags flags = runs[i].Zero ? ExtentFlags.Hole | ExtentFlags.Zero : ExtentFlags.Data;
                    if (count > 0 && output[count - 1].Flags == flags)
                    {
                        output[count - 1] = new Extent(output[count - 1].Length + runs[i].Length, flags);
                    }
                    else if (count == output.Length)
                    {
                        return ValueTask.FromResult(count);
                    }
                    else
                    {
                        output[count++] = new Extent(runs[i].Length, flags);
                    }
                    offset += runs[i].Length;
                }
            }
            return ValueTask.FromResult(count);
        }
        catch (Exception e)
        {
            return ValueTask.FromException<int>(Translate(e, offset));
        }
    }

    /// <summary>Which file of the chain provides each run: 1 = the image itself, 2 = its backing file..., 0 = none.</summary>
    public int GetDepth(long offset, long length, Span<DepthExtent> extents)
    {
        DeviceBounds.ThrowIfClosed(Volatile.Read(ref _disposed) != 0);
        Span<ImageExtent> runs = stackalloc ImageExtent[Math.Min(extents.Length, 64)];
        int n = _shared.Image.GetAllocation(offset, length, runs);
        int count = 0;
        for (int i = 0; i < n; i++)
        {
            // Runs split only by zero-ness are one run of depth.
            if (count > 0 && extents[count - 1].Depth == runs[i].Depth)
            {
                extents[count - 1] = new DepthExtent(extents[count - 1].Length + runs[i].Length, runs[i].Depth);
            }
            else
            {
                extents[count++] = new DepthExtent(runs[i].Length, runs[i].Depth);
            }
        }
        return count;
    }

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) =>
        ValueTask.FromException(DeviceBounds.ReadOnly());

    public ValueTask FlushAsync(CancellationToken cancellationToken = default) => ValueTask.CompletedTask;

    public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) =>
        ValueTask.FromException(DeviceBounds.ReadOnly());

    public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) =>
        ValueTask.FromException(DeviceBounds.ReadOnly());

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) => ValueTask.CompletedTask;

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        lock (s_lock)
        {
            if (--_shared.Users > 0)
            {
                return;
            }
            s_open.Remove(_shared.Key);
        }
        _shared.Image.Dispose();
    }

    private static Exception Translate(Exception e, long offset) => e switch
    {
        Qcow2Exception q => new BlockDeviceException(BlockErrorKind.Io, q.Message, q) { Offset = offset },
        ObjectDisposedException => DeviceBounds.Shutdown(e),
        IOException => new BlockDeviceException(BlockErrorKind.Io, e.Message, e) { Offset = offset }, // an S3 image's store failing
        _ => e,
    };

    private sealed class Shared((string, long, DateTime) key, Qcow2Image image)
    {
        public (string Path, long Length, DateTime Written) Key { get; } = key;

        public Qcow2Image Image { get; } = image;

        public int Users { get; set; }
    }
}
