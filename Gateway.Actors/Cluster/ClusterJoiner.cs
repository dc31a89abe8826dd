using Akka.Actor;
using Akka.Cluster;
using Akka.Event;

namespace Gateway.Actors.Cluster;

/// <summary>
/// The members of a running cluster, as they announce themselves in a store every node reaches
/// (PostgreSQL in a cluster). Freshness is decided by the store's clock alone.
/// </summary>
public interface IClusterMembers
{
    /// <summary>Records that the member at <paramref name="address"/> is Up now.</summary>
    Task AnnounceAsync(string address, CancellationToken cancellationToken);

    /// <summary>The addresses of the members that announced themselves within <paramref name="within"/>.</summary>
    Task<IReadOnlyList<string>> AnnouncedWithinAsync(TimeSpan within, CancellationToken cancellationToken);

    /// <summary>Removes the member's record: it left the cluster.</summary>
    Task WithdrawAsync(string address, CancellationToken cancellationToken);
}

/// <summary>
/// Joins this node to the cluster so that it never forms a second one while a cluster runs.
/// <para>
/// Akka's seed-node join lets the first seed of the list join itself, and so form a new cluster,
/// when no other seed answered within the seed-node timeout (5 s). A first seed restarted under
/// load while the others were slow to answer did exactly that (issue 17, ops/chaos-cluster: 2 of
/// 3 runs), so the gateway joins by hand (no seed nodes in the configuration): every Up member
/// announces itself in the store every <see cref="AnnounceEvery"/>; a node that is not a member
/// yet reads the store and, when another member announced itself within
/// <see cref="Freshness"/>, joins through those members and the other seeds with itself left
/// out of the list, which Akka never self-joins. Only when no other member is alive in the store
/// does it give Akka the configured seed list unchanged (a cold start of the whole cluster,
/// where the first seed forms it). It reads the store again every <see cref="RecheckEvery"/>
/// until it is a member, and changes its join only when the answer changes.
/// </para>
/// <para>
/// With Kubernetes discovery (no seeds), Akka.Management's bootstrap joins and this actor only
/// announces the member.
/// </para>
/// </summary>
public sealed class ClusterJoiner : ReceiveActor, IWithTimers
{
    /// <summary>How often an Up member announces itself.</summary>
    public static readonly TimeSpan AnnounceEvery = TimeSpan.FromSeconds(1);

    /// <summary>
    /// A member that announced itself this recently counts as alive. Ten announcements: a slow
    /// store or a busy node does not make a running cluster look gone; it is also how long a whole
    /// cluster that crashed waits before its first seed forms it again.
    /// </summary>
    public static readonly TimeSpan Freshness = TimeSpan.FromSeconds(10);

    /// <summary>How often a node that is not a member yet reads the store again.</summary>
    public static readonly TimeSpan RecheckEvery = TimeSpan.FromSeconds(1);

    private static readonly TimeSpan StoreTimeout = TimeSpan.FromSeconds(5);

    private readonly Akka.Cluster.Cluster _cluster = Akka.Cluster.Cluster.Get(Context.System);
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly IClusterMembers _members;
    private readonly IReadOnlyList<Address> _seeds;
    private readonly string _self;
    private IReadOnlyList<Address>? _joining;
    private bool _announcing;
    private bool _storeFailed;

    public ITimerScheduler Timers { get; set; } = null!;

    public ClusterJoiner(IClusterMembers members, IReadOnlyList<Address> seeds)
    {
        _members = members;
        _seeds = seeds;
        _self = _cluster.SelfAddress.ToString();
        Receive<Recheck>(_ => Read());
        Receive<Alive>(OnAlive);
        Receive<StoreFailed>(OnStoreFailed);
        Receive<ClusterEvent.MemberUp>(e => OnMemberChanged(e.Member));
        Receive<ClusterEvent.MemberWeaklyUp>(e => OnMemberChanged(e.Member));
        Receive<ClusterEvent.MemberLeft>(e => OnMemberChanged(e.Member));
        Receive<ClusterEvent.MemberExited>(e => OnMemberChanged(e.Member));
        Receive<ClusterEvent.MemberDowned>(e => OnMemberChanged(e.Member));
        Receive<ClusterEvent.MemberRemoved>(e => OnMemberChanged(e.Member));
        Receive<Announce>(_ => _members.AnnounceAsync(_self, CancellationToken.None)
            .WaitAsync(StoreTimeout)
            .PipeTo(Self, success: () => Announced.Instance, failure: e => new StoreFailed("announce", e)));
        Receive<Announced>(_ => _storeFailed = false);
    }

    public static Props Props(IClusterMembers members, IReadOnlyList<Address> seeds) =>
        Akka.Actor.Props.Create(() => new ClusterJoiner(members, seeds));

    protected override void PreStart()
    {
        _cluster.Subscribe(Self, ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(ClusterEvent.MemberUp), typeof(ClusterEvent.MemberWeaklyUp), typeof(ClusterEvent.MemberLeft),
            typeof(ClusterEvent.MemberExited), typeof(ClusterEvent.MemberDowned), typeof(ClusterEvent.MemberRemoved));
        if (_seeds.Count > 0)
        {
            Read();
        }
    }

    protected override void PostStop() => _cluster.Unsubscribe(Self);

    /// <summary>
    /// The seed list to give Akka's join: null to wait. <paramref name="alive"/> is what the store
    /// answered (null: it did not answer). Whenever another member is alive, this node is left out
    /// of the list, so Akka joins the running cluster and never forms one of its own.
    /// </summary>
    public static IReadOnlyList<Address>? Plan(Address self, IReadOnlyList<Address> seeds, IReadOnlyList<Address>? alive)
    {
        Address[] otherSeeds = [.. seeds.Where(s => !SameEndpoint(s, self))];
        if (alive is null)
        {
            // Without the store this node cannot tell whether a cluster runs: it only joins others.
            return otherSeeds.Length > 0 ? otherSeeds : null;
        }
        Address[] others = [.. alive.Where(a => !SameEndpoint(a, self))
            .Select(a => new Address(self.Protocol, self.System, a.Host, a.Port))
            .Distinct()];
        return others.Length == 0 ? seeds : [.. others, .. otherSeeds.Where(s => !others.Any(o => SameEndpoint(o, s)))];
    }

    private static bool SameEndpoint(Address a, Address b) =>
        string.Equals(a.Host, b.Host, StringComparison.OrdinalIgnoreCase) && a.Port == b.Port;

    private void Read()
    {
        if (IsMember())
        {
            return;
        }
        _members.AnnouncedWithinAsync(Freshness, CancellationToken.None)
            .WaitAsync(StoreTimeout)
            .PipeTo(Self, success: alive => new Alive(alive), failure: e => new StoreFailed("read", e));
    }

    private void OnAlive(Alive alive)
    {
        _storeFailed = false;
        var addresses = new List<Address>();
        foreach (string text in alive.Addresses)
        {
            if (Address.TryParse(text, out Address? address) && address is not null)
            {
                addresses.Add(address);
            }
        }
        Join(Plan(_cluster.SelfAddress, _seeds, addresses));
    }

    private void OnStoreFailed(StoreFailed failed)
    {
        if (!_storeFailed)
        {
            _log.Warning("Cluster members: the store failed to {0}: {1}; trying again", failed.What, failed.Cause.Message);
            _storeFailed = true;
        }
        if (failed.What == "read")
        {
            Join(Plan(_cluster.SelfAddress, _seeds, null));
        }
    }

    private void Join(IReadOnlyList<Address>? seeds)
    {
        if (IsMember())
        {
            return;
        }
        if (seeds is not null && (_joining is null || !_joining.SequenceEqual(seeds)))
        {
            bool mayForm = seeds.Count > 0 && seeds[0] == _cluster.SelfAddress;
            _log.Info(mayForm
                ? "Joining the cluster through seeds [{0}]: no other member announced itself within {1}, so this node may form the cluster"
                : "Joining the cluster through [{0}], never joining itself (members alive within {1}, or the store did not answer)",
                string.Join(", ", seeds), Freshness);
            _joining = seeds;
            _cluster.JoinSeedNodes(seeds);
        }
        Timers.StartSingleTimer("recheck", Recheck.Instance, RecheckEvery);
    }

    private bool IsMember() => _cluster.SelfMember.Status is not MemberStatus.Removed || _announcing;

    private void OnMemberChanged(Member member)
    {
        if (member.UniqueAddress != _cluster.SelfUniqueAddress)
        {
            return;
        }
        if (member.Status is MemberStatus.Up or MemberStatus.WeaklyUp)
        {
            if (!_announcing)
            {
                _announcing = true;
                Timers.CancelAll();
                Timers.StartPeriodicTimer("announce", Announce.Instance, TimeSpan.Zero, AnnounceEvery);
            }
            return;
        }
        if (_announcing && member.Status is not MemberStatus.Joining)
        {
            // Leaving, exiting, downed or removed: this member must not keep a cluster looking alive.
            Timers.Cancel("announce");
            _members.WithdrawAsync(_self, CancellationToken.None).WaitAsync(StoreTimeout)
                .PipeTo(Self, success: () => Announced.Instance, failure: e => new StoreFailed("withdraw", e));
        }
    }

    private sealed class Recheck
    {
        public static readonly Recheck Instance = new();
    }

    private sealed class Announce
    {
        public static readonly Announce Instance = new();
    }

    private sealed class Announced
    {
        public static readonly Announced Instance = new();
    }

    private sealed record Alive(IReadOnlyList<string> Addresses);

    private sealed record StoreFailed(string What, Exception Cause);
}
