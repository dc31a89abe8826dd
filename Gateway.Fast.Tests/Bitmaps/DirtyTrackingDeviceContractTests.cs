using Akka.Actor;
using Gateway.Actors.Bitmaps;
using Gateway.Backends;
using Gateway.Tests.Backends;
using Xunit;

namespace Gateway.Tests.Bitmaps;

/// <summary>
/// The backend contract through the dirty-tracking decorator (a memory backend under it, one
/// enabled 64 KiB bitmap recorded by the real bitmaps actor on an in-memory journal), and that
/// every change it passes on marks exactly the granules it touches.
/// </summary>
public sealed class DirtyTrackingDeviceContractTests(DirtyTrackingDeviceContractTests.Bitmaps bitmaps)
    : BlockDeviceContract, IClassFixture<DirtyTrackingDeviceContractTests.Bitmaps>
{
    private const int Granule = 64 * KiB;

    protected override bool HasNonBlockingIo => true;

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        bitmaps.TrackAsync(new MemoryBackend(size, readOnly)).GetAwaiter().GetResult().Device;

    [Fact]
    public async Task Writes_zeroes_and_trims_mark_exactly_the_granules_they_touch()
    {
        (DirtyTrackingDevice device, DirtyTracker tracker) = await bitmaps.TrackAsync(new MemoryBackend(4 * MiB));
        using IBlockDevice owned = device;

        await device.WriteAsync(Granule - 1, new byte[2], fua: false); // the last byte of granule 0, the first of 1
        await device.ZeroAsync(5 * Granule + 100, 2 * Granule, ZeroFlags.None); // 5, 6 and 7
        await device.TrimAsync(20 * Granule, Granule, fua: true); // exactly 20
        await device.ZeroAsync(MiB * 4 - 1, 1, ZeroFlags.NoHole); // the last granule
        await device.ReadAsync(30 * Granule, new byte[Granule]); // reads mark nothing
        await device.CacheAsync(31 * Granule, Granule);

        DirtyBitmap bits = Assert.Single(tracker.View.Enabled);
        long last = 4 * MiB / Granule - 1;
        long[] dirty = [.. Enumerable.Range(0, (int)bits.GranuleCount).Select(g => (long)g).Where(bits.IsGranuleDirty)];
        Assert.Equal([0, 1, 5, 6, 7, 20, last], dirty);
    }

    [Fact]
    public async Task A_change_already_covered_waits_for_no_actor()
    {
        (DirtyTrackingDevice device, DirtyTracker tracker) = await bitmaps.TrackAsync(new MemoryBackend(MiB));
        using IBlockDevice owned = device;
        await device.WriteAsync(0, new byte[Granule], fua: false);

        // With the actor gone, only a change whose granules are all dirty can still go through.
        tracker.Actor = ActorRefs.Nobody;
        await device.WriteAsync(100, new byte[1000], fua: false).AsTask().WaitAsync(TimeSpan.FromSeconds(5));

        Task clean = device.WriteAsync(Granule, new byte[1], fua: false).AsTask();
        await Task.WhenAny(clean, Task.Delay(200));
        Assert.False(clean.IsCompleted, "a change to a clean granule went through without its mark being recorded");
    }

    /// <summary>An actor system with an in-memory journal; one bitmaps actor per device.</summary>
    public sealed class Bitmaps : IAsyncLifetime
    {
        private const string Config = """
            akka.loglevel = WARNING
            akka.persistence.journal.plugin = "akka.persistence.journal.inmem"
            akka.persistence.snapshot-store.plugin = "akka.persistence.snapshot-store.inmem"
            """;

        private readonly ActorSystem _system = ActorSystem.Create("dirty-tracking-contract", Config);
        private int _count;

        public async Task<(DirtyTrackingDevice Device, DirtyTracker Tracker)> TrackAsync(IBlockDevice backend)
        {
            string export = $"disk{Interlocked.Increment(ref _count)}";
            var tracker = new DirtyTracker();
            IActorRef actor = _system.ActorOf(BitmapsActor.Props(export, backend.Size, tracker));
            tracker.Actor = actor;
            BitmapResult added = await actor.Ask<BitmapResult>(new AddBitmap(export, "b", Granule, Enabled: true), TimeSpan.FromSeconds(10));
            Assert.True(added.Error is null, added.Message);
            return (new DirtyTrackingDevice(backend, tracker), tracker);
        }

        public Task InitializeAsync() => Task.CompletedTask;

        public Task DisposeAsync() => _system.Terminate();
    }
}
