using Akka.Actor;

namespace Gateway.Actors.Exports;

/// <summary>
/// Freeze the export's top layer and push a new empty one. <paramref name="LayerId"/> is filled in by
/// the registry (ids are random, and Decide stays a pure function).
/// </summary>
public sealed record SnapshotExport(string ExportName, string? LayerId = null) : IWithExportName;

/// <summary>To an export actor: is its top layer empty? Answered with a bool.</summary>
public sealed record QueryTopEmpty
{
    public static readonly QueryTopEmpty Instance = new();
}

/// <summary>To the registry, from itself: create an overlay on a writable overlay base whose top was (or was not) empty.</summary>
public sealed record CreateOnOverlayBase(CreateExport Create, IActorRef ReplyTo, bool BaseTopEmpty);

/// <summary>To an export actor: open the (already created and recorded) layer and push it as the new top.</summary>
public sealed record PushLayer(ExportSpec Spec, string LayerId);

/// <summary>Persisted: the export's chain is now <paramref name="Layers"/> (top first).</summary>
public sealed record ExportSnapshotted(string Name, string[] Layers) : IExportEvent;
