using Gateway.Backends;
using Gateway.Backends.Overlay;
using Xunit;

namespace Gateway.Tests.Backends;

/// <summary>
/// The contract, run against an overlay of a writable top over an empty frozen layer (file layers
/// in a temp folder), plus what only a chain shows: copy-up, masking, depth, snapshots, durability.
/// </summary>
public sealed class OverlayBackendTests : BlockDeviceContract, IDisposable
{
    private const int Cluster = LayerMap.DefaultClusterSize;
    private readonly string _directory = Directory.CreateTempSubdirectory("gateway-overlay-").FullName;
    private int _layers;

    protected override bool HasNonBlockingIo => true;

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false)
    {
        string bottom = NewLayer(size);
        string top = NewLayer(size);
        return Open(size, readOnly, top, bottom);
    }

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    [Fact]
    public async Task Partial_write_over_lower_data_copies_the_cluster_up_and_leaves_the_lower_layer_unchanged()
    {
        byte[] lower = Pattern(2 * Cluster, seed: 1);
        using OverlayBackend overlay = await ChainAsync(4 * MiB, lower);
        byte[] small = Pattern(100, seed: 2);

        await overlay.WriteAsync(Cluster + 1000, small, fua: false);

        byte[] expected = (byte[])lower.Clone();
        small.CopyTo(expected, Cluster + 1000);
        Assert.Equal(expected, await ReadAsync(overlay, 0, 2 * Cluster));
        Assert.Equal([new DepthExtent(Cluster, 2), new DepthExtent(Cluster, 1), new DepthExtent(4 * MiB - 2 * Cluster, 0)], Depth(overlay, 0, overlay.Size));
        // The frozen layer below still holds the old bytes.
        Assert.Equal(lower, await ReadAsync(overlay.Layers[1].Data, 0, 2 * Cluster));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Zero_or_trim_of_whole_clusters_masks_lower_data(bool trim)
    {
        using OverlayBackend overlay = await ChainAsync(MiB, Pattern(4 * Cluster, seed: 3));

        if (trim)
        {
            await overlay.TrimAsync(Cluster, 2 * Cluster, fua: false);
        }
        else
        {
            await overlay.ZeroAsync(Cluster, 2 * Cluster, ZeroFlags.None);
        }

        AssertZeros(await ReadAsync(overlay, Cluster, 2 * Cluster));
        Assert.Equal([new DepthExtent(Cluster, 2), new DepthExtent(2 * Cluster, 1), new DepthExtent(Cluster, 2), new DepthExtent(MiB - 4 * Cluster, 0)], Depth(overlay, 0, MiB));
        Assert.Equal([new Extent(Cluster, ExtentFlags.Data), new Extent(2 * Cluster, ExtentFlags.Hole | ExtentFlags.Zero), new Extent(Cluster, ExtentFlags.Data), new Extent(MiB - 4 * Cluster, ExtentFlags.Hole | ExtentFlags.Zero)],
            await AllocationAsync(overlay, 0, MiB));
    }

    [Fact]
    public async Task Partial_zero_over_lower_data_zeros_only_its_range()
    {
        byte[] lower = Pattern(Cluster, seed: 4);
        using OverlayBackend overlay = await ChainAsync(MiB, lower);

        await overlay.ZeroAsync(100, 1000, ZeroFlags.None);

        byte[] read = await ReadAsync(overlay, 0, Cluster);
        Assert.Equal(lower.AsSpan(0, 100), read.AsSpan(0, 100));
        AssertZeros(read.AsSpan(100, 1000));
        Assert.Equal(lower.AsSpan(1100), read.AsSpan(1100));
        Assert.Equal(1u, Depth(overlay, 0, Cluster).Single().Depth);
    }

    [Fact]
    public async Task Trim_where_no_layer_has_data_stays_unallocated()
    {
        using OverlayBackend overlay = await ChainAsync(MiB, []);
        await overlay.WriteAsync(0, Pattern(Cluster, seed: 5), fua: false);

        await overlay.TrimAsync(0, MiB, fua: false);

        Assert.Equal([new DepthExtent(MiB, 0)], Depth(overlay, 0, MiB));
        AssertZeros(await ReadAsync(overlay, 0, MiB));
    }

    [Fact]
    public async Task Depth_names_the_shallowest_layer_with_each_cluster_in_a_four_layer_chain()
    {
        using OverlayBackend overlay = await ChainAsync(MiB, []);
        // Layer 4 (bottom): clusters 0-3; layer 3: 1-2; layer 2: 2; top: 3 zeroed.
        await overlay.WriteAsync(0, Pattern(4 * Cluster, seed: 40), fua: false);
        await overlay.PushTopAsync(await NewOpenLayerAsync(MiB));
        await overlay.WriteAsync(Cluster, Pattern(2 * Cluster, seed: 30), fua: false);
        await overlay.PushTopAsync(await NewOpenLayerAsync(MiB));
        await overlay.WriteAsync(2 * Cluster + 10, Pattern(10, seed: 20), fua: false);
        await overlay.PushTopAsync(await NewOpenLayerAsync(MiB));
        await overlay.ZeroAsync(3 * Cluster, Cluster, ZeroFlags.None);

        Assert.Equal(5, overlay.Layers.Count); // the empty bottom of ChainAsync under the four
        Assert.Equal([new DepthExtent(Cluster, 4), new DepthExtent(Cluster, 3), new DepthExtent(Cluster, 2), new DepthExtent(Cluster, 1), new DepthExtent(MiB - 4 * Cluster, 0)],
            Depth(overlay, 0, MiB));
        byte[] expected = new byte[4 * Cluster];
        Pattern(4 * Cluster, seed: 40).CopyTo(expected, 0);
        Pattern(2 * Cluster, seed: 30).CopyTo(expected, Cluster);
        Pattern(10, seed: 20).CopyTo(expected, 2 * Cluster + 10);
        Array.Clear(expected, 3 * Cluster, Cluster);
        Assert.Equal(expected, await ReadAsync(overlay, 0, 4 * Cluster));
    }

    [Fact]
    public async Task Concurrent_partial_writes_to_one_cluster_all_land_over_lower_data()
    {
        byte[] lower = Pattern(Cluster, seed: 6);
        const int Pieces = 16, Piece = 1000;
        for (int round = 0; round < 20; round++)
        {
            using OverlayBackend overlay = await ChainAsync(MiB, lower);

            // Every piece starts where the cluster is not yet in the top, so all race the copy-up.
            await Task.WhenAll(Enumerable.Range(0, Pieces).Select(i => Task.Run(() =>
                overlay.WriteAsync(i * 4000, Pattern(Piece, seed: 100 + i), fua: false).AsTask())));

            byte[] expected = (byte[])lower.Clone();
            for (int i = 0; i < Pieces; i++)
            {
                Pattern(Piece, seed: 100 + i).CopyTo(expected, i * 4000);
            }
            Assert.Equal(expected, await ReadAsync(overlay, 0, Cluster));
        }
    }

    [Fact]
    public async Task Snapshots_under_concurrent_writes_lose_nothing_and_survive_reopen()
    {
        const long Size = 4 * MiB;
        const int Writers = 8, WritesEach = 150, Block = 4096;
        string top = NewLayer(Size);
        List<string> chain = [top];
        var overlay = Open(Size, readOnly: false, top);
        byte[] expected = new byte[Size];
        try
        {
            using var stop = new CancellationTokenSource();
            Task[] writers = [.. Enumerable.Range(0, Writers).Select(w => Task.Run(async () =>
            {
                var random = new Random(w);
                for (int i = 0; i < WritesEach; i++)
                {
                    // Each writer owns every Writers-th block, so the final content is known.
                    long block = random.Next((int)(Size / Block / Writers)) * Writers + w;
                    byte[] data = Pattern(Block - 7 * (i % 3), seed: w * 10_000 + i);
                    await overlay.WriteAsync(block * Block, data, fua: i % 10 == 0);
                    lock (expected)
                    {
                        data.CopyTo(expected, block * Block);
                    }
                }
            }))];
            for (int s = 0; s < 3; s++)
            {
                await Task.Delay(5);
                string id = NewLayer(Size);
                await overlay.PushTopAsync(await LayerFiles.OpenAsync(_directory, id, writable: true));
                chain.Insert(0, id);
            }
            await Task.WhenAll(writers);

            Assert.Equal(4, overlay.Layers.Count);
            Assert.Equal(expected, await ReadAsync(overlay, 0, (int)Size));
            await overlay.FlushAsync();
        }
        finally
        {
            overlay.Dispose();
        }

        using OverlayBackend reopened = Open(Size, readOnly: true, [.. chain]);
        Assert.Equal(expected, await ReadAsync(reopened, 0, (int)Size));
    }

    [Fact]
    public async Task Flushed_maps_survive_reopen_and_unflushed_states_do_not()
    {
        const long Size = MiB;
        string bottom = NewLayer(Size), top = NewLayer(Size);
        byte[] lower = Pattern(4 * Cluster, seed: 7);
        using (OverlayBackend writeBottom = Open(Size, readOnly: false, bottom))
        {
            await writeBottom.WriteAsync(0, lower, fua: true);
        }
        byte[] flushed = Pattern(Cluster, seed: 8);
        using (OverlayBackend overlay = Open(Size, readOnly: false, top, bottom))
        {
            await overlay.WriteAsync(0, flushed, fua: false);
            await overlay.ZeroAsync(3 * Cluster, Cluster, ZeroFlags.None);
            await overlay.FlushAsync();
            // Never flushed: its state is not durable, so after a "crash" the lower data shows.
            await overlay.WriteAsync(Cluster, Pattern(Cluster, seed: 9), fua: false);
        }

        using OverlayBackend reopened = Open(Size, readOnly: true, top, bottom);

        Assert.Equal(flushed, await ReadAsync(reopened, 0, Cluster));
        Assert.Equal(lower.AsSpan(Cluster, Cluster).ToArray(), await ReadAsync(reopened, Cluster, Cluster));
        AssertZeros(await ReadAsync(reopened, 3 * Cluster, Cluster));
        Assert.Equal([new DepthExtent(Cluster, 1), new DepthExtent(2 * Cluster, 2), new DepthExtent(Cluster, 1), new DepthExtent(Size - 4 * Cluster, 0)],
            Depth(reopened, 0, Size));
    }

    [Fact]
    public async Task Raw_image_bottom_is_allocated_throughout_but_reports_its_holes_to_base_allocation()
    {
        string image = Path.Combine(_directory, "base.raw");
        using (FileBackend raw = FileBackend.Create(image, 2 * MiB))
        {
            await raw.WriteAsync(MiB, Pattern(Cluster, seed: 10), fua: true);
        }
        string top = NewLayer(4 * MiB);
        using var overlay = new OverlayBackend([await LayerFiles.OpenAsync(_directory, top, writable: true), LayerFiles.OpenRaw(image)], 4 * MiB, readOnly: false);

        await overlay.WriteAsync(0, Pattern(10, seed: 11), fua: false);

        Assert.Equal(Pattern(Cluster, seed: 10), await ReadAsync(overlay, MiB, Cluster));
        AssertZeros(await ReadAsync(overlay, 2 * MiB, 2 * MiB)); // past the image's end
        Assert.Equal([new DepthExtent(Cluster, 1), new DepthExtent(2 * MiB - Cluster, 2), new DepthExtent(2 * MiB, 0)], Depth(overlay, 0, 4 * MiB));
        Assert.Equal([new Extent(Cluster, ExtentFlags.Data), new Extent(MiB - Cluster, ExtentFlags.Hole | ExtentFlags.Zero), new Extent(Cluster, ExtentFlags.Data), new Extent(3 * MiB - Cluster, ExtentFlags.Hole | ExtentFlags.Zero)],
            await AllocationAsync(overlay, 0, 4 * MiB));
    }

    [Fact]
    public async Task Two_overlays_share_one_frozen_layer_and_write_independently()
    {
        string golden = NewLayer(MiB);
        byte[] image = Pattern(MiB, seed: 12);
        using (OverlayBackend writer = Open(MiB, readOnly: false, golden))
        {
            await writer.WriteAsync(0, image, fua: true);
        }
        using OverlayBackend vm1 = Open(MiB, readOnly: false, NewLayer(MiB), golden);
        using OverlayBackend vm2 = Open(MiB, readOnly: false, NewLayer(MiB), golden);

        await vm1.WriteAsync(10, Pattern(10, seed: 13), fua: true);

        Assert.Equal(image, await ReadAsync(vm2, 0, MiB));
        Assert.Equal(Pattern(10, seed: 13), await ReadAsync(vm1, 10, 10));
        Assert.Equal(image.AsSpan(20).ToArray(), await ReadAsync(vm1, 20, MiB - 20));
    }

    /// <summary>A writable top over one frozen layer holding <paramref name="lower"/> at offset 0.</summary>
    private async Task<OverlayBackend> ChainAsync(long size, byte[] lower)
    {
        string bottom = NewLayer(size);
        if (lower.Length > 0)
        {
            using OverlayBackend fill = Open(size, readOnly: false, bottom);
            await fill.WriteAsync(0, lower, fua: true);
        }
        return Open(size, readOnly: false, NewLayer(size), bottom);
    }

    private OverlayBackend Open(long size, bool readOnly, params string[] chain)
    {
        var layers = new List<Layer>();
        for (int i = 0; i < chain.Length; i++)
        {
            layers.Add(LayerFiles.OpenAsync(_directory, chain[i], writable: i == 0 && !readOnly).AsTask().GetAwaiter().GetResult());
        }
        return new OverlayBackend(layers, size, readOnly);
    }

    private string NewLayer(long size)
    {
        string id = $"layer{Interlocked.Increment(ref _layers)}";
        LayerFiles.CreateAsync(_directory, id, size).AsTask().GetAwaiter().GetResult();
        return id;
    }

    private async Task<Layer> NewOpenLayerAsync(long size) => await LayerFiles.OpenAsync(_directory, NewLayer(size), writable: true);

    private static DepthExtent[] Depth(OverlayBackend overlay, long offset, long length)
    {
        var extents = new DepthExtent[64];
        int count = overlay.GetDepth(offset, length, extents);
        return extents[..count];
    }
}
