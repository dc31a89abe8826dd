namespace Gateway.Backends.S3;

/// <summary>
/// One object's worth of the disk in the cache. <see cref="DataLock"/> guards the fields and the
/// buffer; <see cref="UploadLock"/> keeps a single upload (or delete) of the object in flight, since
/// S3 is last-writer-wins by arrival and s3rver tears concurrent PUTs. Lock order: upload, then data.
/// </summary>
internal sealed class Chunk(long index)
{
    public long Index { get; } = index;

    public SemaphoreSlim DataLock { get; } = new(1, 1);

    public SemaphoreSlim UploadLock { get; } = new(1, 1);

    /// <summary>The chunk's bytes, or null when none are cached.</summary>
    public byte[]? Buffer;

    /// <summary>
    /// Which 512-byte sectors of <see cref="Buffer"/> hold the chunk's content, while the object has
    /// not been read; null when all do. Sector-aligned writes to an existing object land without
    /// reading it: the one read-modify-write happens when the chunk is uploaded or read.
    /// </summary>
    public ulong[]? Valid;

    /// <summary>Bumped by every change to the buffer.</summary>
    public long Version;

    /// <summary>The version the store holds.</summary>
    public long CleanVersion;

    /// <summary>Bytes written since the last upload began: a chunk's worth starts the next one.</summary>
    public long WrittenBytes;

    public long DirtySince;

    public long LastUse;

    /// <summary>Set under both locks when the entry leaves the cache; holders of a stale reference start over.</summary>
    public bool Evicted;

    public int UploadQueued;

    public bool IsDirty => Volatile.Read(ref Version) != Volatile.Read(ref CleanVersion);
}
