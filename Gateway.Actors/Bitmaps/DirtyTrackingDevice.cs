using System.Diagnostics.CodeAnalysis;
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

/// <summary>
/// Shared by an export's <see cref="DirtyTrackingDevice"/> and its <see cref="BitmapsActor"/>.
/// First touches wait here, not in the actor's mailbox: every mark that arrives before the actor
/// takes them joins one batch with one completion, and only the first of a batch sends the actor
/// a message. Per first touch that is a list entry under a short lock, instead of a message, a
/// dispatch through the persistent actor and a TaskCompletionSource each (issue 19).
/// </summary>
public sealed class DirtyTracker
{
    private readonly Lock _lock = new();
    private volatile BitmapView _view = BitmapView.Recovering;
    private List<(long Offset, long Length)> _pending = [];
    private TaskCompletionSource? _pendingDone;

    // True from the mark that sent CommitMarks until the actor finds nothing pending: meanwhile
    // the actor is bound to take what arrives (when the message comes, or when its commit ends).
    private bool _actorCalled;
    private Exception? _refusal;

    public BitmapView View
    {
        get => _view;
        set => _view = value;
    }

    public IActorRef Actor { get; set; } = ActorRefs.Nobody;

    /// <summary>Hands a first touch to the actor (Tell, never Ask) and completes once it is durable.</summary>
    public Task MarkAsync(long offset, long length)
    {
        Task done;
        bool call;
        lock (_lock)
        {
            if (_refusal is not null)
            {
                return Task.FromException(_refusal);
            }
            _pending.Add((offset, length));
            _pendingDone ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            done = _pendingDone.Task;
            call = !_actorCalled;
            _actorCalled = true;
        }
        if (call)
        {
            CallActorSoon();
        }
        return done;
    }

    /// <summary>
    /// Tells the actor to commit, from the back of the thread pool's queue: first touches already
    /// queued there (a connection's reader queues every request it parsed) join the batch first.
    /// </summary>
    internal void CallActorSoon() => ThreadPool.UnsafeQueueUserWorkItem(static tracker => tracker.Actor.Tell(CommitMarks.Instance, ActorRefs.NoSender), this, preferLocal: false);

    /// <summary>For the actor after a commit: true (and the next mark calls it) if nothing is pending.</summary>
    internal bool ReleaseIfIdle()
    {
        lock (_lock)
        {
            _actorCalled = _pendingDone is not null;
            return !_actorCalled;
        }
    }

    /// <summary>
    /// For the actor: takes every mark pending now and the completion their writers await. False
    /// when there are none; the next mark then calls the actor again.
    /// </summary>
    internal bool TryTakePending([MaybeNullWhen(false)] out List<(long Offset, long Length)> ranges, [MaybeNullWhen(false)] out TaskCompletionSource done)
    {
        lock (_lock)
        {
            if (_pendingDone is null)
            {
                _actorCalled = false;
                ranges = null;
                done = null;
                return false;
            }
            (ranges, done) = (_pending, _pendingDone);
            _pending = [];
            _pendingDone = null;
            return true;
        }
    }

    /// <summary>
    /// The actor stops: pending marks fail. Stopped for good (<paramref name="refusal"/> set), later
    /// marks fail with it (a message to a stopped actor would leave them waiting forever);
    /// restarting, they wait for the next incarnation.
    /// </summary>
    internal void FailPending(Exception failure, Exception? refusal)
    {
        TaskCompletionSource? done;
        lock (_lock)
        {
            done = _pendingDone;
            _pending = [];
            _pendingDone = null;
            _actorCalled = false;
            _refusal = refusal;
        }
        done?.TrySetException(failure);
    }
}

/// <summary>
/// Wraps an export's device so that a change reaches the backend only after every enabled bitmap
/// has its granules durably dirty (the crash guarantee). A write to granules already dirty in
/// every enabled bitmap (or with no bitmap enabled) goes straight on: a few volatile reads, no
/// allocation, no await beyond the backend's own.
/// </summary>
public sealed class DirtyTrackingDevice(IBlockDevice inner, DirtyTracker tracker) : IBlockDevice, INonBlockingIo, IFileRegions
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
        BitmapView view = CheckedView();
        if (!view.IsDirty(offset, source.Length))
        {
            await tracker.MarkAsync(offset, source.Length).ConfigureAwait(false);
        }
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
        BitmapView view = CheckedView();
        if (!view.IsDirty(offset, length))
        {
            await tracker.MarkAsync(offset, length).ConfigureAwait(false);
        }
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
        BitmapView view = CheckedView();
        if (!view.IsDirty(offset, length))
        {
            await tracker.MarkAsync(offset, length).ConfigureAwait(false);
        }
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

    public bool TryGetFileRegion(long offset, int length, out FileRegion region)
    {
        region = default;
        return inner is IFileRegions files && files.TryGetFileRegion(offset, length, out region);
    }

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

    /// <summary>
    /// The view a change is checked against (read before it is marked: if the view changes after,
    /// <see cref="AfterChangeAsync"/> checks again). Marking is inline in each operation, so a
    /// first touch allocates no state machine of its own.
    /// </summary>
    private BitmapView CheckedView()
    {
        BitmapView view = tracker.View;
        if (view.Stopped)
        {
            throw Unavailable();
        }
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
    internal static BlockDeviceException Unavailable() =>
        new(BlockErrorKind.Shutdown, "the export's dirty bitmaps cannot be recorded (their actor has stopped): refusing the change");
}
