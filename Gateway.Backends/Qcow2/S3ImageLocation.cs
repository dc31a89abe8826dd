using Gateway.Backends.S3;

namespace Gateway.Backends.Qcow2;

/// <summary>
/// The objects of one S3 bucket as the files of an image chain, named <c>s3://BUCKET/KEY</c> and
/// read by range. A backing file (or external data file) an image names is the key relative to the
/// image's own key, as a relative path is to a folder; an absolute name, a URL or one that climbs
/// above the bucket is refused: followed, it would read a file of the gateway's host (or another
/// store) that whoever wrote the image chose. Each object has a bounded cache of the small reads
/// (L2 tables, the clusters of 4 KiB reads), <see cref="BlockSize"/> bytes at a time; larger reads
/// go to the store as one ranged GET.
/// </summary>
public sealed class S3ImageLocation : ImageLocation, IDisposable
{
    public const int BlockSize = 256 << 10;
    public const long DefaultCacheBytes = 64L << 20;

    private readonly IObjectStore _store;
    private readonly long _cacheBytes;
    private int _users = 1;

    /// <summary>Takes ownership of <paramref name="store"/>: it is disposed with the location and the last object opened from it.</summary>
    public S3ImageLocation(IObjectStore store, string endpoint, string bucket, long cacheBytes = DefaultCacheBytes)
    {
        _store = store;
        Endpoint = endpoint;
        Bucket = bucket;
        _cacheBytes = cacheBytes;
    }

    public string Endpoint { get; }

    public string Bucket { get; }

    /// <summary>Whether <paramref name="name"/> is an <c>s3://BUCKET/KEY</c> name.</summary>
    public static bool IsS3Name(string name) => name.StartsWith("s3://", StringComparison.Ordinal);

    /// <summary>The bucket and key of <c>s3://BUCKET/KEY</c>, or null when it is not one.</summary>
    public static (string Bucket, string Key)? Split(string name)
    {
        if (!IsS3Name(name))
        {
            return null;
        }
        string rest = name["s3://".Length..];
        int slash = rest.IndexOf('/', StringComparison.Ordinal);
        return slash <= 0 || slash == rest.Length - 1 ? null : (rest[..slash], rest[(slash + 1)..]);
    }

    public string NameOf(string key) => $"s3://{Bucket}/{key}";

    public override ImageSource Open(string name)
    {
        string key = KeyOf(name);
        long length;
        try
        {
            length = _store.GetLengthAsync(key, CancellationToken.None).GetAwaiter().GetResult();
        }
        catch (Exception e) when (e is not (IOException or Qcow2Exception))
        {
            // The store unreachable or refusing: "cannot be opened", with the store's reason.
            throw new IOException($"{e.Message} ({Endpoint})", e);
        }
        Interlocked.Increment(ref _users);
        return new S3ObjectSource(this, name, key, length);
    }

    public override string Resolve(string referrer, string reference)
    {
        if (reference.Length == 0 || reference.StartsWith('/') || reference.Contains("://", StringComparison.Ordinal) || reference.Contains('\\', StringComparison.Ordinal))
        {
            throw new Qcow2Exception(referrer, $"names '{reference}', which is not a key relative to its own: an image in S3 may only name objects of its bucket, by relative name");
        }
        string key = KeyOf(referrer);
        var parts = new List<string>(key.Split('/')[..^1]);
        foreach (string part in reference.Split('/'))
        {
            switch (part)
            {
                case "" or ".":
                    break;
                case "..":
                    if (parts.Count == 0)
                    {
                        throw new Qcow2Exception(referrer, $"names '{reference}', which climbs above the bucket");
                    }
                    parts.RemoveAt(parts.Count - 1);
                    break;
                default:
                    parts.Add(part);
                    break;
            }
        }
        return NameOf(string.Join('/', parts));
    }

    public void Dispose() => Release();

    private void Release()
    {
        if (Interlocked.Decrement(ref _users) == 0)
        {
            _store.Dispose();
        }
    }

    private string KeyOf(string name) =>
        Split(name) is (string bucket, string key) && bucket == Bucket
            ? key
            : throw new ArgumentException($"'{name}' is not an object of s3://{Bucket}", nameof(name));

    /// <summary>One object, read by range through an LRU cache of blocks.</summary>
    private sealed class S3ObjectSource(S3ImageLocation location, string name, string key, long length) : ImageSource
    {
        private readonly Dictionary<long, LinkedListNode<(long Block, byte[] Bytes)>> _index = [];
        private readonly LinkedList<(long Block, byte[] Bytes)> _order = new();
        private readonly Lock _lock = new();
        private readonly int _capacity = (int)Math.Max(4, location._cacheBytes / BlockSize);
        private int _disposed;

        public override string Name => name;

        public override long Length => length;

        public override int Read(Span<byte> destination, long offset)
        {
            if (offset >= length || destination.IsEmpty)
            {
                return 0;
            }
            destination = destination[..(int)Math.Min(destination.Length, length - offset)];
            if (destination.Length >= BlockSize)
            {
                byte[] bytes = new byte[destination.Length];
                int got = Get(offset, bytes);
                bytes.AsSpan(0, got).CopyTo(destination);
                return got;
            }
            int total = 0;
            while (total < destination.Length)
            {
                long at = offset + total;
                long block = at / BlockSize;
                byte[] bytes = Block(block);
                int inside = (int)(at - block * BlockSize);
                int n = Math.Min(destination.Length - total, bytes.Length - inside);
                if (n <= 0)
                {
                    break;
                }
                bytes.AsSpan(inside, n).CopyTo(destination[total..]);
                total += n;
            }
            return total;
        }

        public override bool TryReadNoWait(Span<byte> destination, long offset)
        {
            long block = offset / BlockSize;
            if (offset + destination.Length > Math.Min(length, (block + 1) * BlockSize))
            {
                return false;
            }
            lock (_lock)
            {
                if (!_index.TryGetValue(block, out var node))
                {
                    return false;
                }
                node.Value.Bytes.AsSpan((int)(offset - block * BlockSize), destination.Length).CopyTo(destination);
                return true;
            }
        }

        private byte[] Block(long block)
        {
            lock (_lock)
            {
                if (_index.TryGetValue(block, out var node))
                {
                    _order.Remove(node);
                    _order.AddFirst(node);
                    return node.Value.Bytes;
                }
            }
            // Fetched outside the lock: two readers missing the same block both fetch it, harmlessly.
            long start = block * BlockSize;
            byte[] bytes = new byte[(int)Math.Min(BlockSize, length - start)];
            int got = Get(start, bytes);
            if (got != bytes.Length)
            {
                throw new IOException($"{name} answered {got} bytes at {start}, not {bytes.Length}: the object is shorter than when it was opened ({length} bytes)");
            }
            lock (_lock)
            {
                if (!_index.ContainsKey(block))
                {
                    _index[block] = _order.AddFirst((block, bytes));
                    if (_index.Count > _capacity)
                    {
                        _index.Remove(_order.Last!.Value.Block);
                        _order.RemoveLast();
                    }
                }
            }
            return bytes;
        }

        private int Get(long start, byte[] destination)
        {
            // The qcow2 reader is synchronous (one reader serves every export on the image); a read
            // from S3 holds its thread-pool thread for the GET.
            int got = location._store.GetAsync(key, start, destination, CancellationToken.None).GetAwaiter().GetResult();
            return got >= 0 ? got : throw new IOException($"{name} no longer exists in the store");
        }

        public override void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                location.Release();
            }
        }
    }
}
