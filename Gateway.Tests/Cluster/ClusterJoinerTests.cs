using Akka.Actor;
using Gateway.Actors.Cluster;
using Gateway.Host;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// Issue 17 (chaos, a restarted first seed formed a second cluster): how a node that is not a
/// member yet chooses whom to join, and the members' announcements in PostgreSQL. The restart of
/// a first seed into a running cluster is <see cref="ClusterJoinTests"/>'.
/// </summary>
public sealed class ClusterJoinerTests
{
    private static readonly Address Gw1 = Address.Parse("akka.tcp://gateway@10.0.0.1:4053");
    private static readonly Address Gw2 = Address.Parse("akka.tcp://gateway@10.0.0.2:4053");
    private static readonly Address Gw3 = Address.Parse("akka.tcp://gateway@10.0.0.3:4053");
    private static readonly Address Gw4 = Address.Parse("akka.tcp://gateway@10.0.0.4:4053");

    [Fact]
    public void A_first_seed_with_other_members_alive_joins_them_and_leaves_itself_out()
    {
        IReadOnlyList<Address>? plan = ClusterJoiner.Plan(Gw1, [Gw1, Gw2, Gw3], [Gw1, Gw3]);
        // The alive member first, then the other seeds; never this node, so Akka cannot self-join.
        Assert.Equal([Gw3, Gw2], plan);
    }

    [Fact]
    public void Members_alive_outside_the_seed_list_are_joined_through()
    {
        Assert.Equal([Gw4, Gw2, Gw3], ClusterJoiner.Plan(Gw1, [Gw1, Gw2, Gw3], [Gw4]));
        Assert.Equal([Gw4], ClusterJoiner.Plan(Gw1, [Gw1], [Gw4]));
    }

    [Fact]
    public void With_no_other_member_alive_the_configured_seeds_are_used_unchanged()
    {
        Assert.Equal([Gw1, Gw2, Gw3], ClusterJoiner.Plan(Gw1, [Gw1, Gw2, Gw3], []));
        // Its own earlier incarnation's announcement does not count.
        Assert.Equal([Gw1, Gw2, Gw3], ClusterJoiner.Plan(Gw1, [Gw1, Gw2, Gw3], [Gw1]));
        Assert.Equal([Gw1], ClusterJoiner.Plan(Gw1, [Gw1], [Gw1]));
    }

    [Fact]
    public void Without_the_store_a_node_joins_only_others_and_a_lone_seed_waits()
    {
        Assert.Equal([Gw2, Gw3], ClusterJoiner.Plan(Gw1, [Gw1, Gw2, Gw3], null));
        Assert.Null(ClusterJoiner.Plan(Gw1, [Gw1], null));
    }

    [Fact]
    public void An_announcement_in_the_other_transport_is_joined_in_this_one()
    {
        Address self = Address.Parse("akka.ssl.tcp://gateway@10.0.0.1:4053");
        Address other = Address.Parse("akka.ssl.tcp://gateway@10.0.0.2:4053");
        Assert.Equal([other], ClusterJoiner.Plan(self, [self], [Gw2, Gw1]));
    }

    [Fact]
    public async Task Announced_members_are_alive_until_they_withdraw_or_go_quiet()
    {
        string postgres = Environment.GetEnvironmentVariable("GATEWAY_TEST_POSTGRES") is { Length: > 0 } p
            ? p
            : throw new InvalidOperationException("GATEWAY_TEST_POSTGRES is not set: this test needs a PostgreSQL server (./ops/test starts one)");
        await using var members = new PostgresClusterMembers(postgres);
        string a = $"akka.tcp://gateway@{Guid.NewGuid():N}:1", b = $"akka.tcp://gateway@{Guid.NewGuid():N}:2";

        await members.AnnounceAsync(a, default);
        await members.AnnounceAsync(b, default);
        IReadOnlyList<string> alive = await members.AnnouncedWithinAsync(TimeSpan.FromSeconds(10), default);
        Assert.Contains(a, alive);
        Assert.Contains(b, alive);

        await members.WithdrawAsync(a, default);
        await Task.Delay(700);
        await members.AnnounceAsync(b, default);
        alive = await members.AnnouncedWithinAsync(TimeSpan.FromMilliseconds(500), default);
        Assert.DoesNotContain(a, alive);
        Assert.Contains(b, alive);
        await members.WithdrawAsync(b, default);
    }
}
