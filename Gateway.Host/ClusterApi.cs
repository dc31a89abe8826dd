using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using Akka.Cluster;
using Akka.Cluster.Sharding;
using Akka.Hosting;
using Gateway.Actors;
using Gateway.Actors.Exports;

namespace Gateway.Host;

public sealed record MemberDto(string Node, string Address, string Status, bool Reachable, string? Peer);

public sealed record ExportOwnerDto(string Name, [property: JsonIgnore(Condition = JsonIgnoreCondition.Never)] string? Owner);

/// <summary><c>POST /v1/node/drain</c>: the node that stops, as the cluster names it.</summary>
public sealed record DrainDto(string Node, string State);

/// <summary><c>GET /v1/cluster</c>: members, their state, and which node owns each export (null: not running now).</summary>
public sealed record ClusterStatusDto(string Mode, string Self, string? Leader, MemberDto[] Members, ExportOwnerDto[] Exports);

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(ClusterStatusDto))]
[JsonSerializable(typeof(DrainDto))]
public sealed partial class ClusterJson : JsonSerializerContext;

public static class ClusterApi
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(5);

    /// <summary>The node name a member announced in its roles (see <see cref="ClusterComposition"/>).</summary>
    public static string NodeName(Member member) =>
        member.Roles.FirstOrDefault(r => r.StartsWith(ClusterComposition.NodeRolePrefix, StringComparison.Ordinal))?[ClusterComposition.NodeRolePrefix.Length..]
        ?? member.Address.ToString();

    public static WebApplication MapClusterApi(this WebApplication app)
    {
        app.MapGet("/v1/cluster", async (ActorSystem system, GatewayOptions options, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            IActorRef exports = await registry.GetAsync(ct);
            ExportList list = await exports.Ask<ExportList>(ListExports.Instance, Timeout, ct);
            if (options.Cluster is null)
            {
                return Results.Json(new ClusterStatusDto("single", "local", "local", [new MemberDto("local", "local", "Up", true, null)],
                    [.. list.Exports.Select(e => new ExportOwnerDto(e.Spec.Name, "local"))]), ClusterJson.Default.ClusterStatusDto);
            }
            return Results.Json(await StatusAsync(system, list, ct), ClusterJson.Default.ClusterStatusDto);
        });
        // Drain: the graceful stop SIGTERM starts (NbdListener: no new connections, requests in
        // flight finished, exports flushed; then Akka's CoordinatedShutdown hands the shards over
        // and leaves the cluster), started through the admin API. The process then exits 0.
        app.MapPost("/v1/node/drain", (HttpContext http, ActorSystem system, GatewayOptions options, IHostApplicationLifetime lifetime) =>
        {
            string node = options.Cluster is null ? "local" : NodeName(Akka.Cluster.Cluster.Get(system).SelfMember);
            // After the answer is sent: the stop closes the admin listener too.
            http.Response.OnCompleted(() =>
            {
                lifetime.StopApplication();
                return Task.CompletedTask;
            });
            return Results.Json(new DrainDto(node, "draining"), ClusterJson.Default.DrainDto, statusCode: StatusCodes.Status202Accepted);
        });
        return app;
    }

    private static async Task<ClusterStatusDto> StatusAsync(ActorSystem system, ExportList list, CancellationToken ct)
    {
        var cluster = Akka.Cluster.Cluster.Get(system);
        ClusterEvent.CurrentClusterState state = cluster.State;
        Member[] members = [.. state.Members.OrderBy(m => m.Address.Port)];
        // Each member's shard region knows which exports run there; ask them all at once.
        var owners = new Dictionary<string, string>(StringComparer.Ordinal);
        Task<(Member Member, CurrentShardRegionState? State)>[] asks = [.. members
            .Where(m => m.Status == MemberStatus.Up && !state.Unreachable.Contains(m))
            .Select(async m =>
            {
                try
                {
                    ActorSelection region = system.ActorSelection(new RootActorPath(m.Address) / "system" / "sharding" / "export");
                    return (m, (CurrentShardRegionState?)await region.Ask<CurrentShardRegionState>(GetShardRegionState.Instance, Timeout, ct));
                }
                catch (Exception e) when (e is AskTimeoutException or TaskCanceledException)
                {
                    return (m, null);
                }
            })];
        foreach ((Member member, CurrentShardRegionState? region) in await Task.WhenAll(asks))
        {
            foreach (string entity in region?.Shards.SelectMany(s => s.EntityIds) ?? [])
            {
                owners[entity] = NodeName(member);
            }
        }
        Member? leader = state.Leader is { } address ? members.FirstOrDefault(m => m.Address.Equals(address)) : null;
        return new ClusterStatusDto("cluster", NodeName(members.FirstOrDefault(m => m.UniqueAddress.Equals(cluster.SelfUniqueAddress)) ?? cluster.SelfMember),
            leader is null ? null : NodeName(leader),
            [.. members.Select(m => new MemberDto(NodeName(m), m.Address.ToString(), m.Status.ToString(), !state.Unreachable.Contains(m),
                m.Roles.FirstOrDefault(r => r.StartsWith(ClusterComposition.PeerRolePrefix, StringComparison.Ordinal))?[ClusterComposition.PeerRolePrefix.Length..]))],
            [.. list.Exports.Select(e => new ExportOwnerDto(e.Spec.Name, owners.GetValueOrDefault(e.Spec.Name)))]);
    }
}

/// <summary><c>gateway cluster status</c>: <c>GET /v1/cluster</c> from the command line.</summary>
public sealed class ClusterCliCommands(Uri admin, TextWriter stdout, TextWriter stderr) : AdminClient(admin, stdout, stderr)
{
    public static Command Build(Option<string> adminUrl, Func<ParseResult, Uri> resolve)
    {
        var cluster = new Command("cluster", "Cluster membership and export owners through the admin API");
        cluster.Options.Add(adminUrl);
        cluster.Options.Add(CliAuth.TokenFile);
        var status = new Command("status", "Members, their state, and which node owns each export (JSON)");
        status.SetAction((p, ct) =>
        {
            CliAuth.Configure(p);
            return new ClusterCliCommands(resolve(p), Console.Out, Console.Error).StatusAsync(ct);
        });
        cluster.Subcommands.Add(status);
        return cluster;
    }

    public async Task<int> StatusAsync(CancellationToken ct)
    {
        using HttpResponseMessage response = await SendAsync(HttpMethod.Get, "v1/cluster", null, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }
}

/// <summary><c>gateway node drain</c>: <c>POST /v1/node/drain</c>, then waits until the node has stopped.</summary>
public sealed class NodeCliCommands(Uri admin, TextWriter stdout, TextWriter stderr) : AdminClient(admin, stdout, stderr)
{
    private static readonly Option<int> Timeout = new("--timeout")
    {
        Description = "Seconds to wait for the node to stop (0: do not wait)",
        DefaultValueFactory = _ => 120,
    };

    public static Command Build(Option<string> adminUrl, Func<ParseResult, Uri> resolve)
    {
        var node = new Command("node", "The node the admin API belongs to");
        node.Options.Add(adminUrl);
        node.Options.Add(CliAuth.TokenFile);
        var drain = new Command("drain",
            "Stop the node gracefully, as SIGTERM does: it takes no new connections, finishes the requests in flight, flushes " +
            "its exports, hands them to the other nodes and exits 0 (clients elsewhere see a pause, not an error)");
        drain.Options.Add(Timeout);
        drain.SetAction((p, ct) =>
        {
            CliAuth.Configure(p);
            return new NodeCliCommands(resolve(p), Console.Out, Console.Error).DrainAsync(TimeSpan.FromSeconds(p.GetValue(Timeout)), ct);
        });
        node.Subcommands.Add(drain);
        return node;
    }

    public async Task<int> DrainAsync(TimeSpan timeout, CancellationToken ct)
    {
        if (timeout < TimeSpan.Zero)
        {
            throw new CliException("--timeout must be 0 or more seconds");
        }
        using (HttpResponseMessage response = await SendAsync(HttpMethod.Post, "v1/node/drain", null, ct))
        {
            if (!response.IsSuccessStatusCode)
            {
                return await FailAsync(response, ct);
            }
            await PrintBodyAsync(response, ct);
        }
        if (timeout == TimeSpan.Zero)
        {
            return 0;
        }
        // Stopped: the admin API no longer answers (the process closes it last, after the handover).
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (clock.Elapsed < timeout)
        {
            await Task.Delay(250, ct);
            try
            {
                using HttpResponseMessage alive = await SendAsync(HttpMethod.Get, "healthz", null, ct);
            }
            catch (CliException)
            {
                await Stderr.WriteLineAsync($"drained: the node stopped after {clock.Elapsed.TotalSeconds:F1} s");
                return 0;
            }
        }
        await Stderr.WriteLineAsync($"error: the node still answers {timeout.TotalSeconds:F0} s after the drain began");
        return 1;
    }
}
