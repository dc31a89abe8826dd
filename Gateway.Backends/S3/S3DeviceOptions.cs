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

    /// <summary>
    /// Writes go to a write-ahead log of segment objects (<see cref="S3LogBackend"/>) instead of the
    /// write-back cache of whole chunks. Off by default until the log path has compaction.
    /// </summary>
    public bool WriteLog { get; init; }

    /// <summary>A log segment is sealed and stored once it holds this many bytes.</summary>
    public int LogSegmentBytes { get; init; } = 4 << 20;

    /// <summary>A log segment is sealed and stored once its first record is this old, FLUSH or not.</summary>
    public TimeSpan LogSegmentDelay { get; init; } = TimeSpan.FromMilliseconds(20);

    /// <summary>Memory for log segments not yet stored; writers wait beyond it.</summary>
    public long LogDirtyBytes { get; init; } = 64L << 20;

    /// <summary>
    /// Compaction folds the log into the chunk objects once the stored segments hold this many bytes:
    /// with the chunks, the bucket holds at most the disk's allocated chunks plus this much log, plus
    /// what is written while a compaction runs.
    /// </summary>
    public long LogCompactBytes { get; init; } = 256L << 20;

    /// <summary>An export with a log and no write for this long is compacted (a quiet disk ends as plain chunk objects).</summary>
    public TimeSpan LogCompactIdle { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Dispose (a graceful stop) compacts the log, for at most <see cref="LogCompactCloseTimeout"/>.</summary>
    public bool LogCompactOnClose { get; init; } = true;

    /// <summary>How long a graceful stop may spend compacting; a stop cut short leaves a consistent log that the next open replays.</summary>
    public TimeSpan LogCompactCloseTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The extent index is checkpointed to the bucket after this many segments are stored since the
    /// last checkpoint or fold, so an open reads the checkpoint and replays only the segments after it.
    /// </summary>
    public int LogCheckpointSegments { get; init; } = 256;

    /// <summary>
    /// The write log's read cache: memory for blocks of segment and chunk objects read by ranged GETs
    /// (and of segments leaving the <see cref="CacheBytes"/> window of recently stored ones), least
    /// recently used out first. 0 turns it off: every read past the window is a GET.
    /// </summary>
    public long ReadCacheBytes { get; init; } = 256L << 20;

    /// <summary>
    /// A local folder for the read cache's disk tier (<see cref="S3DiskCache"/>): blocks the memory
    /// tier evicts are kept there, up to <see cref="ReadDiskCacheBytes"/>, and read before a GET. The
    /// export owns the folder while open and empties it of cache files at open. Null: no disk tier.
    /// </summary>
    public string? ReadDiskCachePath { get; init; }

    public const long DefaultReadDiskCacheBytes = 1L << 30;

    /// <summary>The disk tier's bound: bytes of cached blocks in <see cref="ReadDiskCachePath"/>.</summary>
    public long ReadDiskCacheBytes { get; init; } = DefaultReadDiskCacheBytes;

    /// <summary>The read cache's block: the least a GET through the cache reads. A power of two, at least 512.</summary>
    public int ReadCacheBlockBytes { get; init; } = 64 << 10;

    /// <summary>
    /// How far ahead of sequential reads the write log fetches into the read cache (in GETs of at
    /// most 1 MiB, in parallel); 0 turns read-ahead off. Needs the read cache.
    /// </summary>
    public long ReadAheadBytes { get; init; } = 8L << 20;

    /// <summary>The object key of chunk <paramref name="index"/>: nbdkit's <c>KEY/%016x</c>.</summary>
    public static string Key(string prefix, long index) => $"{prefix}/{index:x16}";

    /// <summary>
    /// One store call under an export's parallelism limit (<paramref name="io"/>): a failure other
    /// than the caller's own cancellation becomes EIO naming the call and the object. Both S3
    /// devices make every store call through it.
    /// </summary>
    internal static async Task<int> StoreCallAsync(SemaphoreSlim io, Func<Task<int>> call, string what, string key, CancellationToken ct)
    {
        await io.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            return await call().ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            throw;
        }
        catch (Exception e) when (e is not BlockDeviceException)
        {
            throw new BlockDeviceException(BlockErrorKind.Io, $"S3 {what} of {key} failed: {e.Message}", e);
        }
        finally
        {
            io.Release();
        }
    }

    /// <summary>
    /// How many of <paramref name="length"/> bytes from <paramref name="start"/> in chunk
    /// <paramref name="index"/> its object must hold: all of them, except past the disk's end (an
    /// image cut into objects by another tool may end its last object there).
    /// </summary>
    internal static long BytesDue(long index, int objectShift, int start, int length, long diskSize) =>
        Math.Clamp(diskSize - ((index << objectShift) + start), 0, length);

    /// <summary>
    /// A chunk object that ended before a read's range did (and before the disk's end). The gateway
    /// (and nbdkit's S3 plugin) store every chunk whole, object-size bytes, so a shorter one was stored in part: a store that does not
    /// replace objects whole (stock s3rver truncates the object when a PUT starts, so a PUT cut off
    /// halfway leaves its first bytes). Its missing bytes are lost, not zeros.
    /// </summary>
    internal static BlockDeviceException TornChunk(string key, long start, int read, int objectSize) =>
        new(BlockErrorKind.Io,
            $"S3 object {key} ends {(read > 0 ? $"at byte {start + read}" : $"at or before byte {start}")}, but a chunk is {objectSize} bytes: it was stored in part (the store kept a PUT that did not finish), so its missing bytes cannot be read as zeros");
}
