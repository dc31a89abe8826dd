using Akka.Serialization;
using Gateway.Actors;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Xunit;

namespace Gateway.Tests.Resize;

/// <summary>The catalog's rules for <see cref="ResizeExport"/>: grow only, and what the event does.</summary>
public sealed class ExportCatalogResizeTests
{
    private static readonly ExportSpec Disk = new("vm1", 1 << 20, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null);

    private static ExportCatalog With(params ExportSpec[] specs) =>
        specs.Aggregate(ExportCatalog.Empty, (catalog, spec) => catalog.Apply(new ExportCreated(spec)));

    private static void AssertRefused(ExportCatalog catalog, ResizeExport command, ExportErrorKind kind, string message)
    {
        (IExportEvent? @event, CommandResult? error) = catalog.Decide(command);
        Assert.Null(@event);
        Assert.NotNull(error);
        Assert.Equal(kind, error.Error);
        Assert.Equal(message, error.Message);
    }

    [Fact]
    public void Resize_to_a_larger_size_is_ExportResized_and_applying_it_changes_only_the_size()
    {
        ExportCatalog catalog = With(Disk, Disk with { Name = "other" });

        (IExportEvent? @event, CommandResult? error) = catalog.Decide(new ResizeExport("vm1", 3 << 20));

        Assert.Null(error);
        Assert.Equal(new ExportResized("vm1", 3 << 20), @event);
        ExportCatalog after = catalog.Apply(@event!);
        Assert.Equal(Disk with { Size = 3 << 20 }, after.Exports["vm1"]);
        Assert.Equal(catalog.Exports["other"], after.Exports["other"]);
    }

    [Fact]
    public void Resize_to_the_same_size_succeeds_with_nothing_to_record()
    {
        (IExportEvent? @event, CommandResult? error) = With(Disk).Decide(new ResizeExport("vm1", Disk.Size));

        Assert.Null(@event);
        Assert.Null(error);
    }

    [Fact]
    public void Resize_to_a_smaller_size_is_refused_as_Invalid() =>
        AssertRefused(With(Disk), new ResizeExport("vm1", 4096), ExportErrorKind.Invalid,
            "shrinking is refused: export 'vm1' is 1048576 bytes and 4096 is smaller (the data past it would be lost)");

    [Fact]
    public void Resize_of_an_unknown_export_is_NotFound() =>
        AssertRefused(With(Disk), new ResizeExport("nope", 2 << 20), ExportErrorKind.NotFound, "export 'nope' not found");

    [Fact]
    public void Resize_of_a_read_only_export_is_refused_as_Invalid() =>
        AssertRefused(With(Disk with { ReadOnly = true }), new ResizeExport("vm1", 2 << 20), ExportErrorKind.Invalid,
            "export 'vm1' is read-only: it cannot be resized");

    [Theory]
    [InlineData(0L, "size 0 is invalid: it must be a positive number of bytes")]
    [InlineData(-1L, "size -1 is invalid: it must be a positive number of bytes")]
    [InlineData((1L << 50) + 1, "size 1125899906842625 is over the limit of 1125899906842624 bytes")]
    public void Resize_to_an_invalid_size_is_refused_as_Invalid(long size, string message) =>
        AssertRefused(With(Disk), new ResizeExport("vm1", size), ExportErrorKind.Invalid, message);

    [Fact]
    public void Resized_of_an_export_not_in_the_catalog_changes_nothing()
    {
        ExportCatalog catalog = With(Disk);

        Assert.Same(catalog, catalog.Apply(new ExportResized("gone", 2 << 20)));
    }

    [Fact]
    public void Replaying_create_snapshot_and_resize_rebuilds_the_grown_overlay()
    {
        var overlay = new ExportSpec("vm2", 1 << 20, new BackendSpec(BackendSpec.Overlay, Layers: ["vm2.a"]), ReadOnly: false, null);
        IExportEvent[] events = [new ExportCreated(overlay), new ExportSnapshotted("vm2", ["vm2.b", "vm2.a"]), new ExportResized("vm2", 5 << 20)];

        ExportCatalog catalog = events.Aggregate(ExportCatalog.Empty, (c, e) => c.Apply(e));

        Assert.Equal(overlay with { Size = 5 << 20, Backend = overlay.Backend with { Layers = ["vm2.b", "vm2.a"] } }, catalog.Exports["vm2"]);
    }
}

/// <summary>
/// The new event and messages survive the serializer Akka uses for them: the journal's (the
/// registry's events) and Akka.Remote's (the command to the registry singleton, the grow to the
/// owner through the shard region, the answer).
/// </summary>
public sealed class ResizeSerializationTests : Akka.TestKit.Xunit2.TestKit
{
    private static readonly ExportSpec Spec = new("vm1", 3L << 30, new BackendSpec("overlay", Layers: ["vm1.b", "vm1.a"], BaseImage: "/data/golden.img"),
        ReadOnly: false, "a VM disk", Incarnation: "0123abcd");

    public static TheoryData<string, object> Messages() => new()
    {
        { "event", new ExportResized("vm1", 3L << 30) },
        { "command", new ResizeExport("vm1", 3L << 30) },
        { "grow", new GrowExport(Spec) },
        { "envelope+grow", new ExportEnvelope(Spec, new GrowExport(Spec)) },
        { "answer", CommandResult.Ok(new ExportStatus(Spec, null)) },
    };

    [Theory]
    [MemberData(nameof(Messages))]
    public void Resize_messages_round_trip(string what, object message)
    {
        Serializer serializer = Sys.Serialization.FindSerializerFor(message);
        byte[] bytes = serializer.ToBinary(message);
        object back = serializer is SerializerWithStringManifest manifest
            ? manifest.FromBinary(bytes, manifest.Manifest(message))
            : serializer.FromBinary(bytes, message.GetType());
        Assert.True(back.GetType() == message.GetType(), $"{what}: came back as {back.GetType()}");
        Assert.Equivalent(message, back, strict: true);
    }

    [Fact]
    public void A_journal_with_resized_events_replays_to_the_grown_spec()
    {
        IExportEvent[] journal = [new ExportCreated(Spec with { Size = 1L << 30 }), new ExportResized("vm1", 2L << 30), new ExportResized("vm1", 3L << 30)];

        ExportCatalog catalog = journal
            .Select(e => (IExportEvent)Sys.Serialization.FindSerializerFor(e).FromBinary(Sys.Serialization.FindSerializerFor(e).ToBinary(e), e.GetType()))
            .Aggregate(ExportCatalog.Empty, (c, e) => c.Apply(e));

        Assert.Equal(Spec, catalog.Exports["vm1"]);
    }
}
