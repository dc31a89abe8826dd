using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Backends;

/// <summary>
/// The behaviour every <see cref="IBlockDevice"/> must have. Each backend gets a subclass that
/// only says how to create a device. Allocation tests use 64 KiB-aligned ranges so they hold for
/// any allocation granularity up to that (filesystem blocks, memory pages).
/// </summary>
public abstract class BlockDeviceContract
{
    protected const int KiB = 1024;
    protected const int MiB = 1024 * 1024;
    private const ExtentFlags HoleZero = ExtentFlags.Hole | ExtentFlags.Zero;

    /// <summary>A new device of <paramref name="size"/> bytes reading as zeros.</summary>
    protected abstract IBlockDevice CreateDevice(long size, bool readOnly = false);

    /// <summary>Whether the backend offers the page-cache fast path (<see cref="INonBlockingIo"/>).</summary>
    protected virtual bool HasNonBlockingIo => false;

    /// <summary>
    /// The device offers <see cref="INonBlockingIo"/> for the times its target is in this process,
    /// but the target this suite gives it is not: every attempt must decline (the caller then takes
    /// the asynchronous path), never succeed with bytes it did not read.
    /// </summary>
    protected virtual bool DeclinesNonBlockingIo => false;

    [Fact]
    public async Task Non_blocking_reads_return_what_ReadAsync_returns_or_decline()
    {
        using IBlockDevice device = CreateDevice(2 * MiB);
        if (DeclinesNonBlockingIo)
        {
            INonBlockingIo remote = Assert.IsAssignableFrom<INonBlockingIo>(device);
            await device.WriteAsync(0, Pattern(4096, seed: 11), fua: false);
            byte[] buffer = new byte[4096];
            Assert.False(remote.TryReadNoWait(0, buffer), "a device whose target is elsewhere cannot read without waiting");
            Assert.False(remote.TryWriteNoWait(0, buffer), "a device whose target is elsewhere cannot write without waiting");
            Assert.Equal(Pattern(4096, seed: 11), await ReadAsync(device, 0, 4096));
            return;
        }
        if (!HasNonBlockingIo)
        {
            Assert.IsNotAssignableFrom<INonBlockingIo>(device);
            return;
        }
        INonBlockingIo io = Assert.IsAssignableFrom<INonBlockingIo>(device);
        byte[] data = new byte[3 * 4096];
        new Random(11).NextBytes(data);
        await device.WriteAsync(MiB - 4096, data, fua: false);
        await device.FlushAsync();
        int served = 0;
        foreach ((long offset, int length) in new[] { (MiB - 4096L, 3 * 4096), (MiB - 10L, 20), (0L, 4096), (2 * MiB - 4096L, 4096) })
        {
            byte[] expected = new byte[length];
            await device.ReadAsync(offset, expected);
            byte[] actual = new byte[length];
            // The data was just written, so it is in memory; a decline is allowed but must leave the caller able to fall back.
            if (io.TryReadNoWait(offset, actual))
            {
                Assert.Equal(expected, actual);
                served++;
            }
        }
        Assert.True(served > 0, "data just written and flushed is in memory: the fast path must serve some of it");
        Assert.False(io.TryReadNoWait(2 * MiB - 10, new byte[20]), "a read past the end must decline, not succeed");
    }

    [Fact]
    public void New_device_reports_its_size_and_mode()
    {
        using IBlockDevice device = CreateDevice(3 * MiB + 123);
        using IBlockDevice readOnly = CreateDevice(MiB, readOnly: true);

        Assert.Equal(3 * MiB + 123, device.Size);
        Assert.False(device.IsReadOnly);
        Assert.True(readOnly.IsReadOnly);
        Assert.Equal(BlockCapabilities.None, readOnly.Capabilities & (BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero));
    }

    [Fact]
    public async Task New_device_reads_zeros()
    {
        using IBlockDevice device = CreateDevice(MiB + 7);
        byte[] buffer = Filled((int)device.Size, 0xAA);

        await device.ReadAsync(0, buffer);

        AssertZeros(buffer);
    }

    [Theory]
    [InlineData(0, 4096)]
    [InlineData(65_530, 200_000)] // unaligned, crosses several 64 KiB boundaries
    [InlineData(1, 1)]
    [InlineData(2 * MiB - 10, 10)] // the last bytes of the device
    public async Task Read_after_write_returns_the_written_bytes(int offset, int length)
    {
        using IBlockDevice device = CreateDevice(2 * MiB);
        byte[] data = Pattern(length, seed: offset);

        await device.WriteAsync(offset, data, fua: false);

        Assert.Equal(data, await ReadAsync(device, offset, length));
        // The bytes around the write are untouched.
        byte[] whole = await ReadAsync(device, 0, (int)device.Size);
        AssertZeros(whole.AsSpan(0, offset));
        AssertZeros(whole.AsSpan(offset + length));
    }

    [Fact]
    public async Task Overlapping_write_replaces_only_its_own_range()
    {
        using IBlockDevice device = CreateDevice(MiB);
        byte[] first = Pattern(300_000, seed: 1);
        byte[] second = Pattern(100_000, seed: 2);

        await device.WriteAsync(10_000, first, fua: false);
        await device.WriteAsync(70_000, second, fua: true);

        byte[] expected = new byte[MiB];
        first.CopyTo(expected, 10_000);
        second.CopyTo(expected, 70_000);
        Assert.Equal(expected, await ReadAsync(device, 0, MiB));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Trim_then_read_returns_zeros(bool fua)
    {
        using IBlockDevice device = CreateDevice(MiB);
        byte[] data = Pattern(300_000, seed: 3);
        await device.WriteAsync(0, data, fua: false);

        // Unaligned at both ends, covering whole pages in between.
        await device.TrimAsync(1000, 200_000, fua);

        byte[] read = await ReadAsync(device, 0, 300_000);
        Assert.Equal(data.AsSpan(0, 1000), read.AsSpan(0, 1000));
        AssertZeros(read.AsSpan(1000, 200_000));
        Assert.Equal(data.AsSpan(201_000), read.AsSpan(201_000));
    }

    [Theory]
    [InlineData(ZeroFlags.None)]
    [InlineData(ZeroFlags.NoHole)]
    [InlineData(ZeroFlags.Fua)]
    [InlineData(ZeroFlags.NoHole | ZeroFlags.Fua)]
    public async Task Zero_then_read_returns_zeros(ZeroFlags flags)
    {
        using IBlockDevice device = CreateDevice(MiB);
        byte[] data = Pattern(300_000, seed: 4);
        await device.WriteAsync(0, data, fua: false);

        await device.ZeroAsync(1000, 200_000, flags);

        byte[] read = await ReadAsync(device, 0, 300_000);
        Assert.Equal(data.AsSpan(0, 1000), read.AsSpan(0, 1000));
        AssertZeros(read.AsSpan(1000, 200_000));
        Assert.Equal(data.AsSpan(201_000), read.AsSpan(201_000));
    }

    [Fact]
    public async Task Fast_zero_succeeds_when_advertised()
    {
        using IBlockDevice device = CreateDevice(4 * MiB);
        Assert.True(device.Capabilities.HasFlag(BlockCapabilities.FastZero));
        await device.WriteAsync(MiB, Pattern(MiB, seed: 5), fua: false);

        await device.ZeroAsync(MiB, MiB, ZeroFlags.FastZero);

        AssertZeros(await ReadAsync(device, MiB, MiB));
    }

    [Fact]
    public async Task Zero_length_requests_change_nothing()
    {
        using IBlockDevice device = CreateDevice(MiB);
        byte[] data = Pattern(MiB, seed: 6);
        await device.WriteAsync(0, data, fua: false);

        await device.WriteAsync(MiB, ReadOnlyMemory<byte>.Empty, fua: false);
        await device.TrimAsync(100, 0, fua: false);
        await device.ZeroAsync(100, 0, ZeroFlags.None);
        await device.CacheAsync(100, 0);
        int count = await device.GetAllocationAsync(100, 0, new Extent[4]);

        Assert.Equal(0, count);
        Assert.Equal(data, await ReadAsync(device, 0, MiB));
    }

    [Fact]
    public async Task New_device_is_one_hole()
    {
        using IBlockDevice device = CreateDevice(16 * MiB);

        Extent[] extents = await AllocationAsync(device, 0, device.Size);

        Assert.Equal([new Extent(16 * MiB, HoleZero)], extents);
    }

    [Fact]
    public async Task Written_range_is_data_and_the_rest_a_hole()
    {
        using IBlockDevice device = CreateDevice(16 * MiB);

        await device.WriteAsync(4 * MiB, Pattern(MiB, seed: 7), fua: false);

        Extent[] extents = await AllocationAsync(device, 0, device.Size);
        Assert.Equal([new Extent(4 * MiB, HoleZero), new Extent(MiB, ExtentFlags.Data), new Extent(11 * MiB, HoleZero)], extents);
    }

    [Fact]
    public async Task Allocation_starts_at_the_offset_and_stops_at_the_length()
    {
        using IBlockDevice device = CreateDevice(16 * MiB);
        await device.WriteAsync(4 * MiB, Pattern(MiB, seed: 8), fua: false);

        Extent[] inside = await AllocationAsync(device, 4 * MiB + 100, 512 * KiB);
        Extent[] across = await AllocationAsync(device, 3 * MiB + 5, 2 * MiB);

        Assert.Equal([new Extent(512 * KiB, ExtentFlags.Data)], inside);
        Assert.Equal([new Extent(MiB - 5, HoleZero), new Extent(MiB, ExtentFlags.Data), new Extent(5, HoleZero)], across);
    }

    [Fact]
    public async Task Allocation_stops_when_the_extent_buffer_is_full()
    {
        using IBlockDevice device = CreateDevice(MiB);
        // Alternating data and holes, 64 KiB each.
        for (int offset = 0; offset < MiB; offset += 128 * KiB)
        {
            await device.WriteAsync(offset, Pattern(64 * KiB, seed: offset), fua: false);
        }

        var extents = new Extent[3];
        int count = await device.GetAllocationAsync(0, MiB, extents);

        Assert.Equal(3, count);
        Assert.Equal([new Extent(64 * KiB, ExtentFlags.Data), new Extent(64 * KiB, HoleZero), new Extent(64 * KiB, ExtentFlags.Data)], extents);
    }

    [Fact]
    public async Task Trim_makes_a_hole()
    {
        using IBlockDevice device = CreateDevice(16 * MiB);
        await device.WriteAsync(4 * MiB, Pattern(2 * MiB, seed: 9), fua: false);

        await device.TrimAsync(4 * MiB, MiB, fua: false);

        Extent[] extents = await AllocationAsync(device, 0, device.Size);
        Assert.Equal([new Extent(5 * MiB, HoleZero), new Extent(MiB, ExtentFlags.Data), new Extent(10 * MiB, HoleZero)], extents);
        AssertZeros(await ReadAsync(device, 4 * MiB, MiB));
    }

    [Fact]
    public async Task Read_only_device_refuses_writes_trims_and_zeros()
    {
        using IBlockDevice device = CreateDevice(MiB, readOnly: true);

        await AssertFails(BlockErrorKind.ReadOnly, () => device.WriteAsync(0, new byte[512], fua: false));
        await AssertFails(BlockErrorKind.ReadOnly, () => device.TrimAsync(0, 512, fua: false));
        await AssertFails(BlockErrorKind.ReadOnly, () => device.ZeroAsync(0, 512, ZeroFlags.None));
        // Reading, flushing and asking about allocation still work.
        AssertZeros(await ReadAsync(device, 0, 512));
        await device.FlushAsync();
        Assert.Equal(1, await device.GetAllocationAsync(0, MiB, new Extent[4]));
    }

    [Fact]
    public async Task Write_past_end_throws_NoSpace()
    {
        using IBlockDevice device = CreateDevice(MiB);

        await AssertFails(BlockErrorKind.NoSpace, () => device.WriteAsync(MiB - 100, new byte[101], fua: false));
        await AssertFails(BlockErrorKind.NoSpace, () => device.WriteAsync(MiB + 1, new byte[1], fua: false));
        await AssertFails(BlockErrorKind.NoSpace, () => device.WriteAsync(long.MaxValue, new byte[1], fua: false));
        // Nothing was written by the refused request that straddled the end.
        AssertZeros(await ReadAsync(device, MiB - 100, 100));
    }

    [Fact]
    public async Task Zero_past_end_throws_NoSpace()
    {
        using IBlockDevice device = CreateDevice(MiB);

        await AssertFails(BlockErrorKind.NoSpace, () => device.ZeroAsync(MiB - 100, 101, ZeroFlags.None));
        await AssertFails(BlockErrorKind.NoSpace, () => device.ZeroAsync(1, long.MaxValue, ZeroFlags.NoHole));
    }

    [Fact]
    public async Task Read_trim_cache_and_allocation_past_end_throw_InvalidArgument()
    {
        using IBlockDevice device = CreateDevice(MiB);

        await AssertFails(BlockErrorKind.InvalidArgument, () => device.ReadAsync(MiB - 100, new byte[101]));
        await AssertFails(BlockErrorKind.InvalidArgument, () => device.TrimAsync(MiB, 1, fua: false));
        await AssertFails(BlockErrorKind.InvalidArgument, () => device.CacheAsync(0, MiB + 1));
        await AssertFails(BlockErrorKind.InvalidArgument, () => device.GetAllocationAsync(1, long.MaxValue, new Extent[4]));
    }

    [Fact]
    public async Task Negative_offsets_and_lengths_throw_InvalidArgument()
    {
        using IBlockDevice device = CreateDevice(MiB);

        await AssertFails(BlockErrorKind.InvalidArgument, () => device.ReadAsync(-1, new byte[1]));
        await AssertFails(BlockErrorKind.InvalidArgument, () => device.WriteAsync(-1, new byte[1], fua: false));
        await AssertFails(BlockErrorKind.InvalidArgument, () => device.TrimAsync(0, -1, fua: false));
        await AssertFails(BlockErrorKind.InvalidArgument, () => device.ZeroAsync(0, -1, ZeroFlags.None));
    }

    [Fact]
    public async Task Concurrent_writers_to_disjoint_ranges_all_land()
    {
        const int Writers = 16, WritesEach = 24, Block = 12_345; // odd size: neighbours share pages
        using IBlockDevice device = CreateDevice((long)Writers * WritesEach * Block);

        await Task.WhenAll(Enumerable.Range(0, Writers).Select(writer => Task.Run(async () =>
        {
            for (int i = 0; i < WritesEach; i++)
            {
                // Interleave the writers' blocks so concurrent requests touch neighbouring bytes.
                int block = i * Writers + writer;
                byte[] data = Pattern(Block, seed: block);
                await device.WriteAsync((long)block * Block, data, fua: false);
                Assert.Equal(data, await ReadAsync(device, (long)block * Block, Block));
            }
        })));

        byte[] all = await ReadAsync(device, 0, (int)device.Size);
        for (int block = 0; block < Writers * WritesEach; block++)
        {
            Assert.Equal(Pattern(Block, seed: block), all.AsSpan(block * Block, Block));
        }
    }

    [Fact]
    public async Task Flush_keeps_completed_writes_readable()
    {
        using IBlockDevice device = CreateDevice(MiB);
        byte[] data = Pattern(100_000, seed: 10);
        await device.WriteAsync(5000, data, fua: false);

        await device.FlushAsync();

        Assert.Equal(data, await ReadAsync(device, 5000, data.Length));
    }

    [Fact]
    public async Task Cache_leaves_contents_unchanged()
    {
        using IBlockDevice device = CreateDevice(MiB);
        byte[] data = Pattern(MiB, seed: 11);
        await device.WriteAsync(0, data, fua: false);

        await device.CacheAsync(1000, 500_000);

        Assert.Equal(data, await ReadAsync(device, 0, MiB));
    }

    [Fact]
    public async Task Use_after_dispose_throws_Shutdown()
    {
        IBlockDevice device = CreateDevice(MiB);
        device.Dispose();

        await AssertFails(BlockErrorKind.Shutdown, () => device.ReadAsync(0, new byte[1]));
        await AssertFails(BlockErrorKind.Shutdown, () => device.WriteAsync(0, new byte[1], fua: false));
        await AssertFails(BlockErrorKind.Shutdown, () => device.FlushAsync());
        await AssertFails(BlockErrorKind.Shutdown, () => device.TrimAsync(0, 1, fua: false));
        await AssertFails(BlockErrorKind.Shutdown, () => device.ZeroAsync(0, 1, ZeroFlags.None));
        await AssertFails(BlockErrorKind.Shutdown, () => device.CacheAsync(0, 1));
        await AssertFails(BlockErrorKind.Shutdown, () => device.GetAllocationAsync(0, 1, new Extent[1]));
        device.Dispose(); // a second Dispose is harmless
    }

    [Fact]
    public async Task Cancelled_token_cancels_before_touching_the_device()
    {
        using IBlockDevice device = CreateDevice(MiB);
        using var cts = new CancellationTokenSource();
        cts.Cancel();

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => device.WriteAsync(0, Filled(100, 1), fua: false, cts.Token).AsTask());

        AssertZeros(await ReadAsync(device, 0, 100));
    }

    protected static async Task<byte[]> ReadAsync(IBlockDevice device, long offset, int length)
    {
        byte[] buffer = Filled(length, 0xAA); // not zeros, so a read that skips bytes shows
        await device.ReadAsync(offset, buffer);
        return buffer;
    }

    protected static async Task<Extent[]> AllocationAsync(IBlockDevice device, long offset, long length)
    {
        var extents = new Extent[64];
        int count = await device.GetAllocationAsync(offset, length, extents);
        return extents[..count];
    }

    protected static async Task AssertFails(BlockErrorKind kind, Func<ValueTask> action)
    {
        var e = await Assert.ThrowsAsync<BlockDeviceException>(() => action().AsTask());
        Assert.Equal(kind, e.Kind);
    }

    protected static async Task AssertFails<T>(BlockErrorKind kind, Func<ValueTask<T>> action)
    {
        var e = await Assert.ThrowsAsync<BlockDeviceException>(() => action().AsTask());
        Assert.Equal(kind, e.Kind);
    }

    protected static void AssertZeros(ReadOnlySpan<byte> bytes)
    {
        int nonZero = bytes.IndexOfAnyExcept((byte)0);
        Assert.True(nonZero < 0, $"Expected zeros, found {(nonZero < 0 ? 0 : bytes[nonZero])} at {nonZero}.");
    }

    protected static byte[] Pattern(int length, int seed)
    {
        byte[] data = new byte[length];
        new Random(seed).NextBytes(data);
        // Never zero, so a lost write cannot pass for a hole.
        for (int i = 0; i < data.Length; i++)
        {
            data[i] |= 1;
        }

        return data;
    }

    private static byte[] Filled(int length, byte value)
    {
        byte[] data = new byte[length];
        data.AsSpan().Fill(value);
        return data;
    }
}
