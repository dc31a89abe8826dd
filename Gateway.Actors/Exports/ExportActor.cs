using Akka.Actor;
using Akka.Event;
using Gateway.Actors.Bitmaps;
using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>
/// Owns one export's backend for as long as the export exists on this node. Connections get
/// the device itself in an <see cref="ExportHandle"/> and call it directly; the actor handles
/// lifecycle only (open, flush, close).
/// </summary>
public sealed partial class ExportActor : ReceiveActor
{
    private ExportSpec _spec;
    private readonly BackendFactory _backends;
    private readonly CancellationTokenSource _closed = new();
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private IBlockDevice? _device;
    private ExportHandle? _handle;
    private IActorRef _bitmaps = ActorRefs.Nobody;

    public ExportActor(ExportSpec spec, BackendFactory backends)
    {
        _spec = spec;
        _backends = backends;

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
        Receive<QueryTopEmpty>(_ => Sender.Tell(_overlay is { TopIsEmpty: true }));
        Receive<IBitmapCommand>(command => _bitmaps.Forward(command));
        Receive<BitmapsPurged>(_ => Context.Stop(Self));
        Receive<PurgeBitmaps>(purge =>
        {
            // The export was removed: its bitmaps' events go too, then this actor stops.
            Context.Unwatch(_bitmaps);
            // A custom message, not PoisonPill: a PoisonPill delivered as a termination message
            // arrives as an ordinary message and would not stop this actor.
            Context.WatchWith(_bitmaps, BitmapsPurged.Instance);
            _bitmaps.Tell(purge);
        });
        ReceiveAsync<FlushAllExports>(async _ =>
        {
            try
            {
                if (_device is { IsReadOnly: false })
                {
                    await _device.FlushAsync().ConfigureAwait(false);
                }
                Sender.Tell(new ExportsFlushed(1, []));
            }
            catch (Exception e)
            {
                _log.Error(e, "Flushing export {0} failed", _spec.Name);
                Sender.Tell(new ExportsFlushed(0, [_spec.Name]));
            }
        });
    }

    public static Props Props(ExportSpec spec, BackendFactory backends) =>
        Akka.Actor.Props.Create(() => new ExportActor(spec, backends));

    protected override void PreStart()
    {
        _device = _backends.Open(_spec);
        _overlay = _device as Gateway.Backends.Overlay.OverlayBackend;
        _device = TrackDirtyGranules(_device);
        var info = new ExportInfo(_spec.Name, _spec.Description, _spec.Size, _spec.ReadOnly || _device.IsReadOnly, _device.Capabilities) { Access = _spec.Access ?? ExportAccess.Open };
        _handle = new ExportHandle(info, _device, [new BaseAllocationContext(_device), .. OverlayContexts()], _closed.Token);
        _bitmaps.Tell(new AttachExportHandle(_handle));
        _log.Info("Export {0} open: {1} bytes, {2}", _spec.Name, _spec.Size, _spec.ReadOnly ? "read-only" : "read-write");
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

    protected override void PostStop()
    {
        // Connections still attached see the export close and end their sessions.
        _closed.Cancel();
        if (_device is not null)
        {
            try
            {
                if (!_device.IsReadOnly)
                {
                    _device.FlushAsync().AsTask().GetAwaiter().GetResult();
                }
            }
            catch (Exception e)
            {
                _log.Error(e, "Final flush of export {0} failed", _spec.Name);
            }
            _device.Dispose();
        }
        _closed.Dispose();
    }

    private sealed record BitmapsPurged
    {
        public static readonly BitmapsPurged Instance = new();
    }
}
