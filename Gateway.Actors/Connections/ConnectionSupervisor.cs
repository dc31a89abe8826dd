using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Actors.Telemetry;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Connections;

/// <summary>
/// The node's supervisor of NBD connections: one child per connection. A failing connection is
/// stopped (its socket closed) and nothing else is touched: siblings and exports run on.
/// </summary>
public sealed class ConnectionSupervisor : ReceiveActor
{
    private const int MaxRefusing = 64;
    private static readonly TimeSpan RefusalTimeout = TimeSpan.FromSeconds(5);

    private readonly CancellationTokenSource _stopping = new();
    private readonly HashSet<IActorRef> _connections = [];
    private readonly List<IActorRef> _drainWaiters = [];
    private readonly ILogger _logger;
    private long _accepted;
    private int _refusing;

    /// <param name="maxConnections">
    /// Connections this node serves at once, counted from accept (in the handshake too) until
    /// closed; a client beyond it is refused with a log line. Null: no limit.
    /// </param>
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
                Refuse(serve.Socket, maxConnections.Value, settings ?? NbdServerSettings.Default);
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
        Receive<RefusalEnded>(_ => _refusing--);
    }

    /// <summary>
    /// A client beyond the limit is answered ERR_POLICY with the reason (see <see cref="ConnectionRefusal"/>)
    /// and does not count against the limit. Refusals are bounded in time and in number: under a
    /// flood, those beyond <see cref="MaxRefusing"/> are closed at once.
    /// </summary>
    private void Refuse(Socket socket, int limit, NbdServerSettings settings)
    {
        GatewayTelemetry.ConnectionRefused();
        EndPoint? client = socket.AddressFamily == AddressFamily.Unix ? socket.LocalEndPoint : socket.RemoteEndPoint;
        _logger.LogWarning("Refusing NBD connection from {Client}: this node's limit of {Limit} connections is reached", client, limit);
        if (_refusing >= MaxRefusing)
        {
            socket.Dispose();
            return;
        }
        _refusing++;
        TimeSpan timeout = settings.HandshakeTimeout > TimeSpan.Zero && settings.HandshakeTimeout < RefusalTimeout ? settings.HandshakeTimeout : RefusalTimeout;
        ConnectionRefusal.RefuseAsync(new NetworkStream(socket, ownsSocket: true), $"this gateway node serves its limit of {limit} NBD connections; try again later",
                timeout, _stopping.Token)
            .PipeTo(Self, success: () => RefusalEnded.Instance, failure: _ => RefusalEnded.Instance);
    }

    private sealed record RefusalEnded
    {
        public static readonly RefusalEnded Instance = new();
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
