using System.Collections.Immutable;

namespace Gateway.Actors.Exports;

/// <summary>
/// The set of exports, as pure functions: <see cref="Decide"/> checks a command against the
/// state and names the event; <see cref="Apply"/> folds an event in. The actor persists.
/// </summary>
public sealed record ExportCatalog(ImmutableSortedDictionary<string, ExportSpec> Exports)
{
    public static readonly ExportCatalog Empty = new(ImmutableSortedDictionary<string, ExportSpec>.Empty.WithComparers(StringComparer.Ordinal));

    public (IExportEvent? Event, CommandResult? Error) Decide(object command) => command switch
    {
        CreateExport create when ExportRules.Validate(create.Spec) is string problem =>
            (null, CommandResult.Fail(ExportErrorKind.Invalid, problem)),
        CreateExport create when Exports.ContainsKey(create.Spec.Name) =>
            (null, CommandResult.Fail(ExportErrorKind.Conflict, $"export '{create.Spec.Name}' already exists")),
        CreateExport create => (new ExportCreated(create.Spec), null),
        RemoveExport remove when !Exports.ContainsKey(remove.ExportName) =>
            (null, CommandResult.Fail(ExportErrorKind.NotFound, $"export '{remove.ExportName}' not found")),
        RemoveExport remove when BaseImageUsers(remove.ExportName) is { Length: > 0 } users =>
            (null, CommandResult.Fail(ExportErrorKind.Conflict, $"export '{remove.ExportName}' is the base image of {users}: remove those first")),
        RemoveExport remove => (new ExportRemoved(remove.ExportName), null),
        SnapshotExport snapshot when !Exports.ContainsKey(snapshot.ExportName) =>
            (null, CommandResult.Fail(ExportErrorKind.NotFound, $"export '{snapshot.ExportName}' not found")),
        SnapshotExport snapshot when Exports[snapshot.ExportName] is { } spec && (!spec.IsOverlay() || spec.ReadOnly || spec.Backend.Layers is null) =>
            (null, CommandResult.Fail(ExportErrorKind.Invalid, $"export '{snapshot.ExportName}' is {(spec.ReadOnly ? "read-only" : "not an overlay")}: only a writable overlay export can be snapshotted")),
        SnapshotExport { LayerId: null } snapshot =>
            (null, CommandResult.Fail(ExportErrorKind.Invalid, $"snapshot of '{snapshot.ExportName}' names no new layer")),
        SnapshotExport snapshot =>
            (new ExportSnapshotted(snapshot.ExportName, [snapshot.LayerId!, .. Exports[snapshot.ExportName].Backend.Layers!]), null),
        ResizeExport resize => DecideResize(resize),
        _ => (null, CommandResult.Fail(ExportErrorKind.Invalid, $"unknown command {command.GetType().Name}")),
    };

    /// <summary>
    /// Growing only: a smaller size would cut off data (and NBD clients cannot be told). The same
    /// size succeeds with nothing to record (null, null), so a resize can be repeated.
    /// </summary>
    private (IExportEvent? Event, CommandResult? Error) DecideResize(ResizeExport resize)
    {
        if (!Exports.TryGetValue(resize.ExportName, out ExportSpec? spec))
        {
            return (null, CommandResult.Fail(ExportErrorKind.NotFound, $"export '{resize.ExportName}' not found"));
        }
        if (spec.ReadOnly)
        {
            return (null, CommandResult.Fail(ExportErrorKind.Invalid, $"export '{resize.ExportName}' is read-only: it cannot be resized"));
        }
        if (resize.Size <= 0)
        {
            return (null, CommandResult.Fail(ExportErrorKind.Invalid, $"size {resize.Size} is invalid: it must be a positive number of bytes"));
        }
        if (resize.Size > ExportRules.MaxSize)
        {
            return (null, CommandResult.Fail(ExportErrorKind.Invalid, $"size {resize.Size} is over the limit of {ExportRules.MaxSize} bytes"));
        }
        if (resize.Size < spec.Size)
        {
            return (null, CommandResult.Fail(ExportErrorKind.Invalid,
                $"shrinking is refused: export '{resize.ExportName}' is {spec.Size} bytes and {resize.Size} is smaller (the data past it would be lost)"));
        }
        return resize.Size == spec.Size ? (null, null) : (new ExportResized(resize.ExportName, resize.Size), null);
    }

    public ExportCatalog Apply(IExportEvent @event) => @event switch
    {
        ExportCreated created => this with { Exports = Exports.SetItem(created.Spec.Name, created.Spec) },
        ExportRemoved removed => this with { Exports = Exports.Remove(removed.Name) },
        ExportSnapshotted pushed when Exports.TryGetValue(pushed.Name, out ExportSpec? spec) =>
            this with { Exports = Exports.SetItem(pushed.Name, spec with { Backend = spec.Backend with { Layers = pushed.Layers } }) },
        ExportResized resized when Exports.TryGetValue(resized.Name, out ExportSpec? spec) =>
            this with { Exports = Exports.SetItem(resized.Name, spec with { Size = resized.Size }) },
        _ => this,
    };

    /// <summary>Overlay exports whose raw base image is this file export's data (it must outlive them).</summary>
    private string BaseImageUsers(string name) =>
        Exports.TryGetValue(name, out ExportSpec? spec) && !spec.IsOverlay()
            ? string.Join(", ", Exports.Values.Where(e => e.IsOverlay() && e.Backend.Base == name && e.Backend.BaseImage is not null).Select(e => $"'{e.Name}'"))
            : "";

    /// <summary>Every layer id some export's chain uses.</summary>
    public IEnumerable<string> LayersInUse => Exports.Values.SelectMany(e => e.Backend.Layers ?? []);

    /// <summary>The export a client gets when it names none: disk0 if present, else the first by name.</summary>
    public string? DefaultExport =>
        Exports.ContainsKey("disk0") ? "disk0" : Exports.Keys.FirstOrDefault();
}
