namespace Gateway.Backends.S3;

/// <summary>
/// An S3 disk written through a write-ahead log (issue 18, first step): small random writes become
/// sequential segment objects <c>PREFIX/log/&lt;term&gt;-&lt;seq&gt;</c> (<see cref="LogSegment"/>) over the
/// base chunk objects <c>PREFIX/%016x</c> of <see cref="S3Backend"/>, which this device reads but never
/// writes (compaction, which folds segments into chunks, is the next step).
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
/// owner left (fencing two live owners is the cluster issue's).
/// </para>
/// </summary>
public sealed class S3LogBackend : IBlockDevice, IGrowableDevice
{
    private const int MinRoom = LogSegment.RecordHeaderSize + 512;

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
    private readonly int _parallelism;
    private readonly ExtentIndex _index = new();
    private readonly ChunkMap _base;
    private readonly Lock _log = new();
    private readonly List<LogSegmentBuffer> _pending = []; // sealed, not yet stored, in sequence order
    private readonly Queue<LogSegmentBuffer> _cache = new(); // stored and still holding their bytes, oldest first
    private readonly Timer? _timer;
    private TaskCompletionSource _spaceFreed = NewSignal();
    private LogSegmentBuffer? _open;
    private long _term;
    private long _nextSeq;
    private long _dirty;
    private long _cachedBytes;
    private long _backgroundFailures;
    private long _size;
    private volatile bool _disposed;

    private S3LogBackend(IObjectStore store, bool ownsStore, string prefix, long size, bool readOnly, S3DeviceOptions options)
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
        _io = new SemaphoreSlim(options.Parallelism, options.Parallelism);
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
        var device = new S3LogBackend(store, ownsStore, prefix.TrimEnd('/'), size, readOnly, options);
        try
        {
            await device.ReplayAsync(cancellationToken).ConfigureAwait(false);
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

    /// <summary>Segments found at open and not replayed: torn, corrupt, or after a gap in their term.</summary>
    public int IgnoredSegments { get; private set; }

    /// <summary>Bytes of segments not yet stored (the open one included).</summary>
    public long DirtyBytes => Interlocked.Read(ref _dirty);

    /// <summary>Segment uploads that failed in the background (retried by the next FLUSH or the timer).</summary>
    public long BackgroundFailures => Interlocked.Read(ref _backgroundFailures);

    /// <summary>Extents in the index (tests, metrics).</summary>
    public long IndexExtents => _index.Count;

    // ---------------------------------------------------------------- open

    private async Task ReplayAsync(CancellationToken ct)
    {
        string listPrefix = _prefix + "/";
        var segments = new List<(long Term, long Seq, string Key)>();
        try
        {
            await foreach (string key in _store.ListAsync(listPrefix, ct).ConfigureAwait(false))
            {
                if (LogSegment.TryParseKey(_prefix, key, out long term, out long seq))
                {
                    segments.Add((term, seq, key));
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
        segments.Sort((a, b) => a.Term != b.Term ? a.Term.CompareTo(b.Term) : a.Seq.CompareTo(b.Seq));
        _term = segments.Count == 0 ? 1 : segments.Max(s => s.Term) + 1;

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
                continue;
            }
            bool firstOfTerm = i == 0 || segments[i - 1].Term != term;
            if ((!firstOfTerm && seq != expected) || length < 0 || !LogSegment.TryDecode(data.AsSpan(0, length), term, seq, records))
            {
                // A gap or a torn segment: nothing after it in this term was ever flushed.
                skipTerm = term;
                IgnoredSegments++;
                continue;
            }
            expected = seq + 1;
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
                AddToCacheLocked(segment);
            }
            ReplayedSegments++;
        }
    }

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
                        (fetches ??= []).Add(ReadSegmentRangeAsync(piece.Segment, piece.SegmentOffset, target, cancellationToken));
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

    private async Task ReadSegmentRangeAsync(LogSegmentBuffer segment, long start, Memory<byte> target, CancellationToken ct)
    {
        int n = await StoreAsync(() => _store.GetAsync(segment.Key, start, target, ct), "GET", segment.Key, ct).ConfigureAwait(false);
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
                parts.Add(ReadChunkRangeAsync(index, start, part, ct));
            }
            at += count;
        }
        await Task.WhenAll(parts).ConfigureAwait(false);
    }

    private async Task ReadChunkRangeAsync(long index, int start, Memory<byte> part, CancellationToken ct)
    {
        string key = S3DeviceOptions.Key(_prefix, index);
        int n = await StoreAsync(() => _store.GetAsync(key, start, part, ct), "GET", key, ct).ConfigureAwait(false);
        if (n < 0)
        {
            // Listed at open: its absence is a loss, not zeros.
            throw new BlockDeviceException(BlockErrorKind.Io, $"S3 object {key} is missing although it was listed: refusing to read it as zeros");
        }
        part.Span[n..].Clear();
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
    }

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        DeviceBounds.ThrowIfClosed(_disposed);
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
        return ValueTask.CompletedTask; // advisory; prefetch is a later step
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
        _disposed = true;
        _timer?.Dispose();
    }

    // ---------------------------------------------------------------- the log

    private async Task AppendAsync(long offset, long length, LogRecordKind kind, ReadOnlyMemory<byte> data, bool fua, CancellationToken ct)
    {
        await WaitForRoomAsync(ct).ConfigureAwait(false);
        List<LogSegmentBuffer>? sealedNow = null;
        long seq;
        lock (_log)
        {
            DeviceBounds.ThrowIfClosed(_disposed);
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
                segment.Upload = UploadAsync(segment);
            }
            return segment.Upload;
        }
    }

    private async Task UploadAsync(LogSegmentBuffer segment)
    {
        await Task.Yield();
        try
        {
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
            freed = _spaceFreed;
            _spaceFreed = NewSignal();
        }
        freed.TrySetResult();
    }

    /// <summary>Keeps the newest stored segments' bytes for reads, up to the cache limit.</summary>
    private void AddToCacheLocked(LogSegmentBuffer segment)
    {
        _cache.Enqueue(segment);
        _cachedBytes += segment.Buffer!.Length;
        while (_cachedBytes > _cacheLimit && _cache.TryDequeue(out LogSegmentBuffer? old))
        {
            _cachedBytes -= old.Buffer?.Length ?? 0;
            old.Buffer = null;
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

    /// <summary>One store call under the export's parallelism limit; failures become EIO.</summary>
    private async Task<int> StoreAsync(Func<Task<int>> call, string what, string key, CancellationToken ct)
    {
        await _io.WaitAsync(ct).ConfigureAwait(false);
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
            _io.Release();
        }
    }
}
