using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Backends;

public sealed class MemoryBackendTests : BlockDeviceContract
{
    protected override bool HasNonBlockingIo => true;

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) => new MemoryBackend(size, readOnly);

    [Fact]
    public async Task Zero_with_NoHole_keeps_pages_allocated()
    {
        using var device = new MemoryBackend(MiB);

        await device.ZeroAsync(0, 256 * KiB, ZeroFlags.NoHole);

        Assert.Equal([new Extent(256 * KiB, ExtentFlags.Data), new Extent(768 * KiB, ExtentFlags.Hole | ExtentFlags.Zero)], await AllocationAsync(device, 0, MiB));
        AssertZeros(await ReadAsync(device, 0, 256 * KiB));
    }

    [Fact]
    public async Task Trim_covering_a_short_last_page_drops_it()
    {
        using var device = new MemoryBackend(MiB + 100);
        await device.WriteAsync(MiB, Pattern(100, seed: 1), fua: false);

        await device.TrimAsync(MiB, 100, fua: false);

        Assert.Equal([new Extent(MiB + 100, ExtentFlags.Hole | ExtentFlags.Zero)], await AllocationAsync(device, 0, device.Size));
    }
}
