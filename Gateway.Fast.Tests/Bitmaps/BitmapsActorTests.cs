using System.Collections.Concurrent;
using System.Collections.Immutable;
using Akka.Actor;
using Akka.Persistence;
using Akka.Persistence.Journal;
using Gateway.Actors.Bitmaps;
using Gateway.Backends;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Bitmaps;

/// <summary>An in-memory journal whose writes wait at a gate the test opens, and which records what it wrote.</summary>
public sealed class GatedJournal : MemoryJournal
{
    private static volatile TaskCompletionSource _gate = Opened();

    public static readonly ConcurrentQueue<object> Written = new();

    private static TaskCompletionSource Opened()
    {
        var open = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        open.SetResult();
        return open;
    }

    public static void Close() => _gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);

    public static void Open() => _gate.TrySetResult();

    protected override async Task<IImmutableList<Exception?>> WriteMessagesAsync(IEnumerable<AtomicWrite> messages, CancellationToken cancellationToken)
    {
        List<AtomicWrite> writes = [.. messages];
        await _gate.Task.ConfigureAwait(false);
        foreach (AtomicWrite write in writes)
        {
            foreach (IPersistentRepresentation p in (IImmutableList<IPersistentRepresentation>)write.Payload)
            {
                Written.Enqueue(p.Payload);
            }
        }
        return await base.WriteMessagesAsync(writes, cancellationToken).ConfigureAwait(false);
    }
}

/// <summary>Tests that open and close <see cref="GatedJournal"/>'s static gate run one at a time.</summary>
[CollectionDefinition(Name)]
public sealed class GatedJournalCollection
{
    public const string Name = "Gated journal (serial)";
}

/// <summary>The bitmaps actor: group commit of first touches, durability before the write, recovery.</summary>
[Collection(GatedJournalCollection.Name)]
public sealed class BitmapsActorTests : Akka.TestKit.Xunit2.TestKit
{
    internal const string Config = """
        akka.loglevel = INFO
        akka.persistence.journal.plugin = "akka.persistence.journal.gated"
        akka.persistence.journal.gated {
          class = "Gateway.Tests.Bitmaps.GatedJournal, Gateway.Fast.Tests"
          plugin-dispatcher = "akka.actor.default-dispatcher"
        }
        akka.persistence.snapshot-store.plugin = "akka.persistence.snapshot-store.inmem"
        """;

    private const long Size = 64 << 20;
    private const int K64 = 64 << 10;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    public BitmapsActorTests(ITestOutputHelper output) : base(Config, output)
    {
        GatedJournal.Open();
        GatedJournal.Written.Clear();
    }

    private (IActorRef Actor, DirtyTracker Tracker) Start(string export, int snapshotEvery = BitmapsActor.DefaultSnapshotEvery)
    {
        var tracker = new DirtyTracker();
        IActorRef actor = Sys.ActorOf(BitmapsActor.Props(export, Size, tracker, snapshotEvery));
        tracker.Actor = actor;
        return (actor, tracker);
    }

    private static async Task<BitmapResult> SendAsync(IActorRef actor, IBitmapCommand command)
    {
        BitmapResult result = await actor.Ask<BitmapResult>(command, Patience);
        Assert.True(result.Error is null, result.Message);
        return result;
    }

    private static GranulesDirtied[] Batches() => [.. GatedJournal.Written.OfType<GranulesDirtied>()];

    [Fact]
    public async Task Concurrent_first_touches_are_persisted_as_one_batch_and_complete_only_after_it_is_durable()
    {
        (IActorRef actor, DirtyTracker tracker) = Start("group");
        await SendAsync(actor, new AddBitmap("group", "b", K64, true));

        GatedJournal.Close();
        Task first = tracker.MarkAsync(0, 4096); // its persist is now held at the gate
        await Task.Delay(200);
        Task[] others = [.. Enumerable.Range(1, 20).Select(i => tracker.MarkAsync(i * 2L * K64, 4096))];
        await Task.Delay(300);
        Assert.False(first.IsCompleted, "a first touch completed before its event was durable");
        Assert.DoesNotContain(others, t => t.IsCompleted);
        BitmapInfo before = (await SendAsyncUnchecked(actor, new ListBitmaps("group"))).Bitmaps[0];
        Assert.Equal(0, before.DirtyBytes); // no bit is set before it is durable

        GatedJournal.Open();
        await Task.WhenAll([first, .. others]).WaitAsync(Patience);

        GranulesDirtied[] batches = Batches();
        Assert.Equal(2, batches.Length); // the held one, then all 20 that queued behind it
        Assert.Equal(2, batches[0].Ranges.Length);
        Assert.Equal(40, batches[1].Ranges.Length);
        Assert.Equal(21L * K64, (await SendAsync(actor, new ListBitmaps("group"))).Bitmaps[0].DirtyBytes);
    }

    private static Task<BitmapResult> SendAsyncUnchecked(IActorRef actor, IBitmapCommand command) => actor.Ask<BitmapResult>(command, Patience);

    [Fact]
    public async Task A_write_reaches_the_device_only_after_its_granule_is_durable_and_a_rewrite_pays_nothing()
    {
        (IActorRef actor, DirtyTracker tracker) = Start("order");
        await SendAsync(actor, new AddBitmap("order", "b", K64, true));
        using var memory = new MemoryBackend(Size);
        var device = new DirtyTrackingDevice(memory, tracker);
        byte[] data = [.. Enumerable.Repeat((byte)7, 4096)];

        GatedJournal.Close();
        Task write = device.WriteAsync(K64, data, fua: false).AsTask();
        await Task.Delay(300);
        Assert.False(write.IsCompleted);
        byte[] seen = new byte[4096];
        await memory.ReadAsync(K64, seen);
        Assert.All(seen, b => Assert.Equal(0, b)); // the backend has not been touched yet

        GatedJournal.Open();
        await write.WaitAsync(Patience);
        await memory.ReadAsync(K64, seen);
        Assert.All(seen, b => Assert.Equal(7, b));

        // Same granule again, with the journal closed: it must not wait for it.
        GatedJournal.Close();
        int written = Batches().Length;
        ValueTask again = device.WriteAsync(K64 + 8192, data, fua: false);
        Assert.True(again.IsCompletedSuccessfully, "a write to an already dirty granule waited");
        await again;
        Assert.Equal(written, Batches().Length);
        GatedJournal.Open();
    }

    [Fact]
    public async Task Disabled_bitmaps_record_nothing_and_writes_with_no_bitmap_go_straight_on()
    {
        (IActorRef actor, DirtyTracker tracker) = Start("disabled");
        await SendAsync(actor, new ListBitmaps("disabled")); // recovered
        using var memory = new MemoryBackend(Size);
        var device = new DirtyTrackingDevice(memory, tracker);
        GatedJournal.Close();
        ValueTask bare = device.WriteAsync(0, new byte[512], fua: false);
        Assert.True(bare.IsCompletedSuccessfully, "a write with no bitmap waited");
        GatedJournal.Open();

        await SendAsync(actor, new AddBitmap("disabled", "off", K64, false));
        await device.ZeroAsync(0, 1 << 20, ZeroFlags.None);
        await device.TrimAsync(2 << 20, 1 << 20, fua: false);
        Assert.Equal(0, (await SendAsync(actor, new ListBitmaps("disabled"))).Bitmaps[0].DirtyBytes);
        Assert.Empty(Batches());

        await SendAsync(actor, new SetBitmapEnabled("disabled", "off", true));
        await device.TrimAsync(2 << 20, 1 << 20, fua: false);
        Assert.Equal(1 << 20, (await SendAsync(actor, new ListBitmaps("disabled"))).Bitmaps[0].DirtyBytes);
    }

    [Fact]
    public async Task Bitmaps_and_their_bits_are_recovered_from_events_and_snapshots()
    {
        (IActorRef actor, DirtyTracker tracker) = Start("recover", snapshotEvery: 4);
        await SendAsync(actor, new AddBitmap("recover", "fine", 4096, true));
        await SendAsync(actor, new AddBitmap("recover", "coarse", 1 << 20, true));
        for (int i = 0; i < 7; i++)
        {
            await tracker.MarkAsync(i * 3L << 20, 100).WaitAsync(Patience);
        }
        await SendAsync(actor, new SetBitmapEnabled("recover", "coarse", false));
        await tracker.MarkAsync(60L << 20, 4096).WaitAsync(Patience);
        BitmapInfo[] expected = [.. (await SendAsync(actor, new ListBitmaps("recover"))).Bitmaps];

        Watch(actor);
        actor.Tell(PoisonPill.Instance);
        ExpectTerminated(actor);
        (IActorRef again, DirtyTracker newTracker) = Start("recover");
        Assert.Equal(expected, (await SendAsync(again, new ListBitmaps("recover"))).Bitmaps);
        Assert.True(newTracker.View.Ready);
        Assert.True(newTracker.View.IsDirty(60L << 20, 4096));
    }

    [Fact]
    public async Task A_bitmap_added_while_a_write_is_in_flight_still_records_it_before_the_write_completes()
    {
        (IActorRef actor, DirtyTracker tracker) = Start("added");
        await SendAsync(actor, new ListBitmaps("added"));
        var slow = new SlowDevice(new MemoryBackend(Size));
        var device = new DirtyTrackingDevice(slow, tracker);

        Task write = device.WriteAsync(5 * K64, new byte[4096], fua: false).AsTask();
        await slow.Entered.Task.WaitAsync(Patience); // the write passed the check: no bitmap yet
        await SendAsync(actor, new AddBitmap("added", "late", K64, true));
        slow.Release.SetResult();
        await write.WaitAsync(Patience);
        Assert.Equal(K64, (await SendAsync(actor, new ListBitmaps("added"))).Bitmaps[0].DirtyBytes);
    }

    private sealed class SlowDevice(IBlockDevice inner) : IBlockDevice
    {
        public TaskCompletionSource Entered { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public TaskCompletionSource Release { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public long Size => inner.Size;
        public bool IsReadOnly => false;
        public BlockCapabilities Capabilities => inner.Capabilities;
        public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) => inner.ReadAsync(offset, destination, cancellationToken);

        public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
        {
            Entered.TrySetResult();
            await Release.Task;
            await inner.WriteAsync(offset, source, fua, cancellationToken);
        }

        public ValueTask FlushAsync(CancellationToken cancellationToken = default) => inner.FlushAsync(cancellationToken);
        public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) => inner.TrimAsync(offset, length, fua, cancellationToken);
        public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) => inner.ZeroAsync(offset, length, flags, cancellationToken);
        public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) => inner.CacheAsync(offset, length, cancellationToken);
        public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) => inner.GetAllocationAsync(offset, length, extents, cancellationToken);
        public void Dispose() => inner.Dispose();
    }
}
