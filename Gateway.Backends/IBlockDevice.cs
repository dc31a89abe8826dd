namespace Gateway.Backends;

/// <summary>
/// The block-device contract every backend implements. Offsets and lengths are
/// in bytes; callers (the NBD server) have already checked them against
/// <see cref="Size"/>, but implementations still refuse out-of-range requests
/// with <see cref="BlockErrorKind.InvalidArgument"/> or <see cref="BlockErrorKind.NoSpace"/>.
/// One instance is shared by every connection to an export, so all members
/// must be safe to call concurrently; a completed write is visible to every
/// later read, and <see cref="FlushAsync"/> makes every completed write durable.
/// </summary>
public interface IBlockDevice : IDisposable
{
    long Size { get; }

    bool IsReadOnly { get; }

    /// <summary>What the device can do natively; the server advertises flags from it.</summary>
    BlockCapabilities Capabilities { get; }

    ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default);

    ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default);

    /// <summary>Makes every write completed before the call durable.</summary>
    ValueTask FlushAsync(CancellationToken cancellationToken = default);

    /// <summary>Discards a range: afterwards it reads as zeros (this gateway never lets a trim expose old data).</summary>
    ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default);

    /// <summary>
    /// Writes zeros without sending data. <see cref="ZeroFlags.NoHole"/> keeps the range allocated;
    /// <see cref="ZeroFlags.FastZero"/> fails with <see cref="BlockErrorKind.NotSupported"/> rather than
    /// fall back to something slow.
    /// </summary>
    ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default);

    /// <summary>Prefetches a range into whatever cache the device has.</summary>
    ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default);

    /// <summary>
    /// Describes allocation from <paramref name="offset"/>: fills <paramref name="extents"/> with
    /// consecutive extents starting at offset, covering at most <paramref name="length"/> bytes,
    /// and returns how many it wrote (at least one when length &gt; 0).
    /// </summary>
    ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default);
}

[Flags]
public enum BlockCapabilities
{
    None = 0,
    Trim = 1 << 0,
    Zero = 1 << 1,
    /// <summary>Zeroing is always cheap (no data written), so FAST_ZERO can be honoured.</summary>
    FastZero = 1 << 2,
    Cache = 1 << 3,
    /// <summary>Writes must be flushed to be durable (advertise FLUSH and FUA).</summary>
    Flush = 1 << 4,
}

[Flags]
public enum ZeroFlags
{
    None = 0,
    Fua = 1 << 0,
    NoHole = 1 << 1,
    FastZero = 1 << 2,
}

/// <summary>Allocation flags, with the values of the NBD <c>base:allocation</c> context.</summary>
[Flags]
public enum ExtentFlags : uint
{
    Data = 0,
    Hole = 1,
    Zero = 2,
}

public readonly record struct Extent(long Length, ExtentFlags Flags);

public enum BlockErrorKind
{
    Io,
    InvalidArgument,
    NoSpace,
    ReadOnly,
    NotSupported,
    Shutdown,
}

/// <summary>A failure a backend reports; the server maps the kind to an NBD error code.</summary>
public sealed class BlockDeviceException(BlockErrorKind kind, string message, Exception? inner = null)
    : Exception(message, inner)
{
    public BlockErrorKind Kind { get; } = kind;

    /// <summary>
    /// Where in the device the operation failed, when that is known (an owner's ERROR_OFFSET
    /// chunk); a structured reply passes it on as ERROR_OFFSET.
    /// </summary>
    public long? Offset { get; init; }
}

/// <summary>
/// Optional fast path of a device whose I/O is usually served from memory: try the operation on
/// the caller's thread without blocking, and say false when it would have to wait (the caller
/// then takes the asynchronous path). Spares the thread-pool hop for page-cache hits.
/// </summary>
public interface INonBlockingIo
{
    bool TryReadNoWait(long offset, Span<byte> destination);

    bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source);
}

/// <summary>
/// A device that can name the open file (and offset) holding a range of it while that range is in
/// the page cache, so the protocol layer can send a large read's data with <c>sendfile(2)</c>:
/// page-cache pages go to the socket by reference, instead of being copied into a buffer by
/// <c>pread</c> and from there into the socket. False when the range is not all cached (the read
/// would wait for the disk on the connection's one writer; the caller reads it on the pool
/// instead), when the kernel cannot tell, or when the device is closed.
/// </summary>
public interface IFileRegions
{
    bool TryGetFileRegion(long offset, int length, out FileRegion region);
}

/// <summary>
/// Where a device range lies in an open file: <paramref name="File"/> is the device's own stream
/// on it (never disposed by the caller), <paramref name="Offset"/> the file offset of the range.
/// The stream stays open, even if the device closes, until <paramref name="Holder"/> is released:
/// once per region, after its data is sent or when it will not be.
/// </summary>
public readonly record struct FileRegion(FileStream File, long Offset, IFileRegionHolder Holder);

/// <summary>Keeps a <see cref="FileRegion"/>'s file open until the region is released.</summary>
public interface IFileRegionHolder
{
    void Release();
}

/// <summary>
/// A device that may send its requests to another process (a cluster node's link to the export's
/// owner) instead of doing the I/O: starting a request then only writes it to a stream, so the
/// protocol layer starts it on its reader's thread and corks the stream while it parses a batch.
/// The protocol layer asks for this capability, never for the kind of device.
/// </summary>
public interface IForwardingDevice
{
    /// <summary>True while requests go to another process (nothing blocks before the reply comes back).</summary>
    bool IsRemote { get; }

    /// <summary>Holds the requests started from now on until <see cref="IRequestBatch.Uncork"/>, which sends them in one write; null when not remote.</summary>
    IRequestBatch? Cork();
}

/// <summary>
/// A device whose reads say where the holes are at no extra cost: a cluster node's link to the
/// export's owner, whose reply to a read comes as data and hole chunks. The protocol layer answers
/// such a read with the same data and holes (OFFSET_DATA and OFFSET_HOLE chunks) instead of asking
/// for the allocation first, which for a forwarding device would be a second round trip.
/// </summary>
public interface ISegmentedReads
{
    /// <summary>
    /// True while reads come with their holes (the link is not served on this node); false while
    /// the device is local, where asking the allocation is a local call and the protocol layer's
    /// own allocation path is used instead. A read begun either way is still answered correctly if
    /// this changes meanwhile.
    /// </summary>
    bool ReadsSegments { get; }

    /// <summary>
    /// Reads <paramref name="destination"/> and describes it in <paramref name="segments"/>:
    /// consecutive extents from <paramref name="offset"/>, in order, covering the whole
    /// destination, each <see cref="ExtentFlags.Data"/> or <see cref="ExtentFlags.Hole"/>; returns
    /// how many (at least one when the destination is not empty). The bytes of a hole are left as
    /// they were in <paramref name="destination"/>, so the caller must not send them as data; a
    /// hole that does not fit in <paramref name="segments"/> is zero-filled and reported as data.
    /// </summary>
    ValueTask<int> ReadSegmentsAsync(long offset, Memory<byte> destination, Memory<Extent> segments, CancellationToken cancellationToken = default);
}

/// <summary>
/// A device that can grow while it serves (an export resized online). Growing never changes a byte
/// below the old size, the new range reads as zeros (or as whatever the storage already held
/// there, for storage the gateway did not make), and it is durable before the task completes. A
/// size at or below the current one changes nothing: a grow that was cut short can be repeated.
/// Shrinking is not offered.
/// </summary>
public interface IGrowableDevice
{
    ValueTask GrowAsync(long size, CancellationToken cancellationToken = default);
}

/// <summary>Requests held back by <see cref="IForwardingDevice.Cork"/>.</summary>
public interface IRequestBatch
{
    void Uncork();
}
