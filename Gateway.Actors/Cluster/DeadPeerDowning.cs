using System.Net.Sockets;
using Akka.Actor;
using Akka.Cluster;
using Akka.Event;
using Akka.Remote;

namespace Gateway.Actors.Cluster;

/// <summary>
/// Downs a member at once when its process is gone, instead of waiting for the failure detector
/// and the split-brain resolver (about 3.5 s between them). When a node's association to another
/// drops, it connects to that member's remoting port: a host that answers with a refusal (a TCP
/// reset) is up while nothing listens on the port, so the gateway process on it exited or was
/// killed, and it cannot come back under the same identity. A member that answers, or does not
/// answer (a lost machine, a partition), is left to the failure detector as before.
/// <para>
/// A refusal can also come from the network: a firewall rule that rejects (iptables' REJECT
/// answers as a closed port does) during a partition. So a node downs another only while a
/// strict majority of the members, itself included and the refusing one not, accept its
/// connections at that moment: a node cut off from the rest sees them all refuse and leaves the
/// decision to the split-brain resolver, as without this. And whatever the network does, a node
/// downed by mistake keeps its exports' leases only while it renews them, and a new owner serves
/// only once it holds the lease (<see cref="ExportLease"/>).
/// </para>
/// </summary>
public sealed class DeadPeerDowning : ReceiveActor
{
    /// <summary>How long a connect may take before the member counts as silent rather than refusing.</summary>
    public static readonly TimeSpan ConnectTimeout = TimeSpan.FromMilliseconds(500);

    /// <summary>Refusals needed in a row, a short pause apart, before the member is downed.</summary>
    public const int Refusals = 2;

    private static readonly TimeSpan BetweenProbes = TimeSpan.FromMilliseconds(100);

    private readonly Akka.Cluster.Cluster _cluster = Akka.Cluster.Cluster.Get(Context.System);
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly HashSet<Address> _probing = [];

    public DeadPeerDowning()
    {
        Receive<DisassociatedEvent>(e => Probe(e.RemoteAddress));
        Receive<AssociationErrorEvent>(e => Probe(e.RemoteAddress));
        Receive<ProbeResult>(OnProbed);
    }

    public static Props Props() => Akka.Actor.Props.Create(() => new DeadPeerDowning());

    protected override void PreStart() => Context.System.EventStream.Subscribe(Self, typeof(RemotingLifecycleEvent));

    protected override void PostStop() => Context.System.EventStream.Unsubscribe(Self);

    /// <summary>Whether a member in this state is one the failure detector would have to find dead.</summary>
    public static bool Watched(MemberStatus status) => status is MemberStatus.Up or MemberStatus.WeaklyUp or MemberStatus.Joining;

    private void Probe(Address address)
    {
        if (address.Host is not { } host || address.Port is not { } port || _probing.Contains(address) || Member(address) is null)
        {
            return;
        }
        _probing.Add(address);
        Member[] members = [.. _cluster.State.Members.Where(m => m.Status is not (MemberStatus.Down or MemberStatus.Removed))];
        (string, int)[] others = [.. members
            .Where(m => m.Address != address && m.Address != _cluster.SelfAddress && m.Address.Host is not null && m.Address.Port is not null)
            .Select(m => (m.Address.Host!, m.Address.Port!.Value))];
        ProbeAsync(host, port, others, members.Length).PipeTo(Self, success: refused => new ProbeResult(address, refused));
    }

    /// <summary>
    /// Whether this node, with <paramref name="othersAnswering"/> other members that accept its
    /// connections, is on the side of a strict majority of <paramref name="members"/> (the
    /// refusing one counted, not answering).
    /// </summary>
    public static bool InMajority(int members, int othersAnswering) => (othersAnswering + 1) * 2 > members;

    private void OnProbed(ProbeResult result)
    {
        _probing.Remove(result.Address);
        if (!result.Refused || Member(result.Address) is not { } member)
        {
            return;
        }
        _log.Warning("Cluster member {0} refuses connections on its remoting port while a majority of the members answer: its process is gone; downing it now", member.Address);
        _cluster.Down(member.Address);
    }

    private Member? Member(Address address) =>
        address == _cluster.SelfAddress ? null : _cluster.State.Members.FirstOrDefault(m => m.Address == address && Watched(m.Status));

    /// <summary>
    /// True when every one of <see cref="Refusals"/> connects in a row is refused and, after them,
    /// enough of the other members accept a connection for this node to be in the majority.
    /// </summary>
    private static async Task<bool> ProbeAsync(string host, int port, (string Host, int Port)[] others, int members)
    {
        for (int i = 0; i < Refusals; i++)
        {
            if (i > 0)
            {
                await Task.Delay(BetweenProbes).ConfigureAwait(false);
            }
            if (await ConnectAsync(host, port).ConfigureAwait(false) != PortAnswer.Refused)
            {
                return false;
            }
        }
        PortAnswer[] answers = await Task.WhenAll(others.Select(o => ConnectAsync(o.Host, o.Port))).ConfigureAwait(false);
        return InMajority(members, answers.Count(a => a == PortAnswer.Accepted));
    }

    /// <summary>What a TCP connect to a member's port met.</summary>
    public enum PortAnswer
    {
        /// <summary>Something listens: the process is there.</summary>
        Accepted,

        /// <summary>The host answered that nothing listens (or a firewall rejects as if so).</summary>
        Refused,

        /// <summary>No answer within <see cref="ConnectTimeout"/>, or another network error.</summary>
        Silent,
    }

    public static async Task<PortAnswer> ConnectAsync(string host, int port)
    {
        using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
        using var timeout = new CancellationTokenSource(ConnectTimeout);
        try
        {
            await socket.ConnectAsync(host, port, timeout.Token).ConfigureAwait(false);
            return PortAnswer.Accepted;
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionRefused)
        {
            return PortAnswer.Refused;
        }
        catch (Exception e) when (e is SocketException or OperationCanceledException)
        {
            return PortAnswer.Silent;
        }
    }

    private sealed record ProbeResult(Address Address, bool Refused);
}
