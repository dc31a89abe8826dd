using Akka.Actor;
using Akka.Event;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Nbd;
using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>
/// Owns one export's backend for as long as the export exists on this node. Connections get
/// the device itself in an <see cref="ExportHandle"/> and call it directly; the actor handles
/// lifecycle only (open, flush, close).
/// <para>
/// A planned stop (<see cref="CloseExport"/>, or the removal's <see cref="PurgeBitmaps"/>) goes in
/// this order: the handle closes, so connections stop reading requests and finish those they
/// hold; the actor waits for the device's requests in flight to end; flushes; and only then stops
/// the bitmaps actor and itself. The other order (Akka stops children first) refused the writes
/// still arriving with EIO, because their granules could no longer be recorded (issue 30).
/// </para>
/// <para>
/// The backend opens asynchronously (an S3 export lists its bucket first): until it is open the
/// actor stashes every message, then serves them in order; a failed open fails the actor, and
/// its parent's strategy stops it. No thread waits on the store meanwhile (issue 30).
/// </para>
/// <para>
/// Nothing here awaits on the actor's behalf and then touches <c>Sender</c>, <c>Self</c> or
/// state: asynchronous work is piped back to <c>Self</c> (or straight to the asker) as a message.
/// </para>
/// </summary>
public sealed partial class ExportActor : ReceiveActor, IWithUnboundedStash
{
    /// <summary>How long a planned stop waits for requests in flight before it flushes anyway.</summary>
    public static readonly TimeSpan DrainTimeout = TimeSpan.FromSeconds(20);

    private ExportSpec _spec;
    private readonly BackendFactory _backends;
    private readonly OwnershipFence? _fence;
    private readonly CancellationTokenSource _closed = new();
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private IBlockDevice? _device;
    private DrainingDevice? _gate;
    private ExportHandle? _handle;
    private IActorRef _bitmaps = ActorRefs.Nobody;
    private CloseReason? _closing;
    private IActorRef _closeRequester = ActorRefs.Nobody;
    private bool _flushedOnClose;
    private Task<IBlockDevice>? _opening;

    public ExportActor(ExportSpec spec, BackendFactory backends, OwnershipFence? fence)
    {
        _spec = spec;
        _backends = backends;
        _fence = fence;

        // Opening: there is no device to serve, flush or close yet, so every other message waits
        // (in order) until the open ends. A failed open fails the actor as a throwing PreStart
        // did: an initialization failure, which every strategy (the default one too) stops.
        Receive<BackendOpened>(OnBackendOpened);
        Receive<BackendOpenFailed>(failed =>
            throw new ActorInitializationException(Self, $"export '{_spec.Name}' could not be opened: {failed.Cause.Message}", failed.Cause));
        ReceiveAny(_ => Stash.Stash());
    }

    public IStash Stash { get; set; } = null!;

    /// <summary>The backend is open: the export serves, flushes and closes.</summary>
    private void Ready()
    {
        // Answered by the bitmaps actor once it has recovered, so no client sees the export
        // without its qemu:dirty-bitmap contexts; by this actor if the bitmaps actor has stopped.
        Receive<OpenExport>(open =>
        {
            if (_bitmaps.IsNobody())
            {
                Sender.Tell(new ExportOpened(_handle));
            }
            else
            {
                _bitmaps.Forward(open);
            }
        });
        Receive<Terminated>(t =>
        {
            if (t.ActorRef.Equals(_bitmaps))
            {
                _bitmaps = ActorRefs.Nobody;
            }
        });
        Receive<GetExport>(_ => Sender.Tell(new ExportFound(new ExportStatus(_spec, _handle?.Info))));
        ReceiveAsync<PushLayer>(PushLayerAsync);
        ReceiveAsync<GrowExport>(GrowAsync);
        Receive<QueryTopEmpty>(_ => Sender.Tell(_overlay is { TopIsEmpty: true }));
        Receive<IBitmapCommand>(command => _bitmaps.Forward(command));
        Receive<BitmapsPurged>(_ => Context.Stop(Self));
        Receive<PurgeBitmaps>(_ => BeginClose(CloseReason.Removed));
        Receive<CloseExport>(_ => BeginClose(CloseReason.HandedOff));
        Receive<Drained>(OnDrained);
        Receive<FlushAllExports>(_ =>
        {
            if (_device is not { IsReadOnly: false } device)
            {
                Sender.Tell(new ExportsFlushed(1, []));
                return;
            }
            string name = _spec.Name;
            ILoggingAdapter log = _log;
            FinalFlush.RunAsync(device, name, message => log.Warning(message)).PipeTo(Sender,
                success: () => new ExportsFlushed(1, []),
                failure: e => new ExportsFlushed(0, [$"{name}: {e.Message}"]));
        });
    }

    /// <param name="fence">In a cluster, the owner's lease: no request reaches the bitmaps or the
    /// backend while it is closed (<see cref="FencedDevice"/>); null on a single node.</param>
    public static Props Props(ExportSpec spec, BackendFactory backends, OwnershipFence? fence = null) =>
        Akka.Actor.Props.Create(() => new ExportActor(spec, backends, fence));

    /// <summary>
    /// Opens the backend off the actor (an S3 store lists its objects first, for up to seconds);
    /// the outcome comes back as <see cref="BackendOpened"/> or <see cref="BackendOpenFailed"/>.
    /// </summary>
    protected override void PreStart()
    {
        // The stop token: an export stopped while opening gives up on a slow store.
        _opening = _backends.OpenAsync(_spec, _closed.Token);
        _opening.PipeTo(Self, success: d => new BackendOpened(d), failure: e => new BackendOpenFailed(e));
    }

    private void OnBackendOpened(BackendOpened backendOpened)
    {
        IBlockDevice opened = backendOpened.Device;
        _backend = opened;
        _overlay = opened as Gateway.Backends.Overlay.OverlayBackend;
        // Fenced twice (FencedDevice): on top, so a refused request records no granule, and
        // right above the backend, so a write that waited for its granules checks again.
        _device = TrackDirtyGranules(_fence is null ? opened : new FencedDevice(opened, _fence));
        _gate = new DrainingDevice(_fence is null ? _device : new FencedDevice(_device, _fence));
        var info = new ExportInfo(_spec.Name, _spec.Description, _spec.Size, _spec.ReadOnly || _device.IsReadOnly, _device.Capabilities) { Access = _spec.Access ?? ExportAccess.Open };
        _handle = new ExportHandle(info, _gate, [new BaseAllocationContext(_gate), .. OverlayContexts()], _closed.Token);
        _bitmaps.Tell(new AttachExportHandle(_handle));
        _log.Info("Export {0} open: {1} bytes, {2}", _spec.Name, _spec.Size, _spec.ReadOnly ? "read-only" : "read-write");
        Become(Ready);
        Stash.UnstashAll();
    }

    /// <summary>Every change reaches the device only once the export's enabled bitmaps record it durably.</summary>
    private DirtyTrackingDevice TrackDirtyGranules(IBlockDevice device)
    {
        var tracker = new DirtyTracker();
        _bitmaps = Context.ActorOf(BitmapsActor.Props(_spec.Name, _spec.Size, tracker), "bitmaps");
        tracker.Actor = _bitmaps;
        Context.Watch(_bitmaps);
        return new DirtyTrackingDevice(device, tracker);
    }

    /// <summary>Closes the handle, then drains and flushes off the actor; <see cref="Drained"/> comes back.</summary>
    private void BeginClose(CloseReason reason)
    {
        if (_closing is not null)
        {
            // A removal during a handoff's drain still purges the bitmaps once the drain is done.
            if (reason == CloseReason.Removed)
            {
                _closing = reason;
            }
            return;
        }
        _closing = reason;
        _closeRequester = Sender;
        // Connections stop reading and finish the requests they hold (Transmission.RunAsync).
        _closed.Cancel();
        // Only in Ready, so the backend is open: both are set.
        ILoggingAdapter log = _log;
        DrainAndFlushAsync(_gate!, _device!, _spec.Name, message => log.Warning(message)).PipeTo(Self, failure: e => new Drained(true, e));
    }

    private static async Task<Drained> DrainAndFlushAsync(DrainingDevice gate, IBlockDevice device, string name, Action<string> warn)
    {
        bool drained = await gate.DrainAsync(DrainTimeout).ConfigureAwait(false);
        if (!device.IsReadOnly)
        {
            // The device under the gate: the gate is shut now, and the bitmaps are still running.
            await FinalFlush.RunAsync(device, name, warn).ConfigureAwait(false);
        }
        return new Drained(drained, null);
    }

    private void OnDrained(Drained drained)
    {
        if (!drained.AllFinished)
        {
            _log.Warning("Export {0}: requests still running {1} s after the export began to close; flushed and closing anyway",
                _spec.Name, DrainTimeout.TotalSeconds);
        }
        if (drained.Failure is { } failure)
        {
            _log.Error(failure, "Final flush of export {0} failed", _spec.Name);
        }
        else
        {
            _flushedOnClose = true;
        }
        if (_closing == CloseReason.HandedOff)
        {
            // The next owner's first FLUSH may answer success only if nothing acknowledged here
            // can still be missing from storage (ExportTerms).
            _closeRequester.Tell(new ExportClosed(drained.AllFinished && drained.Failure is null));
        }
        if (_closing == CloseReason.Removed && !_bitmaps.IsNobody())
        {
            // The export was removed: its bitmaps' events go too, then this actor stops.
            Context.Unwatch(_bitmaps);
            // A custom message, not PoisonPill: a PoisonPill delivered as a termination message
            // arrives as an ordinary message and would not stop this actor.
            Context.WatchWith(_bitmaps, BitmapsPurged.Instance);
            _bitmaps.Tell(PurgeBitmaps.Instance);
            return;
        }
        Context.Stop(Self);
    }

    protected override void PostStop()
    {
        // Connections still attached see the export close and end their sessions.
        _closed.Cancel();
        _closed.Dispose();
        if (_device is not { } device)
        {
            // Stopped before the open was taken in: the device, if the open still succeeds (or
            // did, with its message left unread), is nobody's but this continuation's.
            _ = _opening?.ContinueWith(static t =>
            {
                if (t.IsCompletedSuccessfully)
                {
                    t.Result.Dispose();
                }
            }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            return;
        }
        if (_flushedOnClose || device.IsReadOnly)
        {
            device.Dispose();
            return;
        }
        // Stopped without a planned close (the actor system ending, a supervisor's stop): flush
        // and release the backend off the actor thread rather than block it on the store.
        string name = _spec.Name;
        ILoggingAdapter log = _log;
        _ = Task.Run(async () =>
        {
            try
            {
                await device.FlushAsync().ConfigureAwait(false);
            }
            catch (Exception e)
            {
                log.Error(e, "Final flush of export {0} failed", name);
            }
            finally
            {
                device.Dispose();
            }
        });
    }

    private enum CloseReason
    {
        HandedOff,
        Removed,
    }

    private sealed record BackendOpened(IBlockDevice Device);

    private sealed record BackendOpenFailed(Exception Cause);

    /// <summary>The drain and the final flush ended (<paramref name="AllFinished"/>: no request was left running).</summary>
    private sealed record Drained(bool AllFinished, Exception? Failure);

    private sealed record BitmapsPurged
    {
        public static readonly BitmapsPurged Instance = new();
    }
}
