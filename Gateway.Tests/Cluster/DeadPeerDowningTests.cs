using System.Net;
using System.Net.Sockets;
using Akka.Cluster;
using Gateway.Actors.Cluster;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// The probe that tells a dead process (its port refuses connections) from a live or silent one;
/// the kill -9 interop test checks that the survivors act on it.
/// </summary>
public sealed class DeadPeerDowningTests
{
    [Fact]
    public async Task A_port_nothing_listens_on_refuses_and_a_listening_port_does_not()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int listening = ((IPEndPoint)listener.LocalEndpoint).Port;
        Assert.Equal(DeadPeerDowning.PortAnswer.Accepted, await DeadPeerDowning.ConnectAsync("127.0.0.1", listening));

        listener.Stop();
        Assert.Equal(DeadPeerDowning.PortAnswer.Refused, await DeadPeerDowning.ConnectAsync("127.0.0.1", listening));
    }

    [Theory]
    [InlineData(3, 1, true)] // the usual kill -9: this node and the third one still talk
    [InlineData(3, 0, false)] // cut off from both others (a partition that rejects): the resolver decides
    [InlineData(2, 0, false)] // two nodes: neither side is a majority
    [InlineData(5, 2, true)]
    [InlineData(5, 1, false)]
    [InlineData(4, 1, false)]
    public void A_node_downs_a_refusing_member_only_from_the_majority_side(int members, int othersAnswering, bool downs) =>
        Assert.Equal(downs, DeadPeerDowning.InMajority(members, othersAnswering));

    [Theory]
    [InlineData(MemberStatus.Up, true)]
    [InlineData(MemberStatus.WeaklyUp, true)]
    [InlineData(MemberStatus.Joining, true)]
    [InlineData(MemberStatus.Leaving, false)]
    [InlineData(MemberStatus.Exiting, false)]
    [InlineData(MemberStatus.Down, false)]
    [InlineData(MemberStatus.Removed, false)]
    public void Only_members_that_have_not_begun_to_leave_are_downed(MemberStatus status, bool watched) =>
        Assert.Equal(watched, DeadPeerDowning.Watched(status));
}
