using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Connections;
using Gateway.Actors.Exports;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors;

/// <summary>Marker for the node's NBD connection supervisor in the actor registry.</summary>
public sealed class ConnectionSupervisorKey;

/// <summary>Marker for the export registry in the actor registry.</summary>
public sealed class ExportRegistryKey;

public static class GatewayActorsHosting
{
    /// <summary>Starts the export registry (persistent) and the NBD connection supervisor.</summary>
    public static AkkaConfigurationBuilder WithGatewayActors(this AkkaConfigurationBuilder builder, BackendFactory backends, ExportSpec? initialExport,
        Nbd.NbdServerSettings? nbd = null, int? maxConnections = null)
    {
        // Bitmap events are written on the data path: binary, not JSON (AKKA-NOTES.md).
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
}
