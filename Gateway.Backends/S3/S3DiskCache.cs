using System.Threading.Channels;
using Microsoft.Win32.SafeHandles;

namespace Gateway.Backends.S3;

/// <summary>
/// The read cache's optional disk tier (issue 18): blocks the memory tier (<see cref="S3ReadCache"/>)
/// evicted, one file per block in a local folder, up to a bound of bytes, least recently used out
/// first. Keyed like the memory tier (object key, version, block), so the same rules keep it fresh:
/// a chunk's version is only known in memory, which is why the index of files is in memory too and
/// an open empties the folder. A file from an earlier run (a crash may leave one half written, or a
/// chunk may have been rewritten since) is therefore never served.
/// <para>
/// Eviction only queues a block: one writer task stores it under a temporary name and renames it,
/// so a reader never opens a file that is still being written, and a block not on disk yet is
/// served from the queue. A read is one open and one read of a file, off the lock; any failure
/// (a file deleted or cut short behind the gateway's back) drops the entry and the caller GETs.
/// </para>
/// </summary>
internal sealed class S3DiskCache : IDisposable
{
    /// <summary>The folder's lock: two exports (or gateways) sharing a folder would empty each other's cache at open.</summary>
    public const string LockFileName = "gateway-read-cache.lock";

    private const string BlockSuffix = ".block";
    private const string TempSuffix = ".tmp";

    /// <summary>How long an open waits for the folder's lock: the export's previous instance lets go once its last block is written.</summary>
    private static readonly TimeSpan LockWait = TimeSpan.FromSeconds(3);

    private sealed class Entry(S3ReadCache.BlockKey key, byte[] bytes, long file)
    {
        public readonly S3ReadCache.BlockKey Key = key;
        public readonly int Length = bytes.Length;
        public readonly long File = file;

        /// <summary>The bytes until the writer has stored them; null after.</summary>
        public byte[]? Pending = bytes;

        /// <summary>Out of the index (evicted or removed): the writer deletes its file, or does not write it.</summary>
        public bool Dropped;

        public LinkedListNode<Entry>? Node;
    }

    private readonly string _directory;
    private readonly long _limit;
    private readonly long _pendingLimit;
    private readonly FileStream _lockFile;
    private readonly Lock _lock = new();
    private readonly Dictionary<S3ReadCache.BlockKey, Entry> _entries = [];
    private readonly LinkedList<Entry> _lru = new(); // most recently used first
    private readonly Channel<Entry> _work = Channel.CreateUnbounded<Entry>(new UnboundedChannelOptions { SingleReader = true });
    private readonly Task _writer;
    private readonly string _instance = Guid.NewGuid().ToString("N")[..12];
    private long _nextFile;
    private long _bytes;
    private long _pendingBytes;
    private long _queued; // work the writer has not finished
    private long _hits;
    private long _writeFailures;
    private volatile bool _disposed;

    private S3DiskCache(string directory, long limitBytes, FileStream lockFile)
    {
        _directory = directory;
        _limit = limitBytes;
        _pendingLimit = Math.Min(limitBytes, 64L << 20); // evictions faster than the disk are dropped, not queued without end
        _lockFile = lockFile;
        _writer = Task.Run(WriteLoopAsync);
    }

    /// <summary>
    /// Takes the folder (created if need be) and empties it of the cache's files. Throws
    /// <see cref="BlockDeviceException"/> saying what is wrong when the folder cannot be used.
    /// </summary>
    public static async Task<S3DiskCache> OpenAsync(string directory, long limitBytes, CancellationToken cancellationToken)
    {
        if (!Path.IsPathFullyQualified(directory))
        {
            throw Problem(directory, "the path must be absolute", null);
        }
        try
        {
            Directory.CreateDirectory(directory);
        }
        catch (Exception e) when (e is UnauthorizedAccessException or IOException)
        {
            throw Problem(directory, e is UnauthorizedAccessException ? "it cannot be created" : $"it cannot be used ({e.Message})", e);
        }
        FileStream lockFile;
        for (long started = Environment.TickCount64; ;)
        {
            try
            {
                lockFile = new FileStream(Path.Combine(directory, LockFileName), FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
                break;
            }
            catch (UnauthorizedAccessException e)
            {
                throw Problem(directory, "it is not writable", e);
            }
            catch (IOException) when (Environment.TickCount64 - started < LockWait.TotalMilliseconds)
            {
                // Held: the holder may be the export's previous instance, letting go.
                await Task.Delay(100, cancellationToken).ConfigureAwait(false);
            }
            catch (IOException e)
            {
                throw Problem(directory, $"it is in use by another export or gateway, or cannot be used ({e.Message})", e);
            }
        }
        try
        {
            foreach (string file in Directory.EnumerateFiles(directory))
            {
                if (file.EndsWith(BlockSuffix, StringComparison.Ordinal) || file.EndsWith(BlockSuffix + TempSuffix, StringComparison.Ordinal))
                {
                    File.Delete(file);
                }
            }
        }
        catch (Exception e) when (e is UnauthorizedAccessException or IOException)
        {
            lockFile.Dispose();
            throw Problem(directory, $"its old cache files cannot be deleted ({e.Message})", e);
        }
        return new S3DiskCache(directory, limitBytes, lockFile);
    }

    private static BlockDeviceException Problem(string directory, string why, Exception? inner) =>
        new(BlockErrorKind.Io, $"s3 read disk cache folder '{directory}': {why}", inner);

    /// <summary>Bytes of the blocks the tier holds or has queued; never above the bound.</summary>
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

    /// <summary>Blocks read from the tier (its files or its queue).</summary>
    public long Hits => Interlocked.Read(ref _hits);

    /// <summary>Blocks that could not be written (full or failing disk): dropped, the cache is only a cache.</summary>
    public long WriteFailures => Interlocked.Read(ref _writeFailures);

    /// <summary>Takes a block the memory tier evicted; returns at once (the writer stores it).</summary>
    public void Add(S3ReadCache.BlockKey key, byte[] bytes)
    {
        if (_disposed || bytes.Length > _limit)
        {
            return;
        }
        lock (_lock)
        {
            if (_entries.TryGetValue(key, out Entry? existing))
            {
                Touch(existing);
                return;
            }
            if (_pendingBytes + bytes.Length > _pendingLimit)
            {
                return;
            }
            // Room first: the evicted files are deleted before this one is written, so the folder
            // itself stays within the bound, not only the count.
            while (_bytes + bytes.Length > _limit && _lru.Last is { } oldest)
            {
                DropLocked(oldest.Value);
            }
            var entry = new Entry(key, bytes, _nextFile++);
            _entries[key] = entry;
            entry.Node = _lru.AddFirst(entry);
            _bytes += entry.Length;
            _pendingBytes += entry.Length;
            Queue(entry);
        }
    }

    /// <summary>The block's bytes, or null when the tier does not have it (or its file failed to read).</summary>
    public async ValueTask<byte[]?> ReadAsync(S3ReadCache.BlockKey key)
    {
        Entry? entry;
        lock (_lock)
        {
            if (_disposed)
            {
                return null; // the folder may be the next instance's already
            }
            if (!_entries.TryGetValue(key, out entry))
            {
                return null;
            }
            Touch(entry);
            if (entry.Pending is { } pending)
            {
                Interlocked.Increment(ref _hits);
                return pending;
            }
        }
        byte[] bytes = GC.AllocateUninitializedArray<byte>(entry.Length);
        try
        {
            using SafeFileHandle file = File.OpenHandle(PathOf(entry), FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, FileOptions.Asynchronous);
            // The writer renamed the file only once it was whole; a length that does not match is a
            // file changed behind the gateway's back: not served.
            if (RandomAccess.GetLength(file) == entry.Length &&
                await RandomAccess.ReadAsync(file, bytes, 0).ConfigureAwait(false) == entry.Length)
            {
                Interlocked.Increment(ref _hits);
                return bytes;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
        lock (_lock)
        {
            if (_entries.TryGetValue(key, out Entry? current) && current == entry)
            {
                DropLocked(entry);
            }
        }
        return null;
    }

    /// <summary>Drops a block (a chunk version compaction replaced, a segment deleted, a torn read); its file goes with the writer's next turn.</summary>
    public void Remove(S3ReadCache.BlockKey key)
    {
        lock (_lock)
        {
            if (_entries.TryGetValue(key, out Entry? entry))
            {
                DropLocked(entry);
            }
        }
    }

    /// <summary>Waits until every queued block is written or dropped (tests).</summary>
    internal async Task DrainAsync()
    {
        while (!_disposed)
        {
            lock (_lock)
            {
                if (_queued == 0)
                {
                    return;
                }
            }
            await Task.Delay(5).ConfigureAwait(false);
        }
    }

    /// <summary>The cache's files in the folder now (tests).</summary>
    internal long FileBytes() =>
        Directory.EnumerateFiles(_directory, "*" + BlockSuffix).Sum(f => new FileInfo(f).Length);

    /// <summary>Waits for the block being written (at most one), so the next open of the folder meets no writer; leaves the files for that open to delete.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _work.Writer.TryComplete();
        try
        {
            _writer.Wait(TimeSpan.FromSeconds(30));
        }
        catch (AggregateException)
        {
        }
        _lockFile.Dispose();
    }

    private void Touch(Entry entry)
    {
        _lru.Remove(entry.Node!);
        _lru.AddFirst(entry.Node!);
    }

    private void DropLocked(Entry entry)
    {
        _entries.Remove(entry.Key);
        _lru.Remove(entry.Node!);
        entry.Node = null;
        entry.Dropped = true;
        _bytes -= entry.Length;
        if (entry.Pending is not null)
        {
            entry.Pending = null; // the writer finds it dropped and writes nothing
            _pendingBytes -= entry.Length;
        }
        else
        {
            Queue(entry); // written: the writer deletes the file
        }
    }

    private void Queue(Entry entry)
    {
        _queued++;
        _work.Writer.TryWrite(entry);
    }

    /// <summary>Named by this instance's own prefix too: a read that raced this instance's dispose never opens the next instance's file of the same number.</summary>
    private string PathOf(Entry entry) => Path.Combine(_directory, $"{_instance}-{entry.File:x16}{BlockSuffix}");

    /// <summary>One writer, so evictions' deletes and new blocks reach the disk in the order they were decided.</summary>
    private async Task WriteLoopAsync()
    {
        await foreach (Entry entry in _work.Reader.ReadAllAsync().ConfigureAwait(false))
        {
            if (_disposed)
            {
                return; // the next open deletes what is there
            }
            await WriteOrDeleteAsync(entry).ConfigureAwait(false);
            lock (_lock)
            {
                _queued--;
            }
        }
    }

    private async Task WriteOrDeleteAsync(Entry entry)
    {
        string path = PathOf(entry);
        byte[]? bytes;
        lock (_lock)
        {
            bytes = entry.Pending;
        }
        try
        {
            if (bytes is null)
            {
                if (entry.Dropped)
                {
                    File.Delete(path);
                }
                return;
            }
            string temp = path + TempSuffix;
            await File.WriteAllBytesAsync(temp, bytes).ConfigureAwait(false);
            File.Move(temp, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Interlocked.Increment(ref _writeFailures);
            TryDelete(path + TempSuffix);
            lock (_lock)
            {
                if (entry.Pending is not null)
                {
                    DropLocked(entry);
                }
            }
            return;
        }
        bool dropped;
        lock (_lock)
        {
            dropped = entry.Dropped;
            if (entry.Pending is not null)
            {
                entry.Pending = null;
                _pendingBytes -= entry.Length;
            }
        }
        if (dropped)
        {
            TryDelete(path); // dropped while it was written
        }
    }

    private void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Interlocked.Increment(ref _writeFailures);
        }
    }
}
