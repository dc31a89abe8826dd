using System.Buffers.Binary;

namespace Gateway.Backends.Overlay;

/// <summary>What a layer holds for one cluster.</summary>
public enum ClusterState : byte
{
    /// <summary>Not in this layer: the layers below show through.</summary>
    Absent = 0,

    /// <summary>The layer's data store holds the cluster.</summary>
    Data = 1,

    /// <summary>Zeroed or trimmed in this layer: reads give zeros and the layers below are masked.</summary>
    Zero = 2,
}

/// <summary>
/// A layer's allocation map: one <see cref="ClusterState"/> byte per cluster, kept in memory and
/// persisted to a store (a sidecar file) by <see cref="TakeDirtyPages"/> / <see cref="WritePagesAsync"/>.
/// The store holds a 4 KiB header (magic, version, cluster size, layer size) and then the states;
/// only the 4 KiB pages of states changed since the last persist are written.
/// </summary>
public sealed class LayerMap : IDisposable
{
    public const int DefaultClusterSize = 64 * 1024;
    public const int HeaderSize = 4096;
    private const int PageShift = 12;
    private const int PageSize = 1 << PageShift;
    private const int Version = 1;
    private static ReadOnlySpan<byte> Magic => "GWLAYER1"u8;

    private readonly IBlockDevice _store;
    // Replaced (never changed in length) by ExtendAsync, while its caller holds off Set and persists.
    private volatile byte[] _states;
    private volatile ulong[] _dirty;

    private LayerMap(IBlockDevice store, long layerSize, int clusterSize, byte[] states)
    {
        _store = store;
        LayerSize = layerSize;
        ClusterSize = clusterSize;
        ClusterShift = System.Numerics.BitOperations.Log2((uint)clusterSize);
        _states = states;
        _dirty = new ulong[(PageCount(states.Length) + 63) / 64];
    }

    /// <summary>The layer's size as the store's header records it (what the layer opens with).</summary>
    public long LayerSize { get; private set; }

    public int ClusterSize { get; }

    public int ClusterShift { get; }

    public long ClusterCount => _states.Length;

    /// <summary>No cluster has been written, zeroed or trimmed in this layer.</summary>
    public bool IsEmpty => _states.AsSpan().IndexOfAnyExcept((byte)ClusterState.Absent) < 0;

    /// <summary>Bytes the store needs for a layer of <paramref name="layerSize"/> bytes.</summary>
    public static long StoreSize(long layerSize, int clusterSize) => HeaderSize + ClusterCountOf(layerSize, clusterSize);

    /// <summary>Writes an empty map (every cluster absent) into a new store and makes it durable.</summary>
    public static async ValueTask<LayerMap> CreateAsync(IBlockDevice store, long layerSize, int clusterSize = DefaultClusterSize, CancellationToken cancellationToken = default)
    {
        long count = ClusterCountOf(layerSize, clusterSize);
        if (store.Size < HeaderSize + count)
        {
            throw new ArgumentException($"map store of {store.Size} bytes is too small for {count} clusters", nameof(store));
        }
        byte[] header = new byte[HeaderSize];
        Magic.CopyTo(header);
        BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(8), Version);
        BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(12), clusterSize);
        BinaryPrimitives.WriteInt64LittleEndian(header.AsSpan(16), layerSize);
        await store.WriteAsync(0, header, fua: false, cancellationToken).ConfigureAwait(false);
        await store.FlushAsync(cancellationToken).ConfigureAwait(false);
        return new LayerMap(store, layerSize, clusterSize, new byte[count]);
    }

    /// <summary>Loads a map persisted by an earlier <see cref="CreateAsync"/>.</summary>
    public static async ValueTask<LayerMap> OpenAsync(IBlockDevice store, CancellationToken cancellationToken = default)
    {
        byte[] header = new byte[HeaderSize];
        if (store.Size < HeaderSize)
        {
            throw new InvalidDataException("layer map is shorter than its header");
        }
        await store.ReadAsync(0, header, cancellationToken).ConfigureAwait(false);
        if (!header.AsSpan(0, 8).SequenceEqual(Magic) || BinaryPrimitives.ReadInt32LittleEndian(header.AsSpan(8)) != Version)
        {
            throw new InvalidDataException("not a layer map (bad magic or version)");
        }
        int clusterSize = BinaryPrimitives.ReadInt32LittleEndian(header.AsSpan(12));
        long layerSize = BinaryPrimitives.ReadInt64LittleEndian(header.AsSpan(16));
        long count = ClusterCountOf(layerSize, clusterSize);
        if (store.Size < HeaderSize + count)
        {
            throw new InvalidDataException($"layer map holds fewer than its {count} clusters");
        }
        byte[] states = new byte[count];
        await store.ReadAsync(HeaderSize, states, cancellationToken).ConfigureAwait(false);
        foreach (byte s in states)
        {
            if (s > (byte)ClusterState.Zero)
            {
                throw new InvalidDataException($"layer map holds an unknown cluster state {s}");
            }
        }
        return new LayerMap(store, layerSize, clusterSize, states);
    }

    /// <summary>The state of a cluster; clusters past the layer's end are absent.</summary>
    public ClusterState Get(long cluster)
    {
        byte[] states = _states;
        return (ulong)cluster < (ulong)states.Length ? (ClusterState)Volatile.Read(ref states[cluster]) : ClusterState.Absent;
    }

    /// <summary>
    /// Changes a cluster's state in memory; it becomes durable at the next persist. Callers set
    /// <see cref="ClusterState.Data"/> only after the cluster's data was written, which is what
    /// lets a flush order data before map (see <see cref="Layer.FlushAsync"/>).
    /// </summary>
    public void Set(long cluster, ClusterState state)
    {
        if (Get(cluster) == state)
        {
            return;
        }
        Volatile.Write(ref _states[cluster], (byte)state);
        long page = cluster >> PageShift;
        ulong[] dirty = _dirty;
        Interlocked.Or(ref dirty[page >> 6], 1UL << (int)(page & 63));
    }

    /// <summary>
    /// Copies (and marks clean) every page changed since the last call. The copies hold only states
    /// whose data writes had completed when they were set, so syncing the data store afterwards
    /// and then writing these copies never makes a state durable before its data.
    /// </summary>
    public List<(long Page, byte[] Bytes)> TakeDirtyPages()
    {
        var pages = new List<(long, byte[])>();
        ulong[] dirty = _dirty;
        byte[] states = _states;
        for (int word = 0; word < dirty.Length; word++)
        {
            if (Volatile.Read(ref dirty[word]) == 0)
            {
                continue;
            }
            ulong bits = Interlocked.Exchange(ref dirty[word], 0);
            while (bits != 0)
            {
                int bit = System.Numerics.BitOperations.TrailingZeroCount(bits);
                bits &= bits - 1;
                long page = ((long)word << 6) + bit;
                long start = page << PageShift;
                int length = (int)Math.Min(PageSize, states.Length - start);
                pages.Add((page, states.AsSpan((int)start, length).ToArray()));
            }
        }
        return pages;
    }

    /// <summary>Writes pages from <see cref="TakeDirtyPages"/> and makes them durable; on failure they are dirty again.</summary>
    public async ValueTask WritePagesAsync(List<(long Page, byte[] Bytes)> pages, CancellationToken cancellationToken)
    {
        if (pages.Count == 0)
        {
            return;
        }
        try
        {
            foreach ((long page, byte[] bytes) in pages)
            {
                await _store.WriteAsync(HeaderSize + (page << PageShift), bytes, fua: false, cancellationToken).ConfigureAwait(false);
            }
            await _store.FlushAsync(cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            MarkDirty(pages);
            throw;
        }
    }

    /// <summary>Puts pages taken by <see cref="TakeDirtyPages"/> back, for a persist that failed.</summary>
    public void MarkDirty(List<(long Page, byte[] Bytes)> pages)
    {
        ulong[] dirty = _dirty;
        foreach ((long page, _) in pages)
        {
            Interlocked.Or(ref dirty[page >> 6], 1UL << (int)(page & 63));
        }
    }

    /// <summary>
    /// First step of a grow: room for the clusters of a <paramref name="layerSize"/>-byte layer, in
    /// the store (zeros: absent) and in memory; the new clusters can be set from now on. The header
    /// still records the old size until <see cref="CommitSizeAsync"/>, so a crash in between opens
    /// the old map (states past its clusters are ignored) and the grow is simply made again. The
    /// caller holds off <see cref="Set"/> and every persist while this runs (OverlayBackend's write
    /// gate and the layer's flush lock): the arrays are replaced, not changed in place.
    /// </summary>
    public async ValueTask ExtendAsync(long layerSize, CancellationToken cancellationToken)
    {
        long count = ClusterCountOf(layerSize, ClusterSize);
        if (count <= _states.Length)
        {
            return;
        }
        if (_store.Size < HeaderSize + count)
        {
            if (_store is not IGrowableDevice growable)
            {
                throw new NotSupportedException("the layer map's store cannot grow");
            }
            await growable.GrowAsync(HeaderSize + count, cancellationToken).ConfigureAwait(false);
        }
        // The store past the old clusters may hold states of an earlier grow cut short: start them absent.
        byte[] states = new byte[count];
        _states.CopyTo(states, 0);
        ulong[] dirty = new ulong[(PageCount(count) + 63) / 64];
        _dirty.CopyTo(dirty, 0);
        for (long page = _states.Length >> PageShift; page < PageCount(count); page++)
        {
            dirty[page >> 6] |= 1UL << (int)(page & 63);
        }
        _dirty = dirty;
        _states = states;
    }

    /// <summary>Last step of a grow: the header records the new size, durably (the grow's commit point).</summary>
    public async ValueTask CommitSizeAsync(long layerSize, CancellationToken cancellationToken)
    {
        if (layerSize <= LayerSize)
        {
            return;
        }
        if (ClusterCountOf(layerSize, ClusterSize) > _states.Length)
        {
            throw new InvalidOperationException($"the layer map holds fewer clusters than a {layerSize}-byte layer: extend it first");
        }
        byte[] header = new byte[HeaderSize];
        Magic.CopyTo(header);
        BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(8), Version);
        BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(12), ClusterSize);
        BinaryPrimitives.WriteInt64LittleEndian(header.AsSpan(16), layerSize);
        await _store.WriteAsync(0, header, fua: false, cancellationToken).ConfigureAwait(false);
        await _store.FlushAsync(cancellationToken).ConfigureAwait(false);
        LayerSize = layerSize;
    }

    public void Dispose() => _store.Dispose();

    private static long ClusterCountOf(long layerSize, int clusterSize)
    {
        if (clusterSize < 4096 || clusterSize > (1 << 24) || (clusterSize & (clusterSize - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(clusterSize), clusterSize, "cluster size must be a power of two from 4 KiB to 16 MiB");
        }
        ArgumentOutOfRangeException.ThrowIfNegative(layerSize);
        long count = (layerSize + clusterSize - 1) / clusterSize;
        if (count > Array.MaxLength)
        {
            throw new ArgumentOutOfRangeException(nameof(layerSize), layerSize, $"a layer holds at most {Array.MaxLength} clusters");
        }
        return count;
    }

    private static long PageCount(long states) => (states + PageSize - 1) >> PageShift;
}
