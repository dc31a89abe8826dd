using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Akka.Actor;
using Gateway.Actors.Connections;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Gateway.Host;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Protocol;

/// <summary>
/// The node's connection limit over real loopback sockets, through the gateway's own accept loop
/// and connection supervisor: connections count from accept (in the handshake too) until they
/// close, and a client beyond the limit is told why, while the others are served as before.
/// </summary>
[Collection(NbdServerCollection.Name)]
public sealed class ConnectionLimitTests : Akka.TestKit.Xunit2.TestKit
{
    private const string Rw = "rw";
    private const int Limit = 3;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(15);

    private readonly TestExportDirectory _exports = new();
    private readonly Socket _listener = NbdListener.ListenTcp(new IPEndPoint(IPAddress.Loopback, 0));
    private readonly CancellationTokenSource _stopping = new();
    private readonly List<RawClient> _clients = [];
    private Task? _acceptLoop;

    public ConnectionLimitTests(ITestOutputHelper output)
        : base("akka.loglevel = INFO", output)
    {
        _exports.Add(Rw, new MemoryBackend(4L * 1024 * 1024));
    }

    private IPEndPoint EndPoint => (IPEndPoint)_listener.LocalEndPoint!;

    private IActorRef Start(int? maxConnections, NbdServerSettings? settings = null)
    {
        IActorRef supervisor = Sys.ActorOf(ConnectionSupervisor.Props(_exports, NullLogger.Instance, settings, maxConnections), "connections");
        _acceptLoop = NbdListener.AcceptLoopAsync(_listener, supervisor, NullLogger.Instance, _stopping.Token);
        return supervisor;
    }

    private async Task<RawClient> ConnectAsync()
    {
        RawClient client = await RawClient.ConnectAsync(EndPoint);
        _clients.Add(client);
        return client;
    }

    private async Task<RawClient> OpenAsync()
    {
        RawClient client = await RawClient.OpenAsync(EndPoint, Rw);
        _clients.Add(client);
        return client;
    }

    private async Task AssertCountAsync(IActorRef supervisor, int expected) =>
        await AwaitAssertAsync(async () => Assert.Equal(expected, await supervisor.Ask<int>(CountConnections.Instance, Patience)), Patience);

    /// <summary>A client over the limit: greeted, its GO answered ERR_POLICY naming the limit, closed after ABORT.</summary>
    private async Task AssertRefusedAsync()
    {
        RawClient refused = await ConnectAsync();
        await refused.StartAsync();
        OptionReply structured = Assert.Single(await refused.OptionAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty));
        Assert.Equal(OptionReplyType.ErrPolicy, structured.Type);
        OptionReply go = Assert.Single(await refused.InfoOrGoAsync(NbdOption.Go, Rw));
        Assert.Equal(OptionReplyType.ErrPolicy, go.Type);
        Assert.Contains($"limit of {Limit} NBD connections", Encoding.UTF8.GetString(go.Data), StringComparison.Ordinal);
        Assert.Equal(OptionReplyType.Ack, Assert.Single(await refused.OptionAsync(NbdOption.Abort, ReadOnlyMemory<byte>.Empty)).Type);
        Assert.True(await refused.ServerClosedAsync(), "the refused connection should be closed after ABORT");
    }

    [Fact]
    public async Task Connection_beyond_the_limit_is_refused_with_ERR_POLICY_while_the_others_keep_working()
    {
        IActorRef supervisor = Start(Limit);
        RawClient first = await OpenAsync();
        RawClient second = await OpenAsync();
        RawClient negotiating = await ConnectAsync(); // still in the handshake: it counts too
        await negotiating.StartAsync();
        await AssertCountAsync(supervisor, Limit);

        await AssertRefusedAsync();

        await first.AssertWorksAsync(offset: 0, seed: 1);
        await second.AssertWorksAsync(offset: 4096, seed: 2);
        Assert.Equal(OptionReplyType.Ack, (await negotiating.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        await negotiating.AssertWorksAsync(offset: 8192, seed: 3);
        await AssertCountAsync(supervisor, Limit);
    }

    [Fact]
    public async Task After_a_connection_closes_a_new_one_is_accepted()
    {
        IActorRef supervisor = Start(Limit);
        RawClient leaving = await OpenAsync();
        await OpenAsync();
        await OpenAsync();
        await AssertRefusedAsync();

        await leaving.SendAsync(RawClient.Request(NbdCommand.Disconnect, CommandFlags.None, 1, 0, 0));
        Assert.True(await leaving.ServerClosedAsync());
        await AssertCountAsync(supervisor, Limit - 1);

        RawClient next = await OpenAsync();
        await next.AssertWorksAsync(offset: 12288, seed: 4);
        await AssertRefusedAsync();
    }

    [Fact]
    public async Task Connection_beyond_the_limit_asking_EXPORT_NAME_is_closed()
    {
        Start(1);
        RawClient only = await OpenAsync();
        RawClient refused = await ConnectAsync();
        await refused.StartAsync();

        // EXPORT_NAME has no error reply (proto.md): closing is the only refusal.
        await refused.SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes(Rw));

        Assert.True(await refused.ServerClosedAsync());
        await only.AssertWorksAsync();
    }

    [Fact]
    public async Task Refused_client_that_says_nothing_is_closed_within_the_handshake_deadline()
    {
        Start(1, new NbdServerSettings { HandshakeTimeout = TimeSpan.FromSeconds(1) });
        await OpenAsync();
        RawClient refused = await ConnectAsync();
        long start = Stopwatch.GetTimestamp();
        await refused.ReadGreetingAsync();

        Assert.True(await refused.ServerClosedAsync(TimeSpan.FromSeconds(10)));
        Assert.InRange(Stopwatch.GetElapsedTime(start), TimeSpan.FromMilliseconds(800), TimeSpan.FromSeconds(5));
    }

    /// <summary>
    /// Hundreds of idle and half-open connections: every wait on them is an async socket read, so
    /// they hold no thread; a thread per connection would show in the count, and starve the pool
    /// so that a new client would stall.
    /// </summary>
    [Fact]
    public async Task Idle_and_half_open_connections_hold_no_thread()
    {
        const int PerKind = 100;
        IActorRef supervisor = Start(maxConnections: null, new NbdServerSettings { HandshakeTimeout = TimeSpan.Zero });
        await (await OpenAsync()).AssertWorksAsync(); // warm up: the first connection's code paths
        int threadsBefore = Process.GetCurrentProcess().Threads.Count;

        for (int i = 0; i < PerKind; i++)
        {
            await ConnectAsync(); // connected, reads nothing, sends nothing
            RawClient halfOpen = await ConnectAsync();
            await halfOpen.StartAsync();
            await halfOpen.SendOptionAsync(NbdOption.Go, new byte[3], declaredLength: 100); // an option that never completes
            await OpenAsync(); // attached, then idle
        }
        await AssertCountAsync(supervisor, 1 + 3 * PerKind);

        var watch = Stopwatch.StartNew();
        RawClient fresh = await OpenAsync();
        await fresh.AssertWorksAsync(offset: 65536, seed: 9);
        Assert.InRange(watch.Elapsed, TimeSpan.Zero, TimeSpan.FromSeconds(5));
        int threadsAfter = Process.GetCurrentProcess().Threads.Count;
        Assert.True(threadsAfter - threadsBefore < PerKind / 2,
            $"{3 * PerKind} waiting connections grew the process from {threadsBefore} to {threadsAfter} threads");
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _stopping.Cancel();
            _listener.Dispose();
            _acceptLoop?.Wait(Patience);
            foreach (RawClient client in _clients)
            {
                client.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
            _stopping.Dispose();
        }
        base.Dispose(disposing);
    }
}
