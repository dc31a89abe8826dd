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
        RemoveExport remove => (new ExportRemoved(remove.ExportName), null),
        _ => (null, CommandResult.Fail(ExportErrorKind.Invalid, $"unknown command {command.GetType().Name}")),
    };

    public ExportCatalog Apply(IExportEvent @event) => @event switch
    {
        ExportCreated created => this with { Exports = Exports.SetItem(created.Spec.Name, created.Spec) },
        ExportRemoved removed => this with { Exports = Exports.Remove(removed.Name) },
        _ => this,
    };

    /// <summary>The export a client gets when it names none: disk0 if present, else the first by name.</summary>
    public string? DefaultExport =>
        Exports.ContainsKey("disk0") ? "disk0" : Exports.Keys.FirstOrDefault();
}
