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

/// <summary>The block device contract through both tiers of the read cache: a memory tier of four small blocks in front of a disk tier.</summary>
public sealed class S3LogReadCacheDiskTierContractTests : BlockDeviceContract, IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("gateway-disk-cache-contract-").FullName;
    private int _devices;

    public void Dispose() => Directory.Delete(_folder, recursive: true);

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        S3LogBackend.OpenAsync(new MemoryObjectStore(), "disk", size, readOnly, new S3DeviceOptions
        {
            ObjectSize = 64 * KiB,
            CacheBytes = 1,
            ReadCacheBytes = 16 * KiB,
            ReadCacheBlockBytes = 4 * KiB,
            ReadAheadBytes = 8 * KiB,
            ReadDiskCachePath = Path.Combine(_folder, $"{Interlocked.Increment(ref _devices)}"),
            ReadDiskCacheBytes = 512 * KiB,
            WriteLog = true,
            LogSegmentBytes = 256 * KiB,
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
    internal const int DiskSize = 4 * MiB;
    internal const int ObjectSize = 256 * KiB;

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

    internal static S3LogBackend Open(IObjectStore store, S3DeviceOptions? options = null) =>
        S3LogBackend.OpenAsync(store, "disk", DiskSize, readOnly: false, options ?? Options(), ownsStore: false).GetAwaiter().GetResult();

    /// <summary>A disk of base chunk objects only, as nbdkit or a compaction leaves it.</summary>
    internal static byte[] StoreChunks(MemoryObjectStore store, int seed)
    {
        byte[] model = Pattern(DiskSize, seed);
        for (int i = 0; i < DiskSize / ObjectSize; i++)
        {
            store.Put(S3DeviceOptions.Key("disk", i), model.AsSpan(i * ObjectSize, ObjectSize).ToArray());
        }
        return model;
    }

    internal static int ChunkGets(MemoryObjectStore store) =>
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

/// <summary>
/// The read cache's disk tier (issue 18, item 3): blocks the memory tier evicts are read back from a
/// local folder without a GET, never stale after compaction rewrote their chunk, within the tier's
/// bound, and an open empties the folder, so a file an earlier run left (torn or not) is never served.
/// </summary>
public sealed class S3LogReadCacheDiskTierTests : IDisposable
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private const int DiskSize = S3LogReadCacheTests.DiskSize; // its helpers (Open, StoreChunks) lay out this disk
    private const int ObjectSize = S3LogReadCacheTests.ObjectSize;
    private const int Block = 16 * KiB;

    private readonly string _folder = Directory.CreateTempSubdirectory("gateway-disk-cache-").FullName;

    public void Dispose() => Directory.Delete(_folder, recursive: true);

    /// <summary>A memory tier of four blocks in front of a disk tier that holds the whole disk.</summary>
    private S3DeviceOptions Options() => new()
    {
        ObjectSize = ObjectSize,
        CacheBytes = 1,
        ReadCacheBytes = 4 * Block,
        ReadCacheBlockBytes = Block,
        ReadAheadBytes = 0,
        ReadDiskCachePath = _folder,
        ReadDiskCacheBytes = 2 * DiskSize,
        WriteLog = true,
        LogSegmentBytes = 64 * KiB,
        LogDirtyBytes = 8 * MiB,
        LogSegmentDelay = TimeSpan.FromMinutes(10),
        LogCompactBytes = long.MaxValue,
        LogCompactIdle = TimeSpan.FromHours(1),
        LogCompactOnClose = false,
    };

    /// <summary>The whole disk in reads of two blocks (less than the memory tier, so every block is whole when it is evicted).</summary>
    private static async Task ReadAndCheckAsync(S3LogBackend device, byte[] model)
    {
        byte[] buffer = new byte[2 * Block];
        for (int offset = 0; offset < DiskSize; offset += buffer.Length)
        {
            await device.ReadAsync(offset, buffer);
            Assert.Equal(model.AsSpan(offset, buffer.Length).ToArray(), buffer);
        }
    }

    [Fact]
    public async Task Blocks_the_memory_tier_evicted_are_read_from_disk_without_a_GET()
    {
        var store = new MemoryObjectStore();
        byte[] model = S3LogReadCacheTests.StoreChunks(store, seed: 21);
        using S3LogBackend device = S3LogReadCacheTests.Open(store, Options());
        await ReadAndCheckAsync(device, model);
        Assert.True(S3LogReadCacheTests.ChunkGets(store) > 0);
        await device.ReadDiskCache!.DrainAsync();
        Assert.True(device.ReadCacheBytes <= 4 * Block);
        Assert.True(device.ReadDiskCache.FileBytes() >= DiskSize - (4 * Block), $"{device.ReadDiskCache.FileBytes()} bytes on disk");

        store.Gets.Clear();
        await ReadAndCheckAsync(device, model);
        Assert.Equal(0, S3LogReadCacheTests.ChunkGets(store));
        Assert.True(device.ReadDiskCache.Hits >= (DiskSize / Block) - 4, $"{device.ReadDiskCache.Hits} disk hits");

        // The same reads without the disk tier go to the store.
        var cold = new MemoryObjectStore();
        S3LogReadCacheTests.StoreChunks(cold, seed: 21);
        using S3LogBackend memoryOnly = S3LogReadCacheTests.Open(cold, Options() with { ReadDiskCachePath = null });
        await ReadAndCheckAsync(memoryOnly, model);
        cold.Gets.Clear();
        await ReadAndCheckAsync(memoryOnly, model);
        Assert.True(S3LogReadCacheTests.ChunkGets(cold) >= (DiskSize / (2 * Block)) - 2); // a GET per read of two blocks
    }

    [Fact]
    public async Task A_chunk_compaction_rewrote_is_read_new_not_from_its_old_blocks_on_disk()
    {
        var store = new MemoryObjectStore();
        byte[] model = S3LogReadCacheTests.StoreChunks(store, seed: 22);
        using S3LogBackend device = S3LogReadCacheTests.Open(store, Options());
        await ReadAndCheckAsync(device, model); // every chunk's blocks on disk
        await device.ReadDiskCache!.DrainAsync();

        // Rewrite all of chunk 0 and part of chunk 1, so compaction stores new objects under the old keys.
        byte[] write = Pattern(ObjectSize + (40 * KiB), 23);
        await device.WriteAsync(0, write, fua: false);
        write.CopyTo(model, 0);
        await device.TrimAsync(3 * ObjectSize, 20 * KiB, fua: false);
        model.AsSpan(3 * ObjectSize, 20 * KiB).Clear();
        await device.FlushAsync();
        await device.CompactAsync();
        Assert.True(device.Compactions > 0);

        store.Gets.Clear();
        await ReadAndCheckAsync(device, model);
        Assert.True(S3LogReadCacheTests.ChunkGets(store) > 0); // the rewritten chunks' blocks came from the store
        await device.ReadDiskCache.DrainAsync();
        await ReadAndCheckAsync(device, model); // and now from the disk tier, new
        await device.ReadDiskCache.DrainAsync();
        Assert.Equal(device.ReadDiskCache.Bytes, device.ReadDiskCache.FileBytes()); // the old versions' files are gone
    }

    [Fact]
    public async Task The_disk_tier_stays_within_its_bound()
    {
        var store = new MemoryObjectStore();
        byte[] model = S3LogReadCacheTests.StoreChunks(store, seed: 24);
        const long bound = 256 * KiB;
        using S3LogBackend device = S3LogReadCacheTests.Open(store, Options() with { ReadDiskCacheBytes = bound });
        var random = new Random(25);
        byte[] buffer = new byte[2 * Block];
        for (int i = 0; i < 400; i++)
        {
            int offset = random.Next(DiskSize - buffer.Length);
            await device.ReadAsync(offset, buffer);
            Assert.Equal(model.AsSpan(offset, buffer.Length).ToArray(), buffer);
            Assert.InRange(device.ReadDiskCache!.Bytes, 0, bound);
            if (i % 50 == 0)
            {
                await device.ReadDiskCache.DrainAsync();
                Assert.InRange(device.ReadDiskCache.FileBytes(), 0, bound);
            }
        }
        await device.ReadDiskCache!.DrainAsync();
        Assert.InRange(device.ReadDiskCache.FileBytes(), bound / 2, bound);
        Assert.True(device.ReadDiskCache.Hits > 0);
    }

    [Fact]
    public async Task A_reopen_empties_the_folder_so_no_old_or_torn_file_is_served()
    {
        var store = new MemoryObjectStore();
        byte[] model = S3LogReadCacheTests.StoreChunks(store, seed: 26);
        using (S3LogBackend first = S3LogReadCacheTests.Open(store, Options()))
        {
            await ReadAndCheckAsync(first, model);
            await first.ReadDiskCache!.DrainAsync();
        }
        string[] files = Directory.GetFiles(_folder, "*.block");
        Assert.NotEmpty(files);

        // What a crash or another writer could leave: every file the wrong bytes, one cut short, a temporary one.
        foreach (string file in files)
        {
            File.WriteAllBytes(file, Pattern((int)new FileInfo(file).Length, 27));
        }
        File.WriteAllBytes(files[0], new byte[100]);
        File.WriteAllBytes(Path.Combine(_folder, "00000000000000ff.block.tmp"), new byte[Block / 2]);
        File.WriteAllText(Path.Combine(_folder, "notes.txt"), "not the cache's");

        // The bucket changed while the export was closed (the chunk keeps its key, its version starts again).
        byte[] newer = Pattern(ObjectSize, 28);
        store.Put(S3DeviceOptions.Key("disk", 0), newer);
        newer.CopyTo(model, 0);

        store.Gets.Clear();
        using S3LogBackend second = S3LogReadCacheTests.Open(store, Options());
        Assert.Empty(Directory.GetFiles(_folder, "*.block*"));
        Assert.True(File.Exists(Path.Combine(_folder, "notes.txt"))); // only the cache's own files go
        await ReadAndCheckAsync(second, model);
        Assert.True(S3LogReadCacheTests.ChunkGets(store) >= DiskSize / (2 * Block)); // a GET per read of two blocks: nothing came from the old files
        await second.ReadDiskCache!.DrainAsync();
        store.Gets.Clear();
        await ReadAndCheckAsync(second, model); // the reopened tier works
        Assert.Equal(0, S3LogReadCacheTests.ChunkGets(store));
    }

    [Fact]
    public async Task Random_operations_reads_and_compactions_through_both_tiers_always_read_the_model()
    {
        var store = new MemoryObjectStore();
        byte[] model = S3LogReadCacheTests.StoreChunks(store, seed: 29);
        using S3LogBackend device = S3LogReadCacheTests.Open(store, Options() with
        {
            ReadCacheBytes = 64 * KiB,
            ReadCacheBlockBytes = 4 * KiB,
            ReadAheadBytes = 32 * KiB,
            ReadDiskCacheBytes = MiB,
        });
        var random = new Random(30);
        for (int op = 0; op < 1500; op++)
        {
            int offset = random.Next(DiskSize - 1);
            int length = 1 + random.Next(Math.Min(DiskSize - offset, 32 * KiB) - 1);
            switch (random.Next(20))
            {
                case 0:
                    await device.TrimAsync(offset, length, fua: false);
                    model.AsSpan(offset, length).Clear();
                    break;
                case 1:
                    await device.FlushAsync();
                    await device.CompactAsync();
                    break;
                case < 7:
                    byte[] data = Pattern(length, op);
                    await device.WriteAsync(offset, data, fua: false);
                    data.CopyTo(model, offset);
                    break;
                case < 10:
                    int start = random.Next(DiskSize - (256 * KiB));
                    for (int i = 0; i < 8; i++)
                    {
                        byte[] run = new byte[32 * KiB];
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
        byte[] all = new byte[32 * KiB];
        for (int offset = 0; offset < DiskSize; offset += all.Length)
        {
            await device.ReadAsync(offset, all);
            Assert.Equal(model.AsSpan(offset, all.Length).ToArray(), all);
        }
        Assert.True(device.Compactions > 0);
        Assert.True(device.ReadDiskCache!.Hits > 0);
        Assert.InRange(device.ReadDiskCache.Bytes, 0, MiB);
    }

    [Fact]
    public async Task A_reopen_waits_for_the_closing_instance_to_let_go_of_the_folder()
    {
        var store = new MemoryObjectStore();
        byte[] model = S3LogReadCacheTests.StoreChunks(store, seed: 31);
        S3LogBackend first = S3LogReadCacheTests.Open(store, Options());
        await ReadAndCheckAsync(first, model);
        Task closing = Task.Run(async () =>
        {
            await Task.Delay(300);
            first.Dispose(); // as an export actor stopping while its successor opens
        });
        using S3LogBackend second = await S3LogBackend.OpenAsync(store, "disk", DiskSize, readOnly: false, Options(), ownsStore: false);
        await closing;
        await ReadAndCheckAsync(second, model);
        await second.ReadDiskCache!.DrainAsync();
        Assert.Equal(second.ReadDiskCache.Bytes, second.ReadDiskCache.FileBytes()); // the first instance's files went at the open
    }

    [Fact]
    public async Task A_folder_in_use_or_unusable_fails_the_open_saying_why()
    {
        var store = new MemoryObjectStore();
        using S3LogBackend first = S3LogReadCacheTests.Open(store, Options());
        var inUse = await Assert.ThrowsAsync<BlockDeviceException>(() =>
            S3LogBackend.OpenAsync(store, "other", DiskSize, readOnly: false, Options(), ownsStore: false));
        Assert.Contains("in use", inUse.Message);
        Assert.Contains(_folder, inUse.Message);

        string file = Path.Combine(_folder, "notes.txt");
        File.WriteAllText(file, "a file, not a folder");
        var notAFolder = await Assert.ThrowsAsync<BlockDeviceException>(() =>
            S3LogBackend.OpenAsync(store, "other", DiskSize, readOnly: false, Options() with { ReadDiskCachePath = Path.Combine(file, "cache") }, ownsStore: false));
        Assert.Contains("cannot be used", notAFolder.Message);

        var relative = await Assert.ThrowsAsync<BlockDeviceException>(() =>
            S3LogBackend.OpenAsync(store, "other", DiskSize, readOnly: false, Options() with { ReadDiskCachePath = "cache" }, ownsStore: false));
        Assert.Contains("absolute", relative.Message);
    }
}
