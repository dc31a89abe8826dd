using System.Buffers;
using System.Collections.Concurrent;

namespace Gateway.Backends.S3;

/// <summary>
/// A disk in an S3-compatible object store, cut into objects of <see cref="S3DeviceOptions.ObjectSize"/>
/// bytes named <c>PREFIX/%016x</c> (nbdkit's S3 plugin layout, so either can serve a disk the other
/// wrote); a chunk without an object reads as zeros and is a hole for <c>base:allocation</c>. A chunk
/// whose object the gateway stored or listed and that has since gone (deleted behind its back) is
/// EIO, never zeros: only a trim makes a stored chunk a hole.
/// <para>
/// Writes land in a bounded write-back cache of whole chunks. A chunk is uploaded when a chunk's
/// worth has been written to it, when it has been idle for <see cref="S3DeviceOptions.WritebackDelay"/>,
/// when the cache needs room, and by FLUSH and FUA, which return only once what they cover is stored.
/// Only one upload of an object is ever in flight. Trim and zero of whole chunks delete objects.
/// </para>
/// <para>
/// Not <see cref="INonBlockingIo"/>: a cache miss waits for the network, and even a hit takes the
/// chunk's async lock.
/// </para>
/// </summary>
public sealed class S3Backend : IBlockDevice, IGrowableDevice
{
    private const int SectorShift = 9;
    private const int SectorSize = 1 << SectorShift;

    private readonly IObjectStore _store;
    private readonly bool _ownsStore;
    private readonly string _prefix;
    private readonly int _objectSize;
    private readonly int _objectShift;
    private readonly long _cacheLimit;
    private readonly long _writebackTicks;
    private readonly SemaphoreSlim _io;
    private readonly ConcurrentDictionary<long, Chunk> _chunks = new();
    private readonly ChunkMap _allocated;
    // Chunks known to have an object: listed at open or uploaded since, until a trim deletes it. Not
    // _allocated, which writes still in the cache also set: a GET that finds no object for one of
    // these means the object was lost, and reading it as zeros would silently corrupt the disk.
    private readonly ChunkMap _stored;
    private readonly ConcurrentDictionary<long, byte> _missing = new();
    // Trims that cleared a _stored bit: a lock-free read uses it to tell a trim crossing its GET from a loss.
    private long _drops;
    private readonly CancellationTokenSource _stopping = new();
    private readonly Timer? _writeback;
    private readonly SemaphoreSlim _listing = new(1, 1);
    private long _cachedBytes;
    // Until the listing succeeds every chunk may exist: reads then ask the store (a missing object
    // is zeros anyway) and writes merge with whatever is there, so only allocation and trims wait.
    private volatile bool _mapLoaded;
    private long _backgroundFailures;
    private volatile bool _disposed;
    private long _size;

    private S3Backend(IObjectStore store, bool ownsStore, string prefix, long size, bool readOnly, S3DeviceOptions options)
    {
        _store = store;
        _ownsStore = ownsStore;
        _prefix = prefix;
        _size = size;
        IsReadOnly = readOnly;
        _objectSize = options.ObjectSize;
        _objectShift = System.Numerics.BitOperations.Log2((uint)options.ObjectSize);
        _cacheLimit = options.CacheBytes;
        _writebackTicks = (long)options.WritebackDelay.TotalMilliseconds;
        _io = new SemaphoreSlim(options.Parallelism, options.Parallelism);
        _allocated = new ChunkMap((size + _objectSize - 1) >> _objectShift);
        _stored = new ChunkMap(_allocated.ChunkCount);
        if (!readOnly)
        {
            TimeSpan period = TimeSpan.FromMilliseconds(Math.Max(10, _writebackTicks / 4));
            _writeback = new Timer(_ => WriteBackIdle(), null, period, period);
        }
    }

    /// <summary>
    /// Opens the disk under <paramref name="prefix"/>: lists its objects once (ListObjectsV2) to learn
    /// which chunks exist; the map is kept up to date from then on.
    /// </summary>
    public static async Task<S3Backend> OpenAsync(IObjectStore store, string prefix, long size, bool readOnly, S3DeviceOptions options,
        bool ownsStore = true, CancellationToken cancellationToken = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        if (options.ObjectSize < SectorSize || !int.IsPow2(options.ObjectSize))
        {
            throw new ArgumentException($"object size {options.ObjectSize} must be a power of two of at least {SectorSize}", nameof(options));
        }
        ArgumentOutOfRangeException.ThrowIfLessThan(options.Parallelism, 1, nameof(options));
        var device = new S3Backend(store, ownsStore, prefix.TrimEnd('/'), size, readOnly, options);
        try
        {
            await device.EnsureMapAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is BlockDeviceException { Kind: not BlockErrorKind.NotSupported } or OperationCanceledException)
        {
            // The store is down or slow: open anyway, so the export serves what it can and the
            // listing is retried by the first request that needs it.
        }
        return device;
    }

    /// <summary>Lists the objects under the prefix once (ListObjectsV2, paged) to learn which chunks exist.</summary>
    private async Task EnsureMapAsync(CancellationToken ct)
    {
        if (_mapLoaded)
        {
            return;
        }
        await _listing.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            if (_mapLoaded)
            {
                return;
            }
            string listPrefix = _prefix + "/";
            var found = new List<long>();
            bool hasLog = false;
            try
            {
                await foreach (string key in _store.ListAsync(listPrefix, ct).ConfigureAwait(false))
                {
                    hasLog |= LogSegment.TryParseKey(_prefix, key, out _, out _);
                    ReadOnlySpan<char> name = key.AsSpan(listPrefix.Length);
                    if (name.Length == 16 && long.TryParse(name, System.Globalization.NumberStyles.AllowHexSpecifier, null, out long index) &&
                        index >= 0 && index < _allocated.ChunkCount)
                    {
                        found.Add(index);
                    }
                }
            }
            catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
            {
                throw new BlockDeviceException(BlockErrorKind.Io, $"S3 listing of '{listPrefix}' failed: {e.Message}", e);
            }
            if (hasLog)
            {
                // Its newest bytes are in the log, which this path cannot read: serving the chunks would be serving a stale disk.
                throw new BlockDeviceException(BlockErrorKind.NotSupported, $"S3 prefix '{listPrefix}' holds a write log (log/): open it with writeLog");
            }
            // Writes made before the listing already set their bits; add the stored chunks to them.
            foreach (long index in found)
            {
                _allocated.Set(index, true);
                _stored.Set(index, true);
            }
            _mapLoaded = true;
        }
        finally
        {
            _listing.Release();
        }
    }

    /// <summary>False only when the chunk is known to have no object.</summary>
    private bool MayExist(long index) => !_mapLoaded || _allocated.Get(index);

    /// <summary>The disk's size: as opened, or as <see cref="GrowAsync"/> made it since. Only the export's spec records it.</summary>
    public long Size => Volatile.Read(ref _size);

    /// <summary>
    /// Grows the disk: nothing is written to the store. A chunk past the old end has no object, and
    /// a missing object reads as zeros. The maps grow before the size does, so no request reaches
    /// a chunk they have no room for. The chunk that held the old end keeps its bytes past it,
    /// which this gateway never wrote (zeros), unless the objects were adopted from elsewhere.
    /// </summary>
    public ValueTask GrowAsync(long size, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }
        try
        {
            DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
        }
        catch (BlockDeviceException e)
        {
            return ValueTask.FromException(e);
        }
        if (size > Size)
        {
            long chunks = (size + _objectSize - 1) >> _objectShift;
            _allocated.Grow(chunks);
            _stored.Grow(chunks);
            Volatile.Write(ref _size, size);
        }
        return ValueTask.CompletedTask;
    }

    public bool IsReadOnly { get; }

    public BlockCapabilities Capabilities => IsReadOnly
        ? BlockCapabilities.Cache | BlockCapabilities.Flush
        : BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero | BlockCapabilities.Cache | BlockCapabilities.Flush;

    /// <summary>Background write-backs that failed (they stay dirty and are retried); for tests and metrics.</summary>
    public long BackgroundFailures => Interlocked.Read(ref _backgroundFailures);

    /// <summary>
    /// Chunks whose object was found missing although the gateway had stored or listed it (each counted
    /// once); their reads fail with EIO. For tests and metrics: the connection logs each failed request.
    /// </summary>
    public long MissingObjects => _missing.Count;

    /// <summary>Bytes of chunk buffers held by the cache.</summary>
    public long CachedBytes => Interlocked.Read(ref _cachedBytes);

    public int ObjectSize => _objectSize;

    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfDisposed();
        DeviceBounds.Check(offset, destination.Length, Size, BlockErrorKind.InvalidArgument);
        await ForEachPartAsync(offset, destination.Length, (index, start, at, length) =>
            ReadPartAsync(index, start, destination.Slice(at, length), cancellationToken)).ConfigureAwait(false);
    }

    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfNotWritable();
        DeviceBounds.Check(offset, source.Length, Size, BlockErrorKind.NoSpace);
        await ChangeAsync(offset, source.Length, source, zero: false, fua, cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfDisposed();
        await FlushDirtyAsync(cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfNotWritable();
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
        if (length > 0)
        {
            await EnsureMapAsync(cancellationToken).ConfigureAwait(false);
        }
        await ClearAsync(offset, length, keepAllocated: false, fua, cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfNotWritable();
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.NoSpace);
        if (length > 0)
        {
            await EnsureMapAsync(cancellationToken).ConfigureAwait(false);
        }
        await ClearAsync(offset, length, (flags & ZeroFlags.NoHole) != 0, (flags & ZeroFlags.Fua) != 0, cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfDisposed();
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
        // Prefetch no more than half the cache, or the prefetch would evict itself.
        length = Math.Min(length, _cacheLimit / 2);
        await ForEachPartAsync(offset, length, (index, _, _, _) => LoadChunkAsync(index, cancellationToken)).ConfigureAwait(false);
    }

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled<int>(cancellationToken);
        }
        try
        {
            ThrowIfDisposed();
            DeviceBounds.CheckQuery(offset, length, Size, extents.Length);
            if (!_mapLoaded)
            {
                return GetAllocationAfterListingAsync(offset, length, extents, cancellationToken);
            }
            return ValueTask.FromResult(Allocation(offset, length, extents.Span));
        }
        catch (Exception e)
        {
            return ValueTask.FromException<int>(e);
        }
    }

    private async ValueTask<int> GetAllocationAfterListingAsync(long offset, long length, Memory<Extent> extents, CancellationToken ct)
    {
        await EnsureMapAsync(ct).ConfigureAwait(false);
        return Allocation(offset, length, extents.Span);
    }

    private int Allocation(long offset, long length, Span<Extent> extents)
    {
        {
            var writer = new ExtentWriter(extents);
            long end = offset + length;
            long lastChunk = (end - 1 + _objectSize) >> _objectShift; // one past the chunk holding end - 1
            while (offset < end)
            {
                long index = offset >> _objectShift;
                bool data = _allocated.Get(index);
                long next = Math.Min(end, _allocated.NextDifferent(index, data, lastChunk) << _objectShift);
                if (!writer.TryAdd(next - offset, data ? ExtentFlags.Data : ExtentFlags.Hole | ExtentFlags.Zero))
                {
                    break;
                }
                offset = next;
            }
            return writer.Count;
        }
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _writeback?.Dispose();
        // Best effort for callers that did not flush: the export actor flushes before disposing.
        if (!IsReadOnly && _chunks.Values.Any(c => c.IsDirty))
        {
            try
            {
                using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                FlushDirtyAsync(timeout.Token).GetAwaiter().GetResult();
            }
            catch (Exception e) when (e is BlockDeviceException or OperationCanceledException)
            {
            }
        }
        _stopping.Cancel();
        if (_ownsStore)
        {
            _store.Dispose();
        }
        // Buffers are left to the GC: a request racing with Dispose may still be copying from one.
    }

    // ---------------------------------------------------------------- reads

    private async Task ReadPartAsync(long index, int start, Memory<byte> destination, CancellationToken ct)
    {
        for (int attempt = 1; ; attempt++)
        {
            if (!_chunks.TryGetValue(index, out Chunk? chunk))
            {
                if (!MayExist(index))
                {
                    destination.Span.Clear();
                    return;
                }
                // A small read of an uncached object fetches only its range: caching 4 MiB for 4 KiB
                // would spend the cache and the link on bytes nobody asked for.
                if (destination.Length < _objectSize / 4)
                {
                    // Lock-free, so the chunk may be uploaded or trimmed while the GET is out. Read in
                    // this order (a trim clears _stored, then counts): storedBefore true means no trim
                    // of this chunk had counted yet when drops was read.
                    long drops = Interlocked.Read(ref _drops);
                    bool storedBefore = _stored.Get(index);
                    int n = await StoreAsync(() => _store.GetAsync(Key(index), start, destination, ct), "GET", index, ct).ConfigureAwait(false);
                    // Not stored when the GET left: a PUT racing it may have come too late for it, and
                    // zeros are what the chunk held before that write. Stored since and still stored:
                    // lost, unless a trim (and a new upload) crossed the GET, so look again.
                    if (n < 0 && storedBefore && _stored.Get(index))
                    {
                        if (Interlocked.Read(ref _drops) != drops && attempt < 4)
                        {
                            continue;
                        }
                        ThrowMissing(index);
                    }
                    if (n >= 0 && n < S3DeviceOptions.BytesDue(index, _objectShift, start, destination.Length, Size))
                    {
                        // Chunks are stored whole: a short one is torn, and its missing bytes are not zeros.
                        if (attempt < 3)
                        {
                            await Task.Delay(100 * attempt, ct).ConfigureAwait(false);
                            continue;
                        }
                        throw S3DeviceOptions.TornChunk(Key(index), start, n, _objectSize);
                    }
                    destination.Span[Math.Max(n, 0)..].Clear();
                    return;
                }
                chunk = _chunks.GetOrAdd(index, static i => new Chunk(i));
            }
            await chunk.DataLock.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                if (chunk.Evicted)
                {
                    continue;
                }
                if (chunk.Buffer is null)
                {
                    if (!MayExist(index))
                    {
                        destination.Span.Clear();
                        return;
                    }
                    await AttachBufferAsync(chunk, exists: true, ct).ConfigureAwait(false);
                }
                if (chunk.Valid is not null && !AllValid(chunk.Valid, start, destination.Length))
                {
                    await LoadAsync(chunk, ct).ConfigureAwait(false);
                }
                chunk.Buffer.AsSpan(start, destination.Length).CopyTo(destination.Span);
                chunk.LastUse = Environment.TickCount64;
                return;
            }
            finally
            {
                chunk.DataLock.Release();
            }
        }
    }

    private async Task LoadChunkAsync(long index, CancellationToken ct)
    {
        if (!MayExist(index))
        {
            return;
        }
        while (true)
        {
            Chunk chunk = _chunks.GetOrAdd(index, static i => new Chunk(i));
            await chunk.DataLock.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                if (chunk.Evicted)
                {
                    continue;
                }
                if (chunk.Buffer is null)
                {
                    if (!MayExist(index))
                    {
                        return;
                    }
                    await AttachBufferAsync(chunk, exists: true, ct).ConfigureAwait(false);
                }
                if (chunk.Valid is not null)
                {
                    await LoadAsync(chunk, ct).ConfigureAwait(false);
                }
                chunk.LastUse = Environment.TickCount64;
                return;
            }
            finally
            {
                chunk.DataLock.Release();
            }
        }
    }

    /// <summary>
    /// Reads the object into the sectors of the buffer not written since it was cached: the single
    /// read-modify-write of a partially written chunk. Caller holds the data lock.
    /// </summary>
    private async Task LoadAsync(Chunk chunk, CancellationToken ct)
    {
        byte[] buffer = chunk.Buffer!;
        ulong[] valid = chunk.Valid!;
        byte[] stored = ArrayPool<byte>.Shared.Rent(_objectSize);
        try
        {
            int n = await StoreAsync(() => _store.GetAsync(Key(chunk.Index), 0, stored.AsMemory(0, _objectSize), ct), "GET", chunk.Index, ct).ConfigureAwait(false);
            // Before the listing, a chunk written only to the cache legitimately has no object; one
            // the gateway stored must still have it. No race here: the data lock keeps trims out, and
            // a chunk with sectors left to load has no upload of its own in flight (an upload loads
            // them, under this lock, before it lets go of it to PUT).
            if (n < 0 && _stored.Get(chunk.Index))
            {
                ThrowMissing(chunk.Index);
            }
            if (n >= 0 && n < S3DeviceOptions.BytesDue(chunk.Index, _objectShift, 0, _objectSize, Size))
            {
                throw S3DeviceOptions.TornChunk(Key(chunk.Index), 0, n, _objectSize);
            }
            stored.AsSpan(Math.Max(n, 0), _objectSize - Math.Max(n, 0)).Clear();
            int sectors = _objectSize >> SectorShift;
            for (int s = 0; s < sectors;)
            {
                if (IsValid(valid, s))
                {
                    s++;
                    continue;
                }
                int run = s;
                while (run < sectors && !IsValid(valid, run))
                {
                    run++;
                }
                stored.AsSpan(s << SectorShift, (run - s) << SectorShift).CopyTo(buffer.AsSpan(s << SectorShift));
                s = run;
            }
            chunk.Valid = null;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(stored);
        }
    }

    // ---------------------------------------------------------------- writes

    /// <summary>Writes <paramref name="source"/> (or zeros) through the cache; with FUA, uploads what it touched before returning.</summary>
    private async Task ChangeAsync(long offset, long length, ReadOnlyMemory<byte> source, bool zero, bool fua, CancellationToken ct)
    {
        if (length == 0)
        {
            return;
        }
        var touched = new ConcurrentBag<(Chunk Chunk, long Version)>();
        await ForEachPartAsync(offset, length, async (index, start, at, count) =>
            touched.Add(await WritePartAsync(index, start, zero ? default : source.Slice(at, count), count, ct).ConfigureAwait(false))).ConfigureAwait(false);
        if (fua)
        {
            await Task.WhenAll(touched.Select(t => UploadAsync(t.Chunk, t.Version, ct))).ConfigureAwait(false);
        }
    }

    /// <summary>Writes into one chunk's buffer (zeros when <paramref name="source"/> is empty); returns the chunk and its new version.</summary>
    private async Task<(Chunk, long)> WritePartAsync(long index, int start, ReadOnlyMemory<byte> source, int length, CancellationToken ct)
    {
        while (true)
        {
            Chunk chunk = _chunks.GetOrAdd(index, static i => new Chunk(i));
            await chunk.DataLock.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                if (chunk.Evicted)
                {
                    continue;
                }
                if (chunk.Buffer is null)
                {
                    await AttachBufferAsync(chunk, MayExist(index), ct).ConfigureAwait(false);
                }
                bool aligned = ((start | length) & (SectorSize - 1)) == 0;
                if (chunk.Valid is not null && !aligned && !AllValid(chunk.Valid, start, length))
                {
                    await LoadAsync(chunk, ct).ConfigureAwait(false);
                }
                Span<byte> target = chunk.Buffer.AsSpan(start, length);
                if (source.IsEmpty)
                {
                    target.Clear();
                }
                else
                {
                    source.Span.CopyTo(target);
                }
                if (chunk.Valid is not null)
                {
                    MarkValid(chunk.Valid, start, length);
                    if (chunk.Valid.AsSpan().IndexOfAnyExcept(ulong.MaxValue) < 0)
                    {
                        chunk.Valid = null;
                    }
                }
                long now = Environment.TickCount64;
                if (!chunk.IsDirty)
                {
                    chunk.DirtySince = now;
                }
                long version = Volatile.Read(ref chunk.Version) + 1;
                Volatile.Write(ref chunk.Version, version);
                chunk.LastUse = now;
                chunk.WrittenBytes += length;
                _allocated.Set(index, true);
                if (chunk.WrittenBytes >= _objectSize)
                {
                    // A chunk's worth written (a sequential writer moved past it): write it back now.
                    ScheduleUpload(chunk);
                }
                return (chunk, version);
            }
            finally
            {
                chunk.DataLock.Release();
            }
        }
    }

    /// <summary>Trim or zero: whole chunks lose their objects (unless NO_HOLE), the edges get zeros through the cache.</summary>
    private async Task ClearAsync(long offset, long length, bool keepAllocated, bool fua, CancellationToken ct)
    {
        if (length == 0)
        {
            return;
        }
        long end = offset + length;
        long chunkEnd(long index) => Math.Min(Size, (index + 1) << _objectShift);
        var edges = new List<Task>();
        var whole = new List<long>();
        for (long index = offset >> _objectShift; index << _objectShift < end; index++)
        {
            long from = Math.Max(offset, index << _objectShift);
            long to = Math.Min(end, chunkEnd(index));
            bool covers = from == index << _objectShift && to == chunkEnd(index);
            if (covers && !keepAllocated)
            {
                // Skip the (possibly many) chunks that hold nothing anywhere.
                if (_allocated.Get(index) || _chunks.ContainsKey(index))
                {
                    whole.Add(index);
                }
            }
            else
            {
                edges.Add(ChangeAsync(from, to - from, default, zero: true, fua, ct));
            }
        }
        await Task.WhenAll(edges.Concat(whole.Select(index => DropChunkAsync(index, ct)))).ConfigureAwait(false);
    }

    /// <summary>Deletes a chunk's object and forgets its cached bytes; afterwards it is a hole.</summary>
    private async Task DropChunkAsync(long index, CancellationToken ct)
    {
        while (true)
        {
            Chunk chunk = _chunks.GetOrAdd(index, static i => new Chunk(i));
            await chunk.UploadLock.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                await chunk.DataLock.WaitAsync(ct).ConfigureAwait(false);
                try
                {
                    if (chunk.Evicted)
                    {
                        continue;
                    }
                    if (_allocated.Get(index))
                    {
                        // Cleared before the DELETE: a small read bypasses these locks, and once the
                        // object may be gone its missing object is the trim's doing, not a loss.
                        bool wasStored = _stored.Get(index);
                        _stored.Set(index, false);
                        Interlocked.Increment(ref _drops); // after the clear: see ReadPartAsync
                        try
                        {
                            await StoreAsync(async () =>
                            {
                                await _store.DeleteAsync(Key(index), ct).ConfigureAwait(false);
                                return 0;
                            }, "DELETE", index, ct).ConfigureAwait(false);
                        }
                        catch
                        {
                            // The trim failed and the chunk keeps its data, as far as anyone knows.
                            _stored.Set(index, wasStored);
                            throw;
                        }
                        _allocated.Set(index, false);
                    }
                    RemoveLocked(chunk);
                    return;
                }
                finally
                {
                    chunk.DataLock.Release();
                }
            }
            finally
            {
                chunk.UploadLock.Release();
            }
        }
    }

    // ---------------------------------------------------------------- write-back

    private async Task FlushDirtyAsync(CancellationToken ct)
    {
        // Versions taken now: the flush covers every write completed before it, not later ones.
        (Chunk, long)[] dirty = _chunks.Values.Where(c => c.IsDirty).Select(c => (c, Volatile.Read(ref c.Version))).ToArray();
        await Task.WhenAll(dirty.Select(d => UploadAsync(d.Item1, d.Item2, ct))).ConfigureAwait(false);
    }

    /// <summary>Returns once the store holds <paramref name="target"/> or a later version of the chunk.</summary>
    private async Task UploadAsync(Chunk chunk, long target, CancellationToken ct)
    {
        if (Volatile.Read(ref chunk.CleanVersion) >= target)
        {
            return;
        }
        await chunk.UploadLock.WaitAsync(ct).ConfigureAwait(false);
        byte[]? snapshot = null;
        try
        {
            if (Volatile.Read(ref chunk.CleanVersion) >= target)
            {
                return; // an upload that finished while we waited covered it
            }
            long version;
            await chunk.DataLock.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                if (chunk.Evicted || chunk.Buffer is null)
                {
                    return; // a trim dropped the chunk after the write: nothing left to store
                }
                if (chunk.Valid is not null)
                {
                    await LoadAsync(chunk, ct).ConfigureAwait(false);
                }
                // Upload a copy so writers need not wait for the network.
                snapshot = ArrayPool<byte>.Shared.Rent(_objectSize);
                chunk.Buffer.AsSpan(0, _objectSize).CopyTo(snapshot);
                version = Volatile.Read(ref chunk.Version);
                chunk.WrittenBytes = 0;
            }
            finally
            {
                chunk.DataLock.Release();
            }
            // Not the caller's token: an upload cut off halfway could leave a torn object behind.
            await StoreAsync(async () =>
            {
                await _store.PutAsync(Key(chunk.Index), snapshot, _objectSize, CancellationToken.None).ConfigureAwait(false);
                return 0;
            }, "PUT", chunk.Index, CancellationToken.None).ConfigureAwait(false);
            // Under the upload lock, which a trim takes too: no DELETE of this chunk runs meanwhile.
            _stored.Set(chunk.Index, true);
            Volatile.Write(ref chunk.CleanVersion, version);
            if (chunk.IsDirty)
            {
                chunk.DirtySince = Environment.TickCount64;
            }
        }
        finally
        {
            chunk.UploadLock.Release();
            if (snapshot is not null)
            {
                ArrayPool<byte>.Shared.Return(snapshot);
            }
        }
    }

    private void ScheduleUpload(Chunk chunk)
    {
        if (_disposed || Interlocked.Exchange(ref chunk.UploadQueued, 1) != 0)
        {
            return;
        }
        _ = Task.Run(async () =>
        {
            Volatile.Write(ref chunk.UploadQueued, 0);
            try
            {
                await UploadAsync(chunk, Volatile.Read(ref chunk.Version), _stopping.Token).ConfigureAwait(false);
            }
            catch (Exception)
            {
                // Stays dirty: the next FLUSH (or the idle timer) tries again, and reports the error.
                Interlocked.Increment(ref _backgroundFailures);
            }
        });
    }

    private void WriteBackIdle()
    {
        if (_disposed)
        {
            return;
        }
        long now = Environment.TickCount64;
        foreach (Chunk chunk in _chunks.Values)
        {
            if (chunk.IsDirty && now - chunk.DirtySince >= _writebackTicks)
            {
                ScheduleUpload(chunk);
            }
        }
    }

    // ---------------------------------------------------------------- cache memory

    /// <summary>Gives a chunk a buffer, after making room for it. Caller holds the chunk's data lock.</summary>
    private async Task AttachBufferAsync(Chunk chunk, bool exists, CancellationToken ct)
    {
        await ReserveAsync(ct).ConfigureAwait(false);
        byte[] buffer = ArrayPool<byte>.Shared.Rent(_objectSize);
        buffer.AsSpan(0, _objectSize).Clear();
        chunk.Buffer = buffer;
        // A chunk with no object is all zeros, known; an existing one is known sector by sector as written.
        chunk.Valid = null;
        if (exists)
        {
            ulong[] valid = new ulong[Math.Max(1, (_objectSize >> SectorShift) / 64)];
            if ((_objectSize >> SectorShift) < 64)
            {
                // Fewer than 64 sectors: the bits past the chunk count as valid so "all valid" still means all ones.
                valid[0] = ~0UL << (_objectSize >> SectorShift);
            }
            chunk.Valid = valid;
        }
    }

    private async Task ReserveAsync(CancellationToken ct)
    {
        Interlocked.Add(ref _cachedBytes, _objectSize);
        // Bounded: when everything is locked for a long time, overcommit rather than stall forever.
        for (int attempt = 0; attempt < 2000 && Interlocked.Read(ref _cachedBytes) > _cacheLimit; attempt++)
        {
            if (EvictClean())
            {
                continue;
            }
            Chunk? oldest = _chunks.Values.Where(c => c.IsDirty && c.UploadLock.CurrentCount > 0).MinBy(c => c.DirtySince);
            if (oldest is not null)
            {
                try
                {
                    await UploadAsync(oldest, Volatile.Read(ref oldest.Version), ct).ConfigureAwait(false);
                }
                catch
                {
                    Interlocked.Add(ref _cachedBytes, -_objectSize);
                    throw;
                }
            }
            else
            {
                await Task.Delay(5, ct).ConfigureAwait(false);
            }
        }
    }

    /// <summary>Drops the least recently used clean chunks until the cache is 1/8 under its limit; false when none could go.</summary>
    private bool EvictClean()
    {
        long excess = Interlocked.Read(ref _cachedBytes) - _cacheLimit * 7 / 8;
        bool any = false;
        foreach (Chunk chunk in _chunks.Values.Where(c => c.Buffer is not null && !c.IsDirty).OrderBy(c => c.LastUse).ToArray())
        {
            if (excess <= 0)
            {
                break;
            }
            if (!chunk.UploadLock.Wait(0))
            {
                continue;
            }
            try
            {
                if (!chunk.DataLock.Wait(0))
                {
                    continue;
                }
                try
                {
                    if (chunk.Evicted || chunk.Buffer is null || chunk.IsDirty)
                    {
                        continue;
                    }
                    RemoveLocked(chunk);
                    excess -= _objectSize;
                    any = true;
                }
                finally
                {
                    chunk.DataLock.Release();
                }
            }
            finally
            {
                chunk.UploadLock.Release();
            }
        }
        return any;
    }

    /// <summary>Takes a chunk out of the cache. Caller holds both its locks.</summary>
    private void RemoveLocked(Chunk chunk)
    {
        chunk.Evicted = true;
        _chunks.TryRemove(new KeyValuePair<long, Chunk>(chunk.Index, chunk));
        if (chunk.Buffer is { } buffer)
        {
            chunk.Buffer = null;
            ArrayPool<byte>.Shared.Return(buffer);
            Interlocked.Add(ref _cachedBytes, -_objectSize);
        }
    }

    // ---------------------------------------------------------------- helpers

    private string Key(long index) => S3DeviceOptions.Key(_prefix, index);

    /// <summary>A GET found no object for a chunk the gateway stored or listed: the data is lost, which is EIO, not zeros.</summary>
    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private void ThrowMissing(long index)
    {
        _missing.TryAdd(index, 0);
        throw new BlockDeviceException(BlockErrorKind.Io, $"S3 object {Key(index)} is missing although it was stored: refusing to read it as zeros");
    }

    private delegate Task PartAction(long index, int start, int at, int length);

    /// <summary>Runs <paramref name="action"/> on each chunk the range touches, in parallel when there are several.</summary>
    private Task ForEachPartAsync(long offset, long length, PartAction action)
    {
        if (length == 0)
        {
            return Task.CompletedTask;
        }
        long end = offset + length;
        long first = offset >> _objectShift;
        long last = (end - 1) >> _objectShift;
        if (first == last)
        {
            return action(first, (int)(offset - (first << _objectShift)), 0, (int)length);
        }
        var parts = new List<Task>((int)Math.Min(last - first + 1, 1 << 16));
        for (long index = first; index <= last; index++)
        {
            long from = Math.Max(offset, index << _objectShift);
            long to = Math.Min(end, (index + 1) << _objectShift);
            parts.Add(action(index, (int)(from - (index << _objectShift)), (int)(from - offset), (int)(to - from)));
        }
        return Task.WhenAll(parts);
    }

    /// <summary>One store call under the export's parallelism limit; failures become EIO.</summary>
    private Task<int> StoreAsync(Func<Task<int>> call, string what, long index, CancellationToken ct) =>
        S3DeviceOptions.StoreCallAsync(_io, call, what, Key(index), ct);

    private static bool IsValid(ulong[] valid, int sector) => (valid[sector >> 6] & (1UL << (sector & 63))) != 0;

    private static bool AllValid(ulong[] valid, int start, int length)
    {
        int last = (start + length - 1) >> SectorShift;
        for (int s = start >> SectorShift; s <= last; s++)
        {
            if (!IsValid(valid, s))
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>Marks the sectors a write covers entirely; partly covered edges stay unknown.</summary>
    private static void MarkValid(ulong[] valid, int start, int length)
    {
        int first = (start + SectorSize - 1) >> SectorShift;
        int end = (start + length) >> SectorShift;
        for (int s = first; s < end; s++)
        {
            valid[s >> 6] |= 1UL << (s & 63);
        }
    }

    private void ThrowIfDisposed() => DeviceBounds.ThrowIfClosed(_disposed);

    private void ThrowIfNotWritable() => DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
}
