using System.Runtime.CompilerServices;
using Akka.Actor;
using Gateway.Backends;

namespace Gateway.Actors.Bitmaps;

/// <summary>
/// What the data path checks: the enabled bitmaps as of one moment. The bitmaps actor publishes a
/// new instance on every change of the set (add, remove, enable, disable, clear), never for bits
/// that get set, so a write compares references to learn whether the set changed under it.
/// </summary>
public sealed class BitmapView(DirtyBitmap[] enabled, bool ready)
{
    /// <summary>Before recovery: every change goes to the actor, which holds it until it knows its bitmaps.</summary>
    public static readonly BitmapView Recovering = new([], ready: false);

    public DirtyBitmap[] Enabled { get; } = enabled;

    /// <summary>False until the bitmaps are recovered; then every write waits for the actor.</summary>
    public bool Ready { get; } = ready;

    /// <summary>The bitmaps actor has stopped (persistence failed, or the export closed): writes fail.</summary>
    public bool Stopped { get; init; }

    public bool IsDirty(long offset, long length)
    {
        if (!Ready)
        {
            return false;
        }
        foreach (DirtyBitmap bits in Enabled)
        {
            if (!bits.IsDirty(offset, length))
            {
                return false;
            }
        }
        return true;
    }
}

/// <summary>Shared by an export's <see cref="DirtyTrackingDevice"/> and its <see cref="BitmapsActor"/>.</summary>
public sealed class DirtyTracker
{
    private volatile BitmapView _view = BitmapView.Recovering;

    public BitmapView View
    {
        get => _view;
        set => _view = value;
    }

    public IActorRef Actor { get; set; } = ActorRefs.Nobody;

    /// <summary>Hands first touches to the actor (Tell, never Ask) and completes once they are durable.</summary>
    public Task MarkAsync(long offset, long length)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Actor.Tell(new MarkDirty(offset, length, done), ActorRefs.NoSender);
        return done.Task;
    }
}

/// <summary>
/// Wraps an export's device so that a change reaches the backend only after every enabled bitmap
/// has its granules durably dirty (the crash guarantee). A write to granules already dirty in
/// every enabled bitmap (or with no bitmap enabled) goes straight on: a few volatile reads, no
/// allocation, no await beyond the backend's own.
/// </summary>
public sealed class DirtyTrackingDevice(IBlockDevice inner, DirtyTracker tracker) : IBlockDevice, INonBlockingIo
{
    public IBlockDevice Inner => inner;

    public long Size => inner.Size;

    public bool IsReadOnly => inner.IsReadOnly;

    public BlockCapabilities Capabilities => inner.Capabilities;

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        inner.ReadAsync(offset, destination, cancellationToken);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        BitmapView view = await BeforeChangeAsync(offset, source.Length).ConfigureAwait(false);
        await inner.WriteAsync(offset, source, fua, cancellationToken).ConfigureAwait(false);
        await AfterChangeAsync(view, offset, source.Length).ConfigureAwait(false);
        if (fua)
        {
            JournalDurability.Sync();
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default)
    {
        BitmapView view = await BeforeChangeAsync(offset, length).ConfigureAwait(false);
        await inner.TrimAsync(offset, length, fua, cancellationToken).ConfigureAwait(false);
        await AfterChangeAsync(view, offset, length).ConfigureAwait(false);
        if (fua)
        {
            JournalDurability.Sync();
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default)
    {
        BitmapView view = await BeforeChangeAsync(offset, length).ConfigureAwait(false);
        await inner.ZeroAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
        await AfterChangeAsync(view, offset, length).ConfigureAwait(false);
        if (flags.HasFlag(ZeroFlags.Fua))
        {
            JournalDurability.Sync();
        }
    }

    /// <summary>Data first, then the journal: every bit recorded before the flush is durable with it.</summary>
    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        await inner.FlushAsync(cancellationToken).ConfigureAwait(false);
        JournalDurability.Sync();
    }

    public bool TryReadNoWait(long offset, Span<byte> destination) =>
        inner is INonBlockingIo io && io.TryReadNoWait(offset, destination);

    /// <summary>
    /// The fast path only for granules already dirty in every enabled bitmap. If the set of
    /// bitmaps changed while the write ran, false sends the caller down the asynchronous path,
    /// which marks the granules and writes again (the same bytes) before acknowledging.
    /// </summary>
    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source)
    {
        BitmapView view = tracker.View;
        if (inner is not INonBlockingIo io || view.Stopped || !view.IsDirty(offset, source.Length) || !io.TryWriteNoWait(offset, source))
        {
            return false;
        }
        BitmapView now = tracker.View;
        return ReferenceEquals(now, view) || (!now.Stopped && now.IsDirty(offset, source.Length));
    }

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
        inner.CacheAsync(offset, length, cancellationToken);

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
        inner.GetAllocationAsync(offset, length, extents, cancellationToken);

    public void Dispose() => inner.Dispose();

    /// <summary>Returns the view the change was checked against, once its granules are durable in it.</summary>
    private ValueTask<BitmapView> BeforeChangeAsync(long offset, long length)
    {
        BitmapView view = tracker.View;
        if (view.Stopped)
        {
            throw Unavailable();
        }
        return view.IsDirty(offset, length) ? new ValueTask<BitmapView>(view) : MarkThenViewAsync(offset, length);
    }

    private async ValueTask<BitmapView> MarkThenViewAsync(long offset, long length)
    {
        // Read the view before asking: if it changes after, AfterChangeAsync checks again.
        BitmapView view = tracker.View;
        await tracker.MarkAsync(offset, length).ConfigureAwait(false);
        return view;
    }

    /// <summary>
    /// A bitmap added, enabled or cleared while the change was in flight may lack its granules;
    /// mark them again before the change is acknowledged. (Such a change overlaps the admin
    /// operation, so it may be ordered before it; every change that starts after the operation
    /// returns is durable in the bitmap before it reaches the backend.)
    /// </summary>
    private ValueTask AfterChangeAsync(BitmapView before, long offset, long length)
    {
        BitmapView now = tracker.View;
        if (ReferenceEquals(now, before) || now.Stopped || now.IsDirty(offset, length))
        {
            return ValueTask.CompletedTask;
        }
        return new ValueTask(tracker.MarkAsync(offset, length));
    }

    // ESHUTDOWN, not EIO: the change was refused before it reached storage, and the bitmaps'
    // actor stops when its export closes or its node stops (a node downed after a freeze stopped
    // it under a write queued on the peer stream). A forwarding node then sends the write again
    // to the export's next owner instead of failing its client (ops/chaos-cluster, sigstop).
    private static BlockDeviceException Unavailable() =>
        new(BlockErrorKind.Shutdown, "the export's dirty bitmaps cannot be recorded (their actor has stopped): refusing the change");
}
