using Akka.Cluster.Sharding;
using Gateway.Actors.Exports;

namespace Gateway.Actors.Cluster;

/// <summary>
/// A message for one export's sharded entity. It carries the export's spec so that whichever
/// node the shard lands on can open the export without asking anyone first.
/// </summary>
public sealed record ExportEnvelope(ExportSpec Spec, object Message);

/// <summary>Keep the export running somewhere (sent by the registry on start and after a node leaves).</summary>
public sealed record WakeExport
{
    public static readonly WakeExport Instance = new();
}

/// <summary>Where is the export served? Answered by its owner with <see cref="ExportLocated"/>.</summary>
public sealed record LocateExport
{
    public static readonly LocateExport Instance = new();
}

/// <summary>
/// The owner's answer: its node, its peer data endpoint, and what a client attaching to the
/// export needs before any I/O (size, flags, context names), so a handshake costs no data stream.
/// </summary>
/// <remarks><paramref name="Epoch"/> is the owner's durability epoch (<see cref="ExportTerms"/>): it
/// changes when an owner took over from one that did not hand over cleanly, and a link that sees
/// it change cannot vouch for writes completed before (see <see cref="ExportLink.FlushAsync"/>).</remarks>
public sealed record ExportLocated(string Name, string Node, string PeerHost, int PeerPort, long Size, bool ReadOnly, int Capabilities, string[] Contexts, long Epoch);

/// <summary>
/// The answer to a <see cref="LocateExport"/> whose spec is of an export since removed (or removed
/// and created again under its name): the connection that asked gets EIO from now on.
/// </summary>
public sealed record ExportGone(string Name, string Reason);

/// <summary>The export was removed: purge its bitmaps, close it, answer <see cref="ExportRetired"/>.</summary>
public sealed record RetireExport
{
    public static readonly RetireExport Instance = new();
}

public sealed record ExportRetired(string Name);

/// <summary>To the registry: the spec of an export ("" names the default export).</summary>
public sealed record GetExportSpec(string ExportName) : IWithExportName;

public sealed record ExportSpecFound(ExportSpec? Spec);

/// <summary>This node in the cluster: its name and where other nodes reach its export data.</summary>
public sealed record ClusterNode(string Name, string PeerHost, int PeerPort);

/// <summary>Export name = entity id; shards by a stable hash of the name.</summary>
public sealed class ExportMessageExtractor() : HashCodeMessageExtractor(MaxShards)
{
    /// <summary>Ten shards per node for a large cluster; more shards than exports is harmless.</summary>
    public const int MaxShards = 100;

    public override string? EntityId(object message) => message switch
    {
        ExportEnvelope envelope => envelope.Spec.Name,
        _ => null,
    };

    public override object EntityMessage(object message) => message;
}
