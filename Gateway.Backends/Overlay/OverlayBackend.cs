using System.Buffers;

namespace Gateway.Backends.Overlay;

/// <summary>A run of bytes and the layer that provides it: 1 = top, n = n-th layer, 0 = none (qemu:allocation-depth).</summary>
public readonly record struct DepthExtent(long Length, uint Depth);

/// <summary>
/// A chain of layers, top (writable) first. Reads take each cluster from the shallowest layer that
/// has it (zeros where none does, or where a layer's map says it was zeroed); writes go to the top,
/// copying a partially written cluster up first. A cluster's state only moves to
/// <see cref="ClusterState.Data"/> after its whole content is in the top's data store, so a reader
/// racing a copy-up sees either the old lower data or the finished cluster.
/// </summary>
public sealed class OverlayBackend : IBlockDevice, INonBlockingIo, IGrowableDevice
{
    // Copy-ups and state changes of one cluster are serialised; stripes bound the number of locks.
    private const int StripeCount = 256;
    private readonly SemaphoreSlim[] _stripes = new SemaphoreSlim[StripeCount];
    private readonly WriteGate _gate = new();
    private readonly SemaphoreSlim _switch = new(1, 1);
    private readonly int _clusterSize;
    private readonly int _shift;
    private readonly byte[] _zeros;
    private volatile Layer[] _layers;
    private volatile bool _disposed;
    private long _size;

    /// <param name="layers">Top first. Every layer but a bottom raw image has a map, all with one cluster size.</param>
    public OverlayBackend(IReadOnlyList<Layer> layers, long size, bool readOnly)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        if (layers.Count == 0 || layers[0].Map is not { } topMap)
        {
            throw new ArgumentException("an overlay needs a top layer with an allocation map", nameof(layers));
        }
        for (int i = 0; i < layers.Count; i++)
        {
            if (layers[i].Map is { } map ? map.ClusterSize != topMap.ClusterSize : i != layers.Count - 1)
            {
                throw new ArgumentException($"layer '{layers[i].Id}' has another cluster size, or is a raw image above the bottom", nameof(layers));
            }
        }
        if (!readOnly && (layers[0].Data.IsReadOnly || layers[0].Size < size))
        {
            throw new ArgumentException($"top layer '{layers[0].Id}' is read-only or smaller than the device", nameof(layers));
        }
        _layers = [.. layers];
        _clusterSize = topMap.ClusterSize;
        _shift = topMap.ClusterShift;
        _zeros = new byte[_clusterSize];
        _size = size;
        IsReadOnly = readOnly;
        for (int i = 0; i < _stripes.Length; i++)
        {
            _stripes[i] = new SemaphoreSlim(1, 1);
        }
    }

    /// <summary>The device's size: as opened, or as <see cref="GrowAsync"/> made it since.</summary>
    public long Size => Volatile.Read(ref _size);

    public bool IsReadOnly { get; }

    public int ClusterSize => _clusterSize;

    /// <summary>The chain now, top first.</summary>
    public IReadOnlyList<Layer> Layers => _layers;

    /// <summary>The writable top holds nothing yet: the layers below are all there is.</summary>
    public bool TopIsEmpty => _layers[0].Map is { IsEmpty: true };

    public BlockCapabilities Capabilities => IsReadOnly
        ? BlockCapabilities.Cache | BlockCapabilities.Flush
        : BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero | BlockCapabilities.Cache | BlockCapabilities.Flush;

    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfDisposed();
        DeviceBounds.Check(offset, destination.Length, Size, BlockErrorKind.InvalidArgument);
        await ReadFromAsync(_layers, 0, offset, destination, cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfNotWritable();
        DeviceBounds.Check(offset, source.Length, Size, BlockErrorKind.NoSpace);
        await _gate.EnterAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            Layer[] layers = _layers;
            Layer top = layers[0];
            LayerMap map = top.Map!;
            while (!source.IsEmpty)
            {
                long cluster = offset >> _shift;
                int count;
                if (map.Get(cluster) == ClusterState.Data)
                {
                    // The common case once a cluster is in the top: one write for the whole run.
                    long end = Math.Min(offset + source.Length, (cluster + 1) << _shift);
                    while (end < offset + source.Length && map.Get(end >> _shift) == ClusterState.Data)
                    {
                        end = Math.Min(offset + source.Length, end + _clusterSize);
                    }
                    count = (int)(end - offset);
                    await top.Data.WriteAsync(offset, source[..count], fua: false, cancellationToken).ConfigureAwait(false);
                }
                else
                {
                    count = (int)Math.Min(source.Length, ((cluster + 1) << _shift) - offset);
                    await WriteClusterAsync(layers, cluster, offset, source[..count], cancellationToken).ConfigureAwait(false);
                }
                offset += count;
                source = source[count..];
            }
            if (fua)
            {
                await top.FlushAsync(cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            _gate.Exit();
        }
    }

    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfDisposed();
        if (!IsReadOnly)
        {
            await _layers[0].FlushAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfNotWritable();
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
        return ClearAsync(offset, length, fua ? ZeroFlags.Fua : ZeroFlags.None, cancellationToken);
    }

    public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfNotWritable();
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.NoSpace);
        return ClearAsync(offset, length, flags, cancellationToken);
    }

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfDisposed();
        DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
        return ValueTask.CompletedTask;
    }

    /// <summary>base:allocation through the chain: data where the providing layer has data, a hole where no layer does or a layer zeroed it.</summary>
    public async ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ThrowIfDisposed();
        DeviceBounds.CheckQuery(offset, length, Size, extents.Length);
        Layer[] layers = _layers;
        long end = offset + length;
        int count = 0;
        Extent[] raw = [];
        while (offset < end)
        {
            long cluster = offset >> _shift;
            (int source, bool masked) = Provider(layers, cluster, 0);
            long next = RunEnd(layers, offset, end, source, masked);
            if (source >= 0 && !masked && !layers[source].IsRaw && next > layers[source].Size)
            {
                // A lower layer shorter than the device (the export grew since it was frozen)
                // holds nothing past its end, though its last cluster runs on.
                long inside = Math.Max(offset, layers[source].Size);
                if (offset < inside && !TryAdd(extents.Span, ref count, inside - offset, ExtentFlags.Data))
                {
                    return count;
                }
                if (!TryAdd(extents.Span, ref count, next - inside, ExtentFlags.Hole | ExtentFlags.Zero))
                {
                    return count;
                }
                offset = next;
                continue;
            }
            if (source >= 0 && !masked && layers[source].IsRaw)
            {
                // A raw image tells its own holes (SEEK_DATA); past its end it reads zeros.
                Layer image = layers[source];
                long inside = Math.Min(next, image.Size);
                if (offset < inside)
                {
                    if (raw.Length == 0)
                    {
                        raw = new Extent[Math.Min(64, extents.Length)];
                    }
                    int n = await image.Data.GetAllocationAsync(offset, inside - offset, raw, cancellationToken).ConfigureAwait(false);
                    for (int i = 0; i < n; i++)
                    {
                        if (!TryAdd(extents.Span, ref count, raw[i].Length, raw[i].Flags))
                        {
                            return count;
                        }
                        offset += raw[i].Length;
                    }
                    continue;
                }
                source = -1;
            }
            ExtentFlags flags = source >= 0 && !masked ? ExtentFlags.Data : ExtentFlags.Hole | ExtentFlags.Zero;
            if (!TryAdd(extents.Span, ref count, next - offset, flags))
            {
                return count;
            }
            offset = next;
        }
        return count;
    }

    /// <summary>
    /// qemu:allocation-depth: for each run, 1 when the top provides it (data, or zeros that mask the
    /// layers below), n for the n-th layer, 0 when no layer does. A raw image is allocated throughout,
    /// as qemu reports a raw backing file; a qcow2 bottom counts each file of its own chain.
    /// </summary>
    public int GetDepth(long offset, long length, Span<DepthExtent> extents)
    {
        ThrowIfDisposed();
        DeviceBounds.CheckQuery(offset, length, Size, extents.Length);
        Layer[] layers = _layers;
        long end = offset + length;
        int count = 0;
        Span<DepthExtent> within = stackalloc DepthExtent[16];
        while (offset < end)
        {
            long cluster = offset >> _shift;
            (int source, bool masked) = Provider(layers, cluster, 0);
            long next = RunEnd(layers, offset, end, source, masked);
            if (source >= 0 && layers[source].Data is IImageChain chain && offset < layers[source].Size)
            {
                // A bottom image with its own backing files (qcow2): each of its files is a layer
                // of its own, counted on from the image's depth, as qemu counts a backing chain.
                int n = chain.GetDepth(offset, Math.Min(next, layers[source].Size) - offset, within);
                for (int i = 0; i < n; i++)
                {
                    if (!TryAddDepth(extents, ref count, within[i].Length, within[i].Depth == 0 ? 0 : (uint)source + within[i].Depth))
                    {
                        return count;
                    }
                    offset += within[i].Length;
                }
                continue;
            }
            uint depth = source >= 0 ? (uint)source + 1 : 0;
            if (source >= 0 && next > layers[source].Size)
            {
                // Past a short layer's end (a raw image, or a lower layer of a grown export) nothing is allocated.
                if (offset < layers[source].Size)
                {
                    next = layers[source].Size;
                }
                else
                {
                    depth = 0;
                }
            }
            if (!TryAddDepth(extents, ref count, next - offset, depth))
            {
                break;
            }
            offset = next;
        }
        return count;
    }

    private static bool TryAddDepth(Span<DepthExtent> extents, ref int count, long length, uint depth)
    {
        if (count > 0 && extents[count - 1].Depth == depth)
        {
            extents[count - 1] = new DepthExtent(extents[count - 1].Length + length, depth);
            return true;
        }
        if (count == extents.Length)
        {
            return false;
        }
        extents[count++] = new DepthExtent(length, depth);
        return true;
    }

    /// <summary>
    /// Freezes the current top and puts <paramref name="newTop"/> (empty, writable, with a map) above
    /// it, while clients keep going: the old top is flushed once with writes still flowing, then the
    /// gate is closed (waiting for writes in flight), the few writes since are flushed, and the chain
    /// swapped. Writes that arrive meanwhile wait for the gate and land in the new top.
    /// </summary>
    public async ValueTask PushTopAsync(Layer newTop, CancellationToken cancellationToken = default)
    {
        ThrowIfNotWritable();
        if (newTop.Map is not { } map || map.ClusterSize != _clusterSize || newTop.Data.IsReadOnly || newTop.Size < Size)
        {
            throw new ArgumentException($"layer '{newTop.Id}' cannot be a top: it needs a writable store of at least {Size} bytes and a map of {_clusterSize}-byte clusters", nameof(newTop));
        }
        await _switch.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            Layer old = _layers[0];
            await old.FlushAsync(cancellationToken).ConfigureAwait(false);
            await _gate.CloseAsync().ConfigureAwait(false);
            try
            {
                await old.FlushAsync(CancellationToken.None).ConfigureAwait(false);
                _layers = [newTop, .. _layers];
            }
            finally
            {
                _gate.Open();
            }
        }
        finally
        {
            _switch.Release();
        }
    }

    /// <summary>
    /// Grows the device to <paramref name="size"/> bytes: only the top grows; the layers below keep
    /// their size and read as nothing past their end (zeros, a hole, depth 0). A lower layer longer
    /// than the old size (a clone of a bigger base) must not show through the new range, so that
    /// range is zeroed in the top first, as qemu does when it grows an image over a longer backing
    /// file. The top's map header records the new size last: a crash before it reopens the layer
    /// at its old size and the grow is made again (<c>BackendFactory</c> does so at open). The
    /// write gate is closed only while the map's arrays are replaced; clients go on meanwhile, and
    /// none can reach the new range until the caller shows the new size.
    /// </summary>
    public async ValueTask GrowAsync(long size, CancellationToken cancellationToken = default)
    {
        ThrowIfNotWritable();
        await _switch.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            long old = Size;
            Layer top = _layers[0];
            if (size <= old && top.Map!.LayerSize >= size)
            {
                return;
            }
            size = Math.Max(size, old);
            await _gate.CloseAsync().ConfigureAwait(false);
            try
            {
                await top.ExtendAsync(size, cancellationToken).ConfigureAwait(false);
                Volatile.Write(ref _size, size);
            }
            finally
            {
                _gate.Open();
            }
            long shown = Math.Min(size, _layers.Skip(1).Select(l => l.Size).DefaultIfEmpty(0).Max());
            if (shown > old)
            {
                await ClearAsync(old, shown - old, ZeroFlags.None, cancellationToken).ConfigureAwait(false);
            }
            await top.CommitSizeAsync(size, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _switch.Release();
        }
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        foreach (Layer layer in _layers)
        {
            layer.Dispose();
        }
    }

    /// <summary>
    /// Which layer decides a cluster: its index (-1 when none does), and whether that layer zeroed
    /// it (<paramref name="from"/> skips the layers above, for copy-up from below the top).
    /// </summary>
    private static (int Layer, bool Masked) Provider(Layer[] layers, long cluster, int from)
    {
        for (int i = from; i < layers.Length; i++)
        {
            if (layers[i].Map is not { } map)
            {
                return (i, false);
            }
            switch (map.Get(cluster))
            {
                case ClusterState.Data:
                    return (i, false);
                case ClusterState.Zero:
                    return (i, true);
            }
        }
        return (-1, false);
    }

    /// <summary>The layer to read a cluster from, or -1 for zeros.</summary>
    private static int ReadSource(Layer[] layers, long cluster, int from) =>
        Provider(layers, cluster, from) is (int layer, false) ? layer : -1;

    /// <summary>Where the run of clusters from <paramref name="offset"/> with the same provider ends (at most <paramref name="end"/>).</summary>
    private long RunEnd(Layer[] layers, long offset, long end, int source, bool masked)
    {
        long next = Math.Min(end, ((offset >> _shift) + 1) << _shift);
        while (next < end && Provider(layers, next >> _shift, 0) == (source, masked))
        {
            next = Math.Min(end, next + _clusterSize);
        }
        return next;
    }

    /// <summary>
    /// The page-cache fast path through the chain: each run of clusters is read from its layer
    /// without blocking, or not at all (false: the caller takes <see cref="ReadAsync"/>).
    /// </summary>
    public bool TryReadNoWait(long offset, Span<byte> destination)
    {
        if (_disposed || offset < 0 || destination.Length > Size - offset)
        {
            return false;
        }
        Layer[] layers = _layers;
        while (!destination.IsEmpty)
        {
            long cluster = offset >> _shift;
            int source = ReadSource(layers, cluster, 0);
            int count = (int)Math.Min(destination.Length, ((cluster + 1) << _shift) - offset);
            if (source < 0)
            {
                destination[..count].Clear();
            }
            else
            {
                Layer layer = layers[source];
                int inside = (int)Math.Clamp(layer.Size - offset, 0, count);
                if (inside > 0 && (layer.Data is not INonBlockingIo io || !io.TryReadNoWait(offset, destination[..inside])))
                {
                    return false;
                }
                destination[inside..count].Clear();
            }
            offset += count;
            destination = destination[count..];
        }
        return true;
    }

    /// <summary>Writes go through the copy-up and map logic of <see cref="WriteAsync"/>.</summary>
    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source) => false;

    private async ValueTask ReadFromAsync(Layer[] layers, int from, long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        while (!destination.IsEmpty)
        {
            long cluster = offset >> _shift;
            int source = ReadSource(layers, cluster, from);
            long end = Math.Min(offset + destination.Length, (cluster + 1) << _shift);
            while (end < offset + destination.Length && ReadSource(layers, end >> _shift, from) == source)
            {
                end = Math.Min(offset + destination.Length, end + _clusterSize);
            }
            int count = (int)(end - offset);
            if (source < 0)
            {
                destination.Span[..count].Clear();
            }
            else
            {
                // A layer smaller than the device (a short base image) reads zeros past its end.
                Layer layer = layers[source];
                int inside = (int)Math.Clamp(layer.Size - offset, 0, count);
                if (inside > 0)
                {
                    await layer.Data.ReadAsync(offset, destination[..inside], cancellationToken).ConfigureAwait(false);
                }
                destination.Span[inside..count].Clear();
            }
            offset += count;
            destination = destination[count..];
        }
    }

    /// <summary>
    /// Writes part (or all) of a cluster the top does not hold as data. Under the cluster's lock:
    /// a partial write copies the cluster up (from the layers below, or zeros when the top masks
    /// them), merges the new bytes and writes the whole cluster; then the state becomes Data.
    /// </summary>
    private async ValueTask WriteClusterAsync(Layer[] layers, long cluster, long offset, ReadOnlyMemory<byte> source, CancellationToken cancellationToken)
    {
        Layer top = layers[0];
        LayerMap map = top.Map!;
        long start = cluster << _shift;
        int length = (int)Math.Min(_clusterSize, Size - start);
        SemaphoreSlim stripe = _stripes[cluster & (StripeCount - 1)];
        await stripe.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            ClusterState state = map.Get(cluster);
            if (state == ClusterState.Data || (offset == start && source.Length == length))
            {
                await top.Data.WriteAsync(offset, source, fua: false, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                byte[] buffer = ArrayPool<byte>.Shared.Rent(length);
                try
                {
                    Memory<byte> whole = buffer.AsMemory(0, length);
                    if (state == ClusterState.Zero)
                    {
                        whole.Span.Clear();
                    }
                    else
                    {
                        await ReadFromAsync(layers, 1, start, whole, cancellationToken).ConfigureAwait(false);
                    }
                    source.Span.CopyTo(whole.Span[(int)(offset - start)..]);
                    await top.Data.WriteAsync(start, whole, fua: false, cancellationToken).ConfigureAwait(false);
                }
                finally
                {
                    ArrayPool<byte>.Shared.Return(buffer);
                }
            }
            map.Set(cluster, ClusterState.Data);
        }
        finally
        {
            stripe.Release();
        }
    }

    /// <summary>
    /// WRITE_ZEROES and TRIM: a whole cluster becomes Zero in the top's map (masking the layers
    /// below) or Absent when nothing below has it; a partial one is zeroed in place when the top
    /// holds it, copied up with zeros when a lower layer does, and left alone when it reads zeros.
    /// </summary>
    private async ValueTask ClearAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        await _gate.EnterAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            Layer[] layers = _layers;
            Layer top = layers[0];
            LayerMap map = top.Map!;
            bool noHole = (flags & ZeroFlags.NoHole) != 0;
            ZeroFlags fileFlags = flags & (ZeroFlags.NoHole | ZeroFlags.FastZero);
            while (length > 0)
            {
                long cluster = offset >> _shift;
                long start = cluster << _shift;
                int clusterLength = (int)Math.Min(_clusterSize, Size - start);
                int count = (int)Math.Min(length, start + clusterLength - offset);
                bool below = ReadSource(layers, cluster, 1) >= 0;
                if (count == clusterLength)
                {
                    SemaphoreSlim stripe = _stripes[cluster & (StripeCount - 1)];
                    await stripe.WaitAsync(cancellationToken).ConfigureAwait(false);
                    try
                    {
                        ClusterState state = map.Get(cluster);
                        // Absent and Zero clusters are never read from the top's store, so only a
                        // Data cluster needs its bytes dropped (or NO_HOLE its space provisioned).
                        if (state == ClusterState.Data || noHole)
                        {
                            await top.Data.ZeroAsync(start, clusterLength, fileFlags, cancellationToken).ConfigureAwait(false);
                        }
                        map.Set(cluster, below || noHole ? ClusterState.Zero : ClusterState.Absent);
                    }
                    finally
                    {
                        stripe.Release();
                    }
                }
                else
                {
                    ClusterState state = map.Get(cluster);
                    if (state == ClusterState.Data)
                    {
                        await top.Data.ZeroAsync(offset, count, fileFlags & ~ZeroFlags.NoHole, cancellationToken).ConfigureAwait(false);
                    }
                    else if (state == ClusterState.Absent && below)
                    {
                        await WriteClusterAsync(layers, cluster, offset, _zeros.AsMemory(0, count), cancellationToken).ConfigureAwait(false);
                    }
                }
                offset += count;
                length -= count;
            }
            if ((flags & ZeroFlags.Fua) != 0)
            {
                await top.FlushAsync(cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            _gate.Exit();
        }
    }

    private static bool TryAdd(Span<Extent> extents, ref int count, long length, ExtentFlags flags)
    {
        if (count > 0 && extents[count - 1].Flags == flags)
        {
            extents[count - 1] = new Extent(extents[count - 1].Length + length, flags);
            return true;
        }
        if (count == extents.Length)
        {
            return false;
        }
        extents[count++] = new Extent(length, flags);
        return true;
    }

    private void ThrowIfDisposed() => DeviceBounds.ThrowIfClosed(_disposed);

    private void ThrowIfNotWritable() => DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
}
