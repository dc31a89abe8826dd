using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors;
using Gateway.Actors.Connections;
using Gateway.Actors.Exports;

namespace Gateway.Host;

/// <summary>
/// Accepts NBD clients on every configured endpoint (TCP and Unix domain sockets) and hands each
/// socket to the node's connection supervisor. On shutdown: stops accepting, lets every
/// connection finish its requests in flight, then flushes every export.
/// </summary>
public sealed class NbdListener(
    GatewayOptions options,
    IRequiredActor<ConnectionSupervisorKey> connections,
    IRequiredActor<ExportRegistryKey> exports,
    Gateway.Actors.Cluster.LocalExports localExports,
    ActorSystem system,
    ShutdownOutcome outcome,
    ILogger<NbdListener> logger) : BackgroundService
{
    private static readonly TimeSpan DrainTimeout = TimeSpan.FromSeconds(30);
    private static readonly TimeSpan ProgressInterval = TimeSpan.FromSeconds(5);

    /// <summary>The exports' final flush retries a failing store for up to <see cref="FinalFlush.Budget"/>.</summary>
    private static readonly TimeSpan FlushTimeout = FinalFlush.Budget + TimeSpan.FromSeconds(5);
    private readonly List<Socket> _listeners = [];

    public IPEndPoint? LocalEndpoint => _listeners.Select(l => l.LocalEndPoint).OfType<IPEndPoint>().FirstOrDefault();

    public override async Task StartAsync(CancellationToken cancellationToken)
    {
        // Wait for the actors before listening, so a client that connects is always served.
        await connections.GetAsync(cancellationToken).ConfigureAwait(false);
        await exports.GetAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            foreach (EndPoint endpoint in options.NbdEndpoints)
            {
                _listeners.Add(endpoint is UnixDomainSocketEndPoint unix ? ListenUnix(unix) : ListenTcp(endpoint));
                logger.LogInformation("NBD server listening on {Endpoint}", Describe(_listeners[^1]));
            }
        }
        catch
        {
            CloseListeners();
            throw;
        }
        await base.StartAsync(cancellationToken).ConfigureAwait(false);
    }

    internal static Socket ListenTcp(EndPoint endpoint)
    {
        var listener = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        listener.Bind(endpoint);
        listener.Listen(512);
        return listener;
    }

    /// <summary>
    /// Binds a Unix socket. A socket file left by a gateway that died is removed (nothing answers
    /// on it); one a live server answers on, or a path that is not a socket, is an error.
    /// </summary>
    private Socket ListenUnix(UnixDomainSocketEndPoint endpoint)
    {
        string path = endpoint.ToString();
        if (File.Exists(path) || Directory.Exists(path))
        {
            if ((File.GetAttributes(path) & FileAttributes.Directory) != 0 || !IsSocket(path))
            {
                throw new IOException($"NBD socket path {path} exists and is not a socket; not replacing it");
            }
            using (var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
            {
                try
                {
                    probe.Connect(endpoint);
                    throw new IOException($"NBD socket {path} is in use by another server");
                }
                catch (SocketException)
                {
                    // ECONNREFUSED: a stale socket file.
                }
            }
            logger.LogInformation("Removing stale NBD socket file {Path}", path);
            File.Delete(path);
        }
        var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            listener.Bind(endpoint);
            if (!OperatingSystem.IsWindows())
            {
                File.SetUnixFileMode(path, options.NbdSocketMode);
            }
            listener.Listen(512);
            return listener;
        }
        catch
        {
            listener.Dispose();
            throw;
        }
    }

    private static bool IsSocket(string path)
    {
        // .NET has no S_ISSOCK: a socket is neither a regular file nor a directory, and
        // FileSystemInfo reports it with no Normal/Archive bit, but the sure test is the inode type.
        try
        {
            using FileStream _ = new(path, FileMode.Open, FileAccess.Read);
            return false; // a regular file (or a FIFO) opens; a socket does not (ENXIO)
        }
        catch (IOException)
        {
            return true;
        }
        catch (UnauthorizedAccessException)
        {
            return false;
        }
    }

    private static string Describe(Socket socket) => socket.AddressFamily == AddressFamily.Unix ? $"unix:{socket.LocalEndPoint}" : $"{socket.LocalEndPoint}";

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        IActorRef supervisor = await connections.GetAsync(stoppingToken).ConfigureAwait(false);
        await Task.WhenAll(_listeners.Select(l => AcceptLoopAsync(l, supervisor, logger, stoppingToken))).ConfigureAwait(false);
    }

    internal static async Task AcceptLoopAsync(Socket listener, IActorRef supervisor, ILogger logger, CancellationToken stoppingToken)
    {
        while (!stoppingToken.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await listener.AcceptAsync(stoppingToken).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException)
            {
                break;
            }
            catch (SocketException e)
            {
                logger.LogWarning("Accepting an NBD connection on {Endpoint} failed: {Reason}", Describe(listener), e.Message);
                continue;
            }
            supervisor.Tell(new ServeConnection(client));
        }
    }

    private void CloseListeners()
    {
        foreach (Socket listener in _listeners)
        {
            string? unixPath = listener.AddressFamily == AddressFamily.Unix ? listener.LocalEndPoint?.ToString() : null;
            listener.Dispose();
            if (unixPath is not null)
            {
                try
                {
                    File.Delete(unixPath);
                }
                catch (IOException)
                {
                }
            }
        }
        _listeners.Clear();
    }

    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        await base.StopAsync(cancellationToken).ConfigureAwait(false);
        CloseListeners();
        if (system.WhenTerminated.IsCompleted)
        {
            // A downed node (or one whose join failed) stopped its actors first: its connections and
            // exports stopped with them, and there is no one left to ask.
            logger.LogWarning("NBD server stopped accepting; the actor system had already stopped (this node was downed or left the cluster), so there is nothing to drain");
            return;
        }
        logger.LogInformation("NBD server stopped accepting; finishing requests in flight");
        try
        {
            IActorRef supervisor = await connections.GetAsync(cancellationToken).ConfigureAwait(false);
            _ = await UnlessTerminatedAsync(supervisor.Ask<ConnectionsDrained>(DrainConnections.Instance, DrainTimeout, cancellationToken),
                async () => $"{await supervisor.Ask<int>(CountConnections.Instance, ProgressInterval).ConfigureAwait(false)} NBD connection(s) to close").ConfigureAwait(false);
            ExportsFlushed flushed;
            if (options.Cluster is null)
            {
                IActorRef registry = await exports.GetAsync(cancellationToken).ConfigureAwait(false);
                flushed = await UnlessTerminatedAsync(registry.Ask<ExportsFlushed>(FlushAllExports.Instance, FlushTimeout, cancellationToken),
                    () => Task.FromResult("the exports' final flush")).ConfigureAwait(false);
            }
            else
            {
                // The exports this node owns; CoordinatedShutdown then hands their shards over.
                flushed = await UnlessTerminatedAsync(localExports.FlushAllAsync(message => logger.LogWarning("{Message}", message)),
                    () => Task.FromResult("the final flush of the exports this node owns")).ConfigureAwait(false);
            }
            if (flushed.Failures.Count > 0)
            {
                logger.LogError("Flushing exports failed at shutdown; writes they had not stored are lost: {Failures}", string.Join(", ", flushed.Failures));
                outcome.Fail();
            }
            else
            {
                logger.LogInformation("All connections closed, {Count} exports flushed", flushed.Count);
            }
        }
        catch (ActorSystemStoppedException)
        {
            logger.LogWarning("The actor system stopped while connections were draining (this node was downed or left the cluster): its connections and exports stopped with it");
        }
        catch (Exception e) when (e is AskTimeoutException or OperationCanceledException or TaskCanceledException)
        {
            logger.LogError("Shutdown did not finish draining connections in time: {Reason}", e.Message);
            outcome.Fail();
        }
    }

    /// <summary>
    /// <paramref name="answer"/>, unless the actor system stops first (downed while draining): then
    /// no actor is left to answer, and waiting out <see cref="DrainTimeout"/> would only delay the exit.
    /// Every <see cref="ProgressInterval"/> until then a warning says what the stop still waits for
    /// (<paramref name="waitingFor"/>), so a slow stop, or one the kubelet ends with SIGKILL, shows
    /// its cause in the log.
    /// </summary>
    private async Task<T> UnlessTerminatedAsync<T>(Task<T> answer, Func<Task<string>> waitingFor)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (true)
        {
            Task first = await Task.WhenAny(answer, system.WhenTerminated, Task.Delay(ProgressInterval)).ConfigureAwait(false);
            if (first == answer)
            {
                return await answer.ConfigureAwait(false);
            }
            if (first == system.WhenTerminated)
            {
                throw new ActorSystemStoppedException();
            }
            string what;
            try
            {
                what = await waitingFor().ConfigureAwait(false);
            }
            catch (Exception e) when (e is AskTimeoutException or OperationCanceledException)
            {
                what = "the connection supervisor did not answer";
            }
            logger.LogWarning("Shutdown has waited {Seconds:F0} s for {WaitingFor}", clock.Elapsed.TotalSeconds, what);
        }
    }

    private sealed class ActorSystemStoppedException : Exception;
}
