namespace Gateway.Backends.Overlay;

/// <summary>
/// One layer of an overlay chain: a data store the size of the layer and, for layers the gateway
/// made, an allocation map. A layer without a map is a raw image (a bottom layer only): it
/// provides every byte up to its size.
/// </summary>
public sealed class Layer(string id, IBlockDevice data, LayerMap? map) : IDisposable
{
    private readonly SemaphoreSlim _flush = new(1, 1);

    public string Id { get; } = id;

    public IBlockDevice Data { get; } = data;

    public LayerMap? Map { get; } = map;

    public bool IsRaw => Map is null;

    public long Size => Data.Size;

    /// <summary>
    /// Makes every completed write to the layer durable, data before map: the states to persist are
    /// copied first, then the data store is synced, then the copies are written and synced. A crash
    /// at any point leaves no durable state pointing at data that is not. Flushes run one at a
    /// time so an older copy of a page never lands after a newer one.
    /// </summary>
    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        await _flush.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            List<(long Page, byte[] Bytes)>? pages = Map?.TakeDirtyPages();
            try
            {
                if (!Data.IsReadOnly)
                {
                    await Data.FlushAsync(cancellationToken).ConfigureAwait(false);
                }
            }
            catch when (pages is { Count: > 0 })
            {
                // Not written: keep them dirty for the next flush.
                Map!.MarkDirty(pages);
                throw;
            }
            if (pages is { Count: > 0 })
            {
                await Map!.WritePagesAsync(pages, cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            _flush.Release();
        }
    }

    /// <summary>
    /// First step of growing a top layer to <paramref name="size"/> bytes: the data store grows
    /// (durably; the new range reads as zeros), then the map makes room for the new clusters. The
    /// map's header still records the old size until <see cref="CommitSizeAsync"/>. Holds the
    /// flush lock, so no persist copies the map while its arrays are replaced.
    /// </summary>
    public async ValueTask ExtendAsync(long size, CancellationToken cancellationToken = default)
    {
        if (Map is not { } map || Data is not IGrowableDevice data)
        {
            throw new NotSupportedException($"layer '{Id}' cannot grow: only a layer with a map over a growable store can");
        }
        await _flush.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await data.GrowAsync(size, cancellationToken).ConfigureAwait(false);
            await map.ExtendAsync(size, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _flush.Release();
        }
    }

    /// <summary>The grow's commit point: every change made so far is persisted (data, then map), then the header names the new size.</summary>
    public async ValueTask CommitSizeAsync(long size, CancellationToken cancellationToken = default)
    {
        await FlushAsync(cancellationToken).ConfigureAwait(false);
        await _flush.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await Map!.CommitSizeAsync(size, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _flush.Release();
        }
    }

    public void Dispose()
    {
        Data.Dispose();
        Map?.Dispose();
    }
}

/// <summary>
/// A bottom layer's store that is itself a chain of files (a qcow2 image over its backing files):
/// it tells which of its files provides each run, so <c>qemu:allocation-depth</c> counts them as
/// qemu does instead of calling the whole image one layer.
/// </summary>
public interface IImageChain
{
    /// <summary>Consecutive runs from <paramref name="offset"/>: 1 = the chain's top file, n = its n-th, 0 = none; returns how many.</summary>
    int GetDepth(long offset, long length, Span<DepthExtent> extents);
}
