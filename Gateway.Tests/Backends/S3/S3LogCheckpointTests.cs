using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;
using static Gateway.Tests.Backends.S3.S3TestData;

namespace Gateway.Tests.Backends.S3;

/// <summary>Index checkpoints (issue 18): an open loads the newest whole one and replays only the segments after it.</summary>
public sealed class S3LogCheckpointTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private const int DiskSize = 4 * MiB;

    private static S3LogBackend Open(IObjectStore store, int checkpointSegments = 0, bool readOnly = false) =>
        S3LogBackend.OpenAsync(store, "disk", DiskSize, readOnly, S3LogFencingTests.Options() with { LogCheckpointSegments = checkpointSegments }, ownsStore: false)
            .GetAwaiter().GetResult();

    private static List<string> CheckpointKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => LogSegment.TryParseCheckpointKey("disk", k, out _, out _)).ToList();

    private static List<string> SegmentKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => LogSegment.TryParseKey("disk", k, out _, out _)).ToList();

    /// <summary>Random FUA writes (one segment each), trims and NO_HOLE zeroes against a model.</summary>
    private static async Task RandomOpsAsync(IBlockDevice device, byte[] model, int ops, int seed)
    {
        var random = new Random(seed);
        for (int op = 0; op < ops; op++)
        {
            int offset = random.Next(DiskSize - 64 * KiB);
            int length = 1 + random.Next(64 * KiB - 1);
            switch (random.Next(8))
            {
                case 0:
                    await device.TrimAsync(offset, length, fua: true);
                    model.AsSpan(offset, length).Clear();
                    break;
                case 1:
                    await device.ZeroAsync(offset, length, ZeroFlags.NoHole | ZeroFlags.Fua);
                    model.AsSpan(offset, length).Clear();
                    break;
                default:
                    byte[] data = Pattern(length, seed * 10_000 + op);
                    await device.WriteAsync(offset, data, fua: true);
                    data.CopyTo(model, offset);
                    break;
            }
        }
    }

    [Fact]
    public async Task An_open_loads_the_checkpoint_and_replays_only_the_segments_after_it_over_owners_and_compactions()
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        for (int owner = 0; owner < 5; owner++)
        {
            S3LogBackend device = Open(store, checkpointSegments: 0);
            Assert.Equal(model, await ReadAllAsync(device));
            if (owner > 0)
            {
                Assert.True(device.CheckpointedSegments > 0, $"owner {owner}: no checkpoint loaded");
                Assert.InRange(device.ReplayedSegments, 0, 10);
            }
            await RandomOpsAsync(device, model, ops: 60, seed: owner);
            await device.CheckpointAsync();
            Assert.Single(CheckpointKeys(store));
            await RandomOpsAsync(device, model, ops: 10, seed: 100 + owner); // after the checkpoint: replayed
            if (owner == 2)
            {
                await device.CompactAsync(); // folds what the checkpoint covers: it goes
                Assert.Empty(CheckpointKeys(store));
                await RandomOpsAsync(device, model, ops: 30, seed: 200);
                await device.CheckpointAsync();
                await RandomOpsAsync(device, model, ops: 5, seed: 201);
            }
            device.Abandon(); // kill -9 after FLUSH (every write here is FUA)
        }
        using (S3LogBackend reader = Open(store, readOnly: true))
        {
            Assert.Equal(model, await ReadAllAsync(reader));
        }
        using (S3LogBackend last = Open(store))
        {
            Assert.Equal(model, await ReadAllAsync(last));
            await last.CompactAsync();
            Assert.Empty(SegmentKeys(store));
            Assert.Empty(CheckpointKeys(store));
        }
        using S3Backend chunkPath = await S3Backend.OpenAsync(store, "disk", DiskSize, readOnly: true,
            new S3DeviceOptions { ObjectSize = 64 * KiB, CacheBytes = 2 * MiB }, ownsStore: false);
        Assert.Equal(model, await ReadAllAsync(chunkPath));
    }

    [Theory]
    [InlineData("truncated")]
    [InlineData("flipped")]
    [InlineData("an older torn one beside it")]
    public async Task A_torn_or_corrupt_checkpoint_is_passed_over_and_the_segments_replay(string damage)
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        using (S3LogBackend device = Open(store))
        {
            await RandomOpsAsync(device, model, ops: 40, seed: 3);
            await device.CheckpointAsync();
            await RandomOpsAsync(device, model, ops: 5, seed: 4);
        }
        string key = Assert.Single(CheckpointKeys(store));
        byte[] checkpoint = store.Objects[key];
        switch (damage)
        {
            case "truncated":
                store.Put(key, checkpoint[..(checkpoint.Length / 2)]);
                break;
            case "flipped":
                checkpoint[checkpoint.Length / 2] ^= 1;
                break;
            default:
                // A pass of checkpoints cut short between the new one's PUT and the old one's DELETE, the old one torn.
                Assert.True(LogSegment.TryParseCheckpointKey("disk", key, out long term, out long seq));
                store.Put(LogSegment.CheckpointKey("disk", term, seq - 1), checkpoint[..100]);
                break;
        }
        using S3LogBackend reopened = Open(store);
        Assert.Equal(model, await ReadAllAsync(reopened));
        if (damage == "an older torn one beside it")
        {
            Assert.True(reopened.CheckpointedSegments > 0);
            Assert.Equal([key], CheckpointKeys(store)); // the open deleted the older one
        }
        else
        {
            Assert.Equal(0, reopened.CheckpointedSegments);
            Assert.True(reopened.ReplayedSegments >= 45);
        }
    }

    [Fact]
    public async Task A_checkpoint_seals_and_stores_the_open_segment_first_so_it_covers_every_write_before_it()
    {
        var store = new MemoryObjectStore { PutDelay = TimeSpan.FromMilliseconds(30) };
        byte[] model = new byte[DiskSize];
        S3LogBackend device = Open(store);
        await RandomOpsAsync(device, model, ops: 20, seed: 5);
        byte[] unflushed = Pattern(100 * KiB, 6);
        await device.WriteAsync(MiB, unflushed, fua: false); // in the open segment, not stored yet
        unflushed.CopyTo(model, MiB);
        await device.CheckpointAsync();
        device.Abandon();

        using S3LogBackend reopened = Open(store);
        Assert.Equal(21, reopened.CheckpointedSegments);
        Assert.Equal(0, reopened.ReplayedSegments);
        Assert.Equal(model, await ReadAllAsync(reopened));
    }

    [Fact]
    public async Task Checkpoints_are_taken_in_the_background_so_fewer_than_the_configured_number_of_segments_are_left_to_replay()
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        using (S3LogBackend device = Open(store, checkpointSegments: 16))
        {
            await RandomOpsAsync(device, model, ops: 100, seed: 9);
            // Checkpoints are background work and coalesce: segments stored while one runs start
            // one more after it, which covers them all. How many are taken depends on how fast the
            // pool runs them against the writes (2 of 100 FUA writes at load in CI, 6 when idle);
            // what must hold is that once they settle, fewer than 16 stored segments are past the
            // newest one. Up to 30 s for that: CI runs the interop suites in parallel.
            var waited = System.Diagnostics.Stopwatch.StartNew();
            while (SegmentsPastNewestCheckpoint(store) >= 16 && waited.Elapsed < TimeSpan.FromSeconds(30))
            {
                await Task.Delay(20);
            }
            Assert.True(SegmentsPastNewestCheckpoint(store) < 16,
                $"{SegmentsPastNewestCheckpoint(store)} segments past the newest checkpoint after {waited.Elapsed.TotalSeconds:F1} s; " +
                $"{device.Checkpoints} checkpoints ({device.CheckpointFailures} failed), {SegmentKeys(store).Count} segments stored");
            // The first starts at 16 stored segments and the 84 stored after it start at least one more.
            Assert.True(device.Checkpoints >= 2, $"{device.Checkpoints} checkpoints");
            Assert.Equal(0, device.CheckpointFailures);
        }
        using S3LogBackend reopened = Open(store);
        Assert.True(reopened.CheckpointedSegments >= 100 - 16, $"{reopened.CheckpointedSegments} segments in the checkpoint");
        Assert.InRange(reopened.ReplayedSegments, 0, 16); // the 15 at most past it, and the one closing sealed
        Assert.Equal(model, await ReadAllAsync(reopened));
    }

    /// <summary>Stored segments after the newest checkpoint's mark (all of them when there is none).</summary>
    private static int SegmentsPastNewestCheckpoint(MemoryObjectStore store)
    {
        (long Term, long Seq) mark = (long.MinValue, long.MinValue);
        foreach (string key in store.Objects.Keys.ToList())
        {
            if (LogSegment.TryParseCheckpointKey("disk", key, out long term, out long seq) && (term, seq).CompareTo(mark) > 0)
            {
                mark = (term, seq);
            }
        }
        int past = 0;
        foreach (string key in store.Objects.Keys.ToList())
        {
            if (LogSegment.TryParseKey("disk", key, out long term, out long seq) && (term, seq).CompareTo(mark) >= 0)
            {
                past++;
            }
        }
        return past;
    }

    [Fact]
    public void Checkpoint_round_trips_and_a_cut_or_flipped_byte_is_no_checkpoint()
    {
        LogSegment.CheckpointSegment[] segments = [new(1, 4, 300), new(2, 0, 77)];
        LogSegment.CheckpointExtent[] extents = [new(0, 100, 1, 0, 56), new(4096, 512, 2, -1, 0), new(1L << 33, 9, 1, 1, 32)];
        byte[] data = LogSegment.Checkpoint(2, 1, segments, extents);
        var s = new List<LogSegment.CheckpointSegment>();
        var e = new List<LogSegment.CheckpointExtent>();
        Assert.True(LogSegment.TryDecodeCheckpoint(data, 2, 1, s, e));
        Assert.Equal(segments, s);
        Assert.Equal(extents, e);
        Assert.False(LogSegment.TryDecodeCheckpoint(data, 2, 2, s, e), "another key's");
        for (int cut = 0; cut < data.Length; cut++)
        {
            Assert.False(LogSegment.TryDecodeCheckpoint(data.AsSpan(0, cut), 2, 1, s, e), $"cut at {cut}");
        }
        for (int i = 0; i < data.Length; i++)
        {
            data[i] ^= 0x20;
            Assert.False(LogSegment.TryDecodeCheckpoint(data, 2, 1, s, e), $"byte {i} flipped");
            data[i] ^= 0x20;
        }
        string key = LogSegment.CheckpointKey("p", 2, 1);
        Assert.True(LogSegment.TryParseCheckpointKey("p", key, out long term, out long seq));
        Assert.Equal((2, 1), (term, seq));
        Assert.False(LogSegment.TryParseKey("p", key, out _, out _));
        Assert.False(LogSegment.TryParseFoldKey("p", key, out _, out _));
        Assert.False(LogSegment.TryParseFenceKey("p", key, out _));
    }
}
