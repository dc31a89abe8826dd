using Gateway.Actors;
using Akka.Actor;
using Akka.TestKit;
using Gateway.Actors.Exports;
using Gateway.Tests.Bitmaps;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Actors;

/// <summary>
/// Issue 30: no actor blocks a thread on storage I/O. The registry (a cluster-wide singleton) used
/// to block on the S3 bucket check, so one silent endpoint stalled every admin operation for up to
/// a minute; an export actor blocked in PreStart on its first S3 listing. Now lookups are answered
/// meanwhile, catalog commands still apply in order, and an export opens off its actor.
/// </summary>
[Collection(GatedJournalCollection.Name)]
public sealed class StorageOffTheActorTests : Akka.TestKit.Xunit2.TestKit
{
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);
    private readonly string _data = Directory.CreateTempSubdirectory("gateway-registry-storage-").FullName;

    public StorageOffTheActorTests(ITestOutputHelper output) : base(BitmapsActorTests.Config, output)
    {
        GatedJournal.Open();
    }

    [Fact]
    public async Task While_an_s3_create_waits_on_a_silent_store_lists_are_answered_and_a_later_create_follows_it_in_order()
    {
        using var store = new SilentStore();
        // Bounded for the test: the check fails when the store goes away, or at the latest here.
        var backends = new BackendFactory(_data) { S3CreateTimeout = TimeSpan.FromSeconds(20) };
        IActorRef registry = Sys.ActorOf(ExportRegistryActor.Props(backends, initialExport: null));
        TestProbe client = CreateTestProbe();
        var s3 = new ExportSpec("remote", 1 << 20,
            new BackendSpec(BackendSpec.S3Type, S3: new S3Spec(store.Endpoint, "bucket", "disk", AccessKey: "test", SecretKey: "test")),
            ReadOnly: false, Description: null);
        var file = new ExportSpec("local", 1 << 20, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null);

        registry.Tell(new CreateExport(s3), client);
        // The bucket check is in flight (and will get no answer) before anything else is asked.
        await store.Connected.WaitAsync(Patience);
        registry.Tell(new CreateExport(file), client);

        ExportList during = await registry.Ask<ExportList>(ListExports.Instance, TimeSpan.FromSeconds(2));
        Assert.Empty(during.Exports);
        // The file create is queued behind the S3 one: neither has been answered.
        await client.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(300));

        // The store goes away: the check fails, then the queued create runs.
        store.Close();
        CommandResult first = await client.ExpectMsgAsync<CommandResult>(TimeSpan.FromSeconds(30));
        Assert.Equal(ExportErrorKind.Invalid, first.Error);
        Assert.Contains("'remote'", first.Message);
        CommandResult second = await client.ExpectMsgAsync<CommandResult>(Patience);
        Assert.True(second.Error is null, second.Message);
        Assert.Equal("local", second.Export?.Spec.Name);

        ExportList after = await registry.Ask<ExportList>(ListExports.Instance, Patience);
        Assert.Equal(["local"], after.Exports.Select(e => e.Spec.Name));
    }

    private static ExportSpec S3Export(SilentStore store) => new("remote", 1 << 20,
        new BackendSpec(BackendSpec.S3Type, S3: new S3Spec(store.Endpoint, "bucket", "disk", AccessKey: "test", SecretKey: "test")),
        ReadOnly: false, Description: null);

    [Fact]
    public async Task Messages_sent_while_an_export_opens_wait_and_are_answered_once_it_is_open()
    {
        using var store = new SilentStore();
        // Shortened for the test from 5 s.
        var backends = new BackendFactory(_data) { S3ListTimeout = TimeSpan.FromSeconds(1) };
        IActorRef export = Sys.ActorOf(ExportActor.Props(S3Export(store), backends));
        TestProbe client = CreateTestProbe();
        export.Tell(new GetExport("remote"), client);
        await store.Connected.WaitAsync(Patience);
        // The first listing gets no answer: the export is still opening.
        await client.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(300));
        // The listing gives up (a store that is down does not keep an export closed) and the
        // export opens: the question asked meanwhile is answered with the open export's info.
        ExportFound found = await client.ExpectMsgAsync<ExportFound>(Patience);
        Assert.NotNull(found.Export?.Info);
        Watch(export);
        export.Tell(CloseExport.Instance, ActorRefs.NoSender);
        await ExpectTerminatedAsync(export, Patience);
    }

    [Fact]
    public async Task An_export_stopped_while_its_store_keeps_silent_stops_at_once()
    {
        using var store = new SilentStore();
        var backends = new BackendFactory(_data);
        IActorRef export = Sys.ActorOf(ExportActor.Props(S3Export(store), backends));
        await store.Connected.WaitAsync(Patience);
        Watch(export);
        Sys.Stop(export);
        // Before, the actor's thread sat in PreStart until the listing timed out (5 s).
        await ExpectTerminatedAsync(export, TimeSpan.FromSeconds(2));
    }

    [Fact]
    public async Task An_export_whose_backend_fails_to_open_stops()
    {
        var backends = new BackendFactory(_data);
        // A file export whose file was never made: the open fails.
        var missing = new ExportSpec("missing", 1 << 20, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null);
        IActorRef export = Sys.ActorOf(ExportActor.Props(missing, backends));
        Watch(export);
        // Stopped, as when PreStart threw: even the guardian's default strategy stops an actor that fails to initialize.
        await ExpectTerminatedAsync(export, Patience);
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
