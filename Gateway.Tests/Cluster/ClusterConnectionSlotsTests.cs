using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Gateway.Host;
using Gateway.Tests.Protocol;
using Microsoft.Extensions.Logging.Abstractions;
using Npgsql;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// Issue 17 item 5: the slot contract against the cluster's slots in PostgreSQL, and what only
/// they do: slots of nodes that are no longer members stop counting and are deleted lazily, and a
/// node's graceful stop gives its slots back. Needs GATEWAY_TEST_POSTGRES; fails without it.
/// </summary>
public sealed class PostgresClusterConnectionSlotsTests : ExportConnectionSlotsContract, IAsyncLifetime
{
    private const string NodeA = "akka.tcp://gateway@10.0.0.1:4053#1";
    private const string NodeB = "akka.tcp://gateway@10.0.0.2:4053#2";

    private readonly string _postgres = Environment.GetEnvironmentVariable("GATEWAY_TEST_POSTGRES") is { Length: > 0 } postgres
        ? postgres
        : throw new InvalidOperationException("GATEWAY_TEST_POSTGRES is not set: the slot tests need a PostgreSQL server (./ops/test starts one)");
    private readonly PostgresConnectionSlots _store;

    public PostgresClusterConnectionSlotsTests()
    {
        _store = new PostgresConnectionSlots(_postgres);
        Slots = new ClusterConnectionSlots(_store, NodeA, () => [NodeA], NullLogger.Instance);
    }

    protected override IExportConnectionSlots Slots { get; }

    [Fact]
    public async Task The_limit_holds_across_nodes_and_the_slots_of_a_node_that_is_no_longer_a_member_stop_counting()
    {
        string[] members = [NodeA, NodeB];
        var a = new ClusterConnectionSlots(_store, NodeA, () => members, NullLogger.Instance);
        var b = new ClusterConnectionSlots(_store, NodeB, () => members, NullLogger.Instance);
        Assert.NotNull(await a.TryAcquireAsync(Export, 2, default));
        Assert.NotNull(await b.TryAcquireAsync(Export, 2, default));
        Assert.Null(await a.TryAcquireAsync(Export, 2, default));
        Assert.Null(await b.TryAcquireAsync(Export, 2, default));

        // B was downed (killed): its slot no longer counts, at once, though its row is still there.
        members = [NodeA];
        Assert.NotNull(await a.TryAcquireAsync(Export, 2, default));
        Assert.Null(await a.TryAcquireAsync(Export, 2, default));
        Assert.Equal(3, (await _store.ListAsync(Export, default)).Count);
    }

    [Fact]
    public async Task A_claim_deletes_the_slots_of_departed_nodes_older_than_the_grace_of_any_export_and_keeps_the_young_ones()
    {
        await InsertAsync(Export, NodeB, TimeSpan.FromMinutes(2));
        await InsertAsync(Export + "-other", NodeB, TimeSpan.FromMinutes(2));
        Guid young = await InsertAsync(Export, "akka.tcp://gateway@10.0.0.3:4053#3", TimeSpan.Zero);
        Assert.NotNull(await Slots.TryAcquireAsync(Export, 1, default));
        IReadOnlyList<(string Node, Guid Slot)> left = await _store.ListAsync(Export, default);
        Assert.Equal(2, left.Count);
        Assert.Contains(left, s => s.Slot == young);
        Assert.DoesNotContain(left, s => s.Node == NodeB);
        Assert.Empty(await _store.ListAsync(Export + "-other", default));
    }

    [Fact]
    public async Task A_graceful_stop_gives_back_every_slot_of_the_node()
    {
        string[] members = [NodeA, NodeB];
        var b = new ClusterConnectionSlots(_store, NodeB, () => members, NullLogger.Instance);
        Assert.NotNull(await b.TryAcquireAsync(Export, 2, default));
        Assert.NotNull(await b.TryAcquireAsync(Export, 2, default));
        await b.ReleaseNodeAsync();
        Assert.Empty(await _store.ListAsync(Export, default));
    }

    private async Task<Guid> InsertAsync(string export, string node, TimeSpan age)
    {
        var slot = Guid.NewGuid();
        await using var connection = new NpgsqlConnection(_postgres);
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand("INSERT INTO gateway_connection_slots (slot, export, node, taken_at) VALUES ($1, $2, $3, now() - $4)", connection)
        {
            Parameters =
            {
                new NpgsqlParameter<Guid> { TypedValue = slot },
                new NpgsqlParameter<string> { TypedValue = export },
                new NpgsqlParameter<string> { TypedValue = node },
                new NpgsqlParameter<TimeSpan> { TypedValue = age },
            },
        };
        await command.ExecuteNonQueryAsync();
        return slot;
    }

    // The table exists before a test inserts rows of its own.
    public async Task InitializeAsync() => await _store.ReleaseAsync([], default);

    public async Task DisposeAsync() => await _store.DisposeAsync();
}

/// <summary>
/// The cluster's slots when the store misbehaves, with a store scripted in memory: the attach is
/// refused in bounded time with a reason, and no slot is left behind.
/// </summary>
public sealed class ClusterConnectionSlotsFailureTests
{
    private const string Self = "akka.tcp://gateway@10.0.0.1:4053#1";
    private static readonly TimeSpan Timeout = TimeSpan.FromMilliseconds(300);

    [Fact]
    public async Task An_export_without_a_limit_never_reaches_the_store()
    {
        var store = new ScriptedStore { Take = (_, _) => throw new InvalidOperationException("must not be asked") };
        var slots = new ClusterConnectionSlots(store, Self, () => [], NullLogger.Instance, Timeout);
        using IDisposable? slot = await slots.TryAcquireAsync("disk0", null, default);
        Assert.NotNull(slot);
        Assert.Empty(store.Claims);
    }

    [Fact]
    public async Task This_node_counts_before_the_membership_lists_it()
    {
        var store = new ScriptedStore();
        var slots = new ClusterConnectionSlots(store, Self, () => ["other#2"], NullLogger.Instance, Timeout);
        using IDisposable? slot = await slots.TryAcquireAsync("disk0", 1, default);
        Assert.Equal(["other#2", Self], store.Claims.Single().LiveNodes);
    }

    [Fact]
    public async Task A_store_that_does_not_answer_refuses_within_the_timeout_and_the_slot_it_takes_late_is_given_back()
    {
        var late = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        // It ignores its token, as a connection attempt to a vanished server may.
        var store = new ScriptedStore { Take = (_, _) => late.Task };
        var slots = new ClusterConnectionSlots(store, Self, () => [Self], NullLogger.Instance, Timeout);
        var clock = Stopwatch.StartNew();
        var refused = await Assert.ThrowsAsync<ConnectionSlotsUnavailableException>(() => slots.TryAcquireAsync("disk0", 1, default).AsTask());
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(2), $"refused after {clock.Elapsed.TotalSeconds:F1} s");
        Assert.Contains("did not answer", refused.Message);

        late.SetResult(true);
        Guid slot = store.Claims.Single().Slot;
        Assert.True(await NbdTestServer.EventuallyAsync(() => store.Released.Contains(slot)), "the slot taken after the refusal was not given back");
    }

    [Fact]
    public async Task A_failing_store_refuses_with_its_reason()
    {
        var store = new ScriptedStore { Take = (_, _) => Task.FromException<bool>(new TimeoutException("connection to 10.0.0.9:5432 timed out")) };
        var slots = new ClusterConnectionSlots(store, Self, () => [Self], NullLogger.Instance, Timeout);
        var refused = await Assert.ThrowsAsync<ConnectionSlotsUnavailableException>(() => slots.TryAcquireAsync("disk0", 1, default).AsTask());
        Assert.Contains("did not answer", refused.Message);

        store.Take = (_, _) => Task.FromException<bool>(new InvalidOperationException("relation is broken"));
        refused = await Assert.ThrowsAsync<ConnectionSlotsUnavailableException>(() => slots.TryAcquireAsync("disk0", 1, default).AsTask());
        Assert.Contains("relation is broken", refused.Message);
    }

    [Fact]
    public async Task A_slot_whose_release_failed_is_deleted_by_the_next_claim()
    {
        var store = new ScriptedStore { Release = _ => throw new NpgsqlException("the server went away") };
        var slots = new ClusterConnectionSlots(store, Self, () => [Self], NullLogger.Instance, Timeout);
        IDisposable? first = await slots.TryAcquireAsync("disk0", 1, default);
        Assert.NotNull(first);
        first.Dispose();
        Guid given = store.Claims.Single().Slot;
        Assert.True(await NbdTestServer.EventuallyAsync(() => store.ReleaseAttempts > 0));

        store.Release = _ => Task.CompletedTask;
        using IDisposable? second = await slots.TryAcquireAsync("disk0", 1, default);
        Assert.Equal([given], store.Claims.Last().Released);
        // Once a claim deleted it, later claims no longer carry it.
        using IDisposable? third = await slots.TryAcquireAsync("disk1", 1, default);
        Assert.Empty(store.Claims.Last().Released);
    }

    [Fact]
    public async Task GO_is_refused_with_ERR_POLICY_and_a_reason_when_the_slots_cannot_be_counted_and_the_handshake_goes_on()
    {
        var store = new ScriptedStore { Take = (_, _) => Task.FromException<bool>(new NpgsqlException("the database is down")) };
        var exports = new TestExportDirectory();
        exports.Add("limited", new MemoryBackend(1 << 20), access: new ExportAccess(MaxConnections: 1));
        exports.Add("open", new MemoryBackend(1 << 20));
        var settings = new NbdServerSettings { ExportConnections = new ClusterConnectionSlots(store, Self, () => [Self], NullLogger.Instance, Timeout) };
        await using var server = new NbdTestServer(exports, settings);
        await using RawClient client = await server.ConnectAsync();
        await client.StartAsync();
        OptionReply refused = (await client.InfoOrGoAsync(NbdOption.Go, "limited"))[^1];
        Assert.Equal(OptionReplyType.ErrPolicy, refused.Type);
        Assert.Contains("cannot be checked", Encoding.UTF8.GetString(refused.Data));
        Assert.Contains("the database is down", Encoding.UTF8.GetString(refused.Data));
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, "open"))[^1].Type);
        await client.AssertWorksAsync();
    }

    private sealed class ScriptedStore : IConnectionSlotStore
    {
        public ConcurrentQueue<ConnectionSlotClaim> Claims { get; } = new();
        public ConcurrentQueue<Guid> Released { get; } = new();
        public int ReleaseAttempts;

        public Func<ConnectionSlotClaim, CancellationToken, Task<bool>> Take { get; set; } = (_, _) => Task.FromResult(true);
        public Func<IReadOnlyList<Guid>, Task> Release { get; set; } = _ => Task.CompletedTask;

        public Task<bool> TryTakeAsync(ConnectionSlotClaim claim, CancellationToken cancellationToken)
        {
            Claims.Enqueue(claim);
            return Take(claim, cancellationToken);
        }

        public async Task ReleaseAsync(IReadOnlyList<Guid> slots, CancellationToken cancellationToken)
        {
            Interlocked.Increment(ref ReleaseAttempts);
            await Release(slots);
            foreach (Guid slot in slots)
            {
                Released.Enqueue(slot);
            }
        }

        public Task ReleaseNodeAsync(string node, CancellationToken cancellationToken) => Task.CompletedTask;
    }
}

/// <summary>
/// The peer data stream takes no export connection slot, so a client that reaches a node other
/// than the owner holds one slot (taken at that node), not a second one at the owner.
/// </summary>
public sealed class PeerStreamSlotTests
{
    private const string Limited = "limited";

    [Fact]
    public async Task The_peer_settings_let_any_number_of_streams_attach_to_a_limited_export()
    {
        var exports = new TestExportDirectory();
        exports.Add(Limited, new MemoryBackend(1 << 20), access: new ExportAccess(MaxConnections: 1));
        await using var server = new NbdTestServer(exports, Gateway.Actors.GatewayActorsHosting.PeerSettings(clusterTls: null));
        var clients = new List<RawClient>();
        for (int i = 0; i < 3; i++)
        {
            clients.Add(await server.OpenAsync(Limited));
        }
        foreach (RawClient client in clients)
        {
            await client.AssertWorksAsync();
            await client.DisposeAsync();
        }
    }

    [Fact]
    public async Task The_peer_listener_directory_opens_a_limited_export_with_open_access()
    {
        var device = new MemoryBackend(1 << 20);
        var info = new ExportInfo(Limited, null, device.Size, device.IsReadOnly, device.Capabilities) { Access = new ExportAccess(MaxConnections: 1) };
        var local = new LocalExports();
        local.Add(new ExportHandle(info, device, [], CancellationToken.None));
        ExportHandle? opened = await local.OpenAsync(Limited, default);
        Assert.NotNull(opened);
        Assert.Null(opened.Info.Access.MaxConnections);
        Assert.All(await local.ListAsync(default), e => Assert.Null(e.Access.MaxConnections));
    }
}
