using System.Net.Sockets;
using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors;

namespace Gateway.Host;

/// <summary>
/// Cluster mode: the node-to-node data stream. Other nodes forward their clients' requests for
/// exports this node owns over plain NBD connections to this listener, which serves only those
/// exports (an export that moved away answers "unknown", and the peer looks for the new owner).
/// </summary>
public sealed class PeerListener(GatewayOptions options, IRequiredActor<PeerConnectionSupervisorKey> peers, ILogger<PeerListener> logger) : BackgroundService
{
    private Socket? _listener;

    /// <remarks>
    /// Starts before the actor system (and stops after it, see ServeCommand): it binds here and
    /// waits for the peer supervisor in <see cref="ExecuteAsync"/>, which runs in the background.
    /// </remarks>
    public override async Task StartAsync(CancellationToken cancellationToken)
    {
        _listener = NbdListener.ListenTcp(options.Cluster!.Peer);
        logger.LogInformation("Peer data stream listening on {Endpoint}", _listener.LocalEndPoint);
        await base.StartAsync(cancellationToken).ConfigureAwait(false);
    }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        IActorRef supervisor = await peers.GetAsync(stoppingToken).ConfigureAwait(false);
        await NbdListener.AcceptLoopAsync(_listener!, supervisor, logger, stoppingToken).ConfigureAwait(false);
    }

    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        await base.StopAsync(cancellationToken).ConfigureAwait(false);
        _listener?.Dispose();
    }
}
