using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Microsoft.Extensions.Logging.Abstractions;
using Nerdbank.Streams;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// The NBD server in process: a loopback listener on an ephemeral port whose connections are
/// served by <see cref="NbdConnection.ServeAsync"/>, as the connection actor does, without actors;
/// or, with <c>inMemory</c>, connections that are a pair of in-memory pipes (no socket at all).
/// Disposal stops it and fails if a connection is still being served after a bounded wait, or if
/// a connection ended with an exception (a client's misbehaviour must never surface as one).
/// </summary>
public sealed class NbdTestServer : IAsyncDisposable
{
    public static readonly TimeSpan Patience = TimeSpan.FromSeconds(15);

    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly CancellationTokenSource _stopping = new();
    private readonly List<Task> _sessions = [];
    private readonly Task _acceptLoop;
    private int _active;
    private int _ended;

    private readonly NbdServerSettings? _settings;
    private readonly IExportDirectory _served;

    /// <param name="served">The directory connections are served from, when not <paramref name="exports"/> (the peer listener's, say).</param>
    /// <param name="inMemory">Connections are in-memory pipes (<see cref="ConnectAsync"/>), not loopback sockets; <see cref="EndPoint"/> still listens.</param>
    public NbdTestServer(TestExportDirectory exports, NbdServerSettings? settings = null, IExportDirectory? served = null, bool inMemory = false)
    {
        Exports = exports;
        InMemory = inMemory;
        _settings = settings;
        _served = served ?? exports;
        _listener.Start();
        EndPoint = (IPEndPoint)_listener.LocalEndpoint;
        _acceptLoop = Task.Run(AcceptLoopAsync);
    }

    public TestExportDirectory Exports { get; }

    /// <summary>Wraps each connection's stream before it is served (tests that watch what the server writes).</summary>
    public Func<Stream, Stream>? WrapConnection { get; init; }

    public bool InMemory { get; }

    public IPEndPoint EndPoint { get; }

    /// <summary>Connections being served right now.</summary>
    public int Active => Volatile.Read(ref _active);

    /// <summary>Connections whose ServeAsync has returned.</summary>
    public int Ended => Volatile.Read(ref _ended);

    /// <summary>Exceptions that escaped ServeAsync.</summary>
    public ConcurrentQueue<Exception> Faults { get; } = new();

    public Task<RawClient> ConnectAsync()
    {
        if (!InMemory)
        {
            return RawClient.ConnectAsync(EndPoint);
        }
        (IDuplexPipe client, IDuplexPipe server) = FullDuplexStream.CreatePipePair();
        Interlocked.Increment(ref _active);
        lock (_sessions)
        {
            _sessions.Add(Task.Run(() => ServeAsync(server.AsStream(), remote: null)));
        }
        return Task.FromResult(new RawClient(client));
    }

    /// <summary>A client that has finished the handshake with GO on <paramref name="export"/>.</summary>
    public async Task<RawClient> OpenAsync(string export, bool structured = true, params string[] contexts) =>
        await RawClient.NegotiateAsync(await ConnectAsync(), export, structured, contexts);

    /// <summary>A client that negotiated extended headers (and <paramref name="contexts"/>, if any), then GO on <paramref name="export"/>.</summary>
    public async Task<RawClient> OpenExtendedAsync(string export, params string[] contexts)
    {
        RawClient client = await ConnectAsync();
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.ExtendedHeaders, ReadOnlyMemory<byte>.Empty);
        if (contexts.Length > 0)
        {
            Assert.Equal(OptionReplyType.Ack, (await client.MetaContextAsync(NbdOption.SetMetaContext, export, contexts))[^1].Type);
        }
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, export))[^1].Type);
        Assert.True(client.Extended);
        return client;
    }

    private async Task AcceptLoopAsync()
    {
        while (true)
        {
            Socket socket;
            try
            {
                socket = await _listener.AcceptSocketAsync(_stopping.Token);
            }
            // InvalidOperationException: stopped before the loop's first accept ("Not listening"),
            // as when a test is over before the pool ran the loop.
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException ||
                (e is InvalidOperationException && _stopping.IsCancellationRequested))
            {
                return;
            }
            Interlocked.Increment(ref _active);
            lock (_sessions)
            {
                _sessions.Add(Task.Run(() => ServeAsync(socket)));
            }
        }
    }

    private Task ServeAsync(Socket socket)
    {
        try
        {
            socket.NoDelay = true;
        }
        catch (SocketException)
        {
            // The client is gone already: the first read says so.
        }
        return ServeAsync(new NetworkStream(socket, ownsSocket: true), socket.RemoteEndPoint);
    }

    private async Task ServeAsync(Stream connection, EndPoint? remote)
    {
        try
        {
            await using Stream stream = WrapConnection?.Invoke(connection) ?? connection;
            await NbdConnection.ServeAsync(stream, _served, NullLogger.Instance, _stopping.Token, remote, _settings);
        }
        catch (Exception e)
        {
            Faults.Enqueue(e);
        }
        finally
        {
            Interlocked.Increment(ref _ended);
            Interlocked.Decrement(ref _active);
        }
    }

    private Task? _disposal;

    /// <summary>Stops the server: cancels every connection and waits (bounded) for them to end.</summary>
    public ValueTask DisposeAsync() => new(_disposal ??= StopAsync());

    private async Task StopAsync()
    {
        _stopping.Cancel();
        _listener.Stop();
        await _acceptLoop;
        Task[] sessions;
        lock (_sessions)
        {
            sessions = [.. _sessions];
        }
        try
        {
            await Task.WhenAll(sessions).WaitAsync(Patience);
        }
        catch (TimeoutException)
        {
            throw new TimeoutException($"{sessions.Count(s => !s.IsCompleted)} NBD connection(s) still being served {Patience.TotalSeconds} s after the server stopped");
        }
        finally
        {
            _stopping.Dispose();
        }
        if (!Faults.IsEmpty)
        {
            throw new AggregateException("NBD connections ended with an exception", Faults);
        }
    }

    /// <summary>Polls <paramref name="condition"/> until it holds or <paramref name="timeout"/> passes.</summary>
    public static async Task<bool> EventuallyAsync(Func<bool> condition, TimeSpan? timeout = null)
    {
        DateTime deadline = DateTime.UtcNow + (timeout ?? Patience);
        while (!condition())
        {
            if (DateTime.UtcNow > deadline)
            {
                return false;
            }
            await Task.Delay(10);
        }
        return true;
    }
}
