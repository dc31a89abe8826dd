using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// A fourth node joining a three-node cluster, on a cluster of its own. Rebalancing counts shards,
/// and a shard stays allocated after its last export was removed; the coordinator hands the
/// oldest shards over first. On the cluster <see cref="ClusterInteropTests"/> share, the shards
/// their earlier tests left behind were the ones handed over, and the new node took none of the
/// exports this test made (seen in CI). Here the only shards are this test's and disk0's.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class ClusterJoinTests(ClusterFixture cluster) : IClassFixture<ClusterFixture>
{
    private const long MiB = 1 << 20;

    [Fact]
    public async Task A_node_that_joins_later_takes_shards_and_serves_their_data()
    {
        IReadOnlyList<ClusterNode> three = cluster.Running;
        Assert.True(three.Count == 3, $"the cluster runs {three.Count} nodes, the test needs 3\n{cluster.Describe()}");
        // Twelve exports beside disk0: the new node's share (a quarter of the shards) is at least
        // two, so one of them at most is disk0.
        string[] exports = [.. Enumerable.Range(0, 12).Select(i => $"join-{i}")];
        for (int i = 0; i < exports.Length; i++)
        {
            await cluster.CreateExportAsync(three[i % 3], new { name = exports[i], size = 8 * MiB });
            await cluster.QemuIoAsync(three[(i + 1) % 3], exports[i], $"write -P {0x10 + i} 0 64k"); // opens it: its actor runs
        }

        ClusterNode late = await cluster.StartExtraNodeAsync();
        // Rebalancing hands shards to the new node; each round opens every export again, so an
        // export whose actor stopped in the hand-off starts on its new node.
        string[] taken = [];
        ClusterView view = await cluster.ViewAsync(three[0]);
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromSeconds(60))
        {
            foreach (string export in exports)
            {
                await cluster.RunAsync("nbdinfo", ["--size", three[0].NbdUri(export)], TimeSpan.FromSeconds(30));
            }
            view = await cluster.ViewAsync(three[0]);
            taken = [.. exports.Where(e => view.OwnerOf(e) == late.Name)];
            if (taken.Length > 0)
            {
                break;
            }
            await Task.Delay(2000);
        }
        Assert.True(taken.Length > 0, $"{late.Name} joined but owns none of [{string.Join(", ", exports)}] after 60 s: {JsonSerializer.Serialize(view)}\n{cluster.Describe()}");

        foreach (string export in taken)
        {
            int i = Array.IndexOf(exports, export);
            await cluster.QemuIoAsync(late, export, $"read -P {0x10 + i} 0 64k", "read -P 0 64k 64k");
            await cluster.QemuIoAsync(three[1], export, $"read -P {0x10 + i} 0 64k");
        }
        await cluster.StopAsync(late);
    }

    /// <summary>
    /// Issue 17, ops/chaos-cluster: the first seed, restarted while the cluster ran, heard no
    /// seed answer within Akka's seed-node timeout under load and joined itself, a second
    /// cluster. Here the other seed it lists is a closed port and the running members are not
    /// among its seeds at all, so Akka alone would form a cluster of one after 5 s; the node must
    /// find the running members through their announcements and join them.
    /// </summary>
    [Fact]
    public async Task A_first_seed_restarted_while_the_cluster_runs_joins_it_and_never_forms_its_own()
    {
        IReadOnlyList<ClusterNode> three = cluster.Running;
        Assert.True(three.Count == 3, $"the cluster runs {three.Count} nodes, the test needs 3\n{cluster.Describe()}");
        ClusterNode first = three[0];
        ClusterFixture.Kill(first);
        await cluster.WaitUntilUpAsync();

        string self = $"127.0.0.1:{first.RemotingPort}", closed = $"127.0.0.1:{ClusterFixture.FreePort()}";
        await cluster.RestartAsync(first, ClusterFixture.WithSeeds(first.Gateway.ExtraArgs, self, closed));
        // WaitUntilUpAsync held: every node, the restarted one too, sees exactly the three, Up.
        Assert.Contains("never joining itself", first.Gateway.Output, StringComparison.Ordinal);
        Assert.DoesNotContain("may form the cluster", first.Gateway.Output.Split("===== restart =====").Last(), StringComparison.Ordinal);
        await cluster.QemuIoAsync(first, "disk0", "read 0 4k");
    }
}
