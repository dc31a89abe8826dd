using System.Diagnostics;
using Gateway.Actors.Exports;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Actors;

/// <summary>
/// Issue 17 (fencing): an owner whose lease deadline passed, or whose lease another node took,
/// applies nothing, and says ESHUTDOWN so that a forwarding node sends the request to the next owner.
/// </summary>
public sealed class FencedDeviceTests
{
    private static long In(TimeSpan span) => Stopwatch.GetTimestamp() + (long)(span.TotalSeconds * Stopwatch.Frequency);

    [Fact]
    public async Task A_closed_fence_refuses_every_request_with_ESHUTDOWN_and_nothing_reaches_the_device()
    {
        using var memory = new MemoryBackend(1 << 20);
        var fence = new OwnershipFence();
        using var device = new FencedDevice(memory, fence);
        byte[] block = Enumerable.Repeat((byte)0x5A, 4096).ToArray();

        Func<Task>[] requests =
        [
            () => device.WriteAsync(0, block, fua: false).AsTask(),
            () => device.ReadAsync(0, new byte[4096]).AsTask(),
            () => device.FlushAsync().AsTask(),
            () => device.TrimAsync(0, 4096, fua: false).AsTask(),
            () => device.ZeroAsync(0, 4096, ZeroFlags.None).AsTask(),
            () => device.CacheAsync(0, 4096).AsTask(),
            () => device.GetAllocationAsync(0, 4096, new Extent[4]).AsTask(),
        ];
        foreach (Func<Task> request in requests)
        {
            BlockDeviceException refused = await Assert.ThrowsAsync<BlockDeviceException>(request);
            Assert.Equal(BlockErrorKind.Shutdown, refused.Kind);
        }
        Assert.False(device.TryWriteNoWait(0, block));
        byte[] read = new byte[4096];
        await memory.ReadAsync(0, read);
        Assert.All(read, b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task An_open_fence_serves_until_its_deadline_then_refuses()
    {
        using var memory = new MemoryBackend(1 << 20);
        var fence = new OwnershipFence();
        using var device = new FencedDevice(memory, fence);
        fence.ExtendTo(In(TimeSpan.FromMilliseconds(300)));
        await device.WriteAsync(0, new byte[] { 1, 2, 3, 4 }, fua: false);

        // An earlier deadline never shortens a later one.
        fence.ExtendTo(In(TimeSpan.FromMilliseconds(-1000)));
        Assert.True(fence.IsOpen);

        await Task.Delay(500);
        Assert.False(fence.IsOpen);
        BlockDeviceException late = await Assert.ThrowsAsync<BlockDeviceException>(() => device.WriteAsync(0, new byte[] { 9 }, fua: false).AsTask());
        Assert.Equal(BlockErrorKind.Shutdown, late.Kind);
        Assert.Contains("not renewed in time", late.Message);
    }

    [Fact]
    public async Task A_revoked_fence_stays_closed_whatever_a_late_renewal_says()
    {
        using var memory = new MemoryBackend(1 << 20);
        var fence = new OwnershipFence();
        using var device = new FencedDevice(memory, fence);
        fence.ExtendTo(In(TimeSpan.FromSeconds(30)));
        fence.Revoke("another node holds the export's lease");
        fence.ExtendTo(In(TimeSpan.FromSeconds(60)));
        Assert.False(fence.IsOpen);
        BlockDeviceException refused = await Assert.ThrowsAsync<BlockDeviceException>(() => device.WriteAsync(0, new byte[] { 9 }, fua: false).AsTask());
        Assert.Contains("another node holds", refused.Message);
    }
}
