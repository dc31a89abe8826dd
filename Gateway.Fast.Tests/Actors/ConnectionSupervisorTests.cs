using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using Gateway.Actors.Connections;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Gateway.Tests.Protocol;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Actors;

/// <summary>
/// The node's connection supervisor over real loopback sockets: a connection actor that fails is
/// stopped on its own, while its siblings and the export they use run on.
/// </summary>
[Collection(NbdServerCollection.Name)]
public sealed class ConnectionSupervisorTests : Akka.TestKit.Xunit2.TestKit
{
    private const string Rw = "rw";
    private const string Boom = "boom";
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(15);

    private readonly TestExportDirectory _exports = new() { FailOn = Boom };
    private readonly TestDevice _device;
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly List<RawClient> _clients = [];

    public ConnectionSupervisorTests(ITestOutputHelper output)
        : base("akka.loglevel = INFO", output)
    {
        _device = _exports.Add(Rw, new MemoryBackend(4L * 1024 * 1024));
        _listener.Start();
    }

    private IActorRef NewSupervisor() =>
        Sys.ActorOf(ConnectionSupervisor.Props(_exports, NullLogger.Instance), "connections");

    /// <summary>Accepts a loopback connection and hands the server side to the supervisor, as the listener does.</summary>
    private async Task<RawClient> ConnectThroughAsync(IActorRef supervisor)
    {
        var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        Task<Socket> accepted = _listener.AcceptSocketAsync();
        await socket.ConnectAsync((IPEndPoint)_listener.LocalEndpoint);
        supervisor.Tell(new ServeConnection(await accepted.WaitAsync(Patience)));
        var client = new RawClient(socket);
        _clients.Add(client);
        return client;
    }

    private async Task<RawClient> OpenThroughAsync(IActorRef supervisor, string export = Rw)
    {
        RawClient client = await ConnectThroughAsync(supervisor);
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, export))[^1].Type);
        return client;
    }

    private static Task<int> CountAsync(IActorRef supervisor) => supervisor.Ask<int>(CountConnections.Instance, Patience);

    private async Task AssertCountAsync(IActorRef supervisor, int expected) =>
        await AwaitAssertAsync(async () => Assert.Equal(expected, await CountAsync(supervisor)), Patience);

    private async Task<IActorRef> ChildAsync(IActorRef supervisor, int number) =>
        await Sys.ActorSelection(supervisor.Path / $"nbd-{number}").ResolveOne(Patience);

    [Fact]
    public async Task Failing_connection_is_stopped_alone_and_siblings_and_the_export_keep_running()
    {
        IActorRef supervisor = NewSupervisor();
        RawClient sibling = await OpenThroughAsync(supervisor);
        await sibling.AssertWorksAsync(offset: 0, seed: 1);
        RawClient doomed = await ConnectThroughAsync(supervisor);
        await doomed.StartAsync();
        await AssertCountAsync(supervisor, 2);
        IActorRef doomedActor = await ChildAsync(supervisor, 2);
        Watch(doomedActor);

        // Opening "boom" throws inside the server: an unexpected failure, not a client's fault,
        // so the session fails, the connection actor throws, and the supervisor stops it.
        await EventFilter.Exception<ConnectionFailedException>().ExpectOneAsync(Patience, async () =>
        {
            await doomed.SendOptionAsync(NbdOption.Go, RawClient.InfoRequest(Boom));
            await ExpectTerminatedAsync(doomedActor, Patience);
        });

        Assert.True(await doomed.ServerClosedAsync(), "the failed connection's socket should be closed");
        await AssertCountAsync(supervisor, 1);
        await sibling.AssertWorksAsync(offset: 8192, seed: 2);
        Assert.False(_device.IsDisposed);
        RawClient later = await OpenThroughAsync(supervisor);
        NbdReply read = await later.ReadAsync(8192, 4096);
        Assert.Equal(RawClient.Pattern(4096, 2), read.Data(8192, 4096));
    }

    [Fact]
    public async Task Connection_closed_for_garbage_is_stopped_alone()
    {
        IActorRef supervisor = NewSupervisor();
        RawClient sibling = await OpenThroughAsync(supervisor);
        RawClient garbage = await OpenThroughAsync(supervisor);
        await AssertCountAsync(supervisor, 2);
        IActorRef garbageActor = await ChildAsync(supervisor, 2);
        Watch(garbageActor);
        byte[] request = RawClient.Request(NbdCommand.Read, CommandFlags.None, 1, 0, 512);
        BinaryPrimitives.WriteUInt32BigEndian(request, 0xDEADBEEF);

        await garbage.SendAsync(request);

        await ExpectTerminatedAsync(garbageActor, Patience);
        Assert.True(await garbage.ServerClosedAsync());
        await AssertCountAsync(supervisor, 1);
        await sibling.AssertWorksAsync();
        Assert.False(_device.IsDisposed);
    }

    [Fact]
    public async Task Client_leaving_stops_its_actor()
    {
        IActorRef supervisor = NewSupervisor();
        RawClient client = await OpenThroughAsync(supervisor);
        await AssertCountAsync(supervisor, 1);
        IActorRef actor = await ChildAsync(supervisor, 1);
        Watch(actor);

        await client.SendAsync(RawClient.Request(NbdCommand.Disconnect, CommandFlags.None, 1, 0, 0));

        await ExpectTerminatedAsync(actor, Patience);
        Assert.True(await client.ServerClosedAsync());
        await AssertCountAsync(supervisor, 0);
    }

    [Fact]
    public async Task Drain_finishes_requests_in_flight_and_answers_once_every_connection_has_closed()
    {
        IActorRef supervisor = NewSupervisor();
        var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        _device.Delay = offset =>
        {
            if (offset != 0)
            {
                return TimeSpan.Zero;
            }
            started.TrySetResult();
            return TimeSpan.FromMilliseconds(500);
        };
        RawClient busy = await OpenThroughAsync(supervisor);
        RawClient negotiating = await ConnectThroughAsync(supervisor);
        await negotiating.StartAsync();
        await AssertCountAsync(supervisor, 2);
        await busy.SendRequestAsync(NbdCommand.Read, CommandFlags.None, 77, 0, 4096);
        await started.Task.WaitAsync(Patience);

        supervisor.Tell(DrainConnections.Instance, TestActor);

        ConnectionsDrained drained = await ExpectMsgAsync<ConnectionsDrained>(Patience);
        Assert.Equal(2, drained.Closed);
        NbdReply reply = await busy.ReadReplyAsync(); // answered before the connection closed
        Assert.Equal((77ul, NbdError.None), (reply.Cookie, reply.Error));
        Assert.True(await busy.ServerClosedAsync());
        Assert.True(await negotiating.ServerClosedAsync());
        Assert.Equal(0, await CountAsync(supervisor));
        Assert.False(_device.IsDisposed);

        // Once draining, new connections are refused at once: closed before the greeting.
        RawClient late = await ConnectThroughAsync(supervisor);
        Assert.True(await late.ServerClosedAsync());
    }

    [Fact]
    public async Task Drain_does_not_wait_forever_for_a_client_stuck_mid_payload()
    {
        IActorRef supervisor = NewSupervisor();
        RawClient stuck = await OpenThroughAsync(supervisor);
        long before = PayloadPool.Outstanding;
        // A 1 MiB write of which only the header and 4 KiB ever arrive.
        await stuck.SendAsync(RawClient.Request(NbdCommand.Write, CommandFlags.None, 1, 0, 1024 * 1024, new byte[4096]));
        Assert.True(await NbdTestServer.EventuallyAsync(() => PayloadPool.Outstanding == before + 1), "the server should be waiting for the payload");

        supervisor.Tell(DrainConnections.Instance, TestActor);

        Assert.Equal(1, (await ExpectMsgAsync<ConnectionsDrained>(Patience)).Closed);
        Assert.True(await stuck.ServerClosedAsync());
        Assert.True(await NbdTestServer.EventuallyAsync(() => PayloadPool.Outstanding == before), "the partial write's buffer should be returned");
    }

    [Fact]
    public async Task Drain_with_no_connections_answers_at_once()
    {
        IActorRef supervisor = NewSupervisor();

        supervisor.Tell(DrainConnections.Instance, TestActor);

        Assert.Equal(0, (await ExpectMsgAsync<ConnectionsDrained>(Patience)).Closed);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            foreach (RawClient client in _clients)
            {
                client.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
            _listener.Stop();
        }
        base.Dispose(disposing);
    }
}
