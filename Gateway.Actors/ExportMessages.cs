using Gateway.Actors.Nbd;

namespace Gateway.Actors;

// What every folder that stands in for an export shares: the registry, the export actor, the
// bitmaps actor (which answers for an export whose writes it tracks) and the cluster's entity. Here
// at the root, so that Bitmaps need not reference Exports (docs/architecture.md).

/// <summary>Messages addressed to one export; the name routes them (and, in a cluster, shards them).</summary>
public interface IWithExportName
{
    string ExportName { get; }
}

/// <summary>Attach a connection: answered with <see cref="ExportOpened"/>. "" names the default export.</summary>
public sealed record OpenExport(string ExportName) : IWithExportName;

/// <summary>The handle connections are served from, or null when no such export is open here.</summary>
public sealed record ExportOpened(ExportHandle? Handle);

/// <summary>What went wrong with an export command, in the HTTP-like kinds the admin API answers with.</summary>
public enum ExportErrorKind
{
    Invalid,
    NotFound,
    Conflict,
    Failed,
}
