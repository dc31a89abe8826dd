using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;
using static Gateway.Tests.Backends.S3.S3TestData;

namespace Gateway.Tests.Backends.S3;

/// <summary>
/// The contract suite on the S3 backend against the loopback s3rver. 64 KiB objects: the suite's
/// allocation tests assume a granularity of at most 64 KiB. Every device gets its own prefix.
/// </summary>
public sealed class S3BackendContractTests : BlockDeviceContract, IAsyncLifetime
{
    private readonly List<string> _prefixes = [];

    public Task InitializeAsync() => S3TestServer.EnsureBucketAsync();

    public Task DisposeAsync() => Task.CompletedTask;

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        Open(NewPrefix(), size, readOnly);

    private string NewPrefix()
    {
        string prefix = S3TestServer.NewPrefix("contract");
        _prefixes.Add(prefix);
        return prefix;
    }

    private static S3Backend Open(string prefix, long size, bool readOnly = false, int objectSize = 64 * KiB) =>
        S3Backend.OpenAsync(new S3ObjectStore(S3TestServer.Location()), prefix, size, readOnly,
            new S3DeviceOptions { ObjectSize = objectSize, CacheBytes = 8 * MiB }).GetAwaiter().GetResult();

    // s3rver's failures are silent: these read back through a new device (cold cache, so from the
    // server) and compare content, not status codes.

    [Fact]
    public async Task Flushed_writes_read_back_from_the_server_through_a_new_device()
    {
        string prefix = NewPrefix();
        byte[] data = Pattern(3 * MiB + 1000, seed: 21);
        using (S3Backend device = Open(prefix, 8 * MiB))
        {
            await device.WriteAsync(12_345, data, fua: false);
            await device.FlushAsync();
        }

        using S3Backend fresh = Open(prefix, 8 * MiB);
        Assert.Equal(data, await ReadAsync(fresh, 12_345, data.Length));
        AssertZeros(await ReadAsync(fresh, 0, 12_345));
    }

    [Fact]
    public async Task Objects_are_prefix_slash_sixteen_hex_digits_of_object_size_bytes()
    {
        string prefix = NewPrefix();
        using S3Backend device = Open(prefix, 4 * MiB, objectSize: 64 * KiB);
        await device.WriteAsync(10L * 64 * KiB + 5, Pattern(100, seed: 22), fua: true);
        await device.WriteAsync(3 * MiB, Pattern(64 * KiB, seed: 23), fua: true);

        List<string> keys = await S3TestServer.KeysAsync(prefix);

        Assert.Equal([$"{prefix}/000000000000000a", $"{prefix}/0000000000000030"], keys.Order(StringComparer.Ordinal));
        using var store = new S3ObjectStore(S3TestServer.Location());
        byte[] whole = new byte[128 * KiB];
        Assert.Equal(64 * KiB, await store.GetAsync(keys[0], 0, whole, CancellationToken.None));
    }

    [Fact]
    public async Task Whole_chunk_trim_deletes_the_objects_on_the_server()
    {
        string prefix = NewPrefix();
        using S3Backend device = Open(prefix, MiB);
        await device.WriteAsync(0, Pattern(MiB, seed: 24), fua: true);
        Assert.Equal(16, (await S3TestServer.KeysAsync(prefix)).Count);

        await device.TrimAsync(64 * KiB, 512 * KiB, fua: true);

        Assert.Equal(8, (await S3TestServer.KeysAsync(prefix)).Count);
        using S3Backend fresh = Open(prefix, MiB);
        Extent[] extents = await AllocationAsync(fresh, 0, MiB);
        Assert.Equal([new Extent(64 * KiB, ExtentFlags.Data), new Extent(512 * KiB, ExtentFlags.Hole | ExtentFlags.Zero), new Extent(448 * KiB, ExtentFlags.Data)], extents);
    }

    [Fact]
    public async Task Listing_at_open_pages_through_more_than_a_thousand_objects()
    {
        string prefix = NewPrefix();
        const int Chunks = 1100;
        using (S3Backend device = Open(prefix, Chunks * 4 * KiB, objectSize: 4 * KiB))
        {
            await device.WriteAsync(0, Pattern(Chunks * 4 * KiB, seed: 25), fua: false);
            await device.FlushAsync();
        }

        using S3Backend fresh = Open(prefix, Chunks * 4 * KiB, objectSize: 4 * KiB);

        Assert.Equal([new Extent(Chunks * 4 * KiB, ExtentFlags.Data)], await AllocationAsync(fresh, 0, fresh.Size));
    }
}

/// <summary>The same contract on an in-memory object store: the cache logic without the network.</summary>
public sealed class S3BackendMemoryStoreContractTests : BlockDeviceContract
{
    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        S3Backend.OpenAsync(new MemoryObjectStore(), "disk", size, readOnly,
            new S3DeviceOptions { ObjectSize = 64 * KiB, CacheBytes = 2 * MiB }).GetAwaiter().GetResult();
}

/// <summary>The write-back cache: read-modify-write, ordering, eviction, faults, with a deterministic store.</summary>
public sealed class S3BackendCacheTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private const int Chunk = 64 * KiB;

    private static S3Backend Open(MemoryObjectStore store, long size = 4 * MiB, long cacheBytes = 4 * MiB, int parallelism = 8, TimeSpan? writeback = null) =>
        S3Backend.OpenAsync(store, "disk", size, readOnly: false, new S3DeviceOptions
        {
            ObjectSize = Chunk,
            CacheBytes = cacheBytes,
            Parallelism = parallelism,
            WritebackDelay = writeback ?? TimeSpan.FromMinutes(10), // no idle write-back unless a test wants it
        }, ownsStore: false).GetAwaiter().GetResult();

    [Fact]
    public async Task Unaligned_partial_writes_to_an_existing_object_read_it_once_per_chunk()
    {
        var store = new MemoryObjectStore();
        byte[] old = Pattern(Chunk, 1);
        store.Put("disk/0000000000000000", old);
        using S3Backend device = Open(store);

        // Twenty small unaligned writes into the same chunk.
        byte[] expected = (byte[])old.Clone();
        for (int i = 0; i < 20; i++)
        {
            byte[] data = Pattern(100, 100 + i);
            await device.WriteAsync(i * 1000 + 7, data, fua: false);
            data.CopyTo(expected, i * 1000 + 7);
        }
        await device.FlushAsync();

        Assert.Equal(1, store.GetCount("disk/0000000000000000"));
        Assert.Equal(1, store.PutCount("disk/0000000000000000"));
        Assert.Equal(expected, store.Objects["disk/0000000000000000"]);
    }

    [Fact]
    public async Task Sector_aligned_writes_to_an_existing_object_merge_with_one_read_at_upload()
    {
        var store = new MemoryObjectStore();
        byte[] old = Pattern(Chunk, 2);
        store.Put("disk/0000000000000000", old);
        using S3Backend device = Open(store);

        byte[] expected = (byte[])old.Clone();
        for (int i = 0; i < 8; i++)
        {
            byte[] data = Pattern(4 * KiB, 200 + i);
            await device.WriteAsync(i * 8 * KiB, data, fua: false);
            data.CopyTo(expected, i * 8 * KiB);
        }
        Assert.Equal(0, store.GetCount("disk/0000000000000000")); // nothing read yet
        await device.FlushAsync();

        Assert.Equal(1, store.GetCount("disk/0000000000000000"));
        Assert.Equal(expected, store.Objects["disk/0000000000000000"]);
    }

    [Fact]
    public async Task Writes_covering_a_whole_existing_chunk_never_read_it()
    {
        var store = new MemoryObjectStore();
        store.Put("disk/0000000000000001", Pattern(Chunk, 3));
        using S3Backend device = Open(store);
        byte[] data = Pattern(Chunk, 4);

        await device.WriteAsync(Chunk, data.AsMemory(0, Chunk / 2), fua: false);
        await device.WriteAsync(Chunk + Chunk / 2, data.AsMemory(Chunk / 2), fua: false);
        await device.FlushAsync();

        Assert.Equal(0, store.GetCount("disk/0000000000000001"));
        Assert.Equal(data, store.Objects["disk/0000000000000001"]);
    }

    [Fact]
    public async Task Fua_write_is_in_the_store_when_it_returns()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store);
        byte[] data = Pattern(3 * Chunk, 5);

        await device.WriteAsync(Chunk, data, fua: true);

        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(data.AsSpan(i * Chunk, Chunk).ToArray(), store.Objects[$"disk/{i + 1:x16}"]);
        }
    }

    [Fact]
    public async Task Unflushed_writes_stay_in_the_cache_until_flush()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store);
        await device.WriteAsync(100, Pattern(1000, 6), fua: false);

        Assert.Empty(store.Objects);
        await device.FlushAsync();
        Assert.Single(store.Objects);
    }

    [Fact]
    public async Task A_chunk_worth_of_writes_is_written_back_without_a_flush_once()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store);
        byte[] data = Pattern(4 * Chunk, 7);

        for (int offset = 0; offset < data.Length; offset += 16 * KiB)
        {
            await device.WriteAsync(offset, data.AsMemory(offset, 16 * KiB), fua: false);
        }

        for (int i = 0; i < 200 && store.Objects.Count < 4; i++)
        {
            await Task.Delay(10);
        }
        Assert.Equal(4, store.Objects.Count);
        await device.FlushAsync();
        Assert.All(Enumerable.Range(0, 4), i => Assert.Equal(1, store.PutCount($"disk/{i:x16}")));
    }

    [Fact]
    public async Task Idle_dirty_chunks_are_written_back_after_the_delay()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store, writeback: TimeSpan.FromMilliseconds(100));
        await device.WriteAsync(5, Pattern(10, 8), fua: false);

        for (int i = 0; i < 300 && store.Objects.Count == 0; i++)
        {
            await Task.Delay(10);
        }
        Assert.Single(store.Objects);
    }

    [Fact]
    public async Task Never_two_uploads_of_one_object_at_once()
    {
        var store = new MemoryObjectStore { PutDelay = TimeSpan.FromMilliseconds(5) };
        using S3Backend device = Open(store, parallelism: 16);

        // Many FUA writes to the same two chunks at once, plus flushes.
        await Task.WhenAll(Enumerable.Range(0, 64).Select(i => Task.Run(async () =>
        {
            await device.WriteAsync((i % 2) * Chunk + (i / 2) * 512, Pattern(512, 300 + i), fua: true);
            if (i % 8 == 0)
            {
                await device.FlushAsync();
            }
        })));

        Assert.Equal(0, store.OverlappingPuts);
        // And the last upload carried every write.
        for (int i = 0; i < 64; i++)
        {
            Assert.Equal(Pattern(512, 300 + i), store.Objects[$"disk/{i % 2:x16}"].AsSpan((i / 2) * 512, 512).ToArray());
        }
    }

    [Fact]
    public async Task Whole_chunk_trim_deletes_the_object_and_partial_trim_keeps_it()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store);
        await device.WriteAsync(0, Pattern(3 * Chunk, 9), fua: true);

        await device.TrimAsync(Chunk / 2, 2 * Chunk, fua: true);

        Assert.False(store.Objects.ContainsKey("disk/0000000000000001"));
        Assert.True(store.Objects.ContainsKey("disk/0000000000000000"));
        Assert.True(store.Objects.ContainsKey("disk/0000000000000002"));
        Assert.True(store.Objects["disk/0000000000000000"].AsSpan(Chunk / 2).IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact]
    public async Task Zero_with_no_hole_keeps_the_object()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store);
        await device.WriteAsync(0, Pattern(Chunk, 10), fua: true);

        await device.ZeroAsync(0, Chunk, ZeroFlags.NoHole | ZeroFlags.Fua);

        Assert.True(store.Objects["disk/0000000000000000"].AsSpan().IndexOfAnyExcept((byte)0) < 0);
        Assert.Empty(store.Deletes);
    }

    [Fact]
    public async Task Objects_present_at_open_are_data_and_missing_ones_holes()
    {
        var store = new MemoryObjectStore();
        store.Put("disk/0000000000000002", Pattern(Chunk, 11));
        store.Put("disk/0000000000000003", Pattern(Chunk, 12));
        store.Put("disk/not-a-chunk", [1]);
        store.Put("diskette/0000000000000000", [1]);
        using S3Backend device = Open(store, size: 8 * Chunk);

        var extents = new Extent[8];
        int count = await device.GetAllocationAsync(0, device.Size, extents);

        Assert.Equal([new Extent(2 * Chunk, ExtentFlags.Hole | ExtentFlags.Zero), new Extent(2 * Chunk, ExtentFlags.Data), new Extent(4 * Chunk, ExtentFlags.Hole | ExtentFlags.Zero)], extents[..count]);
        Assert.Equal(store.Objects["disk/0000000000000003"], await ReadAsync(device, 3 * Chunk, Chunk));
    }

    [Fact]
    public async Task A_short_last_object_reads_as_its_bytes_then_zeros_up_to_the_disks_end()
    {
        // An image cut into objects by another tool may end its last object at the disk's end.
        var store = new MemoryObjectStore();
        store.Put("disk/0000000000000000", Pattern(Chunk, 5));
        store.Put("disk/0000000000000001", [1, 2, 3]);
        using S3Backend device = Open(store, size: Chunk + 3);

        byte[] read = await ReadAsync(device, Chunk, 3);

        Assert.Equal([1, 2, 3], read);
    }

    [Fact]
    public async Task A_short_object_that_ends_before_the_disk_does_reads_as_EIO_not_zeros()
    {
        var store = new MemoryObjectStore();
        store.Put("disk/0000000000000000", [1, 2, 3]);
        using S3Backend device = Open(store);

        var e = await Assert.ThrowsAsync<BlockDeviceException>(() => ReadAsync(device, 0, Chunk));

        Assert.Equal(BlockErrorKind.Io, e.Kind);
        Assert.Contains("ends at byte 3", e.Message);
    }

    [Fact]
    public async Task Cache_stays_within_its_limit_and_evicted_chunks_read_back()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store, size: 4 * MiB, cacheBytes: 4 * Chunk);
        byte[] data = Pattern(2 * MiB, 13);

        for (int offset = 0; offset < data.Length; offset += 8 * KiB)
        {
            await device.WriteAsync(offset, data.AsMemory(offset, 8 * KiB), fua: false);
            Assert.True(device.CachedBytes <= 5 * Chunk, $"cache holds {device.CachedBytes} bytes");
        }
        await device.FlushAsync();

        Assert.Equal(data, await ReadAsync(device, 0, data.Length));
    }

    [Fact]
    public async Task Store_failure_gives_EIO_keeps_the_data_and_flush_succeeds_when_it_returns()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store);
        byte[] flushed = Pattern(Chunk, 14);
        await device.WriteAsync(0, flushed, fua: false);
        await device.FlushAsync();
        byte[] pending = Pattern(1000, 15);
        await device.WriteAsync(Chunk + 10, pending, fua: false);

        store.Down = true;
        var flush = await Assert.ThrowsAsync<BlockDeviceException>(() => device.FlushAsync().AsTask());
        var fua = await Assert.ThrowsAsync<BlockDeviceException>(() => device.WriteAsync(5 * Chunk, pending, fua: true).AsTask());
        var read = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(9 * Chunk, new byte[10]).AsTask().ContinueWith(t =>
        {
            // A hole needs no store; reading an existing uncached chunk does.
            if (t.IsCompletedSuccessfully)
            {
                throw new BlockDeviceException(BlockErrorKind.Io, "hole read without the store, as it may");
            }
            t.GetAwaiter().GetResult();
        }));
        Assert.Equal(BlockErrorKind.Io, flush.Kind);
        Assert.Equal(BlockErrorKind.Io, fua.Kind);
        Assert.Equal(BlockErrorKind.Io, read.Kind);

        store.Down = false;
        await device.FlushAsync();

        Assert.Equal(flushed, store.Objects["disk/0000000000000000"]);
        Assert.Equal(pending, store.Objects["disk/0000000000000001"].AsSpan(10, 1000).ToArray());
        Assert.Equal(pending, store.Objects["disk/0000000000000005"].AsSpan(0, 1000).ToArray());
    }

    [Fact]
    public async Task Read_of_an_uncached_existing_chunk_fails_with_EIO_while_the_store_is_down()
    {
        var store = new MemoryObjectStore();
        store.Put("disk/0000000000000000", Pattern(Chunk, 16));
        using S3Backend device = Open(store);

        store.Down = true;
        var e = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[Chunk]).AsTask());
        Assert.Equal(BlockErrorKind.Io, e.Kind);

        store.Down = false;
        Assert.Equal(store.Objects["disk/0000000000000000"], await ReadAsync(device, 0, Chunk));
    }

    [Fact]
    public async Task Trim_while_the_store_is_down_fails_and_changes_nothing()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store);
        byte[] data = Pattern(Chunk, 17);
        await device.WriteAsync(0, data, fua: true);

        store.Down = true;
        await Assert.ThrowsAsync<BlockDeviceException>(() => device.TrimAsync(0, Chunk, fua: false).AsTask());
        store.Down = false;

        Assert.Equal(data, await ReadAsync(device, 0, Chunk));
        Assert.Equal(data, store.Objects["disk/0000000000000000"]);
    }

    [Fact]
    public async Task Export_opens_while_the_store_is_down_and_lists_once_it_returns()
    {
        var store = new MemoryObjectStore();
        byte[] stored = Pattern(Chunk, 18);
        store.Put("disk/0000000000000001", stored);
        store.Down = true;
        using S3Backend device = Open(store);

        await Assert.ThrowsAsync<BlockDeviceException>(() => device.GetAllocationAsync(0, device.Size, new Extent[4]).AsTask());
        await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(Chunk, new byte[10]).AsTask());
        byte[] written = Pattern(4 * KiB, 19);
        await device.WriteAsync(0, written, fua: false); // the cache takes it

        store.Down = false;
        var extents = new Extent[4];
        int count = await device.GetAllocationAsync(0, 4 * Chunk, extents);
        await device.FlushAsync();

        Assert.Equal([new Extent(2 * Chunk, ExtentFlags.Data), new Extent(2 * Chunk, ExtentFlags.Hole | ExtentFlags.Zero)], extents[..count]);
        Assert.Equal(stored, await ReadAsync(device, Chunk, Chunk));
        Assert.Equal(written, store.Objects["disk/0000000000000000"].AsSpan(0, 4 * KiB).ToArray());
    }

    private static async Task<byte[]> ReadAsync(IBlockDevice device, long offset, int length)
    {
        byte[] buffer = new byte[length];
        await device.ReadAsync(offset, buffer);
        return buffer;
    }
}
