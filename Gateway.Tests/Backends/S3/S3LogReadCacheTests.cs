using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;
using static Gateway.Tests.Backends.S3.S3TestData;

namespace Gateway.Tests.Backends.S3;

/// <summary>The block device contract on the write log with a memory window of nothing and a small read cache of small blocks.</summary>
public sealed class S3LogReadCacheContractTests : BlockDeviceContract
{
    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        S3LogBackend.OpenAsync(new MemoryObjectStore(), "disk", size, readOnly, new S3DeviceOptions
        {
            ObjectSize = 64 * KiB,
            CacheBytes = 1,
            ReadCacheBytes = 256 * KiB,
            ReadCacheBlockBytes = 4 * KiB,
            ReadAheadBytes = 128 * KiB,
            WriteLog = true,
            LogSegmentBytes = 256 * KiB, // a 64 KiB write stays one extent (the contract's allocation test)
            LogDirtyBytes = 4 * MiB,
        }).GetAwaiter().GetResult();
}

/// <summary>
/// The write log's read cache and read-ahead (issue 18, item 3), over an in-memory store that counts
/// GETs: re-reads stay in memory, a write, TRIM, WRITE_ZEROES or compaction never lets a cached block
/// be served stale, the cache keeps to its bound, and sequential reads fetch ahead in fewer, larger GETs.
/// </summary>
public sealed class S3LogReadCacheTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private const int DiskSize = 4 * MiB;
    private const int ObjectSize = 256 * KiB;

    private static S3DeviceOptions Options() => new()
    {
        ObjectSize = ObjectSize,
        CacheBytes = 1, // no memory window: stored segments leave it at once
        ReadCacheBytes = 8 * MiB,
        ReadCacheBlockBytes = 16 * KiB,
        ReadAheadBytes = 0,
        WriteLog = true,
        LogSegmentBytes = 64 * KiB,
        LogDirtyBytes = 8 * MiB,
        LogSegmentDelay = TimeSpan.FromMinutes(10),
        LogCompactBytes = long.MaxValue,
        LogCompactIdle = TimeSpan.FromHours(1),
        LogCompactOnClose = false,
    };

    private static S3LogBackend Open(IObjectStore store, S3DeviceOptions? options = null) =>
        S3LogBackend.OpenAsync(store, "disk", DiskSize, readOnly: false, options ?? Options(), ownsStore: false).GetAwaiter().GetResult();

    /// <summary>A disk of base chunk objects only, as nbdkit or a compaction leaves it.</summary>
    private static byte[] StoreChunks(MemoryObjectStore store, int seed)
    {
        byte[] model = Pattern(DiskSize, seed);
        for (int i = 0; i < DiskSize / ObjectSize; i++)
        {
            store.Put(S3DeviceOptions.Key("disk", i), model.AsSpan(i * ObjectSize, ObjectSize).ToArray());
        }
        return model;
    }

    private static int ChunkGets(MemoryObjectStore store) =>
        store.Gets.Where(g => !g.Key.Contains("/log/", StringComparison.Ordinal)).Sum(g => g.Value);

    private static int SegmentGets(MemoryObjectStore store) =>
        store.Gets.Where(g => LogSegment.TryParseKey("disk", g.Key, out _, out _)).Sum(g => g.Value);

    [Fact]
    public async Task A_reread_of_base_chunks_makes_no_GET()
    {
        var store = new MemoryObjectStore();
        byte[] model = StoreChunks(store, seed: 1);
        using S3LogBackend device = Open(store);
        byte[] buffer = new byte[100 * KiB];
        await device.ReadAsync(300 * KiB, buffer);
        Assert.Equal(model.AsSpan(300 * KiB, buffer.Length).ToArray(), buffer);
        int gets = ChunkGets(store);
        Assert.True(gets > 0);

        for (int i = 0; i < 3; i++)
        {
            Array.Clear(buffer);
            await device.ReadAsync(300 * KiB, buffer);
            Assert.Equal(model.AsSpan(300 * KiB, buffer.Length).ToArray(), buffer);
            await device.ReadAsync(310 * KiB, buffer.AsMemory(0, 4 * KiB)); // inside the cached blocks
            Assert.Equal(model.AsSpan(310 * KiB, 4 * KiB).ToArray(), buffer.AsSpan(0, 4 * KiB).ToArray());
        }
        Assert.Equal(gets, ChunkGets(store));
        Assert.True(device.ReadCacheHits > 0);
    }

    [Fact]
    public async Task Recently_written_data_past_the_memory_window_is_read_without_a_GET()
    {
        var store = new MemoryObjectStore();
        using S3LogBackend device = Open(store);
        byte[] data = Pattern(2 * MiB, 2);
        await device.WriteAsync(MiB, data, fua: false);
        await device.FlushAsync();
        byte[] back = new byte[data.Length];
        await device.ReadAsync(MiB, back);
        Assert.Equal(data, back);
        Assert.Equal(0, SegmentGets(store)); // the segments went from the window to the read cache

        // Without the read cache, the same reads are ranged GETs of the segments.
        var cold = new MemoryObjectStore();
        using S3LogBackend uncached = Open(cold, Options() with { ReadCacheBytes = 0 });
        await uncached.WriteAsync(MiB, data, fua: false);
        await uncached.FlushAsync();
        await uncached.ReadAsync(MiB, back);
        Assert.Equal(data, back);
        Assert.True(SegmentGets(cold) > 0);
    }

    [Fact]
    public async Task A_write_trim_or_zero_after_a_cached_read_is_read_back_new_also_after_compaction_rewrote_the_chunk()
    {
        var store = new MemoryObjectStore();
        byte[] model = StoreChunks(store, seed: 3);
        using S3LogBackend device = Open(store);
        Assert.Equal(model, await ReadAllAsync(device)); // every block cached

        byte[] write = Pattern(50 * KiB, 4);
        await device.WriteAsync(10 * KiB, write, fua: false);
        write.CopyTo(model, 10 * KiB);
        await device.TrimAsync(ObjectSize + 7 * KiB, 30 * KiB, fua: false);
        model.AsSpan(ObjectSize + 7 * KiB, 30 * KiB).Clear();
        await device.ZeroAsync(2 * ObjectSize + 100, 5000, ZeroFlags.NoHole);
        model.AsSpan(2 * ObjectSize + 100, 5000).Clear();
        Assert.Equal(model, await ReadAllAsync(device));
        await device.FlushAsync();
        Assert.Equal(model, await ReadAllAsync(device));

        // Compaction rewrites chunks 0 to 2 (the cache holds the old ones' blocks) and points the index at them.
        await device.CompactAsync();
        Assert.Equal(model, await ReadAllAsync(device));
        Assert.Equal(model, await ReadAllAsync(device));

        // Again over the rewritten chunks, now cached themselves.
        byte[] second = Pattern(3 * KiB, 5);
        await device.WriteAsync(12 * KiB, second, fua: false);
        second.CopyTo(model, 12 * KiB);
        await device.TrimAsync(0, 4 * KiB, fua: false);
        model.AsSpan(0, 4 * KiB).Clear();
        await device.FlushAsync();
        await device.CompactAsync();
        Assert.Equal(model, await ReadAllAsync(device));

        // A chunk compaction deletes (all zeros) reads as zeros, not as its cached blocks.
        await device.TrimAsync(3 * ObjectSize, ObjectSize, fua: false);
        model.AsSpan(3 * ObjectSize, ObjectSize).Clear();
        await device.FlushAsync();
        await device.CompactAsync();
        Assert.False(store.Objects.ContainsKey(S3DeviceOptions.Key("disk", 3)));
        Assert.Equal(model, await ReadAllAsync(device));
    }

    [Fact]
    public async Task Recently_written_data_stays_cached_when_compaction_folds_it_into_its_chunk()
    {
        var store = new MemoryObjectStore();
        using S3LogBackend device = Open(store);
        byte[] data = Pattern(MiB, 12);
        await device.WriteAsync(MiB, data, fua: false);
        await device.FlushAsync();
        await device.CompactAsync();
        Assert.True(store.Objects.ContainsKey(S3DeviceOptions.Key("disk", MiB / ObjectSize)));
        store.Gets.Clear();
        byte[] back = new byte[data.Length];
        await device.ReadAsync(MiB, back);
        Assert.Equal(data, back);
        Assert.Equal(0, store.Gets.Values.Sum());
    }

    [Fact]
    public async Task Random_operations_reads_and_compactions_always_read_the_model()
    {
        var store = new MemoryObjectStore();
        byte[] model = StoreChunks(store, seed: 6);
        using S3LogBackend device = Open(store, Options() with { ReadCacheBytes = 512 * KiB, ReadCacheBlockBytes = 4 * KiB, ReadAheadBytes = 256 * KiB });
        var random = new Random(7);
        for (int op = 0; op < 1500; op++)
        {
            int offset = random.Next(DiskSize - 1);
            int length = 1 + random.Next(Math.Min(DiskSize - offset, 64 * KiB) - 1);
            switch (random.Next(20))
            {
                case 0:
                    await device.TrimAsync(offset, length, fua: false);
                    model.AsSpan(offset, length).Clear();
                    break;
                case 1:
                    await device.ZeroAsync(offset, length, ZeroFlags.NoHole);
                    model.AsSpan(offset, length).Clear();
                    break;
                case 2:
                    await device.FlushAsync();
                    break;
                case 3:
                    await device.FlushAsync();
                    await device.CompactAsync();
                    break;
                case < 9:
                    byte[] data = Pattern(length, op);
                    await device.WriteAsync(offset, data, fua: false);
                    data.CopyTo(model, offset);
                    break;
                case < 12:
                    // A sequential stretch: read-ahead runs while writes and compactions go on.
                    int start = random.Next(DiskSize - 512 * KiB);
                    for (int i = 0; i < 8; i++)
                    {
                        byte[] run = new byte[64 * KiB];
                        await device.ReadAsync(start + (i * run.Length), run);
                        Assert.Equal(model.AsSpan(start + (i * run.Length), run.Length).ToArray(), run);
                    }
                    break;
                default:
                    byte[] read = new byte[length];
                    await device.ReadAsync(offset, read);
                    Assert.Equal(model.AsSpan(offset, length).ToArray(), read);
                    break;
            }
        }
        Assert.Equal(model, await ReadAllAsync(device));
        Assert.True(device.Compactions > 0);
    }

    [Fact]
    public async Task The_cache_stays_within_its_bound()
    {
        var store = new MemoryObjectStore();
        byte[] model = StoreChunks(store, seed: 8);
        using S3LogBackend device = Open(store, Options() with { ReadCacheBytes = 256 * KiB });
        var random = new Random(9);
        byte[] buffer = new byte[48 * KiB];
        for (int i = 0; i < 300; i++)
        {
            int offset = random.Next(DiskSize - buffer.Length);
            await device.ReadAsync(offset, buffer);
            Assert.Equal(model.AsSpan(offset, buffer.Length).ToArray(), buffer);
            Assert.InRange(device.ReadCacheBytes, 0, 256 * KiB);
        }
        await device.WriteAsync(0, Pattern(2 * MiB, 10), fua: false); // segments leaving the window come in too
        await device.FlushAsync();
        Assert.InRange(device.ReadCacheBytes, 0, 256 * KiB);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Sequential_reads_fetch_ahead_in_fewer_larger_GETs(bool segments)
    {
        async Task<(int Gets, long Hits)> ReadSequentiallyAsync(long readAhead)
        {
            var store = new MemoryObjectStore();
            byte[] model;
            if (segments)
            {
                model = Pattern(DiskSize, 11);
                using (S3LogBackend writer = Open(store, Options() with { LogSegmentBytes = MiB }))
                {
                    await writer.WriteAsync(0, model, fua: false);
                    await writer.FlushAsync();
                }
            }
            else
            {
                model = StoreChunks(store, seed: 11);
            }
            store.Gets.Clear();
            // Reopened with a cold read cache: the replay reads whole segments, then reads go to the store.
            using S3LogBackend device = Open(store, Options() with { ReadAheadBytes = readAhead });
            store.Gets.Clear();
            byte[] buffer = new byte[64 * KiB];
            for (int offset = 0; offset < DiskSize; offset += buffer.Length)
            {
                await device.ReadAsync(offset, buffer);
                Assert.Equal(model.AsSpan(offset, buffer.Length).ToArray(), buffer);
            }
            return (store.Gets.Values.Sum(), device.ReadCacheHits);
        }

        (int plainGets, _) = await ReadSequentiallyAsync(0);
        (int aheadGets, long aheadHits) = await ReadSequentiallyAsync(MiB);
        Assert.True(aheadGets * 2 <= plainGets, $"{aheadGets} GETs with read-ahead, {plainGets} without");
        Assert.True(aheadHits > 0);
    }
}
