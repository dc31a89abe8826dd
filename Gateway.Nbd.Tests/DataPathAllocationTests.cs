using System.Buffers;
using Xunit;

namespace Gateway.Nbd.Tests;

/// <summary>
/// The transmission phase runs per request: its readers and writers must not allocate, so that the
/// server and the peer client keep the pooled, allocation-free data path they have today.
/// </summary>
public sealed class DataPathAllocationTests
{
    private static readonly MetaExtent[] Extents = [new(4096, 0), new(8192, 3)];

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Request_and_reply_chunks_are_written_and_read_without_allocating(bool extended)
    {
        var writer = new ArrayBufferWriter<byte>(4096);
        byte[] request = new byte[NbdWire.ExtendedRequestHeaderSize];
        RoundTrip(writer, request, extended);   // warm up: JIT and static initialisation

        long before = GC.GetAllocatedBytesForCurrentThread();
        long read = RoundTrip(writer, request, extended);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;

        Assert.Equal(4096 + 8192 + 512 + 7, read);
        Assert.Equal(0, allocated);
    }

    private static long RoundTrip(ArrayBufferWriter<byte> writer, byte[] requestBytes, bool extended)
    {
        writer.ResetWrittenCount();
        int size = new NbdRequest(CommandFlags.None, NbdCommand.BlockStatus, 7, 0, 4096).WriteTo(requestBytes, extended);
        var requests = new ReadOnlySequence<byte>(requestBytes, 0, size);
        Assert.True(NbdRequest.TryRead(ref requests, extended, out NbdRequest request));

        var to = new ReplyTo(request.Cookie, request.Offset, extended);
        Replies.WriteBlockStatus(writer, to, done: false, contextId: 1, Extents);
        Replies.WriteOffsetHole(writer, to, done: false, 0, 512);
        Replies.WriteOffsetData(writer, to, done: true, 0, [1, 2, 3, 4, 5, 6, 7]);

        long total = 0;
        var replies = new ReadOnlySequence<byte>(writer.WrittenMemory);
        while (ChunkHeader.TryRead(ref replies, extended, out ChunkHeader chunk))
        {
            switch (chunk.Type)
            {
                case ReplyType.BlockStatus or ReplyType.BlockStatusExt:
                    Assert.True(ChunkPayload.TryReadBlockStatus(ref replies, chunk, out BlockStatusChunk status));
                    foreach (MetaExtent extent in status)
                    {
                        total += (long)extent.Length;
                    }
                    break;
                case ReplyType.OffsetHole:
                    Assert.True(ChunkPayload.TryReadOffsetHole(ref replies, chunk, out HoleChunk hole));
                    total += hole.Length;
                    break;
                case ReplyType.OffsetData:
                    Assert.True(ChunkPayload.TryReadOffsetData(ref replies, chunk, out DataChunk data));
                    total += (long)data.DataLength;
                    replies = replies.Slice((long)data.DataLength);
                    break;
            }
        }
        return total;
    }
}
