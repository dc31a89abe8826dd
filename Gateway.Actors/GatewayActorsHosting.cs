using Akka.Actor;
using Akka.Cluster.Hosting;
using Akka.Cluster.Sharding;
using Akka.Hosting;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Cluster;
using Gateway.Actors.Connections;
using Gateway.Actors.Exports;
using Gateway.Actors.Tls;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors;

/// <summary>Marker for the node's NBD connection supervisor in the actor registry.</summary>
public sealed class ConnectionSupervisorKey;

/// <summary>Marker for the export registry in the actor registry (in a cluster: the singleton's proxy).</summary>
public sealed class ExportRegistryKey;

/// <summary>Marker for the export shard region (cluster mode).</summary>
public sealed class ExportRegionKey;

/// <summary>Marker for the supervisor of connections from other nodes (cluster mode).</summary>
public sealed class PeerConnectionSupervisorKey;

public static class GatewayActorsHosting
{
    /// <summary>Starts the export registry (persistent) and the NBD connection supervisor.</summary>
    public static AkkaConfigurationBuilder WithGatewayActors(this AkkaConfigurationBuilder builder, BackendFactory backends, ExportSpec? initialExport,
        Nbd.NbdServerSettings? nbd = null, int? maxConnections = null)
    {
        // Bitmap events are written on the data path: binary, not JSON (docs/akka.md#persistence-on-sqlite).
        builder.WithCustomSerializer(BitmapSerializer.Name, [typeof(IBitmapPersisted)], system => new BitmapSerializer(system));
        return builder.WithActors((system, registry, resolver) =>
        {
            ILoggerFactory loggers = resolver.GetService<ILoggerFactory>();
            IActorRef exports = system.ActorOf(ExportRegistryActor.Props(backends, initialExport), "exports");
            registry.Register<ExportRegistryKey>(exports);
            IActorRef connections = system.ActorOf(
                ConnectionSupervisor.Props(new ActorExportDirectory(exports), loggers.CreateLogger("Gateway.Nbd"), nbd, maxConnections), "connections");
            registry.Register<ConnectionSupervisorKey>(connections);
        });
    }

    /// <summary>
    /// Cluster mode: the registry as a cluster singleton, each export a sharded entity, client
    /// connections through <see cref="ClusterExportDirectory"/>, and a second supervisor for the
    /// peer data streams of other nodes, which serves only exports owned here. With
    /// <paramref name="slots"/>, an export's <c>maxConnections</c> holds across the cluster: client
    /// attaches take their slots there (<see cref="ClusterConnectionSlots"/>); peer streams take none.
    /// </summary>
    public static AkkaConfigurationBuilder WithGatewayCluster(this AkkaConfigurationBuilder builder, BackendFactory backends, ExportSpec? initialExport,
        ClusterNode node, LocalExports local, IExportLeases? leases, Nbd.NbdServerSettings? nbd = null, int? maxConnections = null, TlsCredentials? clusterTls = null,
        IConnectionSlotStore? slots = null)
    {
        builder.WithCustomSerializer(BitmapSerializer.Name, [typeof(IBitmapPersisted)], system => new BitmapSerializer(system));
        builder.WithShardRegion<ExportRegionKey>("export", (_, registry) => _ => ExportEntity.Props(backends, local, node, registry.Get<ExportRegistryKey>(), leases), new ExportMessageExtractor(),
            new ShardOptions { StateStoreMode = StateStoreMode.DData, RememberEntities = false, HandOffStopMessage = CloseExport.Instance });
        builder.WithSingleton<ExportRegistryKey>("export-registry",
            (_, registry, _) => ExportRegistryActor.Props(backends, initialExport, new ShardedExportPlacement(registry.Get<ExportRegionKey>())),
            new ClusterSingletonOptions(), createProxyToo: true);
        return builder.WithActors((system, registry, resolver) =>
        {
            ILoggerFactory loggers = resolver.GetService<ILoggerFactory>();
            var directory = new ClusterExportDirectory(registry.Get<ExportRegistryKey>(), registry.Get<ExportRegionKey>(), local, node, clusterTls);
            Nbd.NbdServerSettings? clients = slots is null ? nbd
                : (nbd ?? Nbd.NbdServerSettings.Default) with { ExportConnections = ClusterConnectionSlots.Start(system, slots, loggers.CreateLogger("Gateway.ConnectionSlots")) };
            registry.Register<ConnectionSupervisorKey>(system.ActorOf(
                ConnectionSupervisor.Props(directory, loggers.CreateLogger("Gateway.Nbd"), clients, maxConnections), "connections"));
            system.ActorOf(JournalWarmup.Props(), "journal-warmup");
            system.ActorOf(DeadPeerDowning.Props(), "dead-peer-downing");
            registry.Register<PeerConnectionSupervisorKey>(system.ActorOf(
                ConnectionSupervisor.Props(local, loggers.CreateLogger("Gateway.Peer"), PeerSettings(clusterTls)), "peer-connections"));
        });
    }

    /// <summary>
    /// The peer data stream's server: NBD, with cluster TLS from the first byte when it is
    /// configured (a peer without a certificate of the cluster CA never sees an NBD byte). No
    /// client limit, and no export connection slot: a peer connection is not a client, the node
    /// that forwards a client took the client's slot (and <see cref="LocalExports"/> opens exports
    /// for peers with open access as well).
    /// </summary>
    public static Nbd.NbdServerSettings PeerSettings(TlsCredentials? clusterTls) => clusterTls is null
        ? new() { ExportConnections = Nbd.UncountedConnectionSlots.Instance }
        : new(Tls: clusterTls) { TlsFirst = true, ExportConnections = Nbd.UncountedConnectionSlots.Instance };
}
