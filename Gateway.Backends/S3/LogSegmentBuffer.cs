namespace Gateway.Backends.S3;

/// <summary>
/// One write-log segment in memory: open (records appended under the log's lock), sealed and on
/// its way to the store, or durable. A durable segment keeps its bytes while it is in the read cache;
/// after that reads GET ranges of its object. The extent index points at these, so a read never
/// needs to know which state the segment is in: <see cref="Buffer"/> or the object.
/// </summary>
internal sealed class LogSegmentBuffer(long term, long seq, string key)
{
    public long Term { get; } = term;

    public long Seq { get; } = seq;

    public string Key { get; } = key;

    /// <summary>
    /// The segment's bytes; replaced by a longer copy as an open segment grows (an older array still
    /// holds the same bytes for everything appended before the copy, so a reader holding it is right).
    /// Null once a durable segment leaves the read cache.
    /// </summary>
    public volatile byte[]? Buffer;

    /// <summary>Bytes appended (header and records; with the trailer once sealed).</summary>
    public int Length;

    public int Records;

    /// <summary>Dirty bytes charged for it, given back when it is durable.</summary>
    public long Charged;

    public long OpenedAt;

    public bool Sealed;

    public volatile bool Durable;

    /// <summary>The upload in flight or done; a faulted one is replaced by the next attempt.</summary>
    public Task? Upload;

    public long FailedAt;

    /// <summary>Set once compaction has folded the segment and deleted its object: a read that still held it looks in the index again.</summary>
    public volatile bool Folded;
}
