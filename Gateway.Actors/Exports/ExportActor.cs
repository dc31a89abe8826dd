using Akka.Actor;
using Akka.Event;
using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>
/// Owns one export's backend for as long as the export exists on this node. Connections get
/// the device itself in an <see cref="ExportHandle"/> and call it directly; the actor handles
/// lifecycle only (open, flush, close).
/// </summary>
public sealed class ExportActor : ReceiveActor
{
    private readonly ExportSpec _spec;
    private readonly BackendFactory _backends;
    private readonly CancellationTokenSource _closed = new();
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private IBlockDevice? _device;
    private ExportHandle? _handle;

    public ExportActor(ExportSpec spec, BackendFactory backends)
    {
        _spec = spec;
        _backends = backends;

        Receive<OpenExport>(_ => Sender.Tell(new ExportOpened(_handle)));
        Receive<GetExport>(_ => Sender.Tell(new ExportFound(new ExportStatus(_spec, _handle?.Info))));
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
        var info = new ExportInfo(_spec.Name, _spec.Description, _spec.Size, _spec.ReadOnly || _device.IsReadOnly, _device.Capabilities);
        _handle = new ExportHandle(info, _device, [new BaseAllocationContext(_device)], _closed.Token);
        _log.Info("Export {0} open: {1} bytes, {2}", _spec.Name, _spec.Size, _spec.ReadOnly ? "read-only" : "read-write");
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
}
