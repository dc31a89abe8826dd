using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// Reads through a device that forwards to another process and reads segments (a cluster node's
/// link to the export's owner, <see cref="ISegmentedReads"/>): the holes of its reads reach a
/// client with structured replies or extended headers as OFFSET_HOLE chunks, the hole bytes are
/// never sent, and the allocation is never asked for (that would be a second round trip to the
/// owner per read). A client without structured replies reads zeros (issue 16, item 3).
/// </summary>
[Collection(NbdServerCollection.Name)]
public sealed class ForwardedReadTests : IAsyncLifetime
{
    private const int KiB = 1024;
    private const string Export = "forwarded";

    private readonly ForwardingDevice _device = new(new MemoryBackend(4 * 1024 * KiB));
    private readonly NbdTestServer _server;

    public ForwardedReadTests()
    {
        var exports = new TestExportDirectory();
        exports.AddAsIs(Export, _device);
        _server = new NbdTestServer(exports);
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _server.DisposeAsync();

    private async Task<RawClient> OpenAsync(string mode)
    {
        if (mode != "extended")
        {
            return await _server.OpenAsync(Export, structured: mode == "structured");
        }
        return await _server.OpenExtendedAsync(Export);
    }

    [Theory]
    [InlineData("structured")]
    [InlineData("extended")]
    public async Task Holes_of_a_forwarded_read_are_OFFSET_HOLE_chunks_without_an_allocation_query(string mode)
    {
        // The memory backend allocates 64 KiB pages.
        byte[] data = RawClient.Pattern(64 * KiB, 21);
        await _device.Inner.WriteAsync(128 * KiB, data, fua: false);
        await using RawClient client = await OpenAsync(mode);

        // Small and large reads alike: the holes come with the data, so any read may carry them.
        NbdReply small = await client.ReadAsync(120 * KiB, 16 * KiB);
        NbdReply large = await client.ReadAsync(0, 512 * KiB);

        Assert.Equal(NbdError.None, small.Error);
        Assert.Equal(
            [(ReplyType.OffsetHole, 120ul * KiB, 8u * KiB), (ReplyType.OffsetData, 128ul * KiB, 8u * KiB)],
            small.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        Assert.Equal(
            [(ReplyType.OffsetHole, 0ul, 128u * KiB), (ReplyType.OffsetData, 128ul * KiB, 64u * KiB), (ReplyType.OffsetHole, 192ul * KiB, 320u * KiB)],
            large.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        foreach (NbdReply reply in new[] { small, large })
        {
            Assert.Single(reply.Chunks, c => c.Done);
            Assert.True(reply.Chunks[^1].Done);
        }
        // The hole bytes the device left in the buffer (0xEE) are not what the client reads.
        Assert.Equal([.. new byte[128 * KiB], .. data, .. new byte[320 * KiB]], large.Data(0, 512 * KiB));
        Assert.Equal(0, _device.AllocationQueries);
        Assert.Equal(2, _device.SegmentedReads);
    }

    [Fact]
    public async Task A_forwarded_read_with_DF_is_one_data_chunk()
    {
        await using RawClient client = await OpenAsync("structured");

        NbdReply reply = await client.ReadAsync(0, 128 * KiB, CommandFlags.DontFragment);

        Assert.Equal([(ReplyType.OffsetData, 0ul, 128u * KiB)], reply.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        Assert.Equal(new byte[128 * KiB], reply.Data(0, 128 * KiB));
        Assert.Equal(0, _device.SegmentedReads);
    }

    [Fact]
    public async Task A_client_without_structured_replies_reads_zeros_for_the_holes()
    {
        byte[] data = RawClient.Pattern(64 * KiB, 22);
        await _device.Inner.WriteAsync(128 * KiB, data, fua: false);
        await using RawClient client = await OpenAsync("simple");

        NbdReply reply = await client.ReadAsync(64 * KiB, 192 * KiB);

        Assert.False(reply.Structured);
        Assert.Equal([.. new byte[64 * KiB], .. data, .. new byte[64 * KiB]], reply.Data(64 * KiB, 192 * KiB));
        Assert.Equal(0, _device.SegmentedReads);
        Assert.Equal(0, _device.AllocationQueries);
    }

    [Fact]
    public async Task A_link_whose_owner_is_this_node_reads_through_the_allocation_path()
    {
        _device.Local = true;
        byte[] data = RawClient.Pattern(64 * KiB, 23);
        await _device.Inner.WriteAsync(128 * KiB, data, fua: false);
        await using RawClient client = await OpenAsync("structured");

        NbdReply reply = await client.ReadAsync(0, 512 * KiB);

        Assert.Equal(
            [(ReplyType.OffsetHole, 0ul, 128u * KiB), (ReplyType.OffsetData, 128ul * KiB, 64u * KiB), (ReplyType.OffsetHole, 192ul * KiB, 320u * KiB)],
            reply.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        Assert.Equal([.. new byte[128 * KiB], .. data, .. new byte[320 * KiB]], reply.Data(0, 512 * KiB));
        Assert.Equal(1, _device.AllocationQueries);
        Assert.Equal(0, _device.SegmentedReads);
    }

    [Theory]
    [InlineData("structured")]
    [InlineData("extended")]
    public async Task The_owner_s_error_offset_reaches_the_client_as_an_ERROR_OFFSET_chunk(string mode)
    {
        await using RawClient client = await OpenAsync(mode);

        _device.FailAt = 200 * KiB;
        NbdReply within = await client.ReadAsync(128 * KiB, 128 * KiB);
        // An offset outside the request is not the client's to know: a plain ERROR chunk.
        // A read with DF is not segmented (one data chunk) and still gets the offset.
        NbdReply unsegmented = await client.ReadAsync(128 * KiB, 128 * KiB, CommandFlags.DontFragment);
        _device.FailAt = 8 * KiB;
        NbdReply outside = await client.ReadAsync(128 * KiB, 128 * KiB);

        ReplyChunk error = Assert.Single(within.Chunks);
        Assert.Equal((ReplyType.ErrorOffset, NbdError.Io, 200ul * KiB), (error.Type, error.Error, error.ErrorOffset));
        Assert.True(error.Done);
        error = Assert.Single(unsegmented.Chunks);
        Assert.Equal((ReplyType.ErrorOffset, NbdError.Io, 200ul * KiB), (error.Type, error.Error, error.ErrorOffset));
        error = Assert.Single(outside.Chunks);
        Assert.Equal((ReplyType.Error, NbdError.Io, (ulong?)null), (error.Type, error.Error, error.ErrorOffset));
    }

    /// <summary>
    /// Stands for a link to the owner: remote, reads segments from the inner device's allocation
    /// and fills the holes' bytes with 0xEE, which a correct server never sends.
    /// </summary>
    private sealed class ForwardingDevice(IBlockDevice inner) : IBlockDevice, IForwardingDevice, ISegmentedReads, IRequestBatch
    {
        private int _allocationQueries;
        private int _segmentedReads;

        public IBlockDevice Inner { get; } = inner;

        public int AllocationQueries => Volatile.Read(ref _allocationQueries);

        public int SegmentedReads => Volatile.Read(ref _segmentedReads);

        public long Size => Inner.Size;

        public bool IsReadOnly => Inner.IsReadOnly;

        public BlockCapabilities Capabilities => Inner.Capabilities;

        /// <summary>The owner is this node: no segmented reads, the allocation is a local call.</summary>
        public bool Local { get; set; }

        /// <summary>Reads fail with EIO at this offset, as an owner's ERROR_OFFSET chunk says.</summary>
        public long? FailAt { get; set; }

        public bool IsRemote => !Local;

        public bool ReadsSegments => !Local;

        public IRequestBatch? Cork() => this;

        public void Uncork()
        {
        }

        public async ValueTask<int> ReadSegmentsAsync(long offset, Memory<byte> destination, Memory<Extent> segments, CancellationToken cancellationToken = default)
        {
            Interlocked.Increment(ref _segmentedReads);
            if (FailAt is long failAt)
            {
                throw new BlockDeviceException(BlockErrorKind.Io, "the owner's read failed") { Offset = failAt };
            }
            int n = await Inner.GetAllocationAsync(offset, destination.Length, segments, cancellationToken);
            long at = 0;
            for (int i = 0; i < n; i++)
            {
                Extent extent = segments.Span[i];
                Memory<byte> range = destination.Slice((int)at, (int)extent.Length);
                if ((extent.Flags & ExtentFlags.Hole) != 0)
                {
                    range.Span.Fill(0xEE);
                    segments.Span[i] = extent with { Flags = ExtentFlags.Hole };
                }
                else
                {
                    await Inner.ReadAsync(offset + at, range, cancellationToken);
                }
                at += extent.Length;
            }
            return n;
        }

        public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
        {
            Interlocked.Increment(ref _allocationQueries);
            return Inner.GetAllocationAsync(offset, length, extents, cancellationToken);
        }

        public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) =>
            FailAt is long failAt
                ? ValueTask.FromException(new BlockDeviceException(BlockErrorKind.Io, "the owner's read failed") { Offset = failAt })
                : Inner.ReadAsync(offset, destination, cancellationToken);

        public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) => Inner.WriteAsync(offset, source, fua, cancellationToken);

        public ValueTask FlushAsync(CancellationToken cancellationToken = default) => Inner.FlushAsync(cancellationToken);

        public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) => Inner.TrimAsync(offset, length, fua, cancellationToken);

        public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) => Inner.ZeroAsync(offset, length, flags, cancellationToken);

        public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) => Inner.CacheAsync(offset, length, cancellationToken);

        public void Dispose() => Inner.Dispose();
    }
}
