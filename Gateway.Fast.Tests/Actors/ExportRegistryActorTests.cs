using Gateway.Actors;
using Akka.Actor;
using Akka.TestKit;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Actors;

/// <summary>
/// The export registry on a single node (no shard region): create, lookup and remove through its
/// messages, the refusals the catalog names, recovery of the catalog from its journal, and what
/// it does with a lookup or a catalog command that arrives while a create's storage step runs.
/// (<see cref="StorageOffTheActorTests"/> covers lists and a second create during such a step.)
/// </summary>
public sealed class ExportRegistryActorTests : Akka.TestKit.Xunit2.TestKit
{
    private const string Config = """
        akka.loglevel = WARNING
        akka.persistence.journal.plugin = "akka.persistence.journal.inmem"
        akka.persistence.snapshot-store.plugin = "akka.persistence.snapshot-store.inmem"
        """;

    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);
    private readonly string _data = Directory.CreateTempSubdirectory("gateway-registry-").FullName;
    private readonly BackendFactory _backends;

    public ExportRegistryActorTests(ITestOutputHelper output) : base(Config, output)
    {
        _backends = new BackendFactory(_data);
    }

    private static ExportSpec File(string name, bool readOnly = false) =>
        new(name, 1 << 20, new BackendSpec(BackendSpec.File), readOnly, Description: null);

    private IActorRef StartRegistry(ExportSpec? initialExport = null) => Sys.ActorOf(ExportRegistryActor.Props(_backends, initialExport));

    private static async Task<CommandResult> SendAsync(IActorRef registry, object command) =>
        await registry.Ask<CommandResult>(command, Patience);

    /// <summary>The spec the registry's catalog holds for <paramref name="name"/>, or null.</summary>
    private static async Task<ExportSpec?> SpecAsync(IActorRef registry, string name, TimeSpan? timeout = null) =>
        (await registry.Ask<ExportList>(ListExports.Instance, timeout ?? Patience)).Exports.SingleOrDefault(e => e.Spec.Name == name)?.Spec;

    private static async Task<string[]> NamesAsync(IActorRef registry) =>
        [.. (await registry.Ask<ExportList>(ListExports.Instance, Patience)).Exports.Select(e => e.Spec.Name)];

    [Fact]
    public async Task A_created_export_is_listed_found_opened_and_has_its_storage()
    {
        IActorRef registry = StartRegistry();

        CommandResult created = await SendAsync(registry, new CreateExport(File("vm1")));

        Assert.True(created.Error is null, created.Message);
        Assert.Equal("vm1", created.Export?.Spec.Name);
        Assert.NotNull(created.Export?.Spec.Incarnation);
        Assert.True(System.IO.File.Exists(_backends.FilePath(File("vm1"))));
        Assert.Equal(["vm1"], await NamesAsync(registry));
        Assert.Equal(created.Export!.Spec, await SpecAsync(registry, "vm1"));
        // The export's actor answers with the open export: its size from the device.
        ExportFound found = await registry.Ask<ExportFound>(new GetExport("vm1"), Patience);
        Assert.Equal(1 << 20, found.Export?.Info?.Size);
        ExportOpened opened = await registry.Ask<ExportOpened>(new OpenExport("vm1"), Patience);
        Assert.Equal("vm1", opened.Handle?.Info.Name);
    }

    [Fact]
    public async Task A_second_create_of_a_name_is_refused_as_Conflict_and_changes_nothing()
    {
        IActorRef registry = StartRegistry();
        CommandResult first = await SendAsync(registry, new CreateExport(File("vm1")));

        CommandResult second = await SendAsync(registry, new CreateExport(File("vm1", readOnly: true)));

        Assert.Equal(ExportErrorKind.Conflict, second.Error);
        Assert.Equal("export 'vm1' already exists", second.Message);
        Assert.Equal(first.Export!.Spec, await SpecAsync(registry, "vm1")); // same incarnation, still writable
    }

    [Fact]
    public async Task An_invalid_create_is_refused_before_any_storage_is_made()
    {
        IActorRef registry = StartRegistry();

        CommandResult refused = await SendAsync(registry, new CreateExport(File("vm1") with { Size = 0 }));

        Assert.Equal(ExportErrorKind.Invalid, refused.Error);
        Assert.Contains("size 0 is invalid", refused.Message);
        Assert.False(System.IO.File.Exists(_backends.FilePath(File("vm1"))));
        Assert.Empty(await NamesAsync(registry));
    }

    [Fact]
    public async Task Exports_removed_while_others_are_created_never_stop_the_registry_and_their_storage_goes()
    {
        // The CSI driver's pattern (delete a volume, create the next one at once): a removed
        // export's actor that ended while the registry was persisting or making storage reached
        // it as a bare Terminated, and the DeathPactException stopped the registry for good.
        IActorRef registry = StartRegistry();
        Watch(registry);
        for (int i = 0; i < 25; i++)
        {
            Assert.True((await SendAsync(registry, new CreateExport(File($"gone{i}")))).Error is null);
            Task<CommandResult> removed = SendAsync(registry, new RemoveExport($"gone{i}"));
            Task<CommandResult> created = SendAsync(registry, new CreateExport(File($"kept{i}")));
            Assert.True((await removed).Error is null);
            Assert.True((await created).Error is null);
        }
        ExpectNoMsg(TimeSpan.FromMilliseconds(200));
        Assert.Equal(25, (await NamesAsync(registry)).Length);
        for (int i = 0; i < 25; i++)
        {
            string gone = _backends.FilePath(File($"gone{i}"));
            await AwaitConditionAsync(() => Task.FromResult(!System.IO.File.Exists(gone)), Patience);
            Assert.True(System.IO.File.Exists(_backends.FilePath(File($"kept{i}"))));
        }
    }

    [Fact]
    public async Task A_removed_export_is_gone_from_every_lookup_and_its_file_deleted()
    {
        IActorRef registry = StartRegistry();
        await SendAsync(registry, new CreateExport(File("vm1")));
        await SendAsync(registry, new CreateExport(File("vm2")));

        CommandResult removed = await SendAsync(registry, new RemoveExport("vm1"));

        Assert.True(removed.Error is null, removed.Message);
        Assert.Equal(["vm2"], await NamesAsync(registry));
        Assert.Null((await registry.Ask<ExportFound>(new GetExport("vm1"), Patience)).Export);
        Assert.Null((await registry.Ask<ExportOpened>(new OpenExport("vm1"), Patience)).Handle);
        // The file goes once the export's actor has closed it.
        await AwaitConditionAsync(() => Task.FromResult(!System.IO.File.Exists(_backends.FilePath(File("vm1")))), Patience);
        Assert.True(System.IO.File.Exists(_backends.FilePath(File("vm2"))));
    }

    [Fact]
    public async Task An_overlay_on_a_read_only_file_export_keeps_that_export_from_being_removed()
    {
        IActorRef registry = StartRegistry();
        await SendAsync(registry, new CreateExport(File("golden", readOnly: true)));
        var overlay = new ExportSpec("vm1", 1 << 20, new BackendSpec(BackendSpec.Overlay, Base: "golden"), ReadOnly: false, Description: null);

        CommandResult created = await SendAsync(registry, new CreateExport(overlay));

        Assert.True(created.Error is null, created.Message);
        Assert.Equal(_backends.FilePath(File("golden")), created.Export?.Spec.Backend.BaseImage);
        CommandResult refused = await SendAsync(registry, new RemoveExport("golden"));
        Assert.Equal(ExportErrorKind.Conflict, refused.Error);
        Assert.Equal("export 'golden' is the base image of 'vm1': remove those first", refused.Message);
        Assert.True((await SendAsync(registry, new RemoveExport("vm1"))).Error is null);
        Assert.True((await SendAsync(registry, new RemoveExport("golden"))).Error is null);
    }

    [Fact]
    public async Task Remove_of_an_unknown_export_is_refused_as_NotFound()
    {
        IActorRef registry = StartRegistry();

        CommandResult refused = await SendAsync(registry, new RemoveExport("vm1"));

        Assert.Equal(ExportErrorKind.NotFound, refused.Error);
        Assert.Equal("export 'vm1' not found", refused.Message);
    }

    [Fact]
    public async Task Lookups_of_an_unknown_export_answer_nothing_and_the_empty_name_is_the_default_export()
    {
        IActorRef registry = StartRegistry();
        Assert.Null((await registry.Ask<ExportOpened>(new OpenExport(""), Patience)).Handle);
        await SendAsync(registry, new CreateExport(File("b")));
        await SendAsync(registry, new CreateExport(File("a")));

        Assert.Null((await registry.Ask<ExportFound>(new GetExport("c"), Patience)).Export);
        Assert.Null((await registry.Ask<ExportOpened>(new OpenExport("c"), Patience)).Handle);
        Assert.Equal("a", (await registry.Ask<ExportOpened>(new OpenExport(""), Patience)).Handle?.Info.Name);
    }

    [Fact]
    public async Task A_restarted_registry_recovers_the_catalog_its_commands_left()
    {
        IActorRef registry = StartRegistry();
        await SendAsync(registry, new CreateExport(File("vm1")));
        CommandResult vm2 = await SendAsync(registry, new CreateExport(File("vm2")));
        await SendAsync(registry, new RemoveExport("vm1"));
        await SendAsync(registry, new CreateExport(File("vm3", readOnly: true)));
        Watch(registry);
        Sys.Stop(registry);
        await ExpectTerminatedAsync(registry, Patience);

        // The initial export is made only on a first start: this registry has a journal.
        IActorRef recovered = StartRegistry(initialExport: File("disk0"));

        Assert.Equal(["vm2", "vm3"], await NamesAsync(recovered));
        Assert.Equal(vm2.Export!.Spec, await SpecAsync(recovered, "vm2"));
        Assert.True((await SpecAsync(recovered, "vm3"))?.ReadOnly);
        // And it runs them again.
        Assert.Equal("vm2", (await recovered.Ask<ExportOpened>(new OpenExport("vm2"), Patience)).Handle?.Info.Name);
    }

    [Fact]
    public async Task A_first_start_creates_the_initial_export()
    {
        IActorRef registry = StartRegistry(initialExport: File("disk0"));

        Assert.Equal(["disk0"], await NamesAsync(registry));
        Assert.Equal("disk0", (await registry.Ask<ExportOpened>(new OpenExport(""), Patience)).Handle?.Info.Name);
    }

    [Fact]
    public async Task While_a_create_waits_on_storage_lookups_are_answered_and_a_remove_waits_its_turn()
    {
        using var store = new SilentStore();
        var backends = new BackendFactory(_data) { S3CreateTimeout = TimeSpan.FromSeconds(20) };
        IActorRef registry = Sys.ActorOf(ExportRegistryActor.Props(backends, initialExport: null));
        CommandResult vm1 = await SendAsync(registry, new CreateExport(File("vm1")));
        TestProbe client = CreateTestProbe();
        var s3 = new ExportSpec("remote", 1 << 20,
            new BackendSpec(BackendSpec.S3Type, S3: new S3Spec(store.Endpoint, "bucket", "disk", AccessKey: "test", SecretKey: "test")),
            ReadOnly: false, Description: null);

        registry.Tell(new CreateExport(s3), client);
        await store.Connected.WaitAsync(Patience);
        registry.Tell(new RemoveExport("vm1"), client);

        // Lookups are answered from the catalog as it is: vm1 is still there, remote not yet.
        TimeSpan quick = TimeSpan.FromSeconds(2);
        Assert.Equal(vm1.Export!.Spec, await SpecAsync(registry, "vm1", quick));
        Assert.NotNull((await registry.Ask<ExportFound>(new GetExport("vm1"), quick)).Export);
        Assert.Equal("vm1", (await registry.Ask<ExportOpened>(new OpenExport("vm1"), quick)).Handle?.Info.Name);
        Assert.Null(await SpecAsync(registry, "remote", quick));
        // The remove is decided after the create, not beside it.
        await client.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(300));

        store.Close();
        CommandResult create = await client.ExpectMsgAsync<CommandResult>(TimeSpan.FromSeconds(30));
        Assert.Equal(ExportErrorKind.Invalid, create.Error);
        Assert.Contains("'remote'", create.Message);
        CommandResult remove = await client.ExpectMsgAsync<CommandResult>(Patience);
        Assert.True(remove.Error is null, remove.Message);
        Assert.Empty(await NamesAsync(registry));
    }

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        if (disposing)
        {
            Directory.Delete(_data, recursive: true);
        }
    }
}
