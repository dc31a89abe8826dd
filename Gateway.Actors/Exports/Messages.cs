using Gateway.Actors.Nbd;

namespace Gateway.Actors.Exports;

// Commands
public sealed record CreateExport(ExportSpec Spec);

public sealed record RemoveExport(string ExportName) : IWithExportName;

/// <summary>
/// Grow an export to <paramref name="Size"/> bytes (never shrink). The registry decides and records
/// it (<see cref="ExportResized"/>), then the export's owner grows its device (<see cref="GrowExport"/>).
/// </summary>
public sealed record ResizeExport(string ExportName, long Size) : IWithExportName;

/// <summary>
/// To an export actor (through the shard region in a cluster): the export's recorded spec is now
/// <paramref name="Spec"/>, larger than the device. Grow the device and the dirty bitmaps, then
/// show the new size to new connections; answered with a <see cref="CommandResult"/>.
/// </summary>
public sealed record GrowExport(ExportSpec Spec);

/// <summary>Makes every completed write of every export durable (graceful shutdown).</summary>
public sealed record FlushAllExports
{
    public static readonly FlushAllExports Instance = new();
}

/// <summary>
/// A planned stop of one export on this node (a cluster handoff): stop taking requests, finish
/// those in flight, flush, and only then stop the bitmaps and the export actor.
/// </summary>
public sealed record CloseExport
{
    public static readonly CloseExport Instance = new();
}

/// <summary>
/// The answer to <see cref="CloseExport"/>, sent just before the export actor stops:
/// <paramref name="Clean"/> when no request was left running and the final flush succeeded, so
/// every write the export acknowledged is on storage.
/// </summary>
public sealed record ExportClosed(bool Clean);

// Queries
public sealed record ListExports
{
    public static readonly ListExports Instance = new();
}

public sealed record GetExport(string ExportName) : IWithExportName;

// Replies
/// <remarks>Arrays in messages that cross nodes: the JSON serializer cannot rebuild the list types collection expressions make.</remarks>
public sealed record ExportList(ExportStatus[] Exports);

public sealed record ExportStatus(ExportSpec Spec, ExportInfo? Info)
{
    /// <summary>What NBD_OPT_LIST shows: the open export's info, else what the spec says (no capabilities yet).</summary>
    public ExportInfo ListedInfo() => Info ?? new ExportInfo(Spec.Name, Spec.Description, Spec.Size, Spec.ReadOnly, default) { Access = Spec.Access ?? ExportAccess.Open };
}

public sealed record ExportFound(ExportStatus? Export);

public sealed record ExportsFlushed(int Count, IReadOnlyList<string> Failures);

/// <summary>The outcome of a command: success, or an error with the HTTP-like kind that fits it.</summary>
public sealed record CommandResult(ExportErrorKind? Error, string? Message, ExportStatus? Export = null)
{
    public static CommandResult Ok(ExportStatus? export = null) => new(null, null, export);

    public static CommandResult Fail(ExportErrorKind kind, string message) => new(kind, message);
}

// Events (persisted): never change their shape without a migration.
public interface IExportEvent;

public sealed record ExportCreated(ExportSpec Spec) : IExportEvent;

public sealed record ExportRemoved(string Name) : IExportEvent;

/// <summary>The export grew to <paramref name="Size"/> bytes (it never shrinks).</summary>
public sealed record ExportResized(string Name, long Size) : IExportEvent;
