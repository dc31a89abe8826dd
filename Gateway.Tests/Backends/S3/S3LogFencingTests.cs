using System.Diagnostics;
using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;
using Xunit.Abstractions;
using static Gateway.Tests.Backends.S3.S3TestData;

namespace Gateway.Tests.Backends.S3;

/// <summary>
/// Two owners of one write log (issue 18): a new owner's open fences the old term off, a stale
/// writer's FLUSH fails, its segments are neither replayed nor folded; buckets without fences open as before.
/// </summary>
public sealed class S3LogFencingTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private const int DiskSize = 4 * MiB;
    private const int ObjectSize = 64 * KiB;

    internal static S3DeviceOptions Options(int cacheBytes = 2 * MiB) => new()
    {
        ObjectSize = ObjectSize,
        CacheBytes = cacheBytes,
        WriteLog = true,
        LogSegmentBytes = 256 * KiB,
        LogDirtyBytes = 8 * MiB,
        LogSegmentDelay = TimeSpan.FromMinutes(10),
        LogCompactBytes = long.MaxValue,
        LogCompactIdle = TimeSpan.FromHours(1),
        LogCompactOnClose = false,
    };

    private static S3LogBackend Open(IObjectStore store, string prefix = "disk", bool readOnly = false) =>
        S3LogBackend.OpenAsync(store, prefix, DiskSize, readOnly, Options(), ownsStore: false).GetAwaiter().GetResult();

    private static List<string> SegmentKeys(MemoryObjectStore store, long term) =>
        store.Objects.Keys.Where(k => LogSegment.TryParseKey("disk", k, out long t, out _) && t == term).ToList();

    private static List<string> FenceKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => LogSegment.TryParseFenceKey("disk", k, out _)).ToList();

    private static List<string> ChunkKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => k.Length == "disk/".Length + 16 && !k.Contains("/log/", StringComparison.Ordinal)).ToList();

    /// <summary>
    /// Owner A writes and flushes; B opens the same prefix; A (stale, still running) writes where B never
    /// does and flushes. Returns the disk B's data makes, which is all a later owner may see.
    /// </summary>
    internal static async Task<byte[]> SplitBrainAsync(S3LogBackend a, Func<S3LogBackend> openB, Func<S3LogBackend, Task>? stale = null)
    {
        byte[] model = new byte[DiskSize];
        await a.WriteAsync(0, Pattern(256 * KiB, 1), fua: false);
        await a.FlushAsync();
        Pattern(256 * KiB, 1).CopyTo(model, 0);

        using S3LogBackend b = openB();
        Assert.True(b.Term > a.Term);
        Assert.Equal(Pattern(256 * KiB, 1), (await ReadAllAsync(b))[..(256 * KiB)]);

        // The stale writer: its segment reaches the bucket, but the FLUSH must not be acknowledged.
        await a.WriteAsync(MiB, Pattern(128 * KiB, 2), fua: false);
        var refused = await Assert.ThrowsAsync<BlockDeviceException>(() => a.FlushAsync().AsTask());
        Assert.Equal(BlockErrorKind.Io, refused.Kind);
        Assert.Equal(b.Term, a.FencedBy);
        // ...and it stops writing.
        await Assert.ThrowsAsync<BlockDeviceException>(() => a.WriteAsync(2 * MiB, Pattern(4 * KiB, 3), fua: false).AsTask());
        await Assert.ThrowsAsync<BlockDeviceException>(() => a.WriteAsync(2 * MiB, Pattern(4 * KiB, 3), fua: true).AsTask());
        if (stale is not null)
        {
            await stale(a);
        }

        await b.WriteAsync(128 * KiB, Pattern(256 * KiB, 4), fua: false);
        await b.FlushAsync();
        Pattern(256 * KiB, 4).CopyTo(model, 128 * KiB);
        b.Abandon();
        return model;
    }

    [Fact]
    public async Task A_stale_owners_FLUSH_fails_and_a_third_open_sees_exactly_the_new_owners_data()
    {
        var store = new MemoryObjectStore();
        S3LogBackend a = Open(store);
        byte[] model = await SplitBrainAsync(a, () => Open(store));
        Assert.Contains(SegmentKeys(store, a.Term), k => LogSegment.TryParseKey("disk", k, out _, out long seq) && seq >= 1); // the stale segment
        a.Dispose(); // its close flushes and compacts: both refused, nothing thrown

        using S3LogBackend c = Open(store);
        Assert.Equal(model, await ReadAllAsync(c));
        Assert.Equal(1, c.StaleSegments);

        using S3LogBackend reader = Open(store, readOnly: true);
        Assert.Equal(model, await ReadAllAsync(reader));
    }

    [Fact]
    public async Task A_stale_owner_folds_nothing_and_the_next_owners_compaction_leaves_its_segments_out_of_the_chunks()
    {
        var store = new MemoryObjectStore();
        S3LogBackend a = Open(store);
        int chunkPuts = 0;
        byte[] model = await SplitBrainAsync(a, () => Open(store), async stale =>
        {
            await Assert.ThrowsAsync<BlockDeviceException>(() => stale.CompactAsync());
            chunkPuts = ChunkKeys(store).Count;
        });
        Assert.Equal(0, chunkPuts);
        Assert.Empty(ChunkKeys(store));
        Assert.DoesNotContain(store.Objects.Keys, k => LogSegment.TryParseFoldKey("disk", k, out _, out _));
        a.Abandon();

        using (S3LogBackend c = Open(store))
        {
            await c.CompactAsync();
            Assert.Equal(model, await ReadAllAsync(c));
            Assert.DoesNotContain(store.Objects.Keys, k => LogSegment.TryParseKey("disk", k, out _, out _)); // the stale ones too: garbage
        }
        using S3Backend chunkPath = await S3Backend.OpenAsync(store, "disk", DiskSize, readOnly: true,
            new S3DeviceOptions { ObjectSize = ObjectSize, CacheBytes = 2 * MiB }, ownsStore: false);
        Assert.Equal(model, await ReadAllAsync(chunkPath));
    }

    [Fact]
    public async Task A_stale_FLUSH_between_the_new_owners_claim_and_its_listing_fails()
    {
        var store = new MemoryObjectStore();
        S3LogBackend a = Open(store);
        await a.WriteAsync(0, Pattern(64 * KiB, 1), fua: true);
        Task? staleFlush = null;
        // The replay listing (the whole prefix) comes after the claim: a stale FLUSH in between must
        // see the claim. Were the claim stored after the listing, that FLUSH would be acknowledged with
        // its segment missing from the new owner's replay and fence: a flushed write lost.
        var hooked = new ListHookStore(store, "disk/", () =>
        {
            staleFlush = Task.Run(async () =>
            {
                await a.WriteAsync(MiB, Pattern(64 * KiB, 2), fua: false);
                await a.FlushAsync();
            });
            return staleFlush.ContinueWith(_ => { }, TaskScheduler.Default);
        });
        using (S3LogBackend b = Open(hooked))
        {
            Assert.NotNull(staleFlush);
            await Assert.ThrowsAsync<BlockDeviceException>(() => staleFlush!);
            await b.WriteAsync(2 * MiB, Pattern(64 * KiB, 3), fua: true);
            b.Abandon();
        }
        a.Abandon();
        // What the new owner saw (its replay may hold the stale, unacknowledged write or not) is what the next open sees.
        using S3LogBackend c = Open(store);
        byte[] all = await ReadAllAsync(c);
        Assert.Equal(Pattern(64 * KiB, 1), all[..(64 * KiB)]);
        Assert.Equal(Pattern(64 * KiB, 3), all[(2 * MiB)..(2 * MiB + 64 * KiB)]);
    }

    /// <summary>Runs a callback (once) before the first listing of one prefix goes to the store.</summary>
    private sealed class ListHookStore(MemoryObjectStore inner, string prefix, Func<Task> before) : IObjectStore
    {
        private int _fired;

        public Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken) =>
            inner.GetAsync(key, start, destination, cancellationToken);

        public Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken) => inner.PutAsync(key, data, length, cancellationToken);

        public Task DeleteAsync(string key, CancellationToken cancellationToken) => inner.DeleteAsync(key, cancellationToken);

        public async IAsyncEnumerable<string> ListAsync(string listPrefix, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
        {
            if (listPrefix == prefix && Interlocked.Exchange(ref _fired, 1) == 0)
            {
                await before();
            }
            await foreach (string key in inner.ListAsync(listPrefix, cancellationToken))
            {
                yield return key;
            }
        }

        public void Dispose()
        {
        }
    }

    [Fact]
    public async Task A_FLUSH_batch_checks_the_fence_with_one_GET()
    {
        var store = new FenceCheckStore(new MemoryObjectStore());
        using S3LogBackend device = Open(store);
        int before = store.Checks;
        store.CheckDelay = TimeSpan.FromMilliseconds(50);
        await Task.WhenAll(Enumerable.Range(0, 16).Select(async i =>
        {
            await device.WriteAsync(i * 4 * KiB, Pattern(4 * KiB, i), fua: false);
            await device.FlushAsync();
        }));
        int checks = store.Checks - before;
        Assert.InRange(checks, 1, 4); // one in flight, the rest share the next
    }

    [Fact]
    public async Task A_bucket_written_before_fencing_opens_with_all_its_data_and_older_terms_replay()
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[DiskSize];
        // Two owners of the code before fencing: segments of terms 1 and 2, no fence objects.
        for (int owner = 0; owner < 2; owner++)
        {
            S3LogBackend old = Open(store);
            await old.WriteAsync(owner * 512 * KiB, Pattern(600 * KiB, 10 + owner), fua: false);
            await old.FlushAsync();
            Pattern(600 * KiB, 10 + owner).CopyTo(model, owner * 512 * KiB);
            old.Abandon();
            foreach (string fence in FenceKeys(store))
            {
                await store.DeleteAsync(fence, CancellationToken.None);
            }
        }

        using (S3LogBackend device = Open(store))
        {
            Assert.Equal(0, device.StaleSegments);
            Assert.Equal(0, device.IgnoredSegments);
            Assert.Equal(model, await ReadAllAsync(device));
            Assert.Equal([LogSegment.FenceKey("disk", device.Term)], FenceKeys(store));
        }
        // A later gateway of the old code opens it (it lists past the fence) and writes under term 4:
        // a term above the newest fence replays as far as it is whole.
        byte[] late = Pattern(64 * KiB, 20);
        byte[] segment = new byte[LogSegment.HeaderSize + LogSegment.RecordHeaderSize + late.Length + LogSegment.TrailerSize];
        LogSegment.WriteHeader(segment, term: 4, seq: 0);
        LogSegment.WriteRecordHeader(segment.AsSpan(LogSegment.HeaderSize), 3 * MiB, late.Length, LogRecordKind.Write);
        late.CopyTo(segment, LogSegment.HeaderSize + LogSegment.RecordHeaderSize);
        LogSegment.Seal(segment, LogSegment.HeaderSize + LogSegment.RecordHeaderSize + late.Length, records: 1);
        store.Put(LogSegment.Key("disk", 4, 0), segment);
        late.CopyTo(model, 3 * MiB);

        using S3LogBackend again = Open(store);
        Assert.Equal(5, again.Term);
        Assert.Equal(0, again.IgnoredSegments);
        Assert.Equal(model, await ReadAllAsync(again));
    }

    [Fact]
    public async Task Kill_after_FLUSH_loses_nothing_flushed_over_owners_and_a_dead_opens_claim()
    {
        var store = new MemoryObjectStore { PutDelay = TimeSpan.FromMilliseconds(20) };
        byte[] model = new byte[DiskSize];
        var random = new Random(7);
        for (int owner = 0; owner < 6; owner++)
        {
            S3LogBackend device = Open(store);
            byte[] read = await ReadAllAsync(device);
            Assert.True(model.AsSpan().SequenceEqual(read), $"owner {owner}: flushed bytes differ");
            Assert.Equal(0, device.StaleSegments);
            for (int i = 0; i < 20; i++)
            {
                int offset = random.Next(DiskSize - 64 * KiB);
                byte[] data = Pattern(1 + random.Next(64 * KiB - 1), owner * 100 + i);
                await device.WriteAsync(offset, data, fua: false);
                data.CopyTo(model, offset);
            }
            await device.FlushAsync();
            if (owner == 3)
            {
                await device.CompactAsync();
            }
            await device.WriteAsync(0, Pattern(4 * KiB, 999), fua: false); // unflushed: dies with the process
            device.Abandon(); // kill -9: no close, nothing more stored
            // The gateway after this one died inside its open, after its claim and before its fence was complete.
            if (owner % 2 == 1)
            {
                byte[] claim = LogSegment.Fence(device.Term + 1, null);
                store.Put(LogSegment.FenceKey("disk", device.Term + 1), claim);
            }
        }
        using S3LogBackend last = Open(store);
        Assert.Equal(model, await ReadAllAsync(last));
        Assert.Equal(10, FenceKeys(store).Count); // one per open and per dead open's claim: never deleted, they fence their term - 1
    }

    [Fact]
    public void Fence_round_trips_and_a_cut_or_flipped_byte_is_no_fence()
    {
        var ends = new Dictionary<long, long> { [3] = 17, [5] = 0, [1] = 1L << 40 };
        byte[] fence = LogSegment.Fence(6, ends);
        var decoded = new Dictionary<long, long>();
        Assert.True(LogSegment.TryDecodeFence(fence, 6, out bool complete, decoded));
        Assert.True(complete);
        Assert.Equal(ends.OrderBy(e => e.Key), decoded.OrderBy(e => e.Key));
        Assert.False(LogSegment.TryDecodeFence(fence, 7, out _, decoded), "another term's key");
        for (int cut = 0; cut < fence.Length; cut++)
        {
            Assert.False(LogSegment.TryDecodeFence(fence.AsSpan(0, cut), 6, out _, decoded), $"cut at {cut}");
        }
        for (int i = 0; i < fence.Length; i++)
        {
            fence[i] ^= 0x04;
            Assert.False(LogSegment.TryDecodeFence(fence, 6, out _, decoded), $"byte {i} flipped");
            fence[i] ^= 0x04;
        }
        Assert.True(LogSegment.TryDecodeFence(LogSegment.Fence(2, null), 2, out complete, decoded));
        Assert.False(complete);
        string key = LogSegment.FenceKey("p", 0x1f);
        Assert.True(LogSegment.TryParseFenceKey("p", key, out long term));
        Assert.Equal(0x1f, term);
        Assert.False(LogSegment.TryParseKey("p", key, out _, out _));
        Assert.False(LogSegment.TryParseFoldKey("p", key, out _, out _));
    }

    /// <summary>Counts GETs of fence objects (the FLUSH checks) and can slow them.</summary>
    private sealed class FenceCheckStore(MemoryObjectStore inner) : IObjectStore
    {
        private int _checks;

        public int Checks => Volatile.Read(ref _checks);

        public TimeSpan CheckDelay { get; set; }

        public async Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken)
        {
            if (LogSegment.TryParseFenceKey("disk", key, out _))
            {
                Interlocked.Increment(ref _checks);
                await Task.Delay(CheckDelay, cancellationToken);
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
}

/// <summary>Fencing and open time against the loopback s3rver.</summary>
public sealed class S3LogFencingServerTests(ITestOutputHelper output) : IAsyncLifetime
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;

    public Task InitializeAsync() => S3TestServer.EnsureBucketAsync();

    public Task DisposeAsync() => Task.CompletedTask;

    private static S3LogBackend Open(string prefix, bool readOnly = false, int cacheBytes = 2 * MiB, int checkpointSegments = 0) =>
        S3LogBackend.OpenAsync(new S3ObjectStore(S3TestServer.Location()), prefix, 4 * MiB, readOnly,
            S3LogFencingTests.Options(cacheBytes) with { LogCheckpointSegments = checkpointSegments }).GetAwaiter().GetResult();

    [Fact]
    public async Task A_stale_owners_FLUSH_fails_and_a_third_open_sees_exactly_the_new_owners_data()
    {
        string prefix = S3TestServer.NewPrefix("log-fence");
        using S3LogBackend a = Open(prefix);
        byte[] model = await S3LogFencingTests.SplitBrainAsync(a, () => Open(prefix));

        using S3LogBackend c = Open(prefix, cacheBytes: 1);
        Assert.Equal(1, c.StaleSegments);
        Assert.Equal(model, await ReadAllAsync(c));
    }

    /// <summary>Figures, not a time limit: run with --logger "console;verbosity=detailed".</summary>
    [Fact]
    public async Task Open_time_against_the_number_of_segments()
    {
        foreach (int count in new[] { 10, 100, 1000 })
        {
            string prefix = S3TestServer.NewPrefix("log-opentime");
            byte[] model = new byte[4 * MiB];
            var random = new Random(count);
            var write = Stopwatch.StartNew();
            using (S3LogBackend device = Open(prefix))
            {
                for (int i = 0; i < count; i++)
                {
                    int offset = random.Next(4 * MiB - 4 * KiB) & ~511;
                    byte[] data = Pattern(4 * KiB, i);
                    await device.WriteAsync(offset, data, fua: true); // one segment each
                    data.CopyTo(model, offset);
                }
                device.Abandon();
            }
            write.Stop();
            string full = await OpenTimesAsync(prefix, count, model, expectCheckpointed: false);
            var writable = Stopwatch.StartNew();
            using (S3LogBackend owner = Open(prefix))
            {
                writable.Stop();
                Assert.Equal(count, owner.ReplayedSegments);
                await owner.CheckpointAsync();
                owner.Abandon();
            }
            string fromCheckpoint = await OpenTimesAsync(prefix, count, model, expectCheckpointed: true);
            output.WriteLine($"open-time segments={count}: replaying every segment, read-only opens {full} ms, the writable open (claim, replay, fence) " +
                $"{writable.Elapsed.TotalMilliseconds:F0} ms; from a checkpoint, read-only opens {fromCheckpoint} ms; writing them took {write.Elapsed.TotalMilliseconds:F0} ms");
        }
    }

    private async Task<string> OpenTimesAsync(string prefix, int count, byte[] model, bool expectCheckpointed)
    {
        var times = new List<double>();
        for (int run = 0; run < 3; run++)
        {
            var open = Stopwatch.StartNew();
            using S3LogBackend reopened = Open(prefix, readOnly: true);
            open.Stop();
            times.Add(open.Elapsed.TotalMilliseconds);
            Assert.Equal(expectCheckpointed ? (count, 0) : (0, count), (reopened.CheckpointedSegments, reopened.ReplayedSegments));
            if (run == 0)
            {
                Assert.Equal(model, await ReadAllAsync(reopened));
            }
        }
        return string.Join(" / ", times.Select(t => t.ToString("F0")));
    }
}
