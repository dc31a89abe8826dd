namespace Gateway.Backends.S3;

/// <summary>
/// The write log's read cache (issue 18): fixed-size blocks of objects fetched by ranged GETs, kept
/// in memory up to a bound and evicted least recently used first. A block is keyed by the object's
/// key, a version and the block's index in the object: segment objects never change (version 0),
/// and a chunk object's version goes up each time compaction rewrites or deletes it, so a block of
/// an older chunk is never found again. The extent index decides which object a read goes to; the
/// cache only answers for that object's bytes, so a write, TRIM or WRITE_ZEROES never meets a stale
/// block. Concurrent reads of a missing block share one GET; consecutive missing blocks of one read
/// are fetched by one GET (at most <c>maxRunBytes</c>), which is also how read-ahead asks for them.
/// An optional disk tier (<see cref="S3DiskCache"/>) behind the memory takes the blocks it evicts
/// and is asked before a GET.
/// </summary>
internal sealed class S3ReadCache : IDisposable
{
    /// <summary>Reads <paramref name="destination"/>.Length bytes of the object from <paramref name="start"/>: <see cref="IObjectStore.GetAsync"/>'s contract.</summary>
    public delegate Task<int> Fetch(string key, long start, Memory<byte> destination, CancellationToken cancellationToken);

    internal readonly record struct BlockKey(string Key, long Version, long Block);

    private sealed class Entry(BlockKey key)
    {
        public readonly BlockKey Key = key;

        /// <summary>The block's bytes (shorter at the object's end); null when the object does not exist.</summary>
        public readonly TaskCompletionSource<byte[]?> Bytes = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public LinkedListNode<Entry>? Node;
    }

    private readonly Lock _lock = new();
    private readonly Dictionary<BlockKey, Entry> _entries = [];
    private readonly LinkedList<Entry> _lru = new(); // most recently used first
    private readonly long _limit;
    private readonly int _blockShift;
    private readonly int _maxRunBlocks;
    private readonly Fetch _fetch;
    private readonly S3DiskCache? _disk;
    private long _bytes;
    private long _hits;
    private long _misses;
    private long _gets;

    public S3ReadCache(long limitBytes, int blockBytes, int maxRunBytes, Fetch fetch, S3DiskCache? disk = null)
    {
        if (blockBytes < 512 || !int.IsPow2(blockBytes))
        {
            throw new ArgumentException($"read cache block size {blockBytes} must be a power of two of at least 512", nameof(blockBytes));
        }
        _limit = Math.Max(0, limitBytes);
        BlockBytes = blockBytes;
        _blockShift = System.Numerics.BitOperations.Log2((uint)blockBytes);
        _maxRunBlocks = Math.Max(1, maxRunBytes >> _blockShift);
        _fetch = fetch;
        _disk = disk;
    }

    public int BlockBytes { get; }

    public bool Enabled => _limit >= BlockBytes;

    /// <summary>Bytes the cache holds or has reserved for GETs in flight; never above the bound once a call returns.</summary>
    public long Bytes
    {
        get
        {
            lock (_lock)
            {
                return _bytes;
            }
        }
    }

    public long Hits => Interlocked.Read(ref _hits);

    public long Misses => Interlocked.Read(ref _misses);

    /// <summary>GETs the cache issued (one per run of consecutive missing blocks not on disk either).</summary>
    public long Gets => Interlocked.Read(ref _gets);

    /// <summary>The disk tier, when there is one.</summary>
    public S3DiskCache? Disk => _disk;

    /// <summary>Reads through the cache: like <see cref="IObjectStore.GetAsync"/>, the bytes read (fewer at the object's end) or -1 when the object does not exist.</summary>
    public async Task<int> ReadAsync(string key, long version, long start, Memory<byte> target, CancellationToken cancellationToken)
    {
        if (target.IsEmpty)
        {
            return 0;
        }
        if (!Enabled)
        {
            return await _fetch(key, start, target, cancellationToken).ConfigureAwait(false);
        }
        Entry[] blocks = Acquire(key, version, start, target.Length, prefetch: false);
        int done = 0;
        foreach (Entry entry in blocks)
        {
            byte[]? bytes = await entry.Bytes.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
            if (bytes is null)
            {
                return done == 0 ? -1 : done;
            }
            long blockStart = entry.Key.Block << _blockShift;
            int from = (int)(start + done - blockStart);
            int count = Math.Min(target.Length - done, bytes.Length - from);
            if (count <= 0)
            {
                return done;
            }
            bytes.AsSpan(from, count).CopyTo(target.Span[done..]);
            done += count;
            if (from + count < BlockBytes && done < target.Length)
            {
                return done; // the object ends in this block
            }
        }
        return done;
    }

    /// <summary>Starts the GETs for the blocks of a range that are not cached or on their way; returns at once.</summary>
    public void Prefetch(string key, long version, long start, long length)
    {
        if (Enabled && length > 0)
        {
            Acquire(key, version, start, length, prefetch: true);
        }
    }

    /// <summary>Keeps the blocks of a whole object's bytes (a segment leaving the log's memory window), where not cached yet.</summary>
    public void AddObject(string key, long version, ReadOnlySpan<byte> whole)
    {
        if (!Enabled)
        {
            return;
        }
        lock (_lock)
        {
            for (long block = 0; block << _blockShift < whole.Length; block++)
            {
                var id = new BlockKey(key, version, block);
                if (_entries.ContainsKey(id))
                {
                    continue;
                }
                int from = (int)(block << _blockShift);
                var entry = new Entry(id);
                entry.Bytes.SetResult(whole.Slice(from, Math.Min(BlockBytes, whole.Length - from)).ToArray());
                InsertLocked(entry);
            }
            EvictLocked();
        }
    }

    /// <summary>Whether any block of the range is cached (or on its way).</summary>
    public bool Contains(string key, long version, long start, long length)
    {
        if (!Enabled || length <= 0)
        {
            return false;
        }
        lock (_lock)
        {
            for (long block = start >> _blockShift; block <= (start + length - 1) >> _blockShift; block++)
            {
                if (_entries.ContainsKey(new BlockKey(key, version, block)))
                {
                    return true;
                }
            }
        }
        return false;
    }

    /// <summary>Keeps the blocks of an object's bytes (compaction's new chunk) whose flag in <paramref name="blocks"/> is set.</summary>
    public void AddBlocks(string key, long version, ReadOnlySpan<byte> whole, bool[] blocks)
    {
        if (!Enabled)
        {
            return;
        }
        lock (_lock)
        {
            for (int block = 0; block < blocks.Length && (long)block << _blockShift < whole.Length; block++)
            {
                var id = new BlockKey(key, version, block);
                if (!blocks[block] || _entries.ContainsKey(id))
                {
                    continue;
                }
                int from = block << _blockShift;
                var entry = new Entry(id);
                entry.Bytes.SetResult(whole.Slice(from, Math.Min(BlockBytes, whole.Length - from)).ToArray());
                InsertLocked(entry);
            }
            EvictLocked();
        }
    }

    /// <summary>Drops the blocks of one version of an object (a chunk compaction rewrote: that version is never asked for again).</summary>
    public void Remove(string key, long version, long objectBytes)
    {
        lock (_lock)
        {
            for (long block = 0; block << _blockShift < objectBytes; block++)
            {
                var id = new BlockKey(key, version, block);
                if (_entries.Remove(id, out Entry? entry))
                {
                    RemoveFromLruLocked(entry);
                }
                _disk?.Remove(id);
            }
        }
    }

    private Entry[] Acquire(string key, long version, long start, long length, bool prefetch)
    {
        long first = start >> _blockShift;
        long last = (start + length - 1) >> _blockShift;
        var blocks = prefetch ? null : new Entry[last - first + 1];
        List<List<Entry>>? runs = null;
        List<Entry>? run = null;
        lock (_lock)
        {
            for (long block = first; block <= last; block++)
            {
                var id = new BlockKey(key, version, block);
                if (_entries.TryGetValue(id, out Entry? entry))
                {
                    if (!prefetch)
                    {
                        Interlocked.Increment(ref _hits);
                        _lru.Remove(entry.Node!);
                        _lru.AddFirst(entry.Node!);
                    }
                    run = null;
                }
                else
                {
                    if (!prefetch)
                    {
                        Interlocked.Increment(ref _misses);
                    }
                    entry = new Entry(id);
                    InsertLocked(entry);
                    if (run is null || run.Count == _maxRunBlocks)
                    {
                        (runs ??= []).Add(run = []);
                    }
                    run.Add(entry);
                }
                if (blocks is not null)
                {
                    blocks[block - first] = entry;
                }
            }
            EvictLocked();
        }
        if (runs is not null)
        {
            foreach (List<Entry> missing in runs)
            {
                _ = Task.Run(() => FetchRunAsync(key, missing));
            }
        }
        return blocks ?? [];
    }

    /// <summary>The blocks of a run the disk tier has, then one GET for each stretch of the others.</summary>
    private async Task FetchRunAsync(string key, List<Entry> run)
    {
        if (_disk is null)
        {
            await GetRunAsync(key, run).ConfigureAwait(false);
            return;
        }
        List<Entry>? missing = null;
        foreach (Entry entry in run)
        {
            byte[]? bytes;
            try
            {
                bytes = await _disk.ReadAsync(entry.Key).ConfigureAwait(false);
            }
            catch (Exception)
            {
                bytes = null; // the disk tier is only a cache: whatever fails there is a miss, never a read left waiting
            }
            if (bytes is not null)
            {
                if (missing is not null)
                {
                    await GetRunAsync(key, missing).ConfigureAwait(false);
                    missing = null;
                }
                entry.Bytes.TrySetResult(bytes);
            }
            else
            {
                (missing ??= []).Add(entry);
            }
        }
        if (missing is not null)
        {
            await GetRunAsync(key, missing).ConfigureAwait(false);
        }
    }

    /// <summary>One GET for consecutive missing blocks; shared by every reader waiting on them, so never a reader's token.</summary>
    private async Task GetRunAsync(string key, List<Entry> run)
    {
        long runStart = run[0].Key.Block << _blockShift;
        byte[] buffer = GC.AllocateUninitializedArray<byte>(run.Count << _blockShift);
        int n;
        try
        {
            Interlocked.Increment(ref _gets);
            n = await _fetch(key, runStart, buffer, CancellationToken.None).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            Forget(run);
            foreach (Entry entry in run)
            {
                entry.Bytes.TrySetException(e);
                _ = entry.Bytes.Task.Exception; // observed: a read-ahead's failure has no reader
            }
            return;
        }
        if (n < 0)
        {
            Forget(run); // not kept: the caller decides what a missing object means
        }
        for (int i = 0; i < run.Count; i++)
        {
            int from = i << _blockShift;
            run[i].Bytes.TrySetResult(n < 0 ? null : buffer.AsSpan(from, Math.Clamp(n - from, 0, BlockBytes)).ToArray());
        }
    }

    private void Forget(List<Entry> run)
    {
        lock (_lock)
        {
            foreach (Entry entry in run)
            {
                if (_entries.TryGetValue(entry.Key, out Entry? current) && current == entry)
                {
                    _entries.Remove(entry.Key);
                    RemoveFromLruLocked(entry);
                }
            }
        }
    }

    private void InsertLocked(Entry entry)
    {
        _entries[entry.Key] = entry;
        entry.Node = _lru.AddFirst(entry);
        _bytes += BlockBytes;
    }

    private void RemoveFromLruLocked(Entry entry)
    {
        if (entry.Node is { List: not null } node)
        {
            _lru.Remove(node);
            _bytes -= BlockBytes;
        }
        entry.Node = null;
    }

    /// <summary>
    /// Least recently used first, to the disk tier if there is one; a block still on its way leaves
    /// too (its readers hold it, it just is not kept).
    /// </summary>
    private void EvictLocked()
    {
        while (_bytes > _limit && _lru.Last is { } oldest)
        {
            _entries.Remove(oldest.Value.Key);
            RemoveFromLruLocked(oldest.Value);
            if (_disk is not null && oldest.Value.Bytes.Task.IsCompletedSuccessfully && oldest.Value.Bytes.Task.Result is { } bytes)
            {
                _disk.Add(oldest.Value.Key, bytes);
            }
        }
    }

    public void Dispose() => _disk?.Dispose();
}
