using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;
using static Gateway.Tests.Backends.S3.S3TestData;

namespace Gateway.Tests.Backends.S3;

/// <summary>The block device contract on the write-log path, over an in-memory store.</summary>
public sealed class S3LogBackendMemoryStoreContractTests : BlockDeviceContract
{
    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        S3LogBackend.OpenAsync(new MemoryObjectStore(), "disk", size, readOnly, new S3DeviceOptions
        {
            ObjectSize = 64 * KiB,
            CacheBytes = 2 * MiB,
            WriteLog = true,
            LogSegmentBytes = 256 * KiB,
            LogDirtyBytes = 4 * MiB,
        }).GetAwaiter().GetResult();
}

/// <summary>The segment format and the extent index on their own.</summary>
public sealed class S3LogFormatTests
{
    [Fact]
    public void Segment_round_trips_and_any_flipped_byte_or_cut_makes_it_corrupt()
    {
        byte[] buffer = new byte[4096];
        LogSegment.WriteHeader(buffer, term: 3, seq: 7);
        int length = LogSegment.HeaderSize;
        LogSegment.WriteRecordHeader(buffer.AsSpan(length), 4096, 100, LogRecordKind.Write);
        length += LogSegment.RecordHeaderSize;
        buffer.AsSpan(length, 100).Fill(0xAB);
        length += 100;
        LogSegment.WriteRecordHeader(buffer.AsSpan(length), 1L << 40, 1L << 33, LogRecordKind.Trim);
        length += LogSegment.RecordHeaderSize;
        length = LogSegment.Seal(buffer, length, records: 2);

        var records = new List<LogRecord>();
        Assert.True(LogSegment.TryDecode(buffer.AsSpan(0, length), 3, 7, records));
        Assert.Equal([new LogRecord(4096, 100, LogRecordKind.Write, LogSegment.HeaderSize + LogSegment.RecordHeaderSize),
            new LogRecord(1L << 40, 1L << 33, LogRecordKind.Trim, LogSegment.HeaderSize + 2 * LogSegment.RecordHeaderSize + 100)], records);
        Assert.False(LogSegment.TryDecode(buffer.AsSpan(0, length), 3, 8, records), "a segment under another key");
        for (int cut = 0; cut < length; cut += 7)
        {
            Assert.False(LogSegment.TryDecode(buffer.AsSpan(0, cut), 3, 7, records), $"cut at {cut}");
        }
        for (int i = 0; i < length; i += 5)
        {
            buffer[i] ^= 0x10;
            Assert.False(LogSegment.TryDecode(buffer.AsSpan(0, length), 3, 7, records), $"byte {i} flipped");
            buffer[i] ^= 0x10;
        }
    }

    [Fact]
    public void Segment_keys_sort_in_replay_order_and_parse_back()
    {
        string a = LogSegment.Key("p", 1, 0xff);
        string b = LogSegment.Key("p", 1, 0x100);
        string c = LogSegment.Key("p", 2, 0);
        Assert.True(string.CompareOrdinal(a, b) < 0 && string.CompareOrdinal(b, c) < 0);
        Assert.True(LogSegment.TryParseKey("p", b, out long term, out long seq));
        Assert.Equal((1, 0x100), (term, seq));
        Assert.False(LogSegment.TryParseKey("p", "p/0000000000000001", out _, out _));
        Assert.False(LogSegment.TryParseKey("p", "p/log/0000000000000001-00000000000000zz", out _, out _));
    }

    [Fact]
    public void Index_keeps_the_newest_source_of_overlapping_writes_across_pages()
    {
        var index = new ExtentIndex();
        var s1 = new LogSegmentBuffer(1, 0, "s1");
        var s2 = new LogSegmentBuffer(1, 1, "s2");
        index.Set(0, 3 << 20, ExtentSource.Segment, s1, 1000);        // 3 MiB over three pages
        index.Set((1 << 20) - 10, 20, ExtentSource.Segment, s2, 50);  // straddles a page edge
        index.Set(2 << 20, 4096, ExtentSource.Trim);
        index.Set((2 << 20) + 100, 10, ExtentSource.Zero);            // inside the trim: splits it in three

        var pieces = new List<IndexPiece>();
        index.Lookup(0, 4 << 20, pieces);

        Assert.Equal(
        [
            new IndexPiece(0, (1 << 20) - 10, ExtentSource.Segment, s1, 1000),
            new IndexPiece((1 << 20) - 10, 20, ExtentSource.Segment, s2, 50),
            new IndexPiece((1 << 20) + 10, (1 << 20) - 10, ExtentSource.Segment, s1, 1000 + (1 << 20) + 10),
            new IndexPiece(2 << 20, 100, ExtentSource.Trim, null, 0),
            new IndexPiece((2 << 20) + 100, 10, ExtentSource.Zero, null, 0),
            new IndexPiece((2 << 20) + 110, 4096 - 110, ExtentSource.Trim, null, 0),
            new IndexPiece((2 << 20) + 4096, (1 << 20) - 4096, ExtentSource.Segment, s1, 1000 + (2 << 20) + 4096),
            new IndexPiece(3 << 20, 1 << 20, ExtentSource.Base, null, 0),
        ], pieces);
    }

    [Fact]
    public void Index_matches_a_byte_model_under_random_overlapping_sets()
    {
        const int Size = 3 << 20;
        var index = new ExtentIndex();
        var segments = Enumerable.Range(0, 8).Select(i => new LogSegmentBuffer(1, i, $"s{i}")).ToArray();
        // Each byte's model value: which segment and offset in it, or -1 base, -2 trim.
        var model = new (int Segment, long At)[Size];
        Array.Fill(model, (-1, 0));
        var random = new Random(5);
        for (int op = 0; op < 3000; op++)
        {
            int offset = random.Next(Size - 1);
            int length = 1 + random.Next(Math.Min(Size - offset, random.Next(4) == 0 ? 1 << 20 : 9000) - 1);
            if (random.Next(5) == 0)
            {
                index.Set(offset, length, ExtentSource.Trim);
                model.AsSpan(offset, length).Fill((-2, 0));
            }
            else
            {
                int s = random.Next(segments.Length);
                long at = random.Next(1 << 30);
                index.Set(offset, length, ExtentSource.Segment, segments[s], at);
                for (int i = 0; i < length; i++)
                {
                    model[offset + i] = (s, at + i);
                }
            }
        }

        var pieces = new List<IndexPiece>();
        index.Lookup(0, Size, pieces);
        long expectedStart = 0;
        foreach (IndexPiece piece in pieces)
        {
            Assert.Equal(expectedStart, piece.Offset);
            for (long i = piece.Offset; i < piece.Offset + piece.Length; i++)
            {
                (int Segment, long At) want = piece.Source switch
                {
                    ExtentSource.Base => (-1, 0),
                    ExtentSource.Trim => (-2, 0),
                    _ => (Array.IndexOf(segments, piece.Segment), piece.SegmentOffset + (i - piece.Offset)),
                };
                Assert.True(model[i] == want, $"byte {i}: index says {want}, model {model[i]}");
            }
            expectedStart += piece.Length;
        }
        Assert.Equal(Size, expectedStart);
    }
}

/// <summary>The write-log device over an in-memory store: durability, replay, torn segments, bounded memory.</summary>
public sealed class S3LogBackendTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;

    private static S3DeviceOptions Options(long dirty = 8 * MiB, int segment = 256 * KiB, TimeSpan? delay = null) => new()
    {
        ObjectSize = 64 * KiB,
        CacheBytes = 2 * MiB,
        WriteLog = true,
        LogSegmentBytes = segment,
        LogDirtyBytes = dirty,
        LogSegmentDelay = delay ?? TimeSpan.FromMinutes(10), // only size, FLUSH and FUA seal, unless a test wants the timer
        LogCompactOnClose = false, // these tests look at the log a closed device leaves; compaction has its own
        LogCompactIdle = TimeSpan.FromHours(1),
    };

    private static S3LogBackend Open(IObjectStore store, long size = 4 * MiB, S3DeviceOptions? options = null) =>
        S3LogBackend.OpenAsync(store, "disk", size, readOnly: false, options ?? Options(), ownsStore: false).GetAwaiter().GetResult();

    private static List<string> SegmentKeys(MemoryObjectStore store) =>
        store.Objects.Keys.Where(k => LogSegment.TryParseKey("disk", k, out _, out _)).Order(StringComparer.Ordinal).ToList();

    /// <summary>Random writes, trims and zeroes against a byte model; returns the model.</summary>
    private static async Task<byte[]> RandomOpsAsync(IBlockDevice device, byte[] model, int ops, int seed)
    {
        var random = new Random(seed);
        for (int op = 0; op < ops; op++)
        {
            int offset = random.Next((int)device.Size - 1);
            int length = 1 + random.Next(Math.Min((int)device.Size - offset, random.Next(8) == 0 ? 300 * KiB : 20 * KiB) - 1);
            switch (random.Next(10))
            {
                case 0:
                    await device.TrimAsync(offset, length, fua: false);
                    model.AsSpan(offset, length).Clear();
                    break;
                case 1:
                    await device.ZeroAsync(offset, length, random.Next(2) == 0 ? ZeroFlags.NoHole : ZeroFlags.None);
                    model.AsSpan(offset, length).Clear();
                    break;
                default:
                    byte[] data = Pattern(length, seed * 100_000 + op);
                    await device.WriteAsync(offset, data, fua: random.Next(50) == 0);
                    data.CopyTo(model, offset);
                    break;
            }
        }
        return model;
    }

    [Fact]
    public async Task Overlapping_writes_read_back_newest_first_before_and_after_reopen()
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[4 * MiB];
        using (S3LogBackend device = Open(store))
        {
            await RandomOpsAsync(device, model, ops: 600, seed: 1);
            Assert.Equal(model, await ReadAllAsync(device));
            await device.FlushAsync();
        }

        using S3LogBackend reopened = Open(store);
        Assert.True(reopened.ReplayedSegments > 1, $"{reopened.ReplayedSegments} segments replayed");
        Assert.Equal(0, reopened.IgnoredSegments);
        Assert.Equal(model, await ReadAllAsync(reopened));
    }

    [Fact]
    public async Task Reopen_replays_the_same_bytes_and_the_same_allocation_even_with_a_cold_cache()
    {
        var store = new MemoryObjectStore();
        byte[] model = new byte[4 * MiB];
        Extent[] before;
        using (S3LogBackend device = Open(store))
        {
            await RandomOpsAsync(device, model, ops: 400, seed: 2);
            await device.FlushAsync();
            before = await AllocationAsync(device);
        }

        // A cache too small for any segment: every read is a ranged GET of a segment object.
        using S3LogBackend reopened = Open(store, options: Options() with { CacheBytes = 1 });
        Assert.Equal(model, await ReadAllAsync(reopened));
        Assert.Equal(before, await AllocationAsync(reopened));
        Assert.True(store.Gets.Keys.Count(k => k.StartsWith("disk/log/", StringComparison.Ordinal)) > 0);
    }

    [Fact]
    public async Task Trim_and_zero_are_records_without_data_and_allocation_stays_exact()
    {
        var store = new MemoryObjectStore();
        using (S3LogBackend device = Open(store, options: Options(segment: 2 * MiB)))
        {
            await device.WriteAsync(0, Pattern(MiB, 3), fua: false);
            await device.TrimAsync(128 * KiB, 128 * KiB, fua: false);
            await device.ZeroAsync(512 * KiB, 64 * KiB, ZeroFlags.NoHole);
            await device.ZeroAsync(3 * MiB, MiB, ZeroFlags.None); // never written: still a hole
            await device.FlushAsync();
        }
        // One segment: a megabyte of data and three records of 24 bytes, no zeros stored.
        byte[] segment = store.Objects[Assert.Single(SegmentKeys(store))];
        Assert.Equal(LogSegment.HeaderSize + 4 * LogSegment.RecordHeaderSize + MiB + LogSegment.TrailerSize, segment.Length);

        using S3LogBackend reopened = Open(store);
        Assert.Equal(
        [
            new Extent(128 * KiB, ExtentFlags.Data),
            new Extent(128 * KiB, ExtentFlags.Hole | ExtentFlags.Zero),
            new Extent(256 * KiB, ExtentFlags.Data),
            new Extent(64 * KiB, ExtentFlags.Zero),
            new Extent(448 * KiB, ExtentFlags.Data),
            new Extent(3 * MiB, ExtentFlags.Hole | ExtentFlags.Zero),
        ], await AllocationAsync(reopened));
        byte[] all = await ReadAllAsync(reopened);
        Assert.True(all.AsSpan(128 * KiB, 128 * KiB).IndexOfAnyExcept((byte)0) < 0);
        Assert.True(all.AsSpan(512 * KiB, 64 * KiB).IndexOfAnyExcept((byte)0) < 0);
        Assert.Equal(Pattern(MiB, 3).AsSpan(256 * KiB, 256 * KiB), all.AsSpan(256 * KiB, 256 * KiB));
    }

    [Fact]
    public async Task Every_flushed_byte_is_back_after_a_crash_and_unflushed_ones_may_be_lost()
    {
        // Slow PUTs: a FLUSH that replied before its segments were stored would be caught by the reopen.
        var store = new MemoryObjectStore { PutDelay = TimeSpan.FromMilliseconds(100) };
        byte[] model = new byte[4 * MiB];
        S3LogBackend device = Open(store);
        await RandomOpsAsync(device, model, ops: 300, seed: 4);
        await device.FlushAsync();
        byte[] flushed = (byte[])model.Clone();
        // After the flush: writes that stay in the open segment, then the process "dies".
        await device.WriteAsync(MiB, Pattern(8 * KiB, 44), fua: false);
        device.Abandon();

        using S3LogBackend reopened = Open(store);
        byte[] all = await ReadAllAsync(reopened);
        Assert.True(flushed.AsSpan(0, MiB).SequenceEqual(all.AsSpan(0, MiB)), "flushed bytes before the unflushed write changed");
        Assert.True(flushed.AsSpan(MiB + 8 * KiB).SequenceEqual(all.AsSpan(MiB + 8 * KiB)), "flushed bytes after the unflushed write changed");
        Assert.True(reopened.Term > device.Term, "the new owner writes under a new term");
    }

    [Fact]
    public async Task A_FUA_write_is_stored_before_it_returns()
    {
        var store = new MemoryObjectStore { PutDelay = TimeSpan.FromMilliseconds(100) };
        S3LogBackend device = Open(store);
        await device.WriteAsync(0, Pattern(4 * KiB, 5), fua: false);
        await device.WriteAsync(8 * KiB, Pattern(4 * KiB, 6), fua: true);
        device.Abandon();

        using S3LogBackend reopened = Open(store);
        byte[] all = await ReadAllAsync(reopened);
        Assert.Equal(Pattern(4 * KiB, 5), all[..(4 * KiB)]);
        Assert.Equal(Pattern(4 * KiB, 6), all[(8 * KiB)..(12 * KiB)]);
    }

    [Theory]
    [InlineData("truncated")]
    [InlineData("flipped")]
    [InlineData("empty")]
    public async Task A_torn_last_segment_is_ignored_and_everything_before_it_kept(string damage)
    {
        var store = new MemoryObjectStore();
        byte[] first = Pattern(200 * KiB, 7);
        using (S3LogBackend device = Open(store))
        {
            await device.WriteAsync(0, first, fua: false);
            await device.FlushAsync();
            await device.WriteAsync(100 * KiB, Pattern(200 * KiB, 8), fua: false);
            await device.TrimAsync(0, 50 * KiB, fua: false);
            await device.FlushAsync();
        }
        List<string> keys = SegmentKeys(store);
        Assert.Equal(2, keys.Count);
        byte[] last = store.Objects[keys[1]];
        store.Put(keys[1], damage switch
        {
            "truncated" => last[..(last.Length / 2)],
            "flipped" => last.Select((b, i) => i == last.Length / 3 ? (byte)(b ^ 1) : b).ToArray(),
            _ => [],
        });

        using S3LogBackend reopened = Open(store);
        Assert.Equal((1, 1), (reopened.ReplayedSegments, reopened.IgnoredSegments));
        byte[] all = await ReadAllAsync(reopened);
        Assert.Equal(first, all[..first.Length]);
        Assert.True(all.AsSpan(first.Length).IndexOfAnyExcept((byte)0) < 0);
        // The next owner writes on, under a new term, and a later open keeps both.
        await reopened.WriteAsync(300 * KiB, Pattern(4 * KiB, 9), fua: true);
        using S3LogBackend again = Open(store);
        byte[] later = await ReadAllAsync(again);
        Assert.Equal(first, later[..first.Length]);
        Assert.Equal(Pattern(4 * KiB, 9), later[(300 * KiB)..(304 * KiB)]);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task A_last_segment_whose_body_keeps_ending_early_is_torn_and_any_other_read_failure_fails_the_open(bool endsEarly)
    {
        // s3rver keeps the part of a PUT a kill -9 cut off and announces more than it holds: the
        // GET's body ends early, every time. That PUT was never answered, so nothing on it was
        // acknowledged. Any other failure is the store's, and the open must not guess.
        var store = new MemoryObjectStore();
        byte[] first = Pattern(200 * KiB, 17);
        using (S3LogBackend device = Open(store))
        {
            await device.WriteAsync(0, first, fua: true);
            await device.WriteAsync(100 * KiB, Pattern(200 * KiB, 18), fua: true);
        }
        List<string> keys = SegmentKeys(store);
        Assert.Equal(2, keys.Count);
        var failing = new FailingGetStore(store, keys[1], endsEarly
            ? new HttpIOException(HttpRequestError.ResponseEnded, "The response ended prematurely")
            : new IOException("connection reset"));
        if (!endsEarly)
        {
            await Assert.ThrowsAsync<BlockDeviceException>(() => S3LogBackend.OpenAsync(failing, "disk", 4 * MiB, readOnly: false, Options(), ownsStore: false));
            return;
        }
        using S3LogBackend reopened = Open(failing);
        Assert.Equal((1, 1), (reopened.ReplayedSegments, reopened.IgnoredSegments));
        Assert.Equal(3, failing.Failures); // tried three times before calling it torn
        byte[] all = await ReadAllAsync(reopened);
        Assert.Equal(first, all[..first.Length]);
        Assert.True(all.AsSpan(first.Length).IndexOfAnyExcept((byte)0) < 0);
    }

    /// <summary>Every GET of one key fails with the given exception, as the SDK's response stream throws it.</summary>
    private sealed class FailingGetStore(MemoryObjectStore inner, string key, Exception failure) : IObjectStore
    {
        public int Failures;

        public Task<int> GetAsync(string key1, long start, Memory<byte> destination, CancellationToken cancellationToken)
        {
            if (key1 == key)
            {
                Interlocked.Increment(ref Failures);
                return Task.FromException<int>(failure);
            }
            return inner.GetAsync(key1, start, destination, cancellationToken);
        }

        public Task PutAsync(string key1, byte[] data, int length, CancellationToken cancellationToken) => inner.PutAsync(key1, data, length, cancellationToken);

        public Task DeleteAsync(string key1, CancellationToken cancellationToken) => inner.DeleteAsync(key1, cancellationToken);

        public IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken) => inner.ListAsync(prefix, cancellationToken);

        public void Dispose()
        {
        }
    }

    [Fact]
    public async Task A_segment_after_a_gap_in_its_term_is_not_replayed()
    {
        var store = new MemoryObjectStore();
        using (S3LogBackend device = Open(store))
        {
            for (int i = 0; i < 3; i++)
            {
                await device.WriteAsync(i * 64 * KiB, Pattern(64 * KiB, 10 + i), fua: true);
            }
        }
        List<string> keys = SegmentKeys(store);
        Assert.Equal(3, keys.Count);
        await store.DeleteAsync(keys[1], CancellationToken.None); // its PUT never landed; the later one did

        using S3LogBackend reopened = Open(store);
        Assert.Equal((1, 1), (reopened.ReplayedSegments, reopened.IgnoredSegments));
        byte[] all = await ReadAllAsync(reopened);
        Assert.Equal(Pattern(64 * KiB, 10), all[..(64 * KiB)]);
        Assert.True(all.AsSpan(64 * KiB).IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact]
    public async Task Base_chunk_objects_show_through_where_the_log_has_nothing()
    {
        var store = new MemoryObjectStore();
        byte[] chunk = Pattern(64 * KiB, 11);
        store.Put(S3DeviceOptions.Key("disk", 2), chunk); // written by the chunk path or nbdkit
        using S3LogBackend device = Open(store);
        await device.WriteAsync(2 * 64 * KiB + 1000, Pattern(100, 12), fua: false);

        byte[] all = await ReadAllAsync(device);
        byte[] expected = (byte[])chunk.Clone();
        Pattern(100, 12).CopyTo(expected, 1000);
        Assert.Equal(expected, all[(128 * KiB)..(192 * KiB)]);
        Assert.Equal(
        [
            new Extent(128 * KiB, ExtentFlags.Hole | ExtentFlags.Zero),
            new Extent(64 * KiB, ExtentFlags.Data),
            new Extent(4 * MiB - 192 * KiB, ExtentFlags.Hole | ExtentFlags.Zero),
        ], await AllocationAsync(device));
        await device.TrimAsync(128 * KiB, 64 * KiB, fua: false);
        Assert.True((await ReadAllAsync(device)).AsSpan(128 * KiB, 64 * KiB).IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact]
    public async Task Writers_wait_when_dirty_memory_is_full_and_go_on_when_the_store_takes_it()
    {
        var store = new MemoryObjectStore();
        using S3LogBackend device = Open(store, options: Options(dirty: 512 * KiB, segment: 128 * KiB));
        store.Down = true;
        Task? blocked = null;
        for (int i = 0; i < 64 && blocked is null; i++)
        {
            ValueTask write = device.WriteAsync(i * 64 * KiB % (4 * MiB), Pattern(64 * KiB, i), fua: false);
            Task t = write.AsTask();
            if (await Task.WhenAny(t, Task.Delay(300)) != t)
            {
                blocked = t;
            }
        }
        Assert.NotNull(blocked);
        Assert.InRange(device.DirtyBytes, 512 * KiB, 512 * KiB + 64 * KiB + 2 * LogSegment.RecordHeaderSize + 64);

        store.Down = false; // the timer retries the failed uploads, which frees the room
        await blocked.WaitAsync(TimeSpan.FromSeconds(20));
        await device.FlushAsync();
        Assert.Equal(0, device.DirtyBytes);
    }

    [Fact]
    public async Task A_FLUSH_while_the_store_is_down_fails_and_the_next_one_stores_everything()
    {
        var store = new MemoryObjectStore();
        S3LogBackend device = Open(store);
        await device.WriteAsync(0, Pattern(32 * KiB, 13), fua: false);
        store.Down = true;
        await Assert.ThrowsAsync<BlockDeviceException>(async () => await device.FlushAsync());
        store.Down = false;
        await device.FlushAsync();
        device.Abandon();

        using S3LogBackend reopened = Open(store);
        Assert.Equal(Pattern(32 * KiB, 13), (await ReadAllAsync(reopened))[..(32 * KiB)]);
    }

    [Fact]
    public async Task The_chunk_path_refuses_a_prefix_that_holds_a_log()
    {
        var store = new MemoryObjectStore();
        using (S3LogBackend device = Open(store))
        {
            await device.WriteAsync(0, Pattern(4 * KiB, 15), fua: true);
        }

        BlockDeviceException e = await Assert.ThrowsAsync<BlockDeviceException>(() =>
            S3Backend.OpenAsync(store, "disk", 4 * MiB, readOnly: false, new S3DeviceOptions { ObjectSize = 64 * KiB, CacheBytes = 2 * MiB }, ownsStore: false));
        Assert.Contains("write log", e.Message);
    }

    [Fact]
    public async Task The_timer_stores_a_segment_without_a_FLUSH()
    {
        var store = new MemoryObjectStore();
        using S3LogBackend device = Open(store, options: Options(delay: TimeSpan.FromMilliseconds(20)));
        await device.WriteAsync(0, Pattern(4 * KiB, 14), fua: false);
        for (int i = 0; i < 200 && SegmentKeys(store).Count == 0; i++)
        {
            await Task.Delay(10);
        }
        Assert.Single(SegmentKeys(store));
    }
}

/// <summary>The contract suite on the write log against the loopback s3rver (ranged GETs of real segment objects).</summary>
public sealed class S3LogBackendContractTests : BlockDeviceContract, IAsyncLifetime
{
    public Task InitializeAsync() => S3TestServer.EnsureBucketAsync();

    public Task DisposeAsync() => Task.CompletedTask;

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        S3LogBackend.OpenAsync(new S3ObjectStore(S3TestServer.Location()), S3TestServer.NewPrefix("log-contract"), size, readOnly, new S3DeviceOptions
        {
            ObjectSize = 64 * KiB,
            CacheBytes = 1, // no segment stays cached: reads of stored segments are ranged GETs
            WriteLog = true,
            LogSegmentBytes = 256 * KiB,
            LogDirtyBytes = 4 * MiB,
        }).GetAwaiter().GetResult();

    [Fact]
    public async Task Flushed_log_reads_back_from_the_server_through_a_new_device()
    {
        string prefix = S3TestServer.NewPrefix("log-reopen");
        var options = new S3DeviceOptions { ObjectSize = 64 * KiB, CacheBytes = 1, WriteLog = true, LogSegmentBytes = 256 * KiB, LogDirtyBytes = 4 * MiB };
        byte[] data = Pattern(3 * MiB + 1000, seed: 31);
        using (S3LogBackend device = await S3LogBackend.OpenAsync(new S3ObjectStore(S3TestServer.Location()), prefix, 8 * MiB, false, options))
        {
            await device.WriteAsync(12_345, data, fua: false);
            await device.TrimAsync(MiB, 64 * KiB, fua: false);
            await device.FlushAsync();
        }
        Array.Clear(data, MiB - 12_345, 64 * KiB);

        using S3LogBackend fresh = await S3LogBackend.OpenAsync(new S3ObjectStore(S3TestServer.Location()), prefix, 8 * MiB, false, options);
        Assert.Equal(0, fresh.IgnoredSegments);
        Assert.Equal(data, await ReadAsync(fresh, 12_345, data.Length));
        AssertZeros(await ReadAsync(fresh, 0, 12_345));
    }
}
