using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;
using Xunit.Abstractions;
using static Gateway.Tests.Backends.S3.S3TestData;

namespace Gateway.Tests.Backends.S3;

/// <summary>
/// Compaction of the write log into chunk objects (issue 18, step 2), over an in-memory store:
/// bytes against a model with compactions among the writes, the bucket a quiet export leaves
/// (read by the plain chunk path), crashes after any number of a pass's store calls, the triggers,
/// and the space the bucket takes before and after.
/// </summary>
public sealed class S3LogCompactionTests(ITestOutputHelper output)
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private const int DiskSize = 4 * MiB;
    private const int ObjectSize = 64 * KiB;

    private static S3DeviceOptions Options() => new()
    {
        ObjectSize = ObjectSize,
        CacheBytes = 2 * MiB,
        WriteLog = true,
        LogSegmentBytes = 256 * KiB,
        LogDirtyBytes = 8 * MiB,
        LogSegmentDelay = TimeSpan.FromMinutes(10),
        // Only the test compacts, unless it is about a trigger.
        LogCompactBytes = long.MaxValue,
        LogCompactIdle = TimeSpan.FromHours(1),
        LogCompactOnClose = false,
    };

    private static S3LogBackend Open(IObjectStore store, S3DeviceOptions? options = null) =>
        S3LogBackend.OpenAsync(store, "disk", DiskSize, readOnly: false, options ?? Options(), ownsStore: false).GetAwaiter().GetResult();

    private static S3Backend OpenChunkPath(IObjectStore store) =>
        S3Backend.OpenAsync(store, "disk", DiskSize, readOnly: true, new S3DeviceOptions { ObjectSize = ObjectSize, CacheBytes = 2 * MiB }, ownsStore: false)
            .GetAwaiter().GetResult();

    private static List<string> SegmentKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => LogSegment.TryParseKey("disk", k, out _, out _)).Order(StringComparer.Ordinal).ToList();

    private static List<string> MarkerKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => LogSegment.TryParseFoldKey("disk", k, out _, out _)).ToList();

    private static List<string> ChunkKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => k.Length == "disk/".Length + 16 && !k.Contains("/log/", StringComparison.Ordinal)).ToList();

    private static long BucketBytes(MemoryObjectStore store) => store.Objects.Values.Sum(o => (long)o.Length);

    /// <summary>Random writes (some whole chunks of zeros), trims and zeroes against a byte model; returns the bytes written.</summary>
    private static async Task<long> RandomOpsAsync(IBlockDevice device, byte[] model, int ops, int seed, int maxLength = 100 * KiB)
    {
        var random = new Random(seed);
        long written = 0;
        for (int op = 0; op < ops; op++)
        {
            int offset = random.Next(DiskSize - 1);
            int length = 1 + random.Next(Math.Min(DiskSize - offset, maxLength) - 1);
            switch (random.Next(12))
            {
                case 0:
                    await device.TrimAsync(offset, length, fua: false);
                    model.AsSpan(offset, length).Clear();
                    break;
                case 1:
                    await device.ZeroAsync(offset, length, random.Next(2) == 0 ? ZeroFlags.NoHole : ZeroFlags.None);
                    model.AsSpan(offset, length).Clear();
                    break;
                case 2:
                    // Zeros as data over whole chunks: compaction must delete those chunks, not store zeros.
                    int chunk = random.Next(DiskSize / ObjectSize);
                    await device.WriteAsync((long)chunk * ObjectSize, new byte[ObjectSize], fua: false);
                    model.AsSpan(chunk * ObjectSize, ObjectSize).Clear();
                    written += ObjectSize;
                    break;
                default:
                    byte[] data = Pattern(length, seed * 100_000 + op);
                    await device.WriteAsync(offset, data, fua: random.Next(40) == 0);
                    data.CopyTo(model, offset);
                    written += length;
                    break;
            }
        }
        return written;
    }

    /// <summary>Every range the device calls zero reads as zeros in the model.</summary>
    private static void AssertZeroExtentsAreZero(Extent[] extents, byte[] model)
    {
        long at = 0;
        foreach (Extent extent in extents)
        {
            if ((extent.Flags & ExtentFlags.Zero) != 0)
            {
                Assert.True(model.AsSpan((int)at, (int)extent.Length).IndexOfAnyExcept((byte)0) < 0, $"extent at {at} (+{extent.Length}) is reported zero but holds data");
            }
            at += extent.Length;
        }
        Assert.Equal(model.Length, at);
    }

    [Fact]
    public async Task A_torn_chunk_object_reads_as_EIO_and_compaction_does_not_store_its_missing_bytes_as_zeros()
    {
        var store = new MemoryObjectStore();
        byte[] data = Pattern(2 * ObjectSize, seed: 1801);
        using (S3LogBackend writer = Open(store))
        {
            await writer.WriteAsync(0, data, fua: true);
            await writer.CompactAsync();
        }
        string key = S3DeviceOptions.Key("disk", 0);
        Assert.Equal(ObjectSize, store.Objects[key].Length);
        // What a store that keeps part of a PUT cut off halfway leaves (stock s3rver does).
        await store.PutAsync(key, data, ObjectSize / 4, CancellationToken.None);

        using S3LogBackend device = Open(store);
        var read = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(ObjectSize / 4 - 2 * KiB, new byte[4 * KiB]).AsTask());
        Assert.Equal(BlockErrorKind.Io, read.Kind);
        Assert.Contains($"{key} ends at byte {ObjectSize / 4}", read.Message);

        // A write into the chunk leaves the rest to the torn object: folding it must fail, not store zeros.
        await device.WriteAsync(0, new byte[] { 7 }, fua: true);
        await Assert.ThrowsAsync<BlockDeviceException>(() => device.CompactAsync());
        Assert.Equal(ObjectSize / 4, store.Objects[key].Length);
        // The bytes the object holds, and the other chunk, still read.
        byte[] head = new byte[4 * KiB];
        await device.ReadAsync(4 * KiB, head);
        Assert.Equal(data.AsSpan(4 * KiB, 4 * KiB).ToArray(), head);
        byte[] next = new byte[ObjectSize];
        await device.ReadAsync(ObjectSize, next);
        Assert.Equal(data.AsSpan(ObjectSize, ObjectSize).ToArray(), next);
    }

    [Fact]
    public async Task Random_writes_trims_and_zeroes_with_compactions_running_among_them_read_back_as_the_model()
    {
        // Slow PUTs stretch each pass, so writes land while it folds the chunks they touch.
        var store = new MemoryObjectStore { PutDelay = TimeSpan.FromMilliseconds(2) };
        byte[] model = new byte[DiskSize];
        using (S3LogBackend device = Open(store))
        {
            for (int round = 0; round < 6; round++)
            {
                await RandomOpsAsync(device, model, ops: 150, seed: 100 + round);
                if (round % 2 == 0)
                {
                    await device.FlushAsync();
                }
                Task compaction = device.CompactAsync();
                await RandomOpsAsync(device, model, ops: 60, seed: 200 + round);
                await compaction;
                Assert.Equal(model, await ReadAllAsync(device));
                AssertZeroExtentsAreZero(await AllocationAsync(device), model);
            }
            await device.FlushAsync();
            Assert.True(device.Compactions == 6 && device.FoldedBelow.Seq > 0, $"{device.Compactions} passes, folded below {device.FoldedBelow}");
        }

        using S3LogBackend reopened = Open(store);
        Assert.Equal(0, reopened.IgnoredSegments);
        Assert.Equal(model, await ReadAllAsync(reopened));
    }

    [Fact]
    public async Task Reads_during_a_pass_that_deletes_the_segments_they_looked_up_return_the_disk()
    {
        // No segment bytes cached: every read of the log is a ranged GET of a segment object, which
        // the pass deletes once it has folded it, possibly between a read's lookup and its GET.
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        using S3LogBackend device = Open(new SlowSegmentGetStore(store), Options() with { CacheBytes = 1 });
        for (int round = 0; round < 8; round++)
        {
            await RandomOpsAsync(device, model, ops: 80, seed: 500 + round, maxLength: 8 * KiB);
            await device.FlushAsync();
            Task compaction = device.CompactAsync();
            var readers = Enumerable.Range(0, 4).Select(r => Task.Run(async () =>
            {
                var random = new Random(r);
                byte[] buffer = new byte[32 * KiB];
                while (!compaction.IsCompleted)
                {
                    int offset = random.Next(DiskSize - buffer.Length);
                    await device.ReadAsync(offset, buffer);
                    Assert.True(model.AsSpan(offset, buffer.Length).SequenceEqual(buffer), $"read at {offset} during a pass");
                }
            })).ToArray();
            await compaction;
            await Task.WhenAll(readers);
        }
        Assert.Empty(SegmentKeys(store));
    }

    [Fact]
    public async Task A_flush_during_a_pass_is_not_queued_behind_the_pass_s_segment_reads()
    {
        // Every segment GET of the pass is held until the end: it keeps its store slots, and a
        // FLUSH must still get one. A pass over random writes issues one ranged GET per extent;
        // in one queue with them, the FLUSH's segment PUT waited until the pass had read them all.
        var store = new MemoryObjectStore();
        var gated = new GatedSegmentGetStore(store);
        byte[] model = new byte[DiskSize];
        using S3LogBackend device = Open(gated, Options() with { CacheBytes = 1, Parallelism = 4 });
        var random = new Random(11);
        byte[] block = new byte[4 * KiB];
        for (int i = 0; i < 400; i++)
        {
            random.NextBytes(block);
            int offset = random.Next(DiskSize / block.Length) * block.Length;
            await device.WriteAsync(offset, block, fua: false);
            block.CopyTo(model.AsSpan(offset));
        }
        await device.FlushAsync();

        Task compaction = device.CompactAsync();
        await gated.Entered.Task.WaitAsync(TimeSpan.FromSeconds(30));
        await device.WriteAsync(0, block, fua: false);
        block.CopyTo(model.AsSpan(0));
        Task flush = device.FlushAsync().AsTask();
        Task first = await Task.WhenAny(flush, Task.Delay(TimeSpan.FromSeconds(20)));
        int held = gated.Held;
        gated.Open.TrySetResult();
        Assert.True(first == flush, $"the FLUSH waited behind the pass ({held} segment GETs held)");
        await flush;
        Assert.False(compaction.IsCompleted, "the pass ended while its segment GETs were held");
        Assert.InRange(held, 1, 2); // half the parallelism of 4
        await compaction;
        Assert.Equal(model, await ReadAllAsync(device));
    }

    /// <summary>GETs of segment objects wait until <see cref="Open"/> completes.</summary>
    private sealed class GatedSegmentGetStore(MemoryObjectStore inner) : IObjectStore
    {
        private int _held;

        public TaskCompletionSource Entered { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public TaskCompletionSource Open { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public int Held => Volatile.Read(ref _held);

        public async Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken)
        {
            if (LogSegment.TryParseKey("disk", key, out _, out _))
            {
                Interlocked.Increment(ref _held);
                Entered.TrySetResult();
                await Open.Task.WaitAsync(cancellationToken);
            }
            return await inner.GetAsync(key, start, destination, cancellationToken);
        }

        public Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken) => inner.PutAsync(key, data, length, cancellationToken);

        public Task DeleteAsync(string key, CancellationToken cancellationToken) => inner.DeleteAsync(key, cancellationToken);

        public IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken) => inner.ListAsync(prefix, cancellationToken);

        public void Dispose()
        {
        }
    }

    /// <summary>GETs of log objects take a while, so a pass often deletes a segment while a read's GET of it is on its way.</summary>
    private sealed class SlowSegmentGetStore(MemoryObjectStore inner) : IObjectStore
    {
        public async Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken)
        {
            if (key.Contains("/log/", StringComparison.Ordinal))
            {
                await Task.Delay(5, cancellationToken);
            }
            return await inner.GetAsync(key, start, destination, cancellationToken);
        }

        public Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken) => inner.PutAsync(key, data, length, cancellationToken);

        public Task DeleteAsync(string key, CancellationToken cancellationToken) => inner.DeleteAsync(key, cancellationToken);

        public IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken) => inner.ListAsync(prefix, cancellationToken);

        public void Dispose()
        {
        }
    }

    [Fact]
    public async Task A_compacted_quiet_export_has_no_segments_and_the_chunk_path_reads_the_same_disk_and_allocation()
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        Extent[] allocation;
        using (S3LogBackend device = Open(store))
        {
            await RandomOpsAsync(device, model, ops: 400, seed: 7);
            await device.TrimAsync(3 * ObjectSize, ObjectSize, fua: false); // a whole chunk trimmed: no object
            model.AsSpan(3 * ObjectSize, ObjectSize).Clear();
            await device.FlushAsync();
            await device.CompactAsync();

            Assert.Empty(SegmentKeys(store));
            Assert.Equal(0, device.LogBytes);
            Assert.Equal(0, device.IndexExtents);
            Assert.Equal(model, await ReadAllAsync(device));
            allocation = await AllocationAsync(device);
        }
        // A trimmed chunk is deleted, never stored; every other chunk is a whole object (zeros only
        // where a NO_HOLE zero asked for it to stay provisioned).
        Assert.DoesNotContain(S3DeviceOptions.Key("disk", 3), store.Objects.Keys);
        Assert.All(ChunkKeys(store), k => Assert.Equal(ObjectSize, store.Objects[k].Length));
        Assert.Single(MarkerKeys(store));

        using S3Backend chunkPath = OpenChunkPath(store);
        Assert.Equal(model, await ReadAllAsync(chunkPath));
        Assert.Equal(await AllocationAsync(chunkPath), allocation);
        AssertZeroExtentsAreZero(allocation, model);

        using S3LogBackend reopened = Open(store);
        Assert.Equal((0, 0), (reopened.ReplayedSegments, reopened.IgnoredSegments));
        Assert.Equal(model, await ReadAllAsync(reopened));
        Assert.Equal(allocation, await AllocationAsync(reopened));
    }

    [Fact]
    public async Task A_chunk_zeroed_with_NO_HOLE_stays_an_allocated_object_after_compaction_and_one_zeroed_without_goes()
    {
        var store = new MemoryObjectStore();
        using (S3LogBackend device = Open(store))
        {
            await device.WriteAsync(0, Pattern(2 * ObjectSize, 5), fua: false);
            await device.FlushAsync();
            await device.CompactAsync();
            Assert.Equal(2, ChunkKeys(store).Count);

            await device.ZeroAsync(0, ObjectSize, ZeroFlags.NoHole);
            await device.ZeroAsync(ObjectSize, ObjectSize, ZeroFlags.None);
            await device.FlushAsync();
            await device.CompactAsync();

            Assert.Equal(new byte[2 * ObjectSize], (await ReadAllAsync(device))[..(2 * ObjectSize)]);
            Extent[] allocation = await AllocationAsync(device);
            Assert.Equal((ExtentFlags)0, allocation[0].Flags & ExtentFlags.Hole); // provisioned, as NO_HOLE asks
            Assert.Equal(ObjectSize, allocation[0].Length);
            Assert.NotEqual((ExtentFlags)0, allocation[1].Flags & ExtentFlags.Hole);
        }
        Assert.Equal([S3DeviceOptions.Key("disk", 0)], ChunkKeys(store));
        Assert.Equal(new byte[ObjectSize], store.Objects[S3DeviceOptions.Key("disk", 0)]);
    }

    [Fact]
    public async Task Writes_after_a_compaction_go_to_a_term_above_the_fold_marker_even_when_no_segment_is_left()
    {
        var store = new MemoryObjectStore();
        using (S3LogBackend device = Open(store))
        {
            await device.WriteAsync(0, Pattern(8 * KiB, 1), fua: true);
            await device.CompactAsync();
        }
        Assert.Empty(SegmentKeys(store));
        // Only the marker knows the last term: a new owner must not write under a folded (skipped) key.
        using (S3LogBackend second = Open(store))
        {
            Assert.True(second.Term > 1, $"term {second.Term}");
            await second.WriteAsync(ObjectSize, Pattern(8 * KiB, 2), fua: true);
            second.Abandon();
        }
        using S3LogBackend third = Open(store);
        byte[] all = await ReadAllAsync(third);
        Assert.Equal(Pattern(8 * KiB, 1), all[..(8 * KiB)]);
        Assert.Equal(Pattern(8 * KiB, 2), all[ObjectSize..(ObjectSize + 8 * KiB)]);
    }

    /// <summary>Fails every call from the K-th on, as a process killed there would stop making them; the K-th PUT of a log object is left torn, as s3rver keeps the part it got.</summary>
    private sealed class DyingStore(MemoryObjectStore inner) : IObjectStore
    {
        private long _budget = long.MaxValue;
        public long Calls;

        public void DieAfter(long calls) => Interlocked.Exchange(ref _budget, calls);

        private bool Alive()
        {
            Interlocked.Increment(ref Calls);
            return Interlocked.Decrement(ref _budget) >= 0;
        }

        public Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken) =>
            Alive() ? inner.GetAsync(key, start, destination, cancellationToken) : Task.FromException<int>(new IOException("dead"));

        public Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken)
        {
            if (Alive())
            {
                return inner.PutAsync(key, data, length, cancellationToken);
            }
            if (key.Contains("/log/", StringComparison.Ordinal) && Interlocked.Read(ref _budget) == -1)
            {
                inner.Put(key, data[..(length / 2)]);
            }
            return Task.FromException(new IOException("dead"));
        }

        public Task DeleteAsync(string key, CancellationToken cancellationToken) =>
            Alive() ? inner.DeleteAsync(key, cancellationToken) : Task.FromException(new IOException("dead"));

        public IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken) => inner.ListAsync(prefix, cancellationToken);

        public void Dispose()
        {
        }
    }

    [Fact]
    public async Task A_crash_after_any_number_of_a_compactions_store_calls_loses_no_flushed_byte_and_the_next_open_leaves_no_garbage()
    {
        // The first run measures how many store calls a whole pass makes (the same work for every
        // run: same seeds); the others die after k of them, k over that whole range.
        long passCalls = long.MaxValue;
        int runs = 0;
        int died = 0;
        for (long k = -1; k < passCalls; k += k < 0 ? 1 : Math.Max(1, passCalls / 40), runs++)
        {
            var store = new MemoryObjectStore();
            var dying = new DyingStore(store);
            byte[] model = new byte[DiskSize];
            S3LogBackend device = Open(dying);
            await RandomOpsAsync(device, model, ops: 120, seed: 11);
            await device.FlushAsync();
            await device.CompactAsync(); // an earlier marker and folded chunks under the pass that dies
            await RandomOpsAsync(device, model, ops: 120, seed: 12);
            await device.FlushAsync();
            long before = dying.Calls;
            if (k >= 0)
            {
                dying.DieAfter(k);
                try
                {
                    await device.CompactAsync();
                }
                catch (BlockDeviceException)
                {
                    died++;
                }
                // Else this pass needed fewer than k calls: its folds run in parallel and share
                // cached blocks, so the count of GETs varies a little from run to run.
            }
            else
            {
                await device.CompactAsync();
                passCalls = dying.Calls - before;
                Assert.True(passCalls > 20, $"a pass made {passCalls} store calls");
            }
            device.Abandon();

            using (S3LogBackend reopened = Open(store))
            {
                byte[] read = await ReadAllAsync(reopened);
                Assert.True(model.AsSpan().SequenceEqual(read), $"died after {k} of {passCalls} calls: flushed bytes differ");
                // The open's cleanup: nothing below the marker is left, and one marker.
                (long Term, long Seq) mark = reopened.FoldedBelow;
                Assert.All(SegmentKeys(store), key =>
                {
                    Assert.True(LogSegment.TryParseKey("disk", key, out long term, out long seq));
                    Assert.False(term < mark.Term || (term == mark.Term && seq < mark.Seq), $"died after {k}: {key} is below the marker {mark} and still there");
                });
                Assert.True(MarkerKeys(store).Count == 1, $"died after {k}: markers {string.Join(", ", MarkerKeys(store))}");
                await reopened.CompactAsync();
                Assert.True(SegmentKeys(store).Count == 0 && MarkerKeys(store).Count == 1,
                    $"died after {k}: left {string.Join(", ", store.Objects.Keys.Where(key => key.Contains("/log/", StringComparison.Ordinal)))}");
            }
            using S3Backend chunkPath = OpenChunkPath(store);
            byte[] chunks = await ReadAllAsync(chunkPath);
            Assert.True(model.AsSpan().SequenceEqual(chunks), $"died after {k} of {passCalls} calls: the chunks differ from the disk");
        }
        output.WriteLine($"{runs} runs over a pass of {passCalls} store calls, {died} of them died mid-pass");
        Assert.True(runs > 20, $"{runs} runs");
        Assert.True(died >= runs * 3 / 4, $"only {died} of {runs} passes died before their end");
    }

    [Fact]
    public async Task The_log_is_compacted_in_the_background_once_it_holds_the_threshold_and_stays_near_it()
    {
        var store = new MemoryObjectStore();
        const long Threshold = 1 * MiB;
        byte[] model = new byte[DiskSize];
        using S3LogBackend device = Open(store, Options() with { LogCompactBytes = Threshold, LogSegmentBytes = 64 * KiB });
        long most = 0;
        long written = 0;
        for (int round = 0; round < 40; round++)
        {
            written += await RandomOpsAsync(device, model, ops: 20, seed: 300 + round, maxLength: 16 * KiB);
            await device.FlushAsync();
            most = Math.Max(most, device.LogBytes);
        }
        for (int i = 0; i < 200 && device.LogBytes >= Threshold; i++)
        {
            await Task.Delay(20);
        }
        output.WriteLine($"written {written} bytes, log at most {most} bytes, {device.Compactions} passes");
        Assert.True(device.Compactions > 0, "no background compaction");
        Assert.True(device.LogBytes < Threshold, $"the log holds {device.LogBytes} bytes after the writes stopped");
        Assert.True(most < written, $"the log reached {most} bytes of {written} written: it was never folded");
        Assert.Equal(model, await ReadAllAsync(device));
    }

    [Fact]
    public async Task A_quiet_export_is_compacted_after_the_idle_time_and_a_graceful_close_compacts_the_rest()
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        using (S3LogBackend device = Open(store, Options() with { LogCompactIdle = TimeSpan.FromMilliseconds(300) }))
        {
            await RandomOpsAsync(device, model, ops: 100, seed: 21);
            await device.FlushAsync();
            Assert.NotEmpty(SegmentKeys(store));
            for (int i = 0; i < 250 && SegmentKeys(store).Count > 0; i++)
            {
                await Task.Delay(20);
            }
            Assert.Empty(SegmentKeys(store));
        }

        using (S3LogBackend device = Open(store, Options() with { LogCompactOnClose = true }))
        {
            await RandomOpsAsync(device, model, ops: 100, seed: 22);
            // No FLUSH: the close stores and folds it all.
        }
        Assert.Empty(SegmentKeys(store));
        using S3Backend chunkPath = OpenChunkPath(store);
        Assert.Equal(model, await ReadAllAsync(chunkPath));
    }

    [Fact]
    public async Task Space_bucket_bytes_per_byte_written_falls_to_the_disk_after_compaction()
    {
        // The issue's figure: bucket bytes / logical bytes written, after a random-write run and after compaction.
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        using S3LogBackend device = Open(store, Options() with { LogSegmentBytes = 256 * KiB });
        var random = new Random(31);
        long written = 0;
        for (int i = 0; i < 4096; i++)
        {
            int offset = random.Next(DiskSize / 4096) * 4096;
            byte[] data = Pattern(4096, 40_000 + i);
            await device.WriteAsync(offset, data, fua: i % 32 == 31);
            data.CopyTo(model, offset);
            written += data.Length;
        }
        await device.FlushAsync();
        long logged = BucketBytes(store);
        await device.CompactAsync();
        long compacted = BucketBytes(store);
        output.WriteLine($"4 KiB random writes: {written} bytes written over a {DiskSize}-byte disk; bucket {logged} bytes before compaction ({(double)logged / written:F3} of written), {compacted} after ({(double)compacted / written:F3} of written, {(double)compacted / DiskSize:F3} of the disk)");
        // Before: every write is in the log, with its record header. After: the chunks (all touched here), the marker and the term fence.
        long writes = written / 4096;
        long fence = store.Objects[LogSegment.FenceKey("disk", device.Term)].Length;
        Assert.InRange(logged, written + fence, written + fence + writes * (LogSegment.RecordHeaderSize + LogSegment.HeaderSize + LogSegment.TrailerSize));
        Assert.Equal(DiskSize + LogSegment.FoldMarkerSize + fence, compacted);
        Assert.Equal(model, await ReadAllAsync(device));
    }

    [Fact]
    public async Task No_background_pass_starts_while_an_open_replays_the_log()
    {
        // 160 flushed segments replayed one GET at a time (5 ms each, about a second) under a 64 KiB
        // threshold: the timer runs from the start, so a pass could start with part of the index
        // and delete every segment replayed by its end, folded or not (found by the interop kill
        // test: reads then looped on deleted segments, and a restart would have lost their bytes).
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        var random = new Random(1818);
        using (S3LogBackend writer = Open(store, Options() with { LogSegmentBytes = 64 * KiB }))
        {
            for (int i = 0; i < 160; i++)
            {
                int offset = random.Next(DiskSize / 4096) * 4096;
                byte[] data = Pattern(4096, 7000 + i);
                await writer.WriteAsync(offset, data, fua: true);
                data.CopyTo(model, offset);
            }
        }
        Assert.True(SegmentKeys(store).Count >= 160, $"{SegmentKeys(store).Count} segments");

        S3DeviceOptions compacting = Options() with { LogSegmentBytes = 64 * KiB, LogCompactBytes = 64 * KiB, Parallelism = 1 };
        using (S3LogBackend device = Open(new SlowSegmentGetStore(store), compacting))
        {
            for (int i = 0; i < 500 && (device.Compactions == 0 || device.LogBytes >= 64 * KiB); i++)
            {
                await Task.Delay(20);
            }
            Assert.True(device.Compactions > 0, "no background pass after the open");
            byte[] read = await ReadAllAsync(device).WaitAsync(TimeSpan.FromSeconds(30));
            Assert.True(model.AsSpan().SequenceEqual(read), "the open's own disk differs after its passes");
        }
        using S3LogBackend reopened = Open(store);
        byte[] after = await ReadAllAsync(reopened);
        Assert.True(model.AsSpan().SequenceEqual(after), "flushed bytes lost after a pass that ran at open");
    }
}
