using Akka.Actor;
using Akka.Cluster.Hosting;
using Akka.Cluster.Hosting.SBR;
using Akka.Discovery.KubernetesApi;
using Akka.Management;
using Akka.Management.Cluster.Bootstrap;
using Akka.Hosting;
using Akka.Persistence.Sql.Hosting;
using Akka.Remote.Hosting;
using Gateway.Actors.Cluster;
using Gateway.Actors.Tls;
using LinqToDB;

namespace Gateway.Host;

/// <summary>
/// Akka.Remote, Akka.Cluster and the PostgreSQL journal for cluster mode. Remoting carries
/// control messages only; export data between nodes goes over the peer listener
/// (docs/akka.md#remoting-payloads: remoting is 8-39x slower for 1 MiB writes and stalls heartbeats).
/// </summary>
public static class ClusterComposition
{
    /// <summary>Member roles carry what status output needs to know of a node.</summary>
    public const string NodeRolePrefix = "node:";
    public const string PeerRolePrefix = "peer:";

    /// <summary>
    /// Mutual TLS on remoting: both ends present the node certificate, and each accepts the other
    /// only if its certificate chains to the cluster CA (the same check as the peer data stream;
    /// the system store and the host name play no part). DotNetty takes the certificate once: a
    /// rotated certificate reaches remoting at the node's next start, the peer stream at once.
    /// </summary>
    private static SslOptions RemotingSsl(TlsCredentials tls) => new()
    {
        X509Certificate = tls.Certificate,
        SuppressValidation = false,
        RequireMutualAuthentication = true,
        ValidateCertificateHostname = false,
        CustomValidator = (certificate, chain, remotePeer, _, _) => tls.IsClusterPeer(certificate, chain, remotePeer),
    };

    public static ClusterNode Node(ClusterSettings cluster) => new(cluster.NodeName, cluster.PublicHostname, cluster.Peer.Port);

    /// <param name="tls">Cluster TLS (README "Cluster TLS"): remoting then takes only nodes whose certificate chains to the cluster CA.</param>
    /// <param name="members">Where members announce themselves; <see cref="ClusterJoiner"/> reads it before it joins.</param>
    public static void Configure(AkkaConfigurationBuilder akka, ClusterSettings cluster, IClusterMembers members, TlsCredentials? tls = null)
    {
        var remoting = new RemoteOptions
        {
            HostName = cluster.Remoting.Address.ToString(),
            Port = cluster.Remoting.Port,
            PublicHostName = cluster.PublicHostname,
            // Export lists and specs are small, but a large catalog must not be dropped silently.
            MaxFrameSize = 4 * 1024 * 1024,
        };
        if (tls is not null)
        {
            remoting.EnableSsl = true;
            remoting.Ssl = RemotingSsl(tls);
        }
        akka.WithRemoting(remoting);
        akka.WithClustering(new ClusterOptions
        {
            // No seed nodes for Akka to join by itself: ClusterJoiner joins, so that a first seed
            // restarted while the cluster runs never forms a second one.
            SeedNodes = [],
            // Keep-majority: the side with more than half of the nodes downs the rest, so two
            // owners of one export never run at once after a partition, and no lease service is
            // needed (the Kubernetes lease does not restore here). A 2-node cluster cannot
            // survive losing either node: run 3 or more.
            SplitBrainResolver = new KeepMajorityOption(),
        });
        // A node whose process is gone (its port refuses) is downed at once by DeadPeerDowning;
        // failover then takes 3.6-4.2 s (README "Failover"). Without a refusal: a silent node is
        // unreachable after about 1.8 s (heartbeats every 0.25 s, 1 s of silence allowed, on
        // dedicated threads so a busy node is not mistaken for a dead one), the resolver downs it
        // about 1.3 s later, and its shards and singletons start on the survivors once the leader
        // has removed it. A node silent for more than a second is downed: that is the price.
        // Roles given in HOCON, quoted: Akka.Cluster.Hosting writes ClusterOptions.Roles unquoted,
        // and a role holding ':' then fails to parse.
        string roles = string.Join(", ", new[] { NodeRolePrefix + cluster.NodeName, $"{PeerRolePrefix}{cluster.PublicHostname}:{cluster.Peer.Port}" }
            .Select(r => "\"" + r.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\""));
        akka.AddHocon($"akka.cluster.roles = [{roles}]", HoconAddMode.Prepend);
        akka.AddHocon("""
            akka.cluster.failure-detector.heartbeat-interval = 250ms
            akka.cluster.failure-detector.acceptable-heartbeat-pause = 1s
            # The failure detector is read on this tick (1 s by default): a silent node was
            # marked unreachable up to a second after its pause ran out.
            akka.cluster.unreachable-nodes-reaper-interval = 250ms
            # Removing a downed node and handing its singletons (registry, shard coordinator)
            # over come on the leader's tick and the hand-over retry: 1 s each by default.
            akka.cluster.leader-actions-interval = 250ms
            # The leader removes a downed node once every survivor has seen it down, which they
            # learn by gossip (every 1 s by default): measured here, 0.7-0.9 s from the downing
            # to the removal. Gossip four times a second is a few small messages per node.
            akka.cluster.gossip-interval = 250ms
            akka.cluster.singleton.hand-over-retry-interval = 200ms
            # How often a region asks again where a shard lives while its messages wait (2 s):
            # after a node is removed, the re-homed export's first messages wait on this.
            akka.cluster.sharding.retry-interval = 200ms
            # Each node writes to another over its own outbound connection. With passive
            # connections, a node under full load sometimes opened a second association while the
            # first was in use; the peer dropped the first one's system-message buffers and
            # quarantined the node (measured here: 2 of 5 two-node starts under fio load).
            akka.remote.use-passive-connections = off
            # A failed association drops messages to that node until the gate opens again: keep
            # the gap short (queries on the data path's setup ask again; default 5 s).
            akka.remote.retry-gate-closed-for = 1s
            # Heartbeats and gossip on their own threads: on the thread pool they queue behind
            # the data path's work items, and a saturated node looked dead to the others.
            akka.cluster.use-dispatcher = gateway-cluster-dispatcher
            gateway-cluster-dispatcher {
              type = ForkJoinDispatcher
              throughput = 100
              dedicated-thread-pool { thread-count = 2, threadtype = background }
            }
            akka.cluster.split-brain-resolver.stable-after = 1s
            # Shards and singletons of a removed node start elsewhere after this margin (by
            # default stable-after), the time the far side of a partition gets to stop its own.
            # The owners' leases (ExportLease) fence the exports whatever the margin, so it is kept
            # short; the registry singleton's journal refuses a second writer's events.
            akka.cluster.down-removal-margin = 200ms
            # Downing every node because the membership kept changing is for long instability,
            # not a busy few seconds (the default would derive 1.1 s from stable-after).
            akka.cluster.split-brain-resolver.down-all-when-unstable = 15s
            # The shard coordinator's state (which node owns which shard) is written to and read
            # from a majority of the nodes: by default a majority plus 3 (writes) or 5 (reads), at
            # least 5, which on a 3-node cluster is every node, the dead one included until it is
            # removed. Each allocation then waited out the 5 s update timeout after a kill -9.
            akka.cluster.sharding.coordinator-state.write-majority-plus = 0
            akka.cluster.sharding.coordinator-state.read-majority-plus = 0
            akka.cluster.sharding.distributed-data.majority-min-cap = 2
            akka.cluster.sharding.rebalance-interval = 5s
            akka.cluster.sharding.least-shard-allocation-strategy.rebalance-absolute-limit = 5
            akka.cluster.shutdown-after-unsuccessful-join-seed-nodes = 60s
            akka.coordinated-shutdown.exit-clr = off
            """, HoconAddMode.Prepend);
        Address[] seeds = [.. cluster.Seeds.Select(seed => Address.Parse(ClusterSettings.SeedAddress(seed, tls is not null)))];
        akka.WithActors((system, _) => system.ActorOf(ClusterJoiner.Props(members, seeds), "cluster-joiner"));
        if (cluster.Discovery is { } discovery)
        {
            // Kubernetes: no seed list; pods find each other through the API (RBAC: pods get/watch/list).
            akka.WithKubernetesDiscovery(o =>
            {
                o.PodLabelSelector = Kubernetes.PodLabelSelector;
                if (discovery.Namespace is { } ns)
                {
                    o.PodNamespace = ns;
                }
            });
            akka.WithAkkaManagement(hostName: cluster.PublicHostname, port: discovery.ManagementPort, bindHostname: "0.0.0.0", bindPort: discovery.ManagementPort);
            akka.WithClusterBootstrap(serviceName: discovery.ServiceName, serviceNamespace: discovery.Namespace, portName: Kubernetes.ManagementPortName,
                requiredContactPoints: discovery.RequiredContactPoints);
        }
        akka.WithSqlPersistence(new DataOptions().UseConnectionString(ProviderName.PostgreSQL15, cluster.Postgres), autoInitialize: true);
    }
}
