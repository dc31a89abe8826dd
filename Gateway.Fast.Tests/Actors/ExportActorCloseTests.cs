using Gateway.Actors;
using Akka.Actor;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Gateway.Tests.Bitmaps;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Actors;

/// <summary>
/// Issue 30 (3): a planned stop of an export (a cluster handoff sends <see cref="CloseExport"/>)
/// finishes the requests in flight, flushes, and only then stops the bitmaps. Before, Akka stopped
/// the bitmaps actor first (children stop before their parent's PostStop), so writes still arriving
/// were refused with EIO ("their actor has stopped") and a write waiting for its granule failed.
/// The journal's gate holds a write in flight at a chosen moment, deterministically.
/// </summary>
[Collection(GatedJournalCollection.Name)]
public sealed class ExportActorCloseTests : Akka.TestKit.Xunit2.TestKit
{
    private const long Size = 16 << 20;
    private const int K64 = 64 << 10;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);
    private readonly string _data = Directory.CreateTempSubdirectory("gateway-export-close-").FullName;
    private readonly BackendFactory _backends;

    public ExportActorCloseTests(ITestOutputHelper output) : base(BitmapsActorTests.Config, output)
    {
        GatedJournal.Open();
        GatedJournal.Written.Clear();
        _backends = new BackendFactory(_data);
    }

    private ExportSpec Spec(string name) => new(name, Size, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null);

    /// <summary>A new file export of <paramref name="name"/>, open: its actor and handle.</summary>
    private async Task<(ExportSpec Spec, IActorRef Actor, ExportHandle Handle)> CreateAndOpenAsync(string name)
    {
        ExportSpec spec = Spec(name);
        await _backends.CreateAsync(spec, CancellationToken.None);
        (IActorRef actor, ExportHandle handle) = await OpenAsync(spec);
        return (spec, actor, handle);
    }

    private async Task<(IActorRef Actor, ExportHandle Handle)> OpenAsync(ExportSpec spec)
    {
        IActorRef actor = Sys.ActorOf(ExportActor.Props(spec, _backends));
        ExportOpened opened = await actor.Ask<ExportOpened>(new OpenExport(spec.Name), Patience);
        Assert.NotNull(opened.Handle);
        return (actor, opened.Handle!);
    }

    private static byte[] Pattern(byte value) => Enumerable.Repeat(value, 4096).ToArray();

    [Fact]
    public async Task Writes_in_flight_when_the_export_closes_are_served_recorded_and_flushed_before_the_bitmaps_stop()
    {
        (ExportSpec spec, IActorRef actor, ExportHandle handle) = await CreateAndOpenAsync("handoff");
        BitmapResult added = await actor.Ask<BitmapResult>(new AddBitmap(spec.Name, "since", K64, true), Patience);
        Assert.True(added.Error is null, added.Message);

        // A write whose first touch is held at the journal: in flight when the close begins.
        GatedJournal.Close();
        Task first = handle.Device.WriteAsync(0, Pattern(0xA1), fua: false).AsTask();
        await Task.Delay(200);
        Assert.False(first.IsCompleted, "the first write should wait for its granule to be durable");

        Watch(actor);
        actor.Tell(CloseExport.Instance);
        // Connections learn of the close from the handle's token: then they stop reading, and a
        // request one of them read just before goes to the device now, while the drain waits.
        await AwaitConditionAsync(() => Task.FromResult(handle.Closed.IsCancellationRequested), Patience);
        Task second = handle.Device.WriteAsync(2 * K64, Pattern(0xB2), fua: false).AsTask();

        GatedJournal.Open();
        Exception? firstError = await Record.ExceptionAsync(() => first.WaitAsync(Patience));
        Exception? secondError = await Record.ExceptionAsync(() => second.WaitAsync(Patience));
        Assert.True(firstError is null, $"the write in flight when the export began to close failed: {firstError}");
        Assert.True(secondError is null, $"the write that arrived during the drain was refused: {secondError}");
        ExpectClosedCleanlyAndTerminated(actor);

        // After the drain the device is shut: a straggler gets ESHUTDOWN, never EIO.
        BlockDeviceException late = await Assert.ThrowsAsync<BlockDeviceException>(() => handle.Device.WriteAsync(4 * K64, Pattern(0xC3), fua: false).AsTask());
        Assert.Equal(BlockErrorKind.Shutdown, late.Kind);

        // Both writes are on disk (flushed at the close) and both granules are in the bitmap.
        using (FileBackend file = FileBackend.Open(_backends.FilePath(spec), readOnly: true))
        {
            byte[] read = new byte[4096];
            await file.ReadAsync(0, read);
            Assert.Equal(Pattern(0xA1), read);
            await file.ReadAsync(2 * K64, read);
            Assert.Equal(Pattern(0xB2), read);
        }
        (IActorRef reopened, _) = await OpenAsync(spec);
        BitmapResult listed = await reopened.Ask<BitmapResult>(new ListBitmaps(spec.Name), Patience);
        Assert.True(listed.Error is null, listed.Message);
        Assert.Equal(2L * K64, Assert.Single(listed.Bitmaps).DirtyBytes);
    }

    [Fact]
    public async Task A_close_with_nothing_in_flight_flushes_and_stops_at_once()
    {
        (ExportSpec spec, IActorRef actor, ExportHandle handle) = await CreateAndOpenAsync("idle");
        await handle.Device.WriteAsync(K64, Pattern(0x5A), fua: false);
        Watch(actor);
        actor.Tell(CloseExport.Instance);
        ExpectClosedCleanlyAndTerminated(actor);
        Assert.True(handle.Closed.IsCancellationRequested);
        using FileBackend file = FileBackend.Open(_backends.FilePath(spec), readOnly: true);
        byte[] read = new byte[4096];
        await file.ReadAsync(K64, read);
        Assert.Equal(Pattern(0x5A), read);
    }

    /// <summary>
    /// The closer hears <see cref="ExportClosed"/> (clean: everything acknowledged is flushed), and
    /// the actor stops; Terminated may come first, it is a system message.
    /// </summary>
    private void ExpectClosedCleanlyAndTerminated(IActorRef actor)
    {
        IReadOnlyCollection<object> received = ReceiveN(2, Patience);
        Assert.Contains(received, m => m is ExportClosed { Clean: true });
        Assert.Contains(received, m => m is Terminated t && t.ActorRef.Equals(actor));
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
