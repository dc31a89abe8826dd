namespace Gateway.Backends.S3;

/// <summary>
/// An S3 disk written through a write-ahead log (issue 18, first step): small random writes become
/// sequential segment objects <c>PREFIX/log/&lt;term&gt;-&lt;seq&gt;</c> (<see cref="LogSegment"/>) over the
/// base chunk objects <c>PREFIX/%016x</c> of <see cref="S3Backend"/>, into which compaction
/// (<see cref="CompactAsync"/>) folds the segments.
/// <para>
/// Writes, and TRIM / WRITE_ZEROES as data-less records, are appended to the open segment in memory
/// and recorded in the <see cref="ExtentIndex"/>. A segment is sealed and PUT when a FLUSH or FUA
/// comes, when it reaches <see cref="S3DeviceOptions.LogSegmentBytes"/>, or when its first record is
/// <see cref="S3DeviceOptions.LogSegmentDelay"/> old. Segments upload in parallel; FLUSH and FUA reply
/// once their segment and every earlier one are stored. Writes acknowledged before a FLUSH live only in
/// memory, as in a disk's write cache. Dirty memory (segments not yet stored) is bounded by
/// <see cref="S3DeviceOptions.LogDirtyBytes"/>: writers wait beyond it.
/// </para>
/// <para>
/// Open lists the prefix once, then replays the segments in key order (term, then sequence). Within a
/// term, replay stops at the first missing, torn or corrupt segment: FLUSH never acknowledges a segment
/// before every earlier one is stored, so what follows a gap was never flushed. Each open takes a term
/// above every term in the bucket and starts at sequence 0, so it never overwrites a segment a previous
/// owner left.
/// </para>
/// <para>
/// Fencing (<see cref="LogSegment.FenceKey"/>): a writable open stores a claim of its term before it
/// lists, and, before it returns, the complete fence: where each older term's replayed segments end.
/// Replay ignores an older term's segments past the newest complete fence's end for it (a stale
/// writer's, never seen by the owner that wrote the fence). A FLUSH or FUA, once stored, GETs the
/// fence of the next term (one GET per batch) and fails with EIO if it exists; so does everything
/// after it, and compaction checks before each chunk write. Guaranteed: a stale writer's acknowledged
/// FLUSH was stored before the new owner's claim, hence before its listing, hence replayed. Left: a
/// stale compaction's chunk PUT in flight between its check and the PUT, and two opens racing for one
/// term; both need a conditional PUT (or the cluster's lease).
/// </para>
/// <para>
/// Index checkpoints (<see cref="CheckpointAsync"/>, <see cref="LogSegment.CheckpointKey"/>): every
/// <see cref="S3DeviceOptions.LogCheckpointSegments"/> stored segments the index is stored with the
/// segments it covers, once every segment below its mark is stored; an open loads the newest whole
/// one above the fold marker and replays only later segments. A torn one is passed over.
/// </para>
/// </summary>
public sealed class S3LogBackend : IBlockDevice, IGrowableDevice
{
    private const int MinRoom = LogSegment.RecordHeaderSize + 512;
    private const int TornReadAttempts = 3;
    private const int TornReadDelayMs = 100;

    private readonly IObjectStore _store;
    private readonly bool _ownsStore;
    private readonly string _prefix;
    private readonly int _objectSize;
    private readonly int _objectShift;
    private readonly int _segmentBytes;
    private readonly long _segmentDelayMs;
    private readonly long _dirtyLimit;
    private readonly long _cacheLimit;
    private readonly SemaphoreSlim _io;

    /// <summary>
    /// Store calls of compaction and checkpoints take one of these before one of <see cref="_io"/>:
    /// at most half the parallelism. A pass over random writes queues a ranged GET per extent,
    /// thousands of them; in one FIFO with the clients' calls, a FLUSH's segment PUT waited behind
    /// all of them (`--fsync=32` fell from 2,700 to 3 IOPS while a pass ran, ops/bench-s3).
    /// </summary>
    private readonly SemaphoreSlim _backgroundIo;

    /// <summary>True in the flow of a compaction pass or a checkpoint (see <see cref="_backgroundIo"/>).</summary>
    private static readonly AsyncLocal<bool> s_background = new();

    private readonly int _parallelism;
    private readonly ExtentIndex _index = new();
    private readonly ChunkMap _base;
    private readonly Lock _log = new();
    private readonly List<LogSegmentBuffer> _pending = []; // sealed, not yet stored, in sequence order
    private readonly Queue<LogSegmentBuffer> _cache = new(); // stored and still holding their bytes, oldest first
    private readonly Timer? _timer;
    private readonly S3ReadCache _readCache;
    private readonly System.Collections.Concurrent.ConcurrentDictionary<long, long> _chunkVersions = new(); // chunk index -> rewrites by compaction
    private readonly long _readAhead;
    private readonly Lock _sequential = new();
    private long _sequentialEnd = -1; // where the last read ended, or the furthest of a sequential stream
    private int _sequentialRun;
    private int _sequentialLength;
    private long _aheadTo;
    private TaskCompletionSource _spaceFreed = NewSignal();
    private LogSegmentBuffer? _open;
    private long _term;
    private long _nextSeq;
    private long _dirty;
    private long _cachedBytes;
    private long _backgroundFailures;
    private long _size;
    private volatile bool _disposed;
    private volatile bool _closing;

    // Set once the open has replayed the log: the timer runs from the constructor, and a background
    // pass or checkpoint started during the replay would see part of the index and then delete (or
    // list) every segment replayed by the time it ends, folded or not.
    private volatile bool _opened;

    // Compaction (one pass at a time): the stored segments not yet folded, in the bucket's order of
    // nothing in particular; keys to delete once the next fold marker is stored; the newest marker.
    private readonly SemaphoreSlim _compacting = new(1, 1);
    private readonly List<LogSegmentBuffer> _stored = [];
    private readonly List<string> _garbage = [];
    private readonly long _compactBytes;
    private readonly long _compactIdleMs;
    private readonly bool _compactOnClose;
    private readonly TimeSpan _compactCloseTimeout;
    private (long Term, long Seq) _foldedBelow;
    private string? _foldKey;
    private long _logBytes;
    private long _lastWrite = Environment.TickCount64;
    private long _retryCompactAt;
    private long _compactions;
    private long _compactionFailures;
    private Task? _background;

    // Fencing: the higher term found in the bucket (0 while none), after which this instance stores
    // and acknowledges nothing; FLUSH / FUA checks share one LIST per batch (tickets).
    private readonly SemaphoreSlim _fenceCheck = new(1, 1);
    private long _fencedBy;
    private long _fenceRequests;
    private long _fenceCheckedThrough;

    // Index checkpoints: written after _checkpointSegments stored segments, one at a time with compaction.
    private readonly int _checkpointSegments;
    private int _storedSinceCheckpoint;
    private string? _checkpointKey;
    private (long Term, long Seq) _checkpointMark;
    private bool _checkpointRunning; // a background checkpoint is on its way (under _log)
    private long _checkpoints;
    private long _checkpointFailures;

    private S3LogBackend(IObjectStore store, bool ownsStore, string prefix, long size, bool readOnly, S3DeviceOptions options, S3DiskCache? diskCache)
    {
        _store = store;
        _ownsStore = ownsStore;
        _prefix = prefix;
        _size = size;
        IsReadOnly = readOnly;
        _objectSize = options.ObjectSize;
        _objectShift = System.Numerics.BitOperations.Log2((uint)options.ObjectSize);
        _segmentBytes = options.LogSegmentBytes;
        _segmentDelayMs = Math.Max(1, (long)options.LogSegmentDelay.TotalMilliseconds);
        _dirtyLimit = options.LogDirtyBytes;
        _cacheLimit = options.CacheBytes;
        _parallelism = options.Parallelism;
        _compactBytes = options.LogCompactBytes;
        _compactIdleMs = Math.Max(1, (long)options.LogCompactIdle.TotalMilliseconds);
        _compactOnClose = options.LogCompactOnClose;
        _compactCloseTimeout = options.LogCompactCloseTimeout;
        _checkpointSegments = options.LogCheckpointSegments;
        _io = new SemaphoreSlim(options.Parallelism, options.Parallelism);
        _backgroundIo = new SemaphoreSlim(Math.Max(1, options.Parallelism / 2));
        _readCache = new S3ReadCache(options.ReadCacheBytes, options.ReadCacheBlockBytes, 1 << 20,
            (key, start, destination, ct) => StoreAsync(() => _store.GetAsync(key, start, destination, ct), "GET", key, ct),
            diskCache);
        _readAhead = _readCache.Enabled ? Math.Max(0, options.ReadAheadBytes) : 0;
        _base = new ChunkMap((size + _objectSize - 1) >> _objectShift);
        if (!readOnly)
        {
            TimeSpan period = TimeSpan.FromMilliseconds(Math.Clamp(_segmentDelayMs / 2, 2, 250));
            _timer = new Timer(_ => OnTimer(), null, period, period);
        }
    }

    /// <summary>Lists the prefix and replays its log; fails (EIO) when the store cannot be read, since a disk without its log would be stale.</summary>
    public static async Task<S3LogBackend> OpenAsync(IObjectStore store, string prefix, long size, bool readOnly, S3DeviceOptions options,
        bool ownsStore = true, CancellationToken cancellationToken = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        if (options.ObjectSize < 512 || !int.IsPow2(options.ObjectSize))
        {
            throw new ArgumentException($"object size {options.ObjectSize} must be a power of two of at least 512", nameof(options));
        }
        ArgumentOutOfRangeException.ThrowIfLessThan(options.Parallelism, 1, nameof(options));
        ArgumentOutOfRangeException.ThrowIfLessThan(options.LogSegmentBytes, 64 << 10, nameof(options));
        ArgumentOutOfRangeException.ThrowIfLessThan(options.LogDirtyBytes, (long)options.LogSegmentBytes, nameof(options));
        S3DiskCache? diskCache = options.ReadDiskCachePath is { } folder && options.ReadCacheBytes >= options.ReadCacheBlockBytes
            ? await S3DiskCache.OpenAsync(folder, options.ReadDiskCacheBytes, cancellationToken).ConfigureAwait(false)
            : null;
        S3LogBackend device;
        try
        {
            device = new S3LogBackend(store, ownsStore, prefix.TrimEnd('/'), size, readOnly, options, diskCache);
        }
        catch
        {
            diskCache?.Dispose();
            throw;
        }
        try
        {
            if (!readOnly)
            {
                await device.ClaimTermAsync(cancellationToken).ConfigureAwait(false);
            }
            await device.ReplayAsync(cancellationToken).ConfigureAwait(false);
            device._opened = true;
        }
        catch
        {
            device.Dispose();
            throw;
        }
        return device;
    }

    public long Size => Volatile.Read(ref _size);

    public bool IsReadOnly { get; }

    public BlockCapabilities Capabilities => IsReadOnly
        ? BlockCapabilities.Cache | BlockCapabilities.Flush
        : BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero | BlockCapabilities.Cache | BlockCapabilities.Flush;

    /// <summary>The term this instance writes its segments under.</summary>
    public long Term => _term;

    /// <summary>Segments replayed at open.</summary>
    public int ReplayedSegments { get; private set; }

    /// <summary>Segments found at open and not replayed: torn, corrupt, after a gap in their term, or stale.</summary>
    public int IgnoredSegments { get; private set; }

    /// <summary>Segments found at open past their term's end in the newest fence: a stale writer's, never replayed.</summary>
    public int StaleSegments { get; private set; }

    /// <summary>Segments taken from an index checkpoint at open, not replayed one by one.</summary>
    public int CheckpointedSegments { get; private set; }

    /// <summary>Index checkpoints stored by this instance, and background ones that failed.</summary>
    public long Checkpoints => Interlocked.Read(ref _checkpoints);

    public long CheckpointFailures => Interlocked.Read(ref _checkpointFailures);

    /// <summary>The next term, once its owner's fence was found: this instance stores and acknowledges nothing more. 0 while none.</summary>
    public long FencedBy => Interlocked.Read(ref _fencedBy);

    /// <summary>The read cache's bytes, hits, misses and GETs (tests, metrics).</summary>
    public long ReadCacheBytes => _readCache.Bytes;

    public long ReadCacheHits => _readCache.Hits;

    public long ReadCacheMisses => _readCache.Misses;

    public long ReadCacheGets => _readCache.Gets;

    /// <summary>The read cache's disk tier (<see cref="S3DeviceOptions.ReadDiskCachePath"/>), null without one (tests, metrics).</summary>
    internal S3DiskCache? ReadDiskCache => _readCache.Disk;

    /// <summary>Bytes of segments not yet stored (the open one included).</summary>
    public long DirtyBytes => Interlocked.Read(ref _dirty);

    /// <summary>Segment uploads that failed in the background (retried by the next FLUSH or the timer).</summary>
    public long BackgroundFailures => Interlocked.Read(ref _backgroundFailures);

    /// <summary>Extents in the index (tests, metrics).</summary>
    public long IndexExtents => _index.Count;

    /// <summary>Bytes of the stored segments not yet folded into chunks: the log's share of the bucket.</summary>
    public long LogBytes
    {
        get
        {
            lock (_log)
            {
                return _logBytes;
            }
        }
    }

    /// <summary>Compaction passes that finished.</summary>
    public long Compactions => Interlocked.Read(ref _compactions);

    /// <summary>Background compaction passes that failed (retried a few seconds later).</summary>
    public long CompactionFailures => Interlocked.Read(ref _compactionFailures);

    /// <summary>Every segment whose key sorts below this (term, seq) is folded into the chunks: the newest fold marker.</summary>
    public (long Term, long Seq) FoldedBelow
    {
        get
        {
            lock (_log)
            {
                return _foldedBelow;
            }
        }
    }

    // ---------------------------------------------------------------- open

    private async Task ReplayAsync(CancellationToken ct)
    {
        string listPrefix = _prefix + "/";
        var segments = new List<(long Term, long Seq, string Key)>();
        var markers = new List<(long Term, long Seq, string Key)>();
        var fences = new List<(long Term, string Key)>();
        var checkpoints = new List<(long Term, long Seq, string Key)>();
        try
        {
            await foreach (string key in _store.ListAsync(listPrefix, ct).ConfigureAwait(false))
            {
                if (LogSegment.TryParseKey(_prefix, key, out long term, out long seq))
                {
                    segments.Add((term, seq, key));
                    continue;
                }
                if (LogSegment.TryParseFoldKey(_prefix, key, out term, out seq))
                {
                    markers.Add((term, seq, key));
                    continue;
                }
                if (LogSegment.TryParseFenceKey(_prefix, key, out term))
                {
                    fences.Add((term, key));
                    continue;
                }
                if (LogSegment.TryParseCheckpointKey(_prefix, key, out term, out seq))
                {
                    checkpoints.Add((term, seq, key));
                    continue;
                }
                ReadOnlySpan<char> name = key.AsSpan(listPrefix.Length);
                if (name.Length == 16 && long.TryParse(name, System.Globalization.NumberStyles.AllowHexSpecifier, null, out long index) &&
                    index >= 0 && index < _base.ChunkCount)
                {
                    _base.Set(index, true);
                }
            }
        }
        catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
        {
            throw new BlockDeviceException(BlockErrorKind.Io, $"S3 listing of '{listPrefix}' failed: {e.Message}", e);
        }
        if (IsReadOnly)
        {
            // Above every term in the bucket (a reader writes nothing; the figure is for tests and logs).
            _term = Math.Max(Math.Max(segments.Count == 0 ? 0 : segments.Max(s => s.Term), markers.Count == 0 ? 0 : markers.Max(m => m.Term)),
                fences.Count == 0 ? 0 : fences.Max(f => f.Term)) + 1;
        }
        else if (fences.Exists(f => f.Term > _term) || segments.Exists(s => s.Term >= _term) || markers.Exists(m => m.Term >= _term))
        {
            throw new BlockDeviceException(BlockErrorKind.Io, $"another owner opened the write log of {_prefix} while this one opened it under term {_term}");
        }

        // The newest complete fence below this owner's says where each older term ends: a segment at
        // or past its term's end (0 for a term it does not name) is a stale writer's. None (a bucket
        // from before fencing): every term replays as far as it is whole.
        long fenceTerm = 0;
        var fenceEnds = new Dictionary<long, long>();
        foreach ((long term, string key) in fences.Where(f => f.Term != _term || IsReadOnly).OrderByDescending(f => f.Term))
        {
            if (await IsCompleteFenceAsync(key, term, fenceEnds, ct).ConfigureAwait(false))
            {
                fenceTerm = term;
                break;
            }
        }
        if (fenceTerm == 0)
        {
            fenceEnds.Clear();
        }

        // The newest whole marker says which segments are folded; an older one is stale, a torn one
        // (its PUT cut off) never counted, and both are leftovers like the segments below the mark.
        var leftovers = new List<string>();
        markers.Sort((a, b) => a.Term != b.Term ? b.Term.CompareTo(a.Term) : b.Seq.CompareTo(a.Seq));
        foreach ((long term, long seq, string key) in markers)
        {
            if (_foldKey is null && await IsFoldMarkerAsync(key, term, seq, ct).ConfigureAwait(false))
            {
                _foldedBelow = (term, seq);
                _foldKey = key;
            }
            else
            {
                leftovers.Add(key);
            }
        }
        leftovers.AddRange(segments.Where(s => IsBelow(s.Term, s.Seq, _foldedBelow)).Select(s => s.Key));
        segments.RemoveAll(s => IsBelow(s.Term, s.Seq, _foldedBelow));
        segments.Sort((a, b) => a.Term != b.Term ? a.Term.CompareTo(b.Term) : a.Seq.CompareTo(b.Seq));
        var ends = new Dictionary<long, long>(); // each replayed term's first sequence number not replayed: this owner's fence

        // The newest whole checkpoint above the fold mark (and not a stale writer's, past its term's
        // fence end) stands for every segment below its mark: those it lists are loaded from it,
        // the others there are garbage. A torn or corrupt one, or one naming a segment that is not
        // there, is passed over: the segments replay as without it.
        (long Term, long Seq) start = _foldedBelow;
        checkpoints.Sort((a, b) => a.Term != b.Term ? b.Term.CompareTo(a.Term) : b.Seq.CompareTo(a.Seq));
        var listed = segments.ToDictionary(x => (x.Term, x.Seq), x => x.Key);
        foreach ((long term, long seq, string key) in checkpoints)
        {
            bool usable = start == _foldedBelow && IsBelow(_foldedBelow.Term, _foldedBelow.Seq, (term, seq)) &&
                          !(term < fenceTerm && seq > fenceEnds.GetValueOrDefault(term));
            if (usable && await TryLoadCheckpointAsync(key, term, seq, listed, ends, ct).ConfigureAwait(false))
            {
                start = (term, seq);
                _checkpointKey = key;
                _checkpointMark = start;
                continue;
            }
            leftovers.Add(key);
        }
        if (start != _foldedBelow)
        {
            var loaded = _stored.Select(x => x.Key).ToHashSet(StringComparer.Ordinal);
            foreach ((long _, long _, string key) in segments.Where(x => IsBelow(x.Term, x.Seq, start)))
            {
                if (!loaded.Contains(key))
                {
                    IgnoredSegments++;
                    _garbage.Add(key);
                }
            }
            segments.RemoveAll(x => IsBelow(x.Term, x.Seq, start));
        }
        bool IsStale((long Term, long Seq, string Key) s) => s.Term < fenceTerm && s.Seq >= fenceEnds.GetValueOrDefault(s.Term);
        foreach ((long _, long _, string key) in segments.Where(IsStale))
        {
            // Never replayed, never folded: garbage, deleted once a fold marker of this owner's term covers it.
            StaleSegments++;
            IgnoredSegments++;
            _garbage.Add(key);
        }
        segments.RemoveAll(IsStale);

        // Fetched a window ahead in parallel, applied strictly in order.
        var fetches = new Queue<Task<(byte[] Data, int Length)>>();
        int next = 0;
        long skipTerm = -1;
        long expected = -1;
        var records = new List<LogRecord>();
        for (int i = 0; i < segments.Count; i++)
        {
            while (next < segments.Count && fetches.Count < _parallelism)
            {
                fetches.Enqueue(FetchSegmentAsync(segments[next++].Key, ct));
            }
            (byte[] data, int length) = await fetches.Dequeue().ConfigureAwait(false);
            (long term, long seq, string key) = segments[i];
            if (term == skipTerm)
            {
                IgnoredSegments++;
                _garbage.Add(key);
                continue;
            }
            bool firstOfTerm = i == 0 || segments[i - 1].Term != term;
            if (firstOfTerm)
            {
                // A term starts at 0, or where the fold marker says its folded part ends.
                expected = term == start.Term ? start.Seq : 0;
                ends[term] = expected;
            }
            if (seq != expected || length < 0 || !LogSegment.TryDecode(data.AsSpan(0, length), term, seq, records))
            {
                // A gap or a torn segment: nothing after it in this term was ever flushed. Its
                // object is garbage, deleted once a fold marker of this owner's term covers it.
                skipTerm = term;
                IgnoredSegments++;
                _garbage.Add(key);
                continue;
            }
            expected = seq + 1;
            ends[term] = expected;
            var segment = new LogSegmentBuffer(term, seq, key) { Length = length, Records = records.Count, Sealed = true, Durable = true };
            foreach (LogRecord record in records)
            {
                long end = Math.Min(record.Offset + record.Length, Size);
                if (record.Offset >= end)
                {
                    continue;
                }
                ExtentSource source = record.Kind switch
                {
                    LogRecordKind.Write => ExtentSource.Segment,
                    LogRecordKind.Zero => ExtentSource.Zero,
                    _ => ExtentSource.Trim,
                };
                _index.Set(record.Offset, end - record.Offset, source, source == ExtentSource.Segment ? segment : null, record.DataOffset);
            }
            // A short segment (a trim, a FLUSH of a few writes) is not worth a segment-sized buffer in the cache.
            segment.Buffer = length >= data.Length / 2 ? data : data.AsSpan(0, length).ToArray();
            lock (_log)
            {
                AddToCacheLocked(segment, toReadCache: false); // an open's replay order is no reason to keep old segments
                _stored.Add(segment);
                _logBytes += length;
            }
            ReplayedSegments++;
        }
        if (!IsReadOnly)
        {
            // Stored before the open returns, so before anything is acknowledged. Older fences stay (one
            // small object per open): a writer of term t is fenced by the object of term t + 1.
            byte[] fence = LogSegment.Fence(_term, ends);
            await PutObjectAsync(LogSegment.FenceKey(_prefix, _term), fence, fence.Length).ConfigureAwait(false);
            await DeleteLeftoversAsync(leftovers, ct).ConfigureAwait(false);
        }
    }

    /// <summary>Loads a checkpoint into the index and the stored segments; false (nothing loaded) when it is torn, corrupt or names a missing segment.</summary>
    private async Task<bool> TryLoadCheckpointAsync(string key, long term, long seq, Dictionary<(long, long), string> listed,
        Dictionary<long, long> ends, CancellationToken ct)
    {
        var segments = new List<LogSegment.CheckpointSegment>();
        var extents = new List<LogSegment.CheckpointExtent>();
        try
        {
            for (int size = 64 << 10; ; size *= 2)
            {
                byte[] buffer = GC.AllocateUninitializedArray<byte>(size);
                int n = await StoreAsync(() => _store.GetAsync(key, 0, buffer, ct), "GET", key, ct).ConfigureAwait(false);
                if (n < buffer.Length)
                {
                    if (n < 0 || !LogSegment.TryDecodeCheckpoint(buffer.AsSpan(0, n), term, seq, segments, extents))
                    {
                        return false;
                    }
                    break;
                }
            }
        }
        catch (BlockDeviceException e) when (e.InnerException is HttpIOException { HttpRequestError: HttpRequestError.ResponseEnded })
        {
            return false;
        }
        var buffers = new LogSegmentBuffer[segments.Count];
        for (int i = 0; i < segments.Count; i++)
        {
            LogSegment.CheckpointSegment s = segments[i];
            if (!listed.TryGetValue((s.Term, s.Seq), out string? segmentKey) || !IsBelow(s.Term, s.Seq, (term, seq)))
            {
                return false;
            }
            buffers[i] = new LogSegmentBuffer(s.Term, s.Seq, segmentKey) { Length = s.Length, Records = 1, Sealed = true, Durable = true };
        }
        foreach (LogSegment.CheckpointExtent extent in extents)
        {
            long end = Math.Min(extent.Offset + extent.Length, Size);
            if (extent.Offset < end)
            {
                _index.Set(extent.Offset, end - extent.Offset, (ExtentSource)extent.Source, extent.Segment < 0 ? null : buffers[extent.Segment], extent.SegmentOffset);
            }
        }
        lock (_log)
        {
            foreach (LogSegmentBuffer buffer in buffers)
            {
                _stored.Add(buffer);
                _logBytes += buffer.Length;
                // This owner's fence names every term the checkpoint holds: a later open that cannot read it still keeps them.
                ends[buffer.Term] = Math.Max(ends.GetValueOrDefault(buffer.Term), buffer.Seq + 1);
            }
        }
        ends[term] = Math.Max(ends.GetValueOrDefault(term), seq);
        CheckpointedSegments = buffers.Length;
        return true;
    }

    /// <summary>
    /// Takes a term above every term in the bucket and stores its claim before the open lists the
    /// bucket to replay it: a stale writer whose FLUSH check runs after the claim fails; one whose
    /// check ran before it had its segments stored before the listing, so they are replayed.
    /// </summary>
    private async Task ClaimTermAsync(CancellationToken ct)
    {
        long newest = 0;
        string logPrefix = _prefix + "/log/";
        try
        {
            await foreach (string key in _store.ListAsync(logPrefix, ct).ConfigureAwait(false))
            {
                // Markers too: segments under a term at or below a marker's would be skipped.
                if (LogSegment.TryParseKey(_prefix, key, out long term, out _) || LogSegment.TryParseFoldKey(_prefix, key, out term, out _) ||
                    LogSegment.TryParseFenceKey(_prefix, key, out term))
                {
                    newest = Math.Max(newest, term);
                }
            }
        }
        catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
        {
            throw new BlockDeviceException(BlockErrorKind.Io, $"S3 listing of '{logPrefix}' failed: {e.Message}", e);
        }
        _term = newest + 1;
        byte[] claim = LogSegment.Fence(_term, null);
        await PutObjectAsync(LogSegment.FenceKey(_prefix, _term), claim, claim.Length).ConfigureAwait(false);
    }

    private async Task<bool> IsCompleteFenceAsync(string key, long term, Dictionary<long, long> ends, CancellationToken ct)
    {
        try
        {
            for (int size = 4 << 10; ; size *= 2)
            {
                byte[] buffer = new byte[size];
                int n = await StoreAsync(() => _store.GetAsync(key, 0, buffer, ct), "GET", key, ct).ConfigureAwait(false);
                if (n < buffer.Length)
                {
                    // Missing (deleted since the listing), torn, corrupt, or a claim whose owner died before replay: none bounds anything.
                    return n >= 0 && LogSegment.TryDecodeFence(buffer.AsSpan(0, n), term, out bool complete, ends) && complete;
                }
            }
        }
        catch (BlockDeviceException e) when (e.InnerException is HttpIOException { HttpRequestError: HttpRequestError.ResponseEnded })
        {
            return false;
        }
    }

    /// <summary>
    /// Before a FLUSH or FUA is acknowledged: is there a higher term in the bucket? One check answers
    /// every request that arrived before it started (tickets taken after the request's segments are
    /// stored), so a batch of FLUSHes costs one GET.
    /// </summary>
    private async Task CheckFenceForAckAsync(CancellationToken ct)
    {
        long ticket = Interlocked.Increment(ref _fenceRequests);
        await _fenceCheck.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            if (Interlocked.Read(ref _fenceCheckedThrough) < ticket)
            {
                long covers = Interlocked.Read(ref _fenceRequests);
                await CheckFenceAsync(ct).ConfigureAwait(false);
                Interlocked.Exchange(ref _fenceCheckedThrough, covers);
            }
        }
        finally
        {
            _fenceCheck.Release();
        }
        ThrowIfFenced();
    }

    /// <summary>
    /// Looks for the fence of the next term now: every writable open stores its claim before it takes
    /// any other key, and takes the term above the newest key it lists, so any owner newer than this
    /// one means the object of term + 1 exists (fences are never deleted; a torn claim counts too). One
    /// GET of a key, where a LIST would cost a walk of the prefix (12 ms a FUA on s3rver, against 4).
    /// A newer owner fences this one off for good (EIO from then on).
    /// </summary>
    private async Task CheckFenceAsync(CancellationToken ct)
    {
        ThrowIfFenced();
        string key = LogSegment.FenceKey(_prefix, _term + 1);
        byte[] probe = new byte[1];
        int n = await StoreAsync(() => _store.GetAsync(key, 0, probe, ct), "GET", key, ct).ConfigureAwait(false);
        if (n >= 0)
        {
            Interlocked.CompareExchange(ref _fencedBy, _term + 1, 0);
        }
        ThrowIfFenced();
    }

    private void ThrowIfFenced()
    {
        long by = Interlocked.Read(ref _fencedBy);
        if (by != 0)
        {
            throw new BlockDeviceException(BlockErrorKind.Io,
                $"the write log of {_prefix} is fenced: another owner opened it under term {by}, this one writes term {_term}");
        }
    }

    private static bool IsBelow(long term, long seq, (long Term, long Seq) mark) => term < mark.Term || (term == mark.Term && seq < mark.Seq);

    private async Task<bool> IsFoldMarkerAsync(string key, long term, long seq, CancellationToken ct)
    {
        byte[] buffer = new byte[LogSegment.FoldMarkerSize + 1];
        try
        {
            int n = await StoreAsync(() => _store.GetAsync(key, 0, buffer, ct), "GET", key, ct).ConfigureAwait(false);
            return n >= 0 && LogSegment.IsFoldMarker(buffer.AsSpan(0, n), term, seq);
        }
        catch (BlockDeviceException e) when (e.InnerException is HttpIOException { HttpRequestError: HttpRequestError.ResponseEnded })
        {
            return false; // torn, as with a segment (FetchSegmentAsync)
        }
    }

    /// <summary>
    /// Deletes what a compaction cut short left behind: segments below the fold marker (already in
    /// the chunks, and skipped by replay) and older or torn markers. One that fails to go is left
    /// for the next compaction.
    /// </summary>
    private async Task DeleteLeftoversAsync(List<string> leftovers, CancellationToken ct)
    {
        await Parallel.ForEachAsync(leftovers, new ParallelOptions { MaxDegreeOfParallelism = _parallelism, CancellationToken = ct }, async (key, token) =>
        {
            try
            {
                await DeleteObjectAsync(key, token).ConfigureAwait(false);
            }
            catch (BlockDeviceException)
            {
                lock (_log)
                {
                    _garbage.Add(key);
                }
            }
        }).ConfigureAwait(false);
    }

    private Task DeleteObjectAsync(string key, CancellationToken ct) =>
        StoreAsync(async () =>
        {
            await _store.DeleteAsync(key, ct).ConfigureAwait(false);
            return 0;
        }, "DELETE", key, ct);

    /// <summary>The whole segment object; its size is not known ahead, so the buffer grows until the object fits.</summary>
    /// <remarks>
    /// A segment whose body keeps ending before its announced length (three tries) is torn: a store
    /// without atomic writes (s3rver) keeps the part of a PUT that a kill -9 cut off, and announces
    /// more than it holds. Such a PUT was never answered, so no FLUSH or FUA was acknowledged on it,
    /// and replay treats it like a segment whose checksum fails (length -1). Any other failure
    /// fails the open.
    /// </remarks>
    private async Task<(byte[] Data, int Length)> FetchSegmentAsync(string key, CancellationToken ct)
    {
        int size = _segmentBytes + LogSegment.TrailerSize + 1;
        int cut = 0;
        for (int attempt = 0; attempt < 12; attempt++)
        {
            byte[] buffer = GC.AllocateUninitializedArray<byte>(size);
            int n;
            try
            {
                n = await StoreAsync(() => _store.GetAsync(key, 0, buffer, ct), "GET", key, ct).ConfigureAwait(false);
            }
            catch (BlockDeviceException e) when (e.InnerException is HttpIOException { HttpRequestError: HttpRequestError.ResponseEnded })
            {
                if (++cut == 3)
                {
                    return (buffer, -1);
                }
                await Task.Delay(200, ct).ConfigureAwait(false);
                continue;
            }
            if (n < buffer.Length)
            {
                return (buffer, n);
            }
            size *= 2;
        }
        throw new BlockDeviceException(BlockErrorKind.Io, $"S3 segment {key} is larger than any segment this gateway writes");
    }

    // ---------------------------------------------------------------- requests

    public ValueTask GrowAsync(long size, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
        if (size > Size)
        {
            _base.Grow((size + _objectSize - 1) >> _objectShift);
            Volatile.Write(ref _size, size);
        }
        return ValueTask.CompletedTask;
    }

    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfClosed(_disposed);
        DeviceBounds.Check(offset, destination.Length, Size, BlockErrorKind.InvalidArgument);
        if (destination.IsEmpty)
        {
            return;
        }
        var pieces = new List<IndexPiece>();
        _index.Lookup(offset, destination.Length, pieces);
        ReadAhead(offset, destination.Length);
        List<Task>? fetches = null;
        foreach (IndexPiece piece in pieces)
        {
            Memory<byte> target = destination.Slice((int)(piece.Offset - offset), (int)piece.Length);
            switch (piece.Source)
            {
                case ExtentSource.Segment:
                    // Read the field once: the cache may drop the bytes at any time, the object stays.
                    if (piece.Segment!.Buffer is { } bytes)
                    {
                        bytes.AsSpan((int)piece.SegmentOffset, target.Length).CopyTo(target.Span);
                    }
                    else
                    {
                        (fetches ??= []).Add(ReadSegmentRangeAsync(piece.Segment, piece.SegmentOffset, piece.Offset, target, cached: true, cancellationToken));
                    }
                    break;
                case ExtentSource.Base:
                    (fetches ??= []).Add(ReadBaseAsync(piece.Offset, target, cancellationToken));
                    break;
                default:
                    target.Span.Clear();
                    break;
            }
        }
        if (fetches is not null)
        {
            await Task.WhenAll(fetches).ConfigureAwait(false);
        }
    }

    /// <summary>A range of a segment object: through the read cache for a client's read (segments never change), straight from the store for compaction.</summary>
    private async Task ReadSegmentRangeAsync(LogSegmentBuffer segment, long start, long diskOffset, Memory<byte> target, bool cached, CancellationToken ct)
    {
        int n = cached
            ? await _readCache.ReadAsync(segment.Key, 0, start, target, ct).ConfigureAwait(false)
            : await StoreAsync(() => _store.GetAsync(segment.Key, start, target, ct), "GET", segment.Key, ct).ConfigureAwait(false);
        if (n != target.Length && segment.Folded)
        {
            // Compaction folded the range into its chunk and deleted the segment after this read
            // looked it up: the index now says where the bytes are.
            await ReadAsync(diskOffset, target, ct).ConfigureAwait(false);
            return;
        }
        if (n != target.Length)
        {
            throw new BlockDeviceException(BlockErrorKind.Io, $"S3 segment {segment.Key} is missing or shorter than its index says ({n} of {target.Length} bytes at {start})");
        }
    }

    /// <summary>Reads the base chunk objects under a range: ranged GETs, zeros where a chunk has no object.</summary>
    private async Task ReadBaseAsync(long offset, Memory<byte> target, CancellationToken ct)
    {
        var parts = new List<Task>();
        for (int at = 0; at < target.Length;)
        {
            long index = (offset + at) >> _objectShift;
            int start = (int)((offset + at) - (index << _objectShift));
            int count = (int)Math.Min(target.Length - at, _objectSize - start);
            Memory<byte> part = target.Slice(at, count);
            if (!_base.Get(index))
            {
                part.Span.Clear();
            }
            else
            {
                parts.Add(ReadChunkRangeAsync(index, start, part, cached: true, ct));
            }
            at += count;
        }
        await Task.WhenAll(parts).ConfigureAwait(false);
    }

    /// <summary>
    /// A range of a base chunk object. Through the read cache under the chunk's version, which
    /// compaction raises once it has rewritten or deleted the object and before the index points at
    /// it for the folded ranges: a block cached from the older object is never found again.
    /// <para>
    /// A chunk object is whole (object-size bytes, or up to the disk's end), so one that ends inside the range is torn
    /// (<see cref="S3DeviceOptions.TornChunk"/>): EIO, never zeros, or compaction would store the zeros
    /// for good. Asked again twice first, uncached, in case the store shows a PUT in progress.
    /// </para>
    /// </summary>
    private async Task ReadChunkRangeAsync(long index, int start, Memory<byte> part, bool cached, CancellationToken ct)
    {
        string key = S3DeviceOptions.Key(_prefix, index);
        for (int attempt = 1; ; attempt++)
        {
            long version = _chunkVersions.GetValueOrDefault(index);
            int n = cached
                ? await _readCache.ReadAsync(key, version, start, part, ct).ConfigureAwait(false)
                : await StoreAsync(() => _store.GetAsync(key, start, part, ct), "GET", key, ct).ConfigureAwait(false);
            if (n < 0 && !_base.Get(index))
            {
                // Compaction deleted the chunk (all zeros) after this read found its bit set.
                part.Span.Clear();
                return;
            }
            if (n < 0)
            {
                // Listed at open, or stored by compaction: its absence is a loss, not zeros.
                throw new BlockDeviceException(BlockErrorKind.Io, $"S3 object {key} is missing although it was listed: refusing to read it as zeros");
            }
            if (n >= S3DeviceOptions.BytesDue(index, _objectShift, start, part.Length, Size))
            {
                part.Span[n..].Clear(); // past the disk's end
                return;
            }
            _readCache.Remove(key, version, _objectSize);
            if (attempt == TornReadAttempts)
            {
                throw S3DeviceOptions.TornChunk(key, start, n, _objectSize);
            }
            cached = false;
            await Task.Delay(TornReadDelayMs * attempt, ct).ConfigureAwait(false);
        }
    }

    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
        DeviceBounds.Check(offset, source.Length, Size, BlockErrorKind.NoSpace);
        if (source.IsEmpty)
        {
            return;
        }
        await AppendAsync(offset, source.Length, LogRecordKind.Write, source, fua, cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
        if (length > 0)
        {
            await AppendAsync(offset, length, LogRecordKind.Trim, default, fua, cancellationToken).ConfigureAwait(false);
        }
    }

    public async ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.NoSpace);
        if (length > 0)
        {
            LogRecordKind kind = (flags & ZeroFlags.NoHole) != 0 ? LogRecordKind.Zero : LogRecordKind.Trim;
            await AppendAsync(offset, length, kind, default, (flags & ZeroFlags.Fua) != 0, cancellationToken).ConfigureAwait(false);
        }
    }

    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfClosed(_disposed);
        if (IsReadOnly)
        {
            return;
        }
        LogSegmentBuffer? sealedNow;
        long through;
        lock (_log)
        {
            sealedNow = SealLocked();
            through = _nextSeq - 1;
        }
        StartUpload(sealedNow);
        await DurableThroughAsync(through, cancellationToken).ConfigureAwait(false);
        await CheckFenceForAckAsync(cancellationToken).ConfigureAwait(false);
    }

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfClosed(_disposed);
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
        if (_readCache.Enabled)
        {
            Prefetch(offset, Math.Min(length, _readCache.BlockBytes + Math.Max(_readAhead, 1L << 20))); // advisory, bounded
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfClosed(_disposed);
        DeviceBounds.CheckQuery(offset, length, Size, extents.Length);
        var pieces = new List<IndexPiece>();
        // Every piece gives at least one extent, so more than the caller's room are never needed.
        _index.Lookup(offset, length, pieces, extents.Length);
        var writer = new ExtentWriter(extents.Span);
        foreach (IndexPiece piece in pieces)
        {
            bool room = piece.Source switch
            {
                ExtentSource.Segment => writer.TryAdd(piece.Length, ExtentFlags.Data),
                ExtentSource.Zero => writer.TryAdd(piece.Length, ExtentFlags.Zero),
                ExtentSource.Trim => writer.TryAdd(piece.Length, ExtentFlags.Hole | ExtentFlags.Zero),
                _ => AddBase(ref writer, piece.Offset, piece.Length),
            };
            if (!room)
            {
                break;
            }
        }
        return ValueTask.FromResult(writer.Count);
    }

    private bool AddBase(ref ExtentWriter writer, long offset, long length)
    {
        long end = offset + length;
        long lastChunk = (end - 1 + _objectSize) >> _objectShift;
        while (offset < end)
        {
            long index = offset >> _objectShift;
            bool data = _base.Get(index);
            long next = Math.Min(end, _base.NextDifferent(index, data, lastChunk) << _objectShift);
            if (!writer.TryAdd(next - offset, data ? ExtentFlags.Data : ExtentFlags.Hole | ExtentFlags.Zero))
            {
                return false;
            }
            offset = next;
        }
        return true;
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _closing = true;
        // The disk cache's folder first: a reopen of the export may be waiting for it, and the
        // flush and compaction below need no cache.
        _readCache.Dispose();
        // Best effort for callers that did not flush: the export actor flushes before disposing.
        if (!IsReadOnly && (_open is not null || _pending.Count > 0))
        {
            try
            {
                using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                FlushAsync(timeout.Token).AsTask().GetAwaiter().GetResult();
            }
            catch (Exception e) when (e is BlockDeviceException or OperationCanceledException)
            {
            }
        }
        if (!IsReadOnly)
        {
            // A graceful stop leaves the bucket as chunk objects (what nbdkit reads), or, cut short, a
            // log the next open replays: every step of a pass leaves the bucket consistent.
            try
            {
                using var timeout = new CancellationTokenSource(_compactCloseTimeout);
                if (_compactOnClose)
                {
                    CompactAsync(timeout.Token).GetAwaiter().GetResult();
                }
                else
                {
                    _compacting.WaitAsync(timeout.Token).GetAwaiter().GetResult(); // a background pass ends before the store goes
                    _compacting.Release();
                }
            }
            catch (Exception e) when (e is BlockDeviceException or OperationCanceledException)
            {
            }
        }
        _disposed = true;
        _timer?.Dispose();
        if (_ownsStore)
        {
            _store.Dispose();
        }
    }

    /// <summary>For crash tests: stops the timer and drops every unstored segment, as a killed process would.</summary>
    internal void Abandon()
    {
        _closing = true;
        _disposed = true;
        _timer?.Dispose();
        _readCache.Dispose(); // a killed process lets go of its disk cache folder too
    }

    // ---------------------------------------------------------------- index checkpoints

    /// <summary>
    /// Stores the extent index as it is once every segment so far is stored (the open one is sealed
    /// first): <see cref="LogSegment.CheckpointKey"/> at the first sequence number after them. An open
    /// loads it and replays only the segments after its mark. One at a time with compaction, so a
    /// pass never releases extents under a snapshot; the previous checkpoint is deleted after.
    /// </summary>
    public async Task CheckpointAsync(CancellationToken cancellationToken = default)
    {
        DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
        s_background.Value = true; // this method's flow only
        await _compacting.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await CheckFenceAsync(cancellationToken).ConfigureAwait(false); // a stale writer's index holds what the owner never saw
            LogSegmentBuffer? sealedNow;
            (long Term, long Seq) mark;
            var pieces = new List<IndexPiece>();
            LogSegmentBuffer[] covered;
            lock (_log)
            {
                sealedNow = SealLocked();
                mark = (_term, _nextSeq);
                _index.Lookup(0, Size, pieces); // under the log's lock: no record lands meanwhile
                covered = [.. _stored, .. _pending];
            }
            StartUpload(sealedNow);
            if (mark == _checkpointMark || covered.Length == 0)
            {
                return;
            }
            await DurableThroughAsync(mark.Seq - 1, cancellationToken).ConfigureAwait(false);
            Array.Sort(covered, (a, b) => a.Term != b.Term ? a.Term.CompareTo(b.Term) : a.Seq.CompareTo(b.Seq));
            var numbers = new Dictionary<LogSegmentBuffer, int>(ReferenceEqualityComparer.Instance);
            var segments = new List<LogSegment.CheckpointSegment>(covered.Length);
            foreach (LogSegmentBuffer segment in covered)
            {
                numbers[segment] = segments.Count;
                segments.Add(new LogSegment.CheckpointSegment(segment.Term, segment.Seq, segment.Length));
            }
            var extents = new List<LogSegment.CheckpointExtent>(pieces.Count);
            foreach (IndexPiece piece in pieces)
            {
                if (piece.Source == ExtentSource.Base)
                {
                    continue;
                }
                int number = -1;
                if (piece.Source == ExtentSource.Segment && !numbers.TryGetValue(piece.Segment!, out number))
                {
                    throw new BlockDeviceException(BlockErrorKind.Io, $"the index of {_prefix} points at {piece.Segment!.Key}, which is not among its stored segments");
                }
                extents.Add(new LogSegment.CheckpointExtent(piece.Offset, piece.Length, (uint)piece.Source, number, piece.SegmentOffset));
            }
            ThrowIfAbandoned();
            byte[] data = LogSegment.Checkpoint(mark.Term, mark.Seq, segments, extents);
            string key = LogSegment.CheckpointKey(_prefix, mark.Term, mark.Seq);
            await PutObjectAsync(key, data, data.Length).ConfigureAwait(false);
            string? previous;
            lock (_log)
            {
                previous = _checkpointKey;
                _checkpointKey = key;
                _checkpointMark = mark;
            }
            Interlocked.Increment(ref _checkpoints);
            if (previous is not null)
            {
                await DeleteObjectAsync(previous, CancellationToken.None).ConfigureAwait(false);
            }
        }
        finally
        {
            _compacting.Release();
        }
    }

    private void MaybeStartCheckpoint()
    {
        if (IsReadOnly || _closing || !_opened || _checkpointSegments <= 0)
        {
            return;
        }
        lock (_log)
        {
            if (_storedSinceCheckpoint < _checkpointSegments || _checkpointRunning)
            {
                return;
            }
            _storedSinceCheckpoint = 0;
            _checkpointRunning = true;
            _ = Task.Run(BackgroundCheckpointAsync);
        }
    }

    private async Task BackgroundCheckpointAsync()
    {
        try
        {
            await CheckpointAsync(CancellationToken.None).ConfigureAwait(false);
        }
        catch (Exception e) when (e is BlockDeviceException or OperationCanceledException or ObjectDisposedException)
        {
            Interlocked.Increment(ref _checkpointFailures);
        }
        finally
        {
            lock (_log)
            {
                _checkpointRunning = false;
            }
        }
        // Segments stored while this one ran may have passed the threshold with no upload left to
        // see it (the writes stopped): the next one starts from here.
        MaybeStartCheckpoint();
    }

    // ---------------------------------------------------------------- compaction

    /// <summary>
    /// Folds the log into the chunk objects: every chunk the index touches is rebuilt from its
    /// current object and the index's newest extents, and PUT (or DELETEd when it is all zeros);
    /// then a fold marker records that the segments below the mark are in the chunks; then those
    /// segments are deleted. Reads and writes go on meanwhile. Waits for a pass already running.
    /// </summary>
    /// <remarks>
    /// Crash safety, step by step: (1) chunk PUTs before the marker only ever put the newest bytes
    /// (flushed or not) under the still-replayed segments, and replay lays every segment above the
    /// mark over them, so a crash here loses nothing flushed. (2) The mark is the first segment not
    /// yet stored when the pass began: every extent of a segment below it was in the index then,
    /// so its chunk was folded in this pass. (3) The marker is a new object (a torn PUT leaves the
    /// previous one), stored before any segment delete; an open skips segments below it and deletes
    /// what a crash left (those segments, older markers). (4) Chunk PUTs replace objects in place,
    /// which relies on S3's contract that a PUT replaces an object whole or not at all; on a store
    /// that keeps part of a cut-off PUT (stock s3rver), the short chunk reads as EIO, never as zeros.
    /// </remarks>
    public async Task CompactAsync(CancellationToken cancellationToken = default)
    {
        DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
        s_background.Value = true; // this method's flow only: an async method restores its caller's on return
        await _compacting.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await CompactOnceAsync(cancellationToken).ConfigureAwait(false);
            Interlocked.Increment(ref _compactions);
        }
        finally
        {
            _compacting.Release();
        }
    }

    /// <summary>Starts a background pass when the log holds the threshold, or when the export has been quiet for the idle time.</summary>
    private void MaybeStartCompaction()
    {
        if (IsReadOnly || _closing || !_opened)
        {
            return;
        }
        long now = Environment.TickCount64;
        lock (_log)
        {
            if (_background is { IsCompleted: false } || now < _retryCompactAt)
            {
                return;
            }
            bool quiet = now - Volatile.Read(ref _lastWrite) >= _compactIdleMs && (_stored.Count > 0 || _garbage.Count > 0);
            if (_logBytes < _compactBytes && !quiet)
            {
                return;
            }
            _background = Task.Run(BackgroundCompactAsync);
        }
    }

    private async Task BackgroundCompactAsync()
    {
        try
        {
            await CompactAsync(CancellationToken.None).ConfigureAwait(false);
        }
        catch (Exception e) when (e is BlockDeviceException or OperationCanceledException or ObjectDisposedException)
        {
            Interlocked.Increment(ref _compactionFailures);
            lock (_log)
            {
                _retryCompactAt = Environment.TickCount64 + 5000; // a store that is down is not asked again at once
            }
        }
    }

    private async Task CompactOnceAsync(CancellationToken ct)
    {
        // A stale writer folds nothing: its index holds writes the new owner never saw.
        await CheckFenceAsync(ct).ConfigureAwait(false);
        (long Term, long Seq) below;
        lock (_log)
        {
            // The first segment of this term not yet stored (the oldest unstored one, or the open one).
            long first = _open?.Seq ?? _nextSeq;
            foreach (LogSegmentBuffer pending in _pending)
            {
                first = Math.Min(first, pending.Seq);
            }
            below = (_term, first);
        }
        // Taken after the mark: every extent of a segment below it is in the index by now (later
        // writes go to later segments), so folding every chunk the index touches folds all of them.
        List<long> chunks = _index.Chunks(_objectShift);
        await Parallel.ForEachAsync(chunks, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, _parallelism / 2), CancellationToken = ct },
            async (index, token) => await FoldChunkAsync(index, token).ConfigureAwait(false)).ConfigureAwait(false);

        LogSegmentBuffer[] folded;
        string[] garbage;
        bool newMark;
        string? previousKey;
        lock (_log)
        {
            folded = _stored.Where(s => IsBelow(s.Term, s.Seq, below)).ToArray();
            garbage = [.. _garbage];
            newMark = below != _foldedBelow;
            previousKey = _foldKey;
        }
        if (folded.Length == 0 && garbage.Length == 0)
        {
            return;
        }
        ThrowIfAbandoned();
        await CheckFenceAsync(ct).ConfigureAwait(false);
        string markerKey = LogSegment.FoldKey(_prefix, below.Term, below.Seq);
        if (newMark)
        {
            // Garbage (torn segments of older terms, leftovers) sorts below any mark of this term.
            byte[] marker = LogSegment.FoldMarker(below.Term, below.Seq);
            await PutObjectAsync(markerKey, marker, marker.Length).ConfigureAwait(false);
            lock (_log)
            {
                _foldedBelow = below;
                _foldKey = markerKey;
            }
        }
        ThrowIfAbandoned();
        foreach (LogSegmentBuffer segment in folded)
        {
            // Before the deletes: a read that looked a range up before the pass released it and
            // finds the object gone must look in the index again, not fail.
            segment.Folded = true;
        }
        await Parallel.ForEachAsync(folded.Select(s => s.Key).Concat(garbage), new ParallelOptions { MaxDegreeOfParallelism = _parallelism, CancellationToken = ct },
            async (key, token) => await DeleteObjectAsync(key, CancellationToken.None).ConfigureAwait(false)).ConfigureAwait(false);
        lock (_log)
        {
            foreach (LogSegmentBuffer segment in folded)
            {
                _stored.Remove(segment);
                _logBytes -= segment.Length;
                _readCache.Remove(segment.Key, 0, segment.Length); // the index no longer points at it
                if (segment.Buffer is { } bytes)
                {
                    _cachedBytes -= bytes.Length; // stored segments with bytes are in the cache queue, which skips a null later
                    segment.Buffer = null;
                }
            }
            _garbage.RemoveAll(garbage.Contains);
        }
        string? supersededCheckpoint = null;
        lock (_log)
        {
            if (_checkpointKey is not null && !IsBelow(below.Term, below.Seq, _checkpointMark))
            {
                // Everything it covers is folded now: an open starts from the marker.
                supersededCheckpoint = _checkpointKey;
                _checkpointKey = null;
            }
            _storedSinceCheckpoint = _stored.Count;
        }
        if (supersededCheckpoint is not null)
        {
            await DeleteObjectAsync(supersededCheckpoint, CancellationToken.None).ConfigureAwait(false);
        }
        if (newMark && previousKey is not null)
        {
            // Last: until the new marker and the deletes are through, the previous marker must stay
            // readable in case the new one is torn.
            await DeleteObjectAsync(previousKey, CancellationToken.None).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Rebuilds one chunk from its object (where the index leaves parts of it to the base) and the
    /// index's extents, stores it, then points the extents that did not change meanwhile at it.
    /// </summary>
    private async Task FoldChunkAsync(long index, CancellationToken ct)
    {
        ThrowIfAbandoned();
        long start = index << _objectShift;
        long end = Math.Min(start + _objectSize, Size);
        var pieces = new List<IndexPiece>();
        _index.Lookup(start, end - start, pieces);
        if (pieces.TrueForAll(p => p.Source == ExtentSource.Base))
        {
            return;
        }
        byte[] chunk = new byte[_objectSize];
        bool exists = _base.Get(index);
        string key = S3DeviceOptions.Key(_prefix, index);
        if (exists && (end - start < _objectSize || pieces.Exists(p => p.Source == ExtentSource.Base)))
        {
            await ReadChunkRangeAsync(index, 0, chunk, cached: false, ct).ConfigureAwait(false);
        }
        var fetches = new List<Task>();
        foreach (IndexPiece piece in pieces)
        {
            Memory<byte> target = chunk.AsMemory((int)(piece.Offset - start), (int)piece.Length);
            switch (piece.Source)
            {
                case ExtentSource.Segment:
                    if (piece.Segment!.Buffer is { } bytes)
                    {
                        bytes.AsSpan((int)piece.SegmentOffset, target.Length).CopyTo(target.Span);
                    }
                    else
                    {
                        fetches.Add(ReadSegmentRangeAsync(piece.Segment, piece.SegmentOffset, piece.Offset, target, cached: false, ct));
                    }
                    break;
                case ExtentSource.Trim or ExtentSource.Zero:
                    target.Span.Clear();
                    break;
            }
        }
        await Task.WhenAll(fetches).ConfigureAwait(false);
        bool[] hot = HotBlocks(index, start, pieces);
        ThrowIfAbandoned();
        await CheckFenceAsync(ct).ConfigureAwait(false); // right before the chunk write: the window a stale pass has is one chunk's
        // WRITE_ZEROES with NO_HOLE asks for the range to stay provisioned (NBD proto.md), as the
        // chunk path keeps it: such a chunk is stored as zeros, and only other chunks of zeros go.
        bool provisioned = pieces.Exists(p => p.Source == ExtentSource.Zero);
        if (!provisioned && chunk.AsSpan().IndexOfAnyExcept((byte)0) < 0)
        {
            if (exists)
            {
                // Cleared first: a read that finds the object gone must find the bit clear (zeros), not a loss.
                _base.Set(index, false);
                await DeleteObjectAsync(key, CancellationToken.None).ConfigureAwait(false);
            }
        }
        else
        {
            // Not the caller's token: a PUT cut off halfway could leave a torn chunk behind.
            await PutObjectAsync(key, chunk, chunk.Length).ConfigureAwait(false);
            _base.Set(index, true);
        }
        // After the store call, before the index sends reads to the new object: reads that start
        // from here use the new version, and the new object is what a GET of it returns.
        long old = _chunkVersions.AddOrUpdate(index, 1, (_, v) => v + 1) - 1;
        _readCache.Remove(key, old, _objectSize);
        if (_base.Get(index))
        {
            // What was cached stays cached: the new object's bytes, exactly what a GET of it returns.
            _readCache.AddBlocks(key, old + 1, chunk, hot);
        }
        _index.ReleaseFolded(pieces);
    }

    /// <summary>
    /// The read-cache blocks of a chunk being folded that hold recently used bytes: blocks of its
    /// current object in the cache, and blocks over segment bytes in memory or in the cache.
    /// </summary>
    private bool[] HotBlocks(long index, long start, List<IndexPiece> pieces)
    {
        if (!_readCache.Enabled)
        {
            return [];
        }
        int block = _readCache.BlockBytes;
        bool[] hot = new bool[(_objectSize + block - 1) / block];
        string key = S3DeviceOptions.Key(_prefix, index);
        long version = _chunkVersions.GetValueOrDefault(index);
        for (int b = 0; b < hot.Length; b++)
        {
            hot[b] = _readCache.Contains(key, version, (long)b * block, block);
        }
        foreach (IndexPiece piece in pieces)
        {
            if (piece.Source == ExtentSource.Segment &&
                (piece.Segment!.Buffer is not null || _readCache.Contains(piece.Segment.Key, 0, piece.SegmentOffset, piece.Length)))
            {
                for (long b = (piece.Offset - start) / block; b <= (piece.Offset - start + piece.Length - 1) / block; b++)
                {
                    hot[b] = true;
                }
            }
        }
        return hot;
    }

    private Task PutObjectAsync(string key, byte[] data, int length) =>
        StoreAsync(async () =>
        {
            await _store.PutAsync(key, data, length, CancellationToken.None).ConfigureAwait(false);
            return 0;
        }, "PUT", key, CancellationToken.None);

    /// <summary>A pass of an abandoned device (a crash test's dead process) goes no further.</summary>
    private void ThrowIfAbandoned()
    {
        if (_disposed)
        {
            throw new BlockDeviceException(BlockErrorKind.Io, $"the write log of {_prefix} is closed");
        }
    }

    // ---------------------------------------------------------------- the log

    private async Task AppendAsync(long offset, long length, LogRecordKind kind, ReadOnlyMemory<byte> data, bool fua, CancellationToken ct)
    {
        Volatile.Write(ref _lastWrite, Environment.TickCount64);
        await WaitForRoomAsync(ct).ConfigureAwait(false);
        List<LogSegmentBuffer>? sealedNow = null;
        long seq;
        lock (_log)
        {
            DeviceBounds.ThrowIfClosed(_disposed);
            ThrowIfFenced();
            long done = 0;
            do
            {
                LogSegmentBuffer open = OpenLocked();
                int room = _segmentBytes - open.Length - LogSegment.RecordHeaderSize;
                if (room < MinRoom - LogSegment.RecordHeaderSize && open.Records > 0)
                {
                    (sealedNow ??= []).Add(SealLocked()!);
                    continue;
                }
                long piece = kind == LogRecordKind.Write ? Math.Min(length - done, Math.Max(room, 512)) : length - done;
                AppendLocked(open, offset + done, piece, kind, kind == LogRecordKind.Write ? data.Span.Slice((int)done, (int)piece) : default);
                done += piece;
            }
            while (done < length);
            seq = _open!.Seq;
            if (fua || _open.Length >= _segmentBytes - MinRoom)
            {
                (sealedNow ??= []).Add(SealLocked()!);
            }
        }
        if (sealedNow is not null)
        {
            foreach (LogSegmentBuffer segment in sealedNow)
            {
                StartUpload(segment);
            }
        }
        if (fua)
        {
            await DurableThroughAsync(seq, ct).ConfigureAwait(false);
            await CheckFenceForAckAsync(ct).ConfigureAwait(false);
        }
    }

    private LogSegmentBuffer OpenLocked()
    {
        if (_open is null)
        {
            long seq = _nextSeq++;
            var segment = new LogSegmentBuffer(_term, seq, LogSegment.Key(_prefix, _term, seq))
            {
                Buffer = GC.AllocateUninitializedArray<byte>(Math.Min(_segmentBytes, 64 << 10) + LogSegment.TrailerSize),
                Length = LogSegment.HeaderSize,
                OpenedAt = Environment.TickCount64,
            };
            LogSegment.WriteHeader(segment.Buffer, _term, seq);
            segment.Charged = LogSegment.HeaderSize + LogSegment.TrailerSize;
            _dirty += segment.Charged;
            _open = segment;
        }
        return _open;
    }

    private void AppendLocked(LogSegmentBuffer segment, long offset, long length, LogRecordKind kind, ReadOnlySpan<byte> data)
    {
        int need = LogSegment.RecordHeaderSize + data.Length;
        byte[] buffer = segment.Buffer!;
        if (segment.Length + need + LogSegment.TrailerSize > buffer.Length)
        {
            long grown = Math.Max((long)buffer.Length * 2, segment.Length + need + LogSegment.TrailerSize);
            byte[] longer = GC.AllocateUninitializedArray<byte>((int)Math.Min(grown, Math.Max(_segmentBytes, segment.Length + need) + LogSegment.TrailerSize));
            buffer.AsSpan(0, segment.Length).CopyTo(longer);
            segment.Buffer = buffer = longer;
        }
        LogSegment.WriteRecordHeader(buffer.AsSpan(segment.Length), offset, length, kind);
        int dataOffset = segment.Length + LogSegment.RecordHeaderSize;
        data.CopyTo(buffer.AsSpan(dataOffset));
        segment.Length += need;
        segment.Records++;
        segment.Charged += need;
        _dirty += need;
        ExtentSource source = kind switch
        {
            LogRecordKind.Write => ExtentSource.Segment,
            LogRecordKind.Zero => ExtentSource.Zero,
            _ => ExtentSource.Trim,
        };
        // Under the log's lock: the index's order of extents is the log's order of records.
        _index.Set(offset, length, source, source == ExtentSource.Segment ? segment : null, dataOffset);
    }

    /// <summary>Seals the open segment, if it holds records; the caller starts its upload outside the lock.</summary>
    private LogSegmentBuffer? SealLocked()
    {
        LogSegmentBuffer? segment = _open;
        if (segment is null || segment.Records == 0)
        {
            return null;
        }
        segment.Length = LogSegment.Seal(segment.Buffer!, segment.Length, segment.Records);
        segment.Sealed = true;
        _pending.Add(segment);
        _open = null;
        return segment;
    }

    private void StartUpload(LogSegmentBuffer? segment)
    {
        if (segment is null)
        {
            return;
        }
        _ = EnsureUploadAsync(segment).ContinueWith(
            t => Interlocked.Increment(ref _backgroundFailures),
            CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
    }

    /// <summary>The segment's upload: the one in flight or done, or a new attempt when the last one failed.</summary>
    private Task EnsureUploadAsync(LogSegmentBuffer segment)
    {
        lock (segment)
        {
            if (segment.Upload is null || segment.Upload.IsFaulted || segment.Upload.IsCanceled)
            {
                // On the pool, never the caller's synchronization context (Task.Yield would post
                // there: a test's context, blocked on an open, deadlocked on it).
                segment.Upload = Task.Run(() => UploadAsync(segment));
            }
            return segment.Upload;
        }
    }

    private async Task UploadAsync(LogSegmentBuffer segment)
    {
        // A FLUSH waits on every segment, whoever sealed it (a checkpoint seals the open one).
        s_background.Value = false;
        try
        {
            ThrowIfFenced(); // a fenced writer stores no more segments
            // Not a caller's token: a PUT cut off halfway could leave a torn segment behind.
            await StoreAsync(async () =>
            {
                await _store.PutAsync(segment.Key, segment.Buffer!, segment.Length, CancellationToken.None).ConfigureAwait(false);
                return 0;
            }, "PUT", segment.Key, CancellationToken.None).ConfigureAwait(false);
        }
        catch
        {
            Volatile.Write(ref segment.FailedAt, Environment.TickCount64);
            throw;
        }
        TaskCompletionSource freed;
        lock (_log)
        {
            segment.Durable = true;
            _pending.Remove(segment);
            _dirty -= segment.Charged;
            AddToCacheLocked(segment);
            _stored.Add(segment);
            _logBytes += segment.Length;
            _storedSinceCheckpoint++;
            freed = _spaceFreed;
            _spaceFreed = NewSignal();
        }
        freed.TrySetResult();
        MaybeStartCompaction();
        MaybeStartCheckpoint();
    }

    /// <summary>
    /// Keeps the newest stored segments' bytes for reads, up to the cache limit; a segment leaving it
    /// goes to the read cache (before its bytes go: a read that finds them gone finds the blocks).
    /// </summary>
    private void AddToCacheLocked(LogSegmentBuffer segment, bool toReadCache = true)
    {
        _cache.Enqueue(segment);
        _cachedBytes += segment.Buffer!.Length;
        while (_cachedBytes > _cacheLimit && _cache.TryDequeue(out LogSegmentBuffer? old))
        {
            if (old.Buffer is { } bytes)
            {
                _cachedBytes -= bytes.Length;
                if (toReadCache && !old.Folded)
                {
                    _readCache.AddObject(old.Key, 0, bytes.AsSpan(0, old.Length));
                }
            }
            old.Buffer = null;
        }
    }

    // ---------------------------------------------------------------- read-ahead

    /// <summary>
    /// A read that starts where the previous one ended (or near it, with the same length) continues
    /// a sequential stream; from the third on, the next <see cref="S3DeviceOptions.ReadAheadBytes"/> are fetched into the read cache,
    /// in steps of a quarter of that, so reads past the memory window find their blocks on the way.
    /// </summary>
    private void ReadAhead(long offset, int length)
    {
        if (_readAhead == 0)
        {
            return;
        }
        long end = offset + length;
        long from;
        long to;
        lock (_sequential)
        {
            // Where the last one ended, or near it with the same length (a queue of reads that the
            // network reordered a little): random reads of varying sizes never look sequential.
            long slack = Math.Min(_readAhead, 8L * length);
            bool sequential = _sequentialEnd >= 0 &&
                (offset == _sequentialEnd || (length == _sequentialLength && offset >= _sequentialEnd - slack && offset <= _sequentialEnd + slack));
            _sequentialLength = length;
            if (!sequential)
            {
                _sequentialRun = 0;
                _sequentialEnd = end;
                _aheadTo = end;
                return;
            }
            _sequentialEnd = Math.Max(_sequentialEnd, end);
            if (++_sequentialRun < 2)
            {
                return;
            }
            from = Math.Max(_aheadTo, _sequentialEnd);
            to = Math.Min(_sequentialEnd + _readAhead, Size);
            if (to - from < Math.Max(_readAhead / 4, length))
            {
                return;
            }
            _aheadTo = to;
        }
        Prefetch(from, to - from);
    }

    /// <summary>Starts the GETs that bring a range's store-held bytes (segments past the memory window, base chunks) into the read cache.</summary>
    private void Prefetch(long offset, long length)
    {
        length = Math.Min(length, Size - offset);
        if (length <= 0)
        {
            return;
        }
        var pieces = new List<IndexPiece>();
        _index.Lookup(offset, length, pieces);
        foreach (IndexPiece piece in pieces)
        {
            if (piece.Source == ExtentSource.Segment && piece.Segment!.Buffer is null && !piece.Segment.Folded)
            {
                _readCache.Prefetch(piece.Segment.Key, 0, piece.SegmentOffset, piece.Length);
            }
            else if (piece.Source == ExtentSource.Base)
            {
                for (long at = piece.Offset; at < piece.Offset + piece.Length;)
                {
                    long index = at >> _objectShift;
                    long start = at - (index << _objectShift);
                    long count = Math.Min(piece.Offset + piece.Length - at, _objectSize - start);
                    if (_base.Get(index))
                    {
                        _readCache.Prefetch(S3DeviceOptions.Key(_prefix, index), _chunkVersions.GetValueOrDefault(index), start, count);
                    }
                    at += count;
                }
            }
        }
    }

    /// <summary>Returns once every segment up to <paramref name="seq"/> is stored, retrying those whose upload failed.</summary>
    private async Task DurableThroughAsync(long seq, CancellationToken ct)
    {
        LogSegmentBuffer[] waiting;
        lock (_log)
        {
            waiting = _pending.Where(s => s.Seq <= seq).ToArray();
        }
        if (waiting.Length > 0)
        {
            await Task.WhenAll(waiting.Select(EnsureUploadAsync)).WaitAsync(ct).ConfigureAwait(false);
        }
    }

    /// <summary>Writers wait while the unstored segments hold the dirty limit; bounded, so a dead store turns into EIO.</summary>
    private async Task WaitForRoomAsync(CancellationToken ct)
    {
        for (int waited = 0; ; waited++)
        {
            TaskCompletionSource signal;
            LogSegmentBuffer? sealedNow = null;
            lock (_log)
            {
                if (_dirty < _dirtyLimit)
                {
                    return;
                }
                signal = _spaceFreed;
                if (_open is not null && _pending.Count == 0)
                {
                    sealedNow = SealLocked(); // nothing in flight would free room otherwise
                }
            }
            StartUpload(sealedNow);
            if (waited >= 600)
            {
                throw new BlockDeviceException(BlockErrorKind.Io, $"the write log of {_prefix} holds {DirtyBytes} unstored bytes and the store has not taken any for a minute");
            }
            try
            {
                await signal.Task.WaitAsync(TimeSpan.FromMilliseconds(100), ct).ConfigureAwait(false);
            }
            catch (TimeoutException)
            {
                RetryFailedUploads();
            }
        }
    }

    private void OnTimer()
    {
        if (_disposed)
        {
            return;
        }
        LogSegmentBuffer? sealedNow = null;
        lock (_log)
        {
            if (_open is { Records: > 0 } open && Environment.TickCount64 - open.OpenedAt >= _segmentDelayMs)
            {
                sealedNow = SealLocked();
            }
        }
        StartUpload(sealedNow);
        RetryFailedUploads();
        MaybeStartCompaction();
    }

    /// <summary>Uploads that failed are tried again, at most once a second each, so the log drains by itself once the store is back.</summary>
    private void RetryFailedUploads()
    {
        LogSegmentBuffer[] failed;
        long now = Environment.TickCount64;
        lock (_log)
        {
            failed = _pending.Where(s => s.Upload is { IsFaulted: true } && now - Volatile.Read(ref s.FailedAt) >= 1000).ToArray();
        }
        foreach (LogSegmentBuffer segment in failed)
        {
            StartUpload(segment);
        }
    }

    private static TaskCompletionSource NewSignal() => new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>One store call (<see cref="S3DeviceOptions.StoreCallAsync"/>), behind <see cref="_backgroundIo"/> first in a pass's or checkpoint's flow.</summary>
    private async Task<int> StoreAsync(Func<Task<int>> call, string what, string key, CancellationToken ct)
    {
        bool background = s_background.Value;
        if (background)
        {
            await _backgroundIo.WaitAsync(ct).ConfigureAwait(false);
        }
        try
        {
            return await S3DeviceOptions.StoreCallAsync(_io, call, what, key, ct).ConfigureAwait(false);
        }
        finally
        {
            if (background)
            {
                _backgroundIo.Release();
            }
        }
    }
}
