using Gateway.Backends;
using Gateway.Backends.Overlay;
using Gateway.Backends.Qcow2;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>The qcow2 image as an overlay's bottom store: one shared reader per file, base:allocation and depths from the chain, a bounded L2 cache.</summary>
public sealed class Qcow2DeviceTests : IDisposable
{
    private const long MiB = 1 << 20;
    private readonly QemuImages _images = new();

    public void Dispose() => _images.Dispose();

    [Fact]
    public async Task Devices_on_one_file_share_one_reader_until_the_last_is_disposed()
    {
        string path = await _images.Qcow2Async("s.qcow2", 2 * MiB);
        await _images.Io("s.qcow2", "write -P 0x5c 0 64k");
        Qcow2Device first = Qcow2Device.Open(path);
        Qcow2Device second = Qcow2Device.Open(_images.PathOf("./s.qcow2"));
        Assert.Same(first.Image, second.Image);
        first.Dispose();
        first.Dispose();
        byte[] bytes = new byte[4096];
        await second.ReadAsync(0, bytes);
        Assert.All(bytes, b => Assert.Equal(0x5c, b));
        second.Dispose();
        await Assert.ThrowsAsync<BlockDeviceException>(async () => await second.ReadAsync(0, bytes));

        using Qcow2Device again = Qcow2Device.Open(path);
        Assert.NotSame(second.Image, again.Image);
        await again.ReadAsync(0, bytes);
        Assert.All(bytes, b => Assert.Equal(0x5c, b));
    }

    [Fact]
    public async Task Allocation_and_depth_come_from_the_chain_and_writes_are_refused()
    {
        await _images.RawAsync("base.raw", MiB, 0x01);
        await _images.Qcow2Async("top.qcow2", 2 * MiB, "-b", "base.raw", "-F", "raw");
        await _images.Io("top.qcow2", "write -P 0x02 64k 64k", "write -z 128k 64k");
        using Qcow2Device device = Qcow2Device.Open(_images.PathOf("top.qcow2"));

        Extent[] extents = new Extent[8];
        int n = await device.GetAllocationAsync(0, 2 * MiB, extents);
        Assert.Equal(
            [new Extent(128 * 1024, ExtentFlags.Data), new Extent(64 * 1024, ExtentFlags.Hole | ExtentFlags.Zero), new Extent(MiB - 192 * 1024, ExtentFlags.Data), new Extent(MiB, ExtentFlags.Hole | ExtentFlags.Zero)],
            extents[..n]);

        DepthExtent[] depths = new DepthExtent[8];
        n = device.GetDepth(0, 2 * MiB, depths);
        Assert.Equal(
            [new DepthExtent(64 * 1024, 2), new DepthExtent(128 * 1024, 1), new DepthExtent(2 * MiB - 192 * 1024, 2)],
            depths[..n]);

        var e = await Assert.ThrowsAsync<BlockDeviceException>(async () => await device.WriteAsync(0, new byte[512], fua: false));
        Assert.Equal(BlockErrorKind.ReadOnly, e.Kind);
    }

    [Fact]
    public async Task A_read_whose_l2_tables_are_cached_is_served_without_waiting_and_one_that_needs_io_is_not()
    {
        await _images.RawAsync("nw.raw", 2 * MiB, 0x01);
        await _images.Qcow2Async("nw.qcow2", 4 * MiB, "-b", "nw.raw", "-F", "raw", "-o", "cluster_size=4k");
        await _images.Io("nw.qcow2", "write -P 0x02 64k 8k", "write -c -P 0x03 1M 4k", "write -z 128k 4k");
        using Qcow2Device device = Qcow2Device.Open(_images.PathOf("nw.qcow2"));
        byte[] bytes = new byte[8192];

        // Nothing cached yet: the L2 table must be read first, so the fast path declines.
        Assert.False(device.TryReadNoWait(64 * 1024, bytes));
        await device.ReadAsync(64 * 1024, bytes);
        Assert.True(device.TryReadNoWait(64 * 1024, bytes)); // the L2 table cached, the data in the page cache
        Assert.All(bytes, b => Assert.Equal(0x02, b));

        // Zeros, the raw backing file past the qcow2's data, and beyond the backing file's end.
        Assert.True(device.TryReadNoWait(128 * 1024, bytes.AsSpan(0, 4096)));
        Assert.All(bytes.AsSpan(0, 4096).ToArray(), b => Assert.Equal(0, b));
        Assert.True(device.TryReadNoWait(256 * 1024, bytes));
        Assert.All(bytes, b => Assert.Equal(0x01, b));
        Assert.True(device.TryReadNoWait(3 * MiB, bytes));
        Assert.All(bytes, b => Assert.Equal(0, b));

        // A compressed cluster waits for its decompression once, then is served from it.
        Assert.False(device.TryReadNoWait(MiB, bytes.AsSpan(0, 4096)));
        await device.ReadAsync(MiB, bytes.AsMemory(0, 4096));
        bytes.AsSpan().Clear();
        Assert.True(device.TryReadNoWait(MiB, bytes.AsSpan(0, 4096)));
        Assert.All(bytes.AsSpan(0, 4096).ToArray(), b => Assert.Equal(0x03, b));

        Assert.False(device.TryReadNoWait(4 * MiB - 4096, bytes)); // past the end: the slow path answers the error
        Assert.False(device.TryWriteNoWait(0, bytes));
    }

    [Fact]
    public void The_l2_cache_keeps_at_most_its_capacity_and_the_most_recent_tables()
    {
        var cache = new L2Cache(4);
        for (long i = 0; i < 10; i++)
        {
            cache.Add(i << 16, new byte[1]);
            Assert.True(cache.TryGet(0, out _) || i >= 4);
        }
        Assert.Equal(4, cache.Count);
        Assert.False(cache.TryGet(1 << 16, out _));
        Assert.True(cache.TryGet(9L << 16, out _));
    }
}
