using Gateway.Actors.Bitmaps;
using Gateway.Actors.Exports;
using Gateway.Backends;
using Gateway.Backends.Overlay;
using Gateway.Backends.S3;
using Gateway.Tests.Backends.S3;
using Xunit;

namespace Gateway.Tests.Resize;

/// <summary>
/// Growing a device in place (an export resized online): data below the old end stays, the new
/// range reads as zeros and is reported as a hole, and for an overlay the lower layers, shorter
/// than the new size, hold nothing past their end (reads, base:allocation, allocation depth).
/// </summary>
public sealed class ResizeBackendTests : IDisposable
{
    private const int KiB = 1024;
    private const int MiB = 1024 * KiB;
    private const int Cluster = LayerMap.DefaultClusterSize;
    private readonly string _directory = Directory.CreateTempSubdirectory("gateway-resize-").FullName;
    private int _layers;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    [Fact]
    public async Task File_grows_keeping_its_data_the_new_range_is_a_hole_of_zeros_and_the_length_survives_a_reopen()
    {
        string path = Path.Combine(_directory, "disk.img");
        byte[] data = Pattern(MiB, seed: 1);
        using (FileBackend file = FileBackend.Create(path, MiB))
        {
            await file.WriteAsync(0, data, fua: true);
            await AssertFails(BlockErrorKind.NoSpace, () => file.WriteAsync(MiB, new byte[4096], fua: false));

            await file.GrowAsync(3 * MiB);

            Assert.Equal(3 * MiB, file.Size);
            Assert.Equal(data, await ReadAsync(file, 0, MiB));
            AssertZeros(await ReadAsync(file, MiB, 2 * MiB));
            Assert.Equal([new Extent(2 * MiB, ExtentFlags.Hole | ExtentFlags.Zero)], await AllocationAsync(file, MiB, 2 * MiB));
            await file.WriteAsync(2 * MiB, Pattern(4096, seed: 2), fua: true);
            await file.GrowAsync(2 * MiB); // smaller: nothing changes
            Assert.Equal(3 * MiB, file.Size);
        }
        using FileBackend reopened = FileBackend.Open(path, readOnly: false);
        Assert.Equal(3 * MiB, reopened.Size);
        Assert.Equal(Pattern(4096, seed: 2), await ReadAsync(reopened, 2 * MiB, 4096));
    }

    [Fact]
    public async Task Overlay_grows_its_top_and_a_shorter_lower_layer_is_a_hole_of_depth_0_past_its_end()
    {
        // Not a whole number of clusters: the lower layer's last cluster runs on past its end.
        const long Old = MiB + 4 * KiB;
        const long New = 3 * MiB;
        string lower = NewLayer(Old);
        byte[] data = Pattern((int)Old, seed: 3);
        using (OverlayBackend fill = Open(Old, lower))
        {
            await fill.WriteAsync(0, data, fua: true);
        }
        string top = NewLayer(Old);
        using (OverlayBackend overlay = Open(Old, top, lower))
        {
            await overlay.GrowAsync(New);

            Assert.Equal(New, overlay.Size);
            Assert.Equal(data, await ReadAsync(overlay, 0, (int)Old));
            AssertZeros(await ReadAsync(overlay, Old, (int)(New - Old)));
            Assert.Equal([new Extent(Old, ExtentFlags.Data), new Extent(New - Old, ExtentFlags.Hole | ExtentFlags.Zero)], await AllocationAsync(overlay, 0, New));
            Assert.Equal([new DepthExtent(Old, 2), new DepthExtent(New - Old, 0)], Depth(overlay, 0, New));

            await overlay.WriteAsync(2 * MiB, Pattern(4096, seed: 4), fua: true);
            Assert.Equal(Pattern(4096, seed: 4), await ReadAsync(overlay, 2 * MiB, 4096));
            Assert.Equal([new DepthExtent(Old, 2), new DepthExtent(2 * MiB - Old, 0), new DepthExtent(Cluster, 1), new DepthExtent(MiB - Cluster, 0)], Depth(overlay, 0, New));
        }
        using OverlayBackend reopened = Open(New, top, lower);
        Assert.Equal(New, reopened.Layers[0].Map!.LayerSize);
        Assert.Equal(data, await ReadAsync(reopened, 0, (int)Old));
        Assert.Equal(Pattern(4096, seed: 4), await ReadAsync(reopened, 2 * MiB, 4096));
        AssertZeros(await ReadAsync(reopened, Old, (int)(2 * MiB - Old)));
    }

    [Fact]
    public async Task Overlay_grown_while_clients_write_loses_no_write_in_memory_or_after_a_reopen()
    {
        const long Old = 16 * MiB;
        string lower = NewLayer(Old), top = NewLayer(Old);
        const int Writes = 200;
        using (OverlayBackend overlay = Open(Old, top, lower))
        {
            // Partial clusters: each write sets its cluster's state in the map the grow replaces.
            Task[] writers = [.. Enumerable.Range(0, Writes).Select(i => Task.Run(async () =>
                await overlay.WriteAsync((long)i * Cluster + 512, Pattern(4096, seed: 100 + i), fua: false)))];
            Task grow = Task.Run(async () => await overlay.GrowAsync(2 * Old));
            await Task.WhenAll([.. writers, grow]);
            await overlay.FlushAsync();

            for (int i = 0; i < Writes; i++)
            {
                Assert.Equal(Pattern(4096, seed: 100 + i), await ReadAsync(overlay, (long)i * Cluster + 512, 4096));
            }
        }
        using OverlayBackend reopened = Open(2 * Old, top, lower);
        for (int i = 0; i < Writes; i++)
        {
            Assert.Equal(Pattern(4096, seed: 100 + i), await ReadAsync(reopened, (long)i * Cluster + 512, 4096));
        }
        Assert.Equal([new DepthExtent(Writes * (long)Cluster, 1), new DepthExtent(2 * Old - Writes * (long)Cluster, 0)], Depth(reopened, 0, 2 * Old));
    }

    [Fact]
    public async Task Overlay_grown_over_a_longer_lower_layer_does_not_show_its_data_in_the_new_range()
    {
        const long Old = MiB + 4 * KiB;
        string lower = NewLayer(4 * MiB);
        using (OverlayBackend fill = Open(4 * MiB, lower))
        {
            await fill.WriteAsync(0, Pattern(4 * MiB, seed: 5), fua: true);
        }
        using OverlayBackend overlay = Open(Old, NewLayer(Old), lower);

        await overlay.GrowAsync(3 * MiB);

        Assert.Equal(Pattern(4 * MiB, seed: 5).AsSpan(0, (int)Old).ToArray(), await ReadAsync(overlay, 0, (int)Old));
        AssertZeros(await ReadAsync(overlay, Old, (int)(3 * MiB - Old)));
        Assert.Equal([new DepthExtent(MiB, 2), new DepthExtent(2 * MiB, 1)], Depth(overlay, 0, 3 * MiB));
    }

    [Fact]
    public async Task Overlay_grow_cut_short_before_its_commit_opens_at_the_old_size_and_the_export_open_finishes_it()
    {
        var backends = new BackendFactory(_directory);
        const long Old = 2 * MiB;
        string lower = "vm.lower", top = "vm.top";
        await backends.CreateLayerAsync(lower, 4 * MiB, CancellationToken.None);
        await backends.CreateLayerAsync(top, Old, CancellationToken.None);
        using (Layer bottom = await backends.OpenTopLayerAsync(lower, CancellationToken.None))
        using (var fill = new OverlayBackend([bottom], 4 * MiB, readOnly: false))
        {
            await fill.WriteAsync(0, Pattern(4 * MiB, seed: 6), fua: true);
        }
        using (Layer layer = await backends.OpenTopLayerAsync(top, CancellationToken.None))
        {
            await layer.ExtendAsync(3 * MiB); // then the process dies: no commit
        }
        var spec = new ExportSpec("vm", 3 * MiB, new BackendSpec(BackendSpec.Overlay, Layers: [top, lower]), ReadOnly: false, null);

        using IBlockDevice device = await backends.OpenAsync(spec, CancellationToken.None);

        Assert.Equal(3 * MiB, device.Size);
        Assert.Equal(Pattern(4 * MiB, seed: 6).AsSpan(0, (int)Old).ToArray(), await ReadAsync(device, 0, (int)Old));
        AssertZeros(await ReadAsync(device, Old, MiB));
        Assert.Equal(3 * MiB, ((OverlayBackend)device).Layers[0].Map!.LayerSize);
    }

    [Fact]
    public async Task File_export_stopped_before_its_file_grew_opens_at_the_recorded_size()
    {
        var backends = new BackendFactory(_directory);
        var spec = new ExportSpec("disk", MiB, new BackendSpec(BackendSpec.File), ReadOnly: false, null);
        await backends.CreateAsync(spec, CancellationToken.None);

        using IBlockDevice device = await backends.OpenAsync(spec with { Size = 2 * MiB }, CancellationToken.None);

        Assert.Equal(2 * MiB, device.Size);
        Assert.Equal(2 * MiB, new FileInfo(backends.FilePath(spec)).Length);
    }

    [Fact]
    public async Task S3_disk_grows_without_writing_objects_and_reads_zeros_past_the_old_end()
    {
        var store = new MemoryObjectStore();
        using S3Backend disk = await S3Backend.OpenAsync(store, "disk", MiB, readOnly: false, new S3DeviceOptions { ObjectSize = 64 * KiB, CacheBytes = 2 * MiB }, ownsStore: false);
        await disk.WriteAsync(MiB - 4096, Pattern(4096, seed: 7), fua: true);
        int objects = store.Objects.Count;

        await disk.GrowAsync(3 * MiB);

        Assert.Equal(3 * MiB, disk.Size);
        Assert.Equal(objects, store.Objects.Count);
        Assert.Equal(Pattern(4096, seed: 7), await ReadAsync(disk, MiB - 4096, 4096));
        AssertZeros(await ReadAsync(disk, MiB, 2 * MiB));
        Assert.Equal([new Extent(2 * MiB, ExtentFlags.Hole | ExtentFlags.Zero)], await AllocationAsync(disk, MiB, 2 * MiB));
        await disk.WriteAsync(2 * MiB + 100, Pattern(4096, seed: 8), fua: true);
        Assert.Equal(Pattern(4096, seed: 8), await ReadAsync(disk, 2 * MiB + 100, 4096));
    }

    [Fact]
    public void Dirty_bitmap_grown_keeps_every_dirty_granule_and_its_new_granules_are_clean()
    {
        var bits = new DirtyBitmap(MiB + 100, 64 * KiB);
        bits.SetRange(0, 1);
        bits.SetRange(MiB, 100); // the last, partial granule
        var state = new BitmapState(MiB + 100, System.Collections.Immutable.ImmutableSortedDictionary<string, BitmapEntry>.Empty.Add("b", new BitmapEntry("b", true, bits)));

        BitmapState grown = state.Grow(8 * MiB);

        Assert.Same(bits, grown.Bitmaps["b"].Bits);
        Assert.Equal(8 * MiB, bits.Size);
        Assert.Equal([(0L, 1L), (16L, 1L)], bits.DirtyRuns().ToArray());
        Assert.False(bits.IsDirty(MiB + 64 * KiB, 64 * KiB));
        bits.SetRange(7 * MiB, 1);
        Assert.True(bits.IsDirty(7 * MiB, 64 * KiB));
        Assert.Equal([(0L, 1L), (16L, 1L), (112L, 1L)], bits.DirtyRuns().ToArray());
    }

    private OverlayBackend Open(long size, params string[] chain)
    {
        var layers = new List<Layer>();
        for (int i = 0; i < chain.Length; i++)
        {
            layers.Add(LayerFiles.OpenAsync(_directory, chain[i], writable: i == 0).AsTask().GetAwaiter().GetResult());
        }
        return new OverlayBackend(layers, size, readOnly: false);
    }

    private string NewLayer(long size)
    {
        string id = $"layer{Interlocked.Increment(ref _layers)}";
        LayerFiles.CreateAsync(_directory, id, size).AsTask().GetAwaiter().GetResult();
        return id;
    }

    private static DepthExtent[] Depth(OverlayBackend overlay, long offset, long length)
    {
        var extents = new DepthExtent[64];
        int count = overlay.GetDepth(offset, length, extents);
        return extents[..count];
    }

    private static async Task<byte[]> ReadAsync(IBlockDevice device, long offset, int length)
    {
        byte[] buffer = new byte[length];
        await device.ReadAsync(offset, buffer);
        return buffer;
    }

    private static async Task<Extent[]> AllocationAsync(IBlockDevice device, long offset, long length)
    {
        var extents = new Extent[64];
        int count = await device.GetAllocationAsync(offset, length, extents);
        return extents[..count];
    }

    private static async Task AssertFails(BlockErrorKind kind, Func<ValueTask> action) =>
        Assert.Equal(kind, (await Assert.ThrowsAsync<BlockDeviceException>(async () => await action())).Kind);

    private static void AssertZeros(byte[] bytes) => Assert.True(bytes.All(b => b == 0), "expected zeros");

    private static byte[] Pattern(int length, int seed)
    {
        byte[] bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }
}
