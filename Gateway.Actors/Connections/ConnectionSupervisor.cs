using Akka.Actor;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Connections;

/// <summary>
/// The node's supervisor of NBD connections: one child per connection. A failing connection is
/// stopped (its socket closed) and nothing else is touched: siblings and exports run on.
/// </summary>
public sealed class ConnectionSupervisor : ReceiveActor
{
    private readonly CancellationTokenSource _stopping = new();
    private readonly HashSet<IActorRef> _connections = [];
    private readonly List<IActorRef> _drainWaiters = [];
    private readonly ILogger _logger;
    private long _accepted;

    /// <param name="maxConnections">Connections this node serves at once; beyond it a new client is closed at once, with a log line.</param>
    public ConnectionSupervisor(IExportDirectory exports, ILogger logger, NbdServerSettings? settings = null, int? maxConnections = null)
    {
        _logger = logger;
        Receive<ServeConnection>(serve =>
        {
            if (_stopping.IsCancellationRequested)
            {
                serve.Socket.Dispose();
                return;
            }
            if (_connections.Count >= maxConnections)
            {
                _logger.LogWarning("Refusing NBD connection from {Client}: this node's limit of {Limit} connections is reached",
                    serve.Socket.AddressFamily == System.Net.Sockets.AddressFamily.Unix ? serve.Socket.LocalEndPoint : serve.Socket.RemoteEndPoint, maxConnections);
                serve.Socket.Dispose();
                return;
            }
            IActorRef child = Context.ActorOf(NbdConnectionActor.Props(serve.Socket, exports, logger, _stopping.Token, settings), $"nbd-{++_accepted}");
            Context.Watch(child);
            _connections.Add(child);
        });
        Receive<Terminated>(t =>
        {
            _connections.Remove(t.ActorRef);
            ReplyIfDrained();
        });
        Receive<DrainConnections>(_ =>
        {
            _drainWaiters.Add(Sender);
            _stopping.Cancel();
            ReplyIfDrained();
        });
        Receive<CountConnections>(_ => Sender.Tell(_connections.Count));
    }

    public static Props Props(IExportDirectory exports, ILogger logger, NbdServerSettings? settings = null, int? maxConnections = null) =>
        Akka.Actor.Props.Create(() => new ConnectionSupervisor(exports, logger, settings, maxConnections));

    protected override SupervisorStrategy SupervisorStrategy() => new OneForOneStrategy(e =>
    {
        _logger.LogError(e, "NBD connection actor failed; closing that connection only");
        return Directive.Stop;
    });

    private void ReplyIfDrained()
    {
        if (_stopping.IsCancellationRequested && _connections.Count == 0)
        {
            foreach (IActorRef waiter in _drainWaiters)
            {
                waiter.Tell(new ConnectionsDrained((int)_accepted));
            }
            _drainWaiters.Clear();
        }
    }

    protected override void PostStop()
    {
        _stopping.Cancel();
        _stopping.Dispose();
    }
}
