using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors;
using Gateway.Actors.Connections;
using Gateway.Actors.Exports;

namespace Gateway.Host;

/// <summary>
/// Accepts NBD clients and hands each socket to the node's connection supervisor. On shutdown:
/// stops accepting, lets every connection finish its requests in flight, then flushes every export.
/// </summary>
public sealed class NbdListener(
    GatewayOptions options,
    IRequiredActor<ConnectionSupervisorKey> connections,
    IRequiredActor<ExportRegistryKey> exports,
    ILogger<NbdListener> logger) : BackgroundService
{
    private static readonly TimeSpan DrainTimeout = TimeSpan.FromSeconds(30);
    private Socket? _listener;

    public IPEndPoint? LocalEndpoint => _listener?.LocalEndPoint as IPEndPoint;

    public override async Task StartAsync(CancellationToken cancellationToken)
    {
        // Wait for the actors before listening, so a client that connects is always served.
        await connections.GetAsync(cancellationToken).ConfigureAwait(false);
        await exports.GetAsync(cancellationToken).ConfigureAwait(false);
        var listener = new Socket(options.NbdEndpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        listener.Bind(options.NbdEndpoint);
        listener.Listen(512);
        _listener = listener;
        logger.LogInformation("NBD server listening on {Endpoint}", listener.LocalEndPoint);
        await base.StartAsync(cancellationToken).ConfigureAwait(false);
    }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        IActorRef supervisor = await connections.GetAsync(stoppingToken).ConfigureAwait(false);
        while (!stoppingToken.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await _listener!.AcceptAsync(stoppingToken).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                break;
            }
            catch (SocketException e)
            {
                logger.LogWarning("Accepting an NBD connection failed: {Reason}", e.Message);
                continue;
            }
            supervisor.Tell(new ServeConnection(client));
        }
    }

    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        await base.StopAsync(cancellationToken).ConfigureAwait(false);
        _listener?.Dispose();
        logger.LogInformation("NBD server stopped accepting; finishing requests in flight");
        try
        {
            IActorRef supervisor = await connections.GetAsync(cancellationToken).ConfigureAwait(false);
            ConnectionsDrained drained = await supervisor.Ask<ConnectionsDrained>(DrainConnections.Instance, DrainTimeout, cancellationToken).ConfigureAwait(false);
            IActorRef registry = await exports.GetAsync(cancellationToken).ConfigureAwait(false);
            ExportsFlushed flushed = await registry.Ask<ExportsFlushed>(FlushAllExports.Instance, DrainTimeout, cancellationToken).ConfigureAwait(false);
            if (flushed.Failures.Count > 0)
            {
                logger.LogError("Flushing exports failed at shutdown: {Failures}", string.Join(", ", flushed.Failures));
            }
            else
            {
                logger.LogInformation("All connections closed, {Count} exports flushed", flushed.Count);
            }
        }
        catch (Exception e) when (e is AskTimeoutException or OperationCanceledException or TaskCanceledException)
        {
            logger.LogError("Shutdown did not finish draining connections in time: {Reason}", e.Message);
        }
    }
}
