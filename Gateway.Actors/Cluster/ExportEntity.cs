using Akka.Actor;
using Akka.Event;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Exports;

namespace Gateway.Actors.Cluster;

/// <summary>
/// One export as a cluster-sharded entity: sharding starts it on exactly one node, which opens
/// the export there (an <see cref="ExportActor"/> child, as on a single node) and lists it in
/// <see cref="LocalExports"/>. Other nodes learn where it is with <see cref="LocateExport"/> and
/// send their clients' requests over a peer data stream, never through this mailbox.
/// </summary>
public sealed class ExportEntity : ReceiveActor, IWithTimers
{
    private static readonly TimeSpan OpenTimeout = TimeSpan.FromSeconds(30);
    private static readonly TimeSpan FailedBackoff = TimeSpan.FromSeconds(10);
    private readonly BackendFactory _backends;
    private readonly LocalExports _local;
    private readonly ClusterNode _node;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private IActorRef? _export;
    private ExportHandle? _handle;
    private string _generation = "";
    private IActorRef? _retiredBy;
    private bool _handingOff;
    private bool _failed;

    public ExportEntity(BackendFactory backends, LocalExports local, ClusterNode node)
    {
        _backends = backends;
        _local = local;
        _node = node;

        Receive<ExportEnvelope>(Handle);
        // Sharding's hand-off stop message (GatewayActorsHosting): the export closes in order
        // (requests in flight, flush, then bitmaps) before this entity stops and the shard moves.
        Receive<CloseExport>(_ =>
        {
            if (_export is null)
            {
                Context.Stop(Self);
                return;
            }
            if (!_handingOff)
            {
                _handingOff = true;
                _log.Info("Export {0} handing over from node {1}: finishing requests in flight, then flushing", Self.Path.Name, _node.Name);
                _export.Tell(CloseExport.Instance);
            }
        });
        Receive<Opened>(opened =>
        {
            if (opened.Handle is { } handle && _export is not null)
            {
                _handle = handle;
                _local.Add(handle);
                opened.ReplyTo.Tell(Located(handle));
            }
            else
            {
                opened.ReplyTo.Tell(new Status.Failure(new InvalidOperationException($"export could not be opened on {_node.Name}")));
            }
        });
        Receive<Terminated>(t =>
        {
            if (!t.ActorRef.Equals(_export))
            {
                return;
            }
            if (_retiredBy is not null)
            {
                _retiredBy.Tell(new ExportRetired(Self.Path.Name));
                Context.Stop(Self);
                return;
            }
            if (_handingOff)
            {
                Context.Stop(Self);
                return;
            }
            // Failed to open or broke: answer "not available" for a while, then stop, so that a
            // later message opens it afresh (without a retry, and an error, every wake).
            _export = null;
            _failed = true;
            Timers.StartSingleTimer("backoff", PoisonPill.Instance, FailedBackoff);
        });
    }

    public ITimerScheduler Timers { get; set; } = null!;

    public static Props Props(BackendFactory backends, LocalExports local, ClusterNode node) =>
        Akka.Actor.Props.Create(() => new ExportEntity(backends, local, node));

    private void Handle(ExportEnvelope envelope)
    {
        if (_handingOff && envelope.Message is not RetireExport)
        {
            // Closing here: the next owner answers once the shard has moved.
            if (envelope.Message is not WakeExport)
            {
                Sender.Tell(new Status.Failure(new InvalidOperationException($"export '{envelope.Spec.Name}' is being handed over from {_node.Name}")));
            }
            return;
        }
        if (_failed)
        {
            if (envelope.Message is not WakeExport)
            {
                Sender.Tell(new Status.Failure(new InvalidOperationException($"export '{envelope.Spec.Name}' failed to open on {_node.Name}")));
            }
            return;
        }
        if (_export is null)
        {
            _export = Context.ActorOf(ExportActor.Props(envelope.Spec, _backends), "export");
            _generation = Guid.NewGuid().ToString("N");
            Context.Watch(_export);
            _log.Info("Export {0} homed on node {1}", envelope.Spec.Name, _node.Name);
        }
        switch (envelope.Message)
        {
            case WakeExport:
                break;
            case LocateExport when _handle is { Closed.IsCancellationRequested: false } handle:
                Sender.Tell(Located(handle));
                break;
            case LocateExport:
                IActorRef replyTo = Sender;
                _export.Ask<ExportOpened>(new OpenExport(envelope.Spec.Name), OpenTimeout)
                    .PipeTo(Self, success: o => new Opened(o.Handle, replyTo), failure: _ => new Opened(null, replyTo));
                break;
            case RetireExport:
                _retiredBy = Sender;
                _export.Tell(PurgeBitmaps.Instance);
                break;
            default:
                _export.Forward(envelope.Message);
                break;
        }
    }

    private ExportLocated Located(ExportHandle handle) => new(handle.Info.Name, _node.Name, _node.PeerHost, _node.PeerPort,
        handle.Info.Size, handle.Info.ReadOnly, (int)handle.Info.Capabilities, [.. handle.MetaContexts.Select(c => c.Name)], _generation);

    protected override SupervisorStrategy SupervisorStrategy() =>
        // As on a single node: an export whose backend fails to open is stopped, not restarted in
        // a loop; this entity then stops too, and the registry's next wake tries again.
        new OneForOneStrategy(e =>
        {
            _log.Error(e, "Export actor failed; stopping it");
            return Directive.Stop;
        });

    protected override void PostStop()
    {
        if (_handle is not null)
        {
            _local.Remove(_handle);
        }
    }

    private sealed record Opened(ExportHandle? Handle, IActorRef ReplyTo);
}
