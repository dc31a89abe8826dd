using Gateway.Tests.Cluster;
using Gateway.Tests.Interop;
using Npgsql;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Image;

/// <summary>
/// Issue 21: two containers of the image as one cluster, journal and leases in PostgreSQL on the
/// host's loopback (GATEWAY_TEST_POSTGRES, started by ops/test; the test fails without it), on the
/// host's network so that loopback is theirs too, one shared data folder (the chart's
/// ReadWriteMany claim). A write through one node is read through the other.
/// </summary>
[Collection(ContainerImageCollection.Name)]
public sealed class ContainerClusterTests(ITestOutputHelper log) : IAsyncLifetime
{
    private static readonly TimeSpan ReadyTimeout = TimeSpan.FromSeconds(120);

    private readonly string _adminConnectionString = Environment.GetEnvironmentVariable("GATEWAY_TEST_POSTGRES") is { Length: > 0 } postgres
        ? postgres
        : throw new Xunit.Sdk.XunitException("GATEWAY_TEST_POSTGRES is not set: the container cluster test needs PostgreSQL (./ops/test starts one)");
    private readonly string _database = $"gw_{Guid.NewGuid():N}";
    private readonly List<GatewayContainer> _nodes = [];
    private string _data = null!;

    public async Task InitializeAsync()
    {
        await ExecuteAsync($"CREATE DATABASE {_database}");
        _data = await GatewayContainer.CreateDataDirectoryAsync();
    }

    public async Task DisposeAsync()
    {
        foreach (GatewayContainer node in _nodes)
        {
            await node.DisposeAsync();
        }
        Directory.Delete(_data, recursive: true);
        await ExecuteAsync($"DROP DATABASE IF EXISTS {_database} WITH (FORCE)");
    }

    [Fact]
    public async Task Two_containers_form_a_cluster_and_read_each_others_writes()
    {
        GatewayImage image = await GatewayImage.GetAsync();
        string postgres = new NpgsqlConnectionStringBuilder(_adminConnectionString) { Database = _database }.ConnectionString;
        (int Remoting, int Peer, int Nbd, int Health, int Admin)[] ports =
            [.. Enumerable.Range(0, 2).Select(_ => (ClusterFixture.FreePort(), ClusterFixture.FreePort(), ClusterFixture.FreePort(), ClusterFixture.FreePort(), ClusterFixture.FreePort()))];
        string[] seeds = [.. ports.SelectMany(p => new[] { "--seed", $"127.0.0.1:{p.Remoting}" })];
        for (int i = 0; i < ports.Length; i++)
        {
            (int remoting, int peer, int nbd, int health, int admin) = ports[i];
            _nodes.Add(await GatewayContainer.StartOnHostNetworkAsync(image, _data, nbd, health, [
                "--admin", $"127.0.0.1:{admin}",
                "--remoting", $"127.0.0.1:{remoting}", "--peer", $"127.0.0.1:{peer}", .. seeds,
                "--postgres", postgres, "--node-name", $"gw{i + 1}"]));
        }
        // /readyz: the node has joined the cluster.
        foreach (GatewayContainer node in _nodes)
        {
            TimeSpan ready = await node.WaitHealthyAsync(ReadyTimeout);
            log.WriteLine($"{node.Name}: joined after {ready.TotalSeconds:F1} s");
        }

        // disk0 has one owner: one of these two writes crosses to the other node, and so does one read.
        await QemuIoAsync(_nodes[0], "write -P 0x11 0 1M", "write -P 0x22 1M 1M");
        await QemuIoAsync(_nodes[1], "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "write -P 0x33 2M 1M");
        await QemuIoAsync(_nodes[0], "read -P 0x33 2M 1M");

        // Each node leaves on SIGTERM and exits 0, the second one alone in the cluster.
        foreach (GatewayContainer node in Enumerable.Reverse(_nodes))
        {
            (int exitCode, TimeSpan stopped) = await node.TerminateAsync(image.TerminationGracePeriod);
            log.WriteLine($"{node.Name}: SIGTERM to exit {stopped.TotalSeconds:F1} s, exit code {exitCode}");
            Assert.True(exitCode == 0, $"{node.Name} exited {exitCode} after SIGTERM\n{await node.LogsAsync()}");
        }
    }

    private Task<ToolResult> QemuIoAsync(GatewayContainer node, params string[] commands) =>
        Tool.RunAsync("qemu-io", ["-f", "raw", node.NbdUri("disk0"), .. commands.SelectMany(c => new[] { "-c", c })],
            context: () => string.Join('\n', _nodes.Select(n => n.LogsAsync().GetAwaiter().GetResult())));

    private async Task ExecuteAsync(string sql)
    {
        await using var connection = new NpgsqlConnection(_adminConnectionString);
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand(sql, connection);
        await command.ExecuteNonQueryAsync();
    }
}
