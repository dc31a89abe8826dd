using Gateway.Actors;
using Gateway.Actors.Exports;
using Xunit;

namespace Gateway.Tests.Actors;

/// <summary>
/// The export catalog's pure rules: what each command decides against a state (the event, or
/// the error it names), what each event does to the state, and that replaying the events a run
/// of commands produced rebuilds the same state (what recovery from the journal relies on).
/// </summary>
public sealed class ExportCatalogTests
{
    private static ExportSpec File(string name, bool readOnly = false) =>
        new(name, 1 << 20, new BackendSpec(BackendSpec.File, $"{name}.raw"), readOnly, Description: null);

    private static ExportSpec Overlay(string name, string[] layers, string? baseExport = null, string? baseImage = null, bool readOnly = false) =>
        new(name, 1 << 20, new BackendSpec(BackendSpec.Overlay, Layers: layers, Base: baseExport, BaseImage: baseImage), readOnly, Description: null);

    private static ExportCatalog With(params ExportSpec[] specs) =>
        specs.Aggregate(ExportCatalog.Empty, (catalog, spec) => catalog.Apply(new ExportCreated(spec)));

    private static void AssertRefused(ExportCatalog catalog, object command, ExportErrorKind kind, string message)
    {
        (IExportEvent? @event, CommandResult? error) = catalog.Decide(command);
        Assert.Null(@event);
        Assert.NotNull(error);
        Assert.Equal(kind, error.Error);
        Assert.Equal(message, error.Message);
    }

    private static IExportEvent AssertAccepted(ExportCatalog catalog, object command)
    {
        (IExportEvent? @event, CommandResult? error) = catalog.Decide(command);
        Assert.Null(error);
        return Assert.IsAssignableFrom<IExportEvent>(@event);
    }

    // ------------------------------------------------------------ CreateExport

    [Fact]
    public void Create_of_a_new_valid_spec_is_ExportCreated_with_that_spec()
    {
        ExportSpec spec = File("vm1");

        Assert.Equal(new ExportCreated(spec), AssertAccepted(With(File("vm0")), new CreateExport(spec)));
    }

    [Fact]
    public void Create_of_an_invalid_spec_is_refused_as_Invalid_with_the_rule_it_breaks()
    {
        ExportSpec spec = File("vm1") with { Size = 0 };

        AssertRefused(ExportCatalog.Empty, new CreateExport(spec), ExportErrorKind.Invalid, ExportRules.Validate(spec)!);
        Assert.Contains("size 0 is invalid", ExportCatalog.Empty.Decide(new CreateExport(spec)).Error!.Message);
    }

    [Fact]
    public void Create_of_an_existing_name_is_refused_as_Conflict()
    {
        AssertRefused(With(File("vm1")), new CreateExport(File("vm1", readOnly: true)), ExportErrorKind.Conflict, "export 'vm1' already exists");
    }

    [Fact]
    public void An_invalid_spec_is_Invalid_even_when_its_name_exists()
    {
        // Validation comes first: the client learns what is wrong with the spec, not that the name is taken.
        ExportSpec spec = File("vm1") with { Size = -1 };

        AssertRefused(With(File("vm1")), new CreateExport(spec), ExportErrorKind.Invalid, ExportRules.Validate(spec)!);
    }

    [Fact]
    public void Create_of_an_overlay_chain_completed_on_a_base_export_is_accepted()
    {
        // What the registry decides after it filled in an overlay made on a read-only file export.
        ExportSpec spec = Overlay("vm1", ["vm1.1"], baseExport: "golden", baseImage: "/data/exports/golden.img");

        Assert.Equal(new ExportCreated(spec), AssertAccepted(With(File("golden", readOnly: true)), new CreateExport(spec)));
    }

    [Fact]
    public void Create_of_an_overlay_request_with_both_base_and_base_image_is_refused_as_Invalid()
    {
        AssertRefused(With(File("golden", readOnly: true)), new CreateExport(Overlay("vm1", layers: null!, baseExport: "golden", baseImage: "/data/golden.raw")),
            ExportErrorKind.Invalid, "give base (an export) or baseImage (a raw file), not both");
    }

    // ------------------------------------------------------------ RemoveExport

    [Fact]
    public void Remove_of_an_export_is_ExportRemoved()
    {
        Assert.Equal(new ExportRemoved("vm1"), AssertAccepted(With(File("vm1")), new RemoveExport("vm1")));
    }

    [Fact]
    public void Remove_of_an_unknown_export_is_refused_as_NotFound()
    {
        AssertRefused(With(File("vm1")), new RemoveExport("vm2"), ExportErrorKind.NotFound, "export 'vm2' not found");
    }

    [Fact]
    public void Remove_of_the_base_image_of_overlays_is_refused_as_Conflict_naming_them()
    {
        ExportCatalog catalog = With(File("golden"), Overlay("a", ["a.1"], baseExport: "golden", baseImage: "/data/golden.raw"),
            Overlay("b", ["b.1"], baseExport: "golden", baseImage: "/data/golden.raw"));

        AssertRefused(catalog, new RemoveExport("golden"), ExportErrorKind.Conflict, "export 'golden' is the base image of 'a', 'b': remove those first");
    }

    [Fact]
    public void Remove_of_a_base_export_whose_overlays_do_not_read_its_image_is_accepted()
    {
        // An overlay that names its base but copied no raw image from it does not read its data.
        ExportCatalog catalog = With(File("golden"), Overlay("a", ["a.1"], baseExport: "golden"));

        Assert.Equal(new ExportRemoved("golden"), AssertAccepted(catalog, new RemoveExport("golden")));
    }

    [Fact]
    public void Remove_of_an_overlay_is_accepted_whatever_its_base()
    {
        ExportCatalog catalog = With(File("golden"), Overlay("a", ["a.1"], baseExport: "golden", baseImage: "/data/golden.raw"));

        Assert.Equal(new ExportRemoved("a"), AssertAccepted(catalog, new RemoveExport("a")));
    }

    // ------------------------------------------------------------ SnapshotExport

    [Fact]
    public void Snapshot_of_a_writable_overlay_puts_the_new_layer_on_top()
    {
        ExportCatalog catalog = With(Overlay("a", ["a.2", "a.1"]));

        var snapshotted = Assert.IsType<ExportSnapshotted>(AssertAccepted(catalog, new SnapshotExport("a", "a.3")));

        Assert.Equal("a", snapshotted.Name);
        Assert.Equal(["a.3", "a.2", "a.1"], snapshotted.Layers);
    }

    [Fact]
    public void Snapshot_of_an_unknown_export_is_refused_as_NotFound()
    {
        AssertRefused(ExportCatalog.Empty, new SnapshotExport("a", "a.3"), ExportErrorKind.NotFound, "export 'a' not found");
    }

    [Fact]
    public void Snapshot_of_a_file_export_is_refused_as_Invalid()
    {
        AssertRefused(With(File("vm1")), new SnapshotExport("vm1", "x.1"), ExportErrorKind.Invalid,
            "export 'vm1' is not an overlay: only a writable overlay export can be snapshotted");
    }

    [Fact]
    public void Snapshot_of_a_read_only_overlay_is_refused_as_Invalid()
    {
        AssertRefused(With(Overlay("a", ["a.1"], readOnly: true)), new SnapshotExport("a", "a.2"), ExportErrorKind.Invalid,
            "export 'a' is read-only: only a writable overlay export can be snapshotted");
    }

    [Fact]
    public void Snapshot_of_an_overlay_without_layers_is_refused_as_Invalid()
    {
        // The registry gives a new overlay its first layer before the catalog sees it; a spec without one cannot be pushed onto.
        AssertRefused(With(Overlay("a", layers: null!)), new SnapshotExport("a", "a.2"), ExportErrorKind.Invalid,
            "export 'a' is not an overlay: only a writable overlay export can be snapshotted");
    }

    [Fact]
    public void Snapshot_that_names_no_new_layer_is_refused_as_Invalid()
    {
        AssertRefused(With(Overlay("a", ["a.1"])), new SnapshotExport("a"), ExportErrorKind.Invalid, "snapshot of 'a' names no new layer");
    }

    [Fact]
    public void An_unknown_command_is_refused_as_Invalid()
    {
        AssertRefused(ExportCatalog.Empty, ListExports.Instance, ExportErrorKind.Invalid, "unknown command ListExports");
    }

    // ------------------------------------------------------------ Apply

    [Fact]
    public void ExportCreated_adds_the_spec_under_its_name()
    {
        ExportSpec spec = File("vm1");

        ExportCatalog catalog = ExportCatalog.Empty.Apply(new ExportCreated(spec));

        Assert.Equal(spec, Assert.Single(catalog.Exports).Value);
        Assert.Equal("vm1", catalog.Exports.Keys.Single());
    }

    [Fact]
    public void ExportRemoved_drops_only_that_export()
    {
        ExportCatalog catalog = With(File("vm1"), File("vm2")).Apply(new ExportRemoved("vm1"));

        Assert.Equal(["vm2"], catalog.Exports.Keys);
    }

    [Fact]
    public void ExportSnapshotted_replaces_the_layers_and_keeps_the_rest_of_the_spec()
    {
        ExportSpec before = Overlay("a", ["a.1"], baseExport: "golden", baseImage: "/data/golden.raw") with { Description = "the vm" };

        ExportCatalog catalog = With(before).Apply(new ExportSnapshotted("a", ["a.2", "a.1"]));

        Assert.Equal(before with { Backend = before.Backend with { Layers = ["a.2", "a.1"] } }, catalog.Exports["a"]);
        Assert.Equal(["a.2", "a.1"], catalog.Exports["a"].Backend.Layers!);
    }

    [Fact]
    public void ExportSnapshotted_of_an_export_since_removed_changes_nothing()
    {
        ExportCatalog catalog = With(File("vm1"));

        Assert.Same(catalog, catalog.Apply(new ExportSnapshotted("gone", ["g.2"])));
    }

    [Fact]
    public void Apply_does_not_change_the_state_it_was_given()
    {
        ExportCatalog catalog = With(File("vm1"));

        _ = catalog.Apply(new ExportRemoved("vm1"));
        _ = catalog.Apply(new ExportCreated(File("vm2")));

        Assert.Equal(["vm1"], catalog.Exports.Keys);
    }

    // ------------------------------------------------------------ replay

    [Fact]
    public void Replaying_the_events_of_a_run_of_commands_rebuilds_the_same_state()
    {
        object[] commands =
        [
            new CreateExport(File("golden")),
            new CreateExport(Overlay("a", ["a.1"], baseImage: "/data/golden.raw")),
            new CreateExport(Overlay("b", layers: null!, baseExport: "golden", baseImage: "/data/golden.raw")), // refused: base and baseImage
            new CreateExport(File("vm1")),
            new CreateExport(File("vm1")), // refused: exists
            new SnapshotExport("a", "a.2"),
            new RemoveExport("nothing"), // refused: not found
            new SnapshotExport("vm1", "vm1.2"), // refused: not an overlay
            new SnapshotExport("a", "a.3"),
            new RemoveExport("vm1"),
            new RemoveExport("vm1"), // refused: gone
            new CreateExport(File("vm1", readOnly: true)),
            new CreateExport(File("disk0")),
        ];
        ExportCatalog live = ExportCatalog.Empty;
        var journal = new List<IExportEvent>();
        foreach (object command in commands)
        {
            (IExportEvent? @event, _) = live.Decide(command);
            if (@event is not null)
            {
                journal.Add(@event);
                live = live.Apply(@event);
            }
        }

        ExportCatalog recovered = journal.Aggregate(ExportCatalog.Empty, (catalog, @event) => catalog.Apply(@event));

        Assert.Equal(8, journal.Count);
        Assert.Equal(live.Exports, recovered.Exports);
        Assert.Equal(["a", "disk0", "golden", "vm1"], recovered.Exports.Keys);
        Assert.Equal(["a.3", "a.2", "a.1"], recovered.Exports["a"].Backend.Layers!);
        Assert.True(recovered.Exports["vm1"].ReadOnly);
        Assert.Equal("disk0", recovered.DefaultExport);
        Assert.Equal(["a.3", "a.2", "a.1"], recovered.LayersInUse);
    }

    [Fact]
    public void The_default_export_is_disk0_if_present_else_the_first_by_name()
    {
        Assert.Null(ExportCatalog.Empty.DefaultExport);
        Assert.Equal("b", With(File("c"), File("b")).DefaultExport);
        Assert.Equal("disk0", With(File("a"), File("disk0")).DefaultExport);
    }
}
