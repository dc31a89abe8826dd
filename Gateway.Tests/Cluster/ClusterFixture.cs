using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using Gateway.Tests.Interop;
using Npgsql;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// The cluster tests run alone: each starts three or four gateway processes, and on two cores a
/// parallel test would slow failure detection and re-homing past the deadlines they measure.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ClusterCollection
{
    public const string Name = "Cluster (serial)";
}

/// <summary>One gateway of a <see cref="ClusterFixture"/>: its process and its cluster addresses.</summary>
public sealed class ClusterNode(string name, GatewayProcess gateway, int remotingPort, int peerPort)
{
    public string Name { get; } = name;
    public GatewayProcess Gateway { get; } = gateway;
    public int RemotingPort { get; } = remotingPort;
    public int PeerPort { get; } = peerPort;
    public HttpClient Http => Gateway.Http;
    public string NbdUri(string export) => Gateway.NbdUri(export);
    public override string ToString() => $"{Name} (nbd {Gateway.NbdPort}, remoting {RemotingPort})";
}

/// <summary>What <c>GET /v1/cluster</c> answers.</summary>
public sealed record ClusterView(string Self, string? Leader, ClusterMember[] Members, ExportOwner[] Exports)
{
    public string? OwnerOf(string export) => Exports.FirstOrDefault(e => e.Name == export)?.Owner;
}

public sealed record ClusterMember(string Node, string Address, string Status, string? Peer);

public sealed record ExportOwner(string Name, string? Owner);

/// <summary>
/// Real gateway processes in cluster mode on loopback: one shared data folder, a fresh
/// PostgreSQL database per test class (created on <c>GATEWAY_TEST_POSTGRES</c>, dropped at the
/// end), free ports for everything. Without <c>GATEWAY_TEST_POSTGRES</c> the tests fail: a
/// cluster suite that skips itself where PostgreSQL is missing proves nothing in CI.
/// </summary>
public class ClusterFixture : IAsyncLifetime
{
    public const int InitialNodes = 3;
    public static readonly TimeSpan UpTimeout = TimeSpan.FromSeconds(60);
    public static readonly TimeSpan OwnerTimeout = TimeSpan.FromSeconds(30);

    private readonly List<ClusterNode> _nodes = [];
    private readonly List<string> _seeds = [];
    private string? _adminConnectionString;
    private string? _database;
    private readonly List<string> _otherDatabases = [];

    public string DataDirectory { get; private set; } = null!;

    /// <summary>The Npgsql connection string every node is given.</summary>
    public string Postgres { get; private set; } = null!;

    /// <summary>Every node started so far, killed or stopped ones too, in start order.</summary>
    public IReadOnlyList<ClusterNode> Nodes
    {
        get
        {
            lock (_nodes)
            {
                return [.. _nodes];
            }
        }
    }

    public IReadOnlyList<ClusterNode> Running => [.. Nodes.Where(n => n.Gateway.IsRunning)];

    public ClusterNode Node(string name) =>
        Nodes.FirstOrDefault(n => n.Name == name) ?? throw new Xunit.Sdk.XunitException($"no node is named '{name}'\n{Describe()}");

    /// <summary>How many nodes the fixture starts with.</summary>
    protected virtual int StartingNodes => InitialNodes;

    /// <summary>Runs before the first node starts (after the database and folder exist).</summary>
    protected virtual Task PrepareAsync() => Task.CompletedTask;

    /// <summary>Options every start of node <paramref name="name"/> gets besides the cluster's own.</summary>
    protected virtual IEnumerable<string> NodeArgs(string name) => [];

    public async Task InitializeAsync()
    {
        _adminConnectionString = Environment.GetEnvironmentVariable("GATEWAY_TEST_POSTGRES") is { Length: > 0 } postgres
            ? postgres
            : throw new Xunit.Sdk.XunitException(
                "GATEWAY_TEST_POSTGRES is not set: the cluster tests need PostgreSQL. Run them through ./ops/test, or " +
                "`source ops/lib/postgres.sh && postgres_install && postgres_start` first (it exports GATEWAY_TEST_POSTGRES)");
        _database = $"gw_{Guid.NewGuid():N}";
        try
        {
            await ExecuteAsync($"CREATE DATABASE {_database}");
        }
        catch (Exception e) when (e is NpgsqlException or SocketException or TimeoutException)
        {
            _database = null;
            throw new Xunit.Sdk.XunitException($"cannot create a database on GATEWAY_TEST_POSTGRES ({_adminConnectionString}): {e.Message}");
        }
        Postgres = new NpgsqlConnectionStringBuilder(_adminConnectionString) { Database = _database }.ConnectionString;
        DataDirectory = Directory.CreateTempSubdirectory("gateway-cluster-").FullName;

        try
        {
            // Every node lists all the initial nodes as seeds, the first node first: it alone may
            // bootstrap, and the others (and nodes started later) join whoever is up.
            await PrepareAsync();
            (int Remoting, int Peer)[] ports = [.. Enumerable.Range(0, StartingNodes).Select(_ => (FreePort(), FreePort()))];
            _seeds.AddRange(ports.Select(p => $"127.0.0.1:{p.Remoting}"));
            // All at once: the first seed bootstraps as soon as the others answer that they are
            // not in a cluster yet, instead of waiting out the seed-node timeout alone.
            await Task.WhenAll(ports.Select((p, i) => StartNodeAsync($"gw{i + 1}", p.Remoting, p.Peer)));
            await WaitUntilUpAsync();
        }
        catch
        {
            try
            {
                await DisposeAsync();
            }
            catch (Xunit.Sdk.XunitException)
            {
                // The start failure is the one to report; its message already has every log.
            }
            throw;
        }
    }

    /// <summary>Starts one more node (named gwN), which joins through the seeds, and waits until every running node is Up.</summary>
    public async Task<ClusterNode> StartExtraNodeAsync()
    {
        ClusterNode node = await StartNodeAsync($"gw{Nodes.Count + 1}", FreePort(), FreePort());
        await WaitUntilUpAsync();
        return node;
    }

    private async Task<ClusterNode> StartNodeAsync(string name, int remoting, int peer)
    {
        string[] args =
        [
            "--remoting", $"127.0.0.1:{remoting}",
            "--peer", $"127.0.0.1:{peer}",
            .. _seeds.SelectMany(seed => new[] { "--seed", seed }),
            "--postgres", Postgres,
            "--node-name", name,
            .. NodeArgs(name),
        ];
        // StartAsync also waits until disk0 answers through this node's admin API: the first start
        // of an empty cluster creates it, so a node that sees it has joined.
        GatewayProcess gateway = await GatewayProcess.StartAsync(DataDirectory, args);
        var node = new ClusterNode(name, gateway, remoting, peer);
        lock (_nodes)
        {
            _nodes.Add(node);
        }
        return node;
    }

    /// <summary>The seeds' remoting addresses (HOST:PORT), for a process started outside the fixture.</summary>
    public IReadOnlyList<string> Seeds => _seeds;

    /// <summary>
    /// <paramref name="args"/> with its seeds (<c>--seed HOST:PORT</c> pairs) replaced by
    /// <paramref name="seeds"/>, in that order.
    /// </summary>
    public static IEnumerable<string> WithSeeds(IReadOnlyList<string> args, params string[] seeds)
    {
        for (int i = 0; i < args.Count; i++)
        {
            if (args[i] == "--seed")
            {
                i++;
                continue;
            }
            yield return args[i];
        }
        foreach (string seed in seeds)
        {
            yield return "--seed";
            yield return seed;
        }
    }

    /// <summary>SIGKILL, no leave, no flush. Returns a clock started just before the signal.</summary>
    public static Stopwatch Kill(ClusterNode node)
    {
        var sinceKill = Stopwatch.StartNew();
        node.Gateway.Kill();
        return sinceKill;
    }

    /// <summary>Starts a killed or stopped node again (same name and ports) and waits until every running node is Up.</summary>
    /// <param name="extraArgs">The node's arguments in place of its first start's; null: the same.</param>
    public async Task RestartAsync(ClusterNode node, IEnumerable<string>? extraArgs = null)
    {
        await node.Gateway.RestartAsync(extraArgs);
        await WaitUntilUpAsync();
    }

    /// <summary>SIGTERM: the node leaves the cluster and must exit with code 0.</summary>
    public async Task StopAsync(ClusterNode node)
    {
        await node.Gateway.StopAsync();
        await WaitUntilUpAsync();
    }

    /// <summary>Asks <paramref name="via"/> (default: the first running node) for <c>GET /v1/cluster</c>.</summary>
    public async Task<ClusterView> ViewAsync(ClusterNode? via = null)
    {
        via ??= Running.FirstOrDefault() ?? throw new Xunit.Sdk.XunitException($"no node is running\n{Describe()}");
        string body = await AdminAsync(HttpStatusCode.OK, via, HttpMethod.Get, "v1/cluster");
        return JsonSerializer.Deserialize<ClusterView>(body, JsonSerializerOptions.Web)
            ?? throw new Xunit.Sdk.XunitException($"GET /v1/cluster on {via} answered null");
    }

    /// <summary>
    /// Waits until every running node's /v1/cluster lists exactly the running nodes, all Up (killed
    /// nodes downed and removed, restarted ones back); fails after <see cref="UpTimeout"/>.
    /// </summary>
    public async Task WaitUntilUpAsync(TimeSpan? timeout = null)
    {
        TimeSpan limit = timeout ?? UpTimeout;
        var clock = Stopwatch.StartNew();
        string last = "nothing asked yet";
        while (true)
        {
            IReadOnlyList<ClusterNode> running = Running;
            string[] expected = [.. running.Select(n => n.Name).Order(StringComparer.Ordinal)];
            string? problem = null;
            foreach (ClusterNode node in running)
            {
                try
                {
                    using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
                    using HttpResponseMessage response = await node.Http.GetAsync("v1/cluster", cts.Token);
                    string body = await response.Content.ReadAsStringAsync(cts.Token);
                    if (response.StatusCode != HttpStatusCode.OK)
                    {
                        problem = $"{node.Name}: GET /v1/cluster answered {(int)response.StatusCode}: {body}";
                        break;
                    }
                    ClusterView view = JsonSerializer.Deserialize<ClusterView>(body, JsonSerializerOptions.Web)!;
                    string[] up = [.. view.Members.Where(m => m.Status == "Up").Select(m => m.Node).Order(StringComparer.Ordinal)];
                    if (view.Members.Length != expected.Length || !up.SequenceEqual(expected))
                    {
                        problem = $"{node.Name} sees {body}";
                        break;
                    }
                }
                catch (Exception e) when (e is HttpRequestException or OperationCanceledException or JsonException)
                {
                    problem = $"{node.Name}: GET /v1/cluster: {e.Message}";
                    break;
                }
            }
            if (problem is null)
            {
                return;
            }
            last = problem;
            if (clock.Elapsed > limit)
            {
                Assert.Fail($"the cluster did not show exactly [{string.Join(", ", expected)}] Up within {limit.TotalSeconds} s; last: {last}\n{Describe()}");
            }
            await Task.Delay(250);
        }
    }

    /// <summary>
    /// The node that owns <paramref name="export"/>: opens it once (nbdinfo through the first
    /// running node) so its actor runs, then waits until /v1/cluster names an owner.
    /// </summary>
    public async Task<ClusterNode> OwnerAsync(string export)
    {
        ClusterNode via = Running[0];
        await RunAsync("nbdinfo", ["--size", via.NbdUri(export)]);
        var clock = Stopwatch.StartNew();
        while (true)
        {
            ClusterView view = await ViewAsync(via);
            if (view.OwnerOf(export) is { } owner)
            {
                return Node(owner);
            }
            if (clock.Elapsed > OwnerTimeout)
            {
                Assert.Fail($"/v1/cluster names no owner for {export} {OwnerTimeout.TotalSeconds} s after it was opened: {JsonSerializer.Serialize(view)}\n{Describe()}");
            }
            await Task.Delay(200);
        }
    }

    /// <summary>
    /// One admin API call through <paramref name="via"/>: the status and body. A call that gets
    /// no answer (timeout, refused) fails with every node's log rather than a bare HttpClient error.
    /// </summary>
    public async Task<(HttpStatusCode Status, string Body)> AdminAsync(ClusterNode via, HttpMethod method, string path, object? json = null)
    {
        using var request = new HttpRequestMessage(method, path);
        if (json is not null)
        {
            request.Content = JsonContent.Create(json);
        }
        var clock = Stopwatch.StartNew();
        try
        {
            using HttpResponseMessage response = await via.Http.SendAsync(request);
            return (response.StatusCode, await response.Content.ReadAsStringAsync());
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
        {
            Assert.Fail($"{method} /{path} through {via} got no answer after {clock.Elapsed.TotalSeconds:F1} s: {e.Message}\n{Describe()}");
            throw;
        }
    }

    /// <summary><see cref="AdminAsync"/> that must answer <paramref name="expected"/>; returns the body.</summary>
    public async Task<string> AdminAsync(HttpStatusCode expected, ClusterNode via, HttpMethod method, string path, object? json = null)
    {
        (HttpStatusCode status, string body) = await AdminAsync(via, method, path, json);
        Assert.True(status == expected, $"{method} /{path} through {via} answered {(int)status}, expected {(int)expected}: {body}\n{Describe()}");
        return body;
    }

    public Task CreateExportAsync(ClusterNode via, object request) =>
        AdminAsync(HttpStatusCode.Created, via, HttpMethod.Post, "v1/exports", request);

    /// <summary>qemu-io with the given commands on an export through one node; a failure carries every node's log.</summary>
    public Task<ToolResult> QemuIoAsync(ClusterNode via, string export, params string[] commands) =>
        RunAsync("qemu-io", ["-f", "raw", via.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })], TimeSpan.FromSeconds(120));

    /// <summary>Runs a tool; a failure carries every node's log.</summary>
    public Task<ToolResult> RunAsync(string tool, IEnumerable<string> args, TimeSpan? timeout = null, bool check = true) =>
        Tool.RunAsync(tool, args, timeout, check, DataDirectory, Describe);

    /// <summary>
    /// Runs a tool that may hang or fail without failing the test (probes while an export
    /// re-homes): null when it did not finish within <paramref name="timeout"/>.
    /// </summary>
    public static async Task<ToolResult?> ProbeAsync(string tool, IEnumerable<string> args, TimeSpan timeout)
    {
        var start = new ProcessStartInfo(Tool.Locate(tool))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (string arg in args)
        {
            start.ArgumentList.Add(arg);
        }
        var clock = Stopwatch.StartNew();
        using Process process = Process.Start(start) ?? throw new InvalidOperationException($"could not start {tool}");
        process.StandardInput.Close();
        Task<string> stdout = process.StandardOutput.ReadToEndAsync();
        Task<string> stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
            return null;
        }
        return new ToolResult($"{tool} {string.Join(' ', start.ArgumentList)}", process.ExitCode, await stdout, await stderr, clock.Elapsed);
    }

    /// <summary>Every node's state and log tail, for failure messages.</summary>
    public string Describe()
    {
        var text = new StringBuilder();
        foreach (ClusterNode node in Nodes)
        {
            text.Append("===== ").Append(node.Name).Append(" (remoting ").Append(node.RemotingPort)
                .Append(", peer ").Append(node.PeerPort).Append(") =====\n").Append(node.Gateway.Describe()).Append('\n');
        }
        return text.ToString();
    }

    // Remoting and peer ports come from below the kernel's ephemeral range, never handed out
    // twice: GatewayProcess picks the NBD and admin ports with bind(0), from the ephemeral range,
    // and a remoting port that bind(0) handed out again became another node's NBD port (Akka's
    // dual-stack socket and the NBD listener both bound it, and the other nodes' remoting
    // reconnected to an NBD server).
    private static readonly HashSet<int> Reserved = [];

    internal static int FreePort()
    {
        int low = 32768;
        try
        {
            string[] range = File.ReadAllText("/proc/sys/net/ipv4/ip_local_port_range").Split((char[])['\t', ' ', '\n'], StringSplitOptions.RemoveEmptyEntries);
            low = int.Parse(range[0], System.Globalization.CultureInfo.InvariantCulture);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException or IndexOutOfRangeException)
        {
        }
        int first = Math.Max(1024, low - 12000);
        int span = Math.Max(1, low - first);
        lock (Reserved)
        {
            int start = Random.Shared.Next(span);
            for (int i = 0; i < span; i++)
            {
                int port = first + (start + i) % span;
                if (Reserved.Contains(port))
                {
                    continue;
                }
                try
                {
                    using var listener = new TcpListener(IPAddress.Loopback, port);
                    listener.Start();
                }
                catch (SocketException)
                {
                    continue;
                }
                Reserved.Add(port);
                return port;
            }
        }
        throw new Xunit.Sdk.XunitException($"no free loopback port in [{first}, {first + span})");
    }

    /// <summary>
    /// A connection string to an empty database of its own on the cluster's server (dropped with
    /// the fixture): a node given it is not of this cluster, whose members announce themselves in
    /// <see cref="Postgres"/> (README "Joining").
    /// </summary>
    public async Task<string> CreateOtherDatabaseAsync()
    {
        string name = $"gw_{Guid.NewGuid():N}";
        await ExecuteAsync($"CREATE DATABASE {name}");
        lock (_otherDatabases)
        {
            _otherDatabases.Add(name);
        }
        return new NpgsqlConnectionStringBuilder(_adminConnectionString) { Database = name }.ConnectionString;
    }

    private async Task ExecuteAsync(string sql)
    {
        await using var connection = new NpgsqlConnection(_adminConnectionString);
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand(sql, connection);
        await command.ExecuteNonQueryAsync();
    }

    public virtual async Task DisposeAsync()
    {
        // Every node stops (SIGTERM, one after the other, so each leaves a cluster that still has
        // a majority), then the database and the folder go, whatever failed; failures are
        // reported at the end.
        var failures = new List<string>();
        foreach (ClusterNode node in Enumerable.Reverse(Nodes))
        {
            try
            {
                if (node.Gateway.IsRunning)
                {
                    (int exitCode, TimeSpan elapsed) = await node.Gateway.TerminateAsync();
                    if (exitCode != 0)
                    {
                        failures.Add($"{node.Name} exited with code {exitCode} after SIGTERM ({elapsed.TotalSeconds:F1} s)\n{node.Gateway.Describe()}");
                    }
                }
            }
            catch (Exception e)
            {
                failures.Add($"{node.Name}: {e.Message}");
            }
            finally
            {
                await node.Gateway.DisposeAsync();
            }
        }
        NpgsqlConnection.ClearAllPools();
        foreach (string database in _database is null ? _otherDatabases : [_database, .. _otherDatabases])
        {
            try
            {
                await ExecuteAsync($"DROP DATABASE IF EXISTS {database} WITH (FORCE)");
            }
            catch (Exception e) when (e is NpgsqlException or SocketException or TimeoutException)
            {
                failures.Add($"dropping database {database}: {e.Message}");
            }
        }
        if (DataDirectory is not null)
        {
            try
            {
                Directory.Delete(DataDirectory, recursive: true);
            }
            catch (IOException)
            {
            }
        }
        if (failures.Count > 0)
        {
            throw new Xunit.Sdk.XunitException("cluster shutdown: " + string.Join("\n", failures));
        }
    }
}
