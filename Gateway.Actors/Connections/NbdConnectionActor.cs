using System.Net.Sockets;
using Akka.Actor;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Connections;

/// <summary>
/// One NBD client connection. The protocol runs as a task (the data plane does not go through
/// the mailbox); the actor owns the socket's lifetime: when the session ends the actor stops,
/// when the session fails the actor fails and its supervisor stops it, and either way
/// <see cref="PostStop"/> closes the socket.
/// </summary>
public sealed class NbdConnectionActor : ReceiveActor
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly IExportDirectory _exports;
    private readonly ILogger _logger;
    private readonly CancellationToken _stopping;
    private readonly NbdServerSettings? _settings;

    public NbdConnectionActor(Socket socket, IExportDirectory exports, ILogger logger, CancellationToken stopping, NbdServerSettings? settings = null)
    {
        _settings = settings;
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
        _exports = exports;
        _logger = logger;
        _stopping = stopping;

        Receive<SessionEnded>(_ => Context.Stop(Self));
        Receive<SessionFailed>(failed => throw new ConnectionFailedException(failed.Cause));
    }

    public static Props Props(Socket socket, IExportDirectory exports, ILogger logger, CancellationToken stopping, NbdServerSettings? settings = null) =>
        Akka.Actor.Props.Create(() => new NbdConnectionActor(socket, exports, logger, stopping, settings));

    protected override void PreStart()
    {
        if (_socket.ProtocolType == ProtocolType.Tcp)
        {
            _socket.NoDelay = true;
            // A client that vanished without a FIN or RST (power loss, a dropped network) would
            // otherwise hold its place under the node's connection limit forever while idle:
            // probes after 60 s of silence find it gone within about two minutes. Live idle
            // clients answer the probes and stay.
            _socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
            _socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, 60);
            _socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, 10);
            _socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, 6);
        }
        NbdConnection.ServeAsync(_stream, _exports, _logger, _stopping, ClientName(_socket), _settings)
            .PipeTo(Self, success: () => SessionEnded.Instance, failure: e => new SessionFailed(e));
    }

    protected override void PostStop() => _stream.Dispose();

    // A Unix socket client has no address of its own: name the socket it came in on.
    private static System.Net.EndPoint? ClientName(Socket socket) =>
        socket.AddressFamily == AddressFamily.Unix ? socket.LocalEndPoint : socket.RemoteEndPoint;

    private sealed record SessionEnded
    {
        public static readonly SessionEnded Instance = new();
    }

    private sealed record SessionFailed(Exception Cause);
}

public sealed class ConnectionFailedException(Exception inner) : Exception("NBD connection failed: " + inner.Message, inner);
