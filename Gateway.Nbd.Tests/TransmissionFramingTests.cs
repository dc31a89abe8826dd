using System.Buffers;
using System.Buffers.Binary;
using Xunit;
using static Gateway.Nbd.Tests.Framing;

namespace Gateway.Nbd.Tests;

/// <summary>Requests, simple replies and structured/extended reply chunks: round trips, golden bytes, bad input.</summary>
public sealed class TransmissionFramingTests
{
    private const ulong Cookie = 0x0123456789ABCDEF;
    private const ulong At = 0x0000001000000200;

    private static ReplyTo To(bool extended) => new(Cookie, extended ? At : 0, extended);

    private static readonly MetaExtent[] Extents = [new(4096, 0), new(1 << 20, (uint)(AllocationState.Hole | AllocationState.Zero)), new(512, (uint)AllocationState.Zero)];

    [Fact]
    public void Extended_request_round_trips_split_at_every_byte()
    {
        var request = new NbdRequest(CommandFlags.PayloadLen | CommandFlags.Fua, NbdCommand.Write, Cookie, At, 0x1_0000_0000);
        byte[] frame = Written(d => request.WriteTo(d, extended: true));

        Assert.Equal(NbdWire.ExtendedRequestHeaderSize, frame.Length);
        AssertReadsAtEverySplit(frame, (ref ReadOnlySequence<byte> b, out NbdRequest r) => NbdRequest.TryRead(ref b, extended: true, out r),
            r => Assert.Equal(request, r));
    }

    [Fact]
    public void Compact_request_round_trips_split_at_every_byte()
    {
        var request = new NbdRequest(CommandFlags.None, NbdCommand.BlockStatus, Cookie, At, 0xFFFF_FFFF);
        byte[] frame = Written(d => request.WriteTo(d));

        AssertReadsAtEverySplit(frame, (ref ReadOnlySequence<byte> b, out NbdRequest r) => NbdRequest.TryRead(ref b, out r),
            r => Assert.Equal(request, r));
    }

    [Fact]
    public void Extended_request_is_laid_out_as_the_spec_draws_it()
    {
        byte[] frame = Written(d => new NbdRequest(CommandFlags.ReqOne, NbdCommand.BlockStatus, Cookie, At, 0x1_0000_0000).WriteTo(d, extended: true));

        Assert.Equal(Convert.FromHexString("21e41c71" + "0008" + "0007" + "0123456789ABCDEF" + "0000001000000200" + "0000000100000000"), frame);
    }

    [Fact]
    public void Compact_request_after_extended_headers_is_a_protocol_violation()
    {
        byte[] frame = Written(d => new NbdRequest(CommandFlags.None, NbdCommand.Read, 1, 0, 512).WriteTo(d));
        var buffer = new ReadOnlySequence<byte>(frame);

        Assert.Throws<NbdProtocolException>(() => NbdRequest.TryRead(ref buffer, extended: true, out _));
    }

    [Fact]
    public void Simple_reply_round_trips_split_at_every_byte()
    {
        byte[] frame = Written(w => Replies.WriteSimple(w, Cookie, NbdError.NoSpc));

        AssertReadsAtEverySplit<SimpleReply>(frame, SimpleReply.TryRead, r => Assert.Equal(new SimpleReply(NbdError.NoSpc, Cookie), r));
    }

    [Fact]
    public void Simple_reply_is_laid_out_as_the_spec_draws_it()
    {
        byte[] frame = Written(w => Replies.WriteSimple(w, Cookie, NbdError.Io));

        Assert.Equal(Convert.FromHexString("67446698" + "00000005" + "0123456789ABCDEF"), frame);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Done_chunk_round_trips_split_at_every_byte(bool extended)
    {
        byte[] frame = Written(w => Replies.WriteDone(w, To(extended)));

        AssertReadsAtEverySplit(frame, (ref ReadOnlySequence<byte> b, out ChunkHeader c) => ChunkHeader.TryRead(ref b, extended, out c),
            c => Assert.Equal(new ChunkHeader(To(extended), ReplyFlags.Done, ReplyType.None, 0), c));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Offset_data_chunk_round_trips_split_at_every_byte(bool extended)
    {
        byte[] data = [1, 2, 3, 4, 5, 6, 7];
        byte[] frame = Written(w => Replies.WriteOffsetData(w, To(extended), done: false, At + 7, data));

        AssertReadsAtEverySplit(frame, Chunk(extended, (ref ReadOnlySequence<byte> b, in ChunkHeader h, out (DataChunk, byte[]) p) =>
        {
            p = default;
            ReadOnlySequence<byte> rest = b;
            if (!ChunkPayload.TryReadOffsetData(ref rest, h, out DataChunk chunk) || rest.Length < (long)chunk.DataLength)
            {
                return false;
            }
            p = (chunk, rest.Slice(0, (long)chunk.DataLength).ToArray());
            b = rest.Slice((long)chunk.DataLength);
            return true;
        }), f =>
        {
            Assert.Equal(new ChunkHeader(To(extended), ReplyFlags.None, ReplyType.OffsetData, 8 + 7), f.Header);
            Assert.Equal(new DataChunk(At + 7, 7), f.Payload.Item1);
            Assert.Equal(data, f.Payload.Item2);
        });
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Offset_hole_chunk_round_trips_split_at_every_byte(bool extended)
    {
        byte[] frame = Written(w => Replies.WriteOffsetHole(w, To(extended), done: true, At, 0x10000));

        AssertReadsAtEverySplit(frame, Chunk<HoleChunk>(extended, ChunkPayload.TryReadOffsetHole), f =>
        {
            Assert.Equal(new ChunkHeader(To(extended), ReplyFlags.Done, ReplyType.OffsetHole, 12), f.Header);
            Assert.Equal(new HoleChunk(At, 0x10000), f.Payload);
        });
    }

    [Fact]
    public void Structured_hole_chunk_is_laid_out_as_the_spec_draws_it()
    {
        byte[] frame = Written(w => Replies.WriteOffsetHole(w, To(false), done: true, At, 0x10000));

        Assert.Equal(Convert.FromHexString(
            "668e33ef" + "0001" + "0002" + "0123456789ABCDEF" + "0000000C" + "0000001000000200" + "00010000"), frame);
    }

    [Theory]
    [InlineData(false, null, null)]
    [InlineData(false, "no space left on the export", 0x200UL)]
    [InlineData(true, "", null)]
    [InlineData(true, "é, not ASCII", 0xFFFF_FFFF_FFFFUL)]
    public void Error_chunk_round_trips_split_at_every_byte(bool extended, string? message, ulong? offset)
    {
        byte[] frame = Written(w => Replies.WriteError(w, To(extended), NbdError.NoSpc, offset, message));

        AssertReadsAtEverySplit(frame, Chunk<ErrorChunk>(extended, ChunkPayload.TryReadError), f =>
        {
            Assert.Equal(offset is null ? ReplyType.Error : ReplyType.ErrorOffset, f.Header.Type);
            Assert.True(f.Header.Done);
            Assert.Equal(new ErrorChunk(NbdError.NoSpc, message ?? "", offset), f.Payload);
        });
    }

    [Theory]
    [InlineData("8001", "0000000A", "00000005" + "0002" + "6F6B" + "FFFF", "ok")]                 // ERROR: the message may be shorter than the chunk
    [InlineData("8003", "00000010", "0000001C" + "0000" + "0123456789ABCDEF" + "0000", "")]       // an unknown error type is an error
    [InlineData("FFFF", "00000009", "0000005F" + "0003" + "6E6F21", "no!")]
    public void Error_chunk_of_any_error_type_yields_its_error_and_message_and_skips_the_rest(string type, string length, string payload, string message)
    {
        var buffer = new ReadOnlySequence<byte>(Convert.FromHexString("668e33ef" + "0001" + type + "0123456789ABCDEF" + length + payload + "EE"));
        Assert.True(ChunkHeader.TryRead(ref buffer, extended: false, out ChunkHeader header));
        Assert.True(ChunkPayload.IsError(header.Type));

        Assert.True(ChunkPayload.TryReadError(ref buffer, header, out ErrorChunk error));

        Assert.Equal(new ErrorChunk((NbdError)Convert.ToUInt32(payload[..8], 16), message, null), error);
        Assert.Equal([0xEE], buffer.ToArray());
    }

    [Theory]
    [InlineData(ReplyType.None)]
    [InlineData(ReplyType.OffsetData)]
    [InlineData(ReplyType.BlockStatusExt)]
    public void Chunk_types_without_bit_15_are_not_errors(ReplyType type) => Assert.False(ChunkPayload.IsError(type));

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Block_status_chunk_round_trips_split_at_every_byte(bool extended)
    {
        byte[] frame = Written(w => Replies.WriteBlockStatus(w, To(extended), done: true, contextId: 7, Extents));

        AssertReadsAtEverySplit(frame, Chunk<BlockStatusChunk>(extended, ChunkPayload.TryReadBlockStatus), f =>
        {
            Assert.Equal(extended ? ReplyType.BlockStatusExt : ReplyType.BlockStatus, f.Header.Type);
            Assert.Equal(7u, f.Payload.ContextId);
            Assert.Equal(Extents.Length, f.Payload.Count);
            Assert.Equal(Extents, Descriptors(f.Payload));
        });
    }

    [Fact]
    public void Extended_block_status_chunk_is_laid_out_as_the_spec_draws_it()
    {
        byte[] frame = Written(w => Replies.WriteBlockStatus(w, To(true), done: true, contextId: 1, [new MetaExtent(0x1_0000_0000, 3)]));

        Assert.Equal(Convert.FromHexString(
            "6e8a278c" + "0001" + "0006" + "0123456789ABCDEF" + "0000001000000200" + "0000000000000018"
            + "00000001" + "00000001" + "0000000100000000" + "0000000000000003"), frame);
    }

    [Fact]
    public void Compact_block_status_descriptors_read_even_after_extended_headers()
    {
        // The spec lets a server answer with either chunk type once extended headers are on.
        byte[] frame = Convert.FromHexString(
            "6e8a278c" + "0000" + "0005" + "0123456789ABCDEF" + "0000001000000200" + "000000000000000C"
            + "00000002" + "00001000" + "00000001");
        var buffer = new ReadOnlySequence<byte>(frame);

        Assert.True(ChunkHeader.TryRead(ref buffer, extended: true, out ChunkHeader header));
        Assert.True(ChunkPayload.TryReadBlockStatus(ref buffer, header, out BlockStatusChunk status));

        Assert.Equal([new MetaExtent(0x1000, 1)], Descriptors(status));
        Assert.True(buffer.IsEmpty);
    }

    [Theory]
    [InlineData(false, 0x6e8a278cu)]
    [InlineData(true, 0x668e33efu)]
    [InlineData(false, 0x67446698u)]
    public void Chunk_header_with_the_wrong_magic_is_rejected_as_soon_as_the_magic_is_in(bool extended, uint magic)
    {
        byte[] bytes = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, magic);
        var buffer = new ReadOnlySequence<byte>(bytes);

        Assert.Throws<NbdProtocolException>(() => ChunkHeader.TryRead(ref buffer, extended, out _));
    }

    [Fact]
    public void Simple_reply_with_the_wrong_magic_is_rejected()
    {
        var buffer = new ReadOnlySequence<byte>(Written(w => Replies.WriteDone(w, To(false))));

        Assert.Throws<NbdProtocolException>(() => SimpleReply.TryRead(ref buffer, out _));
    }

    [Theory]
    [InlineData("0002", "0000000D")]   // OFFSET_HOLE is exactly 12 bytes
    [InlineData("0002", "0000000B")]
    [InlineData("0001", "00000007")]   // OFFSET_DATA holds at least its offset
    [InlineData("8001", "00000005")]   // ERROR holds at least error and message length
    [InlineData("8001", "00001007")]   // ... and a message of at most 4096 bytes
    [InlineData("0005", "00000004")]   // BLOCK_STATUS holds at least one descriptor
    [InlineData("0005", "0000000F")]   // ... and only whole 8-byte ones
    [InlineData("0006", "00000014")]   // BLOCK_STATUS_EXT: whole 16-byte descriptors
    public void Chunk_whose_length_does_not_fit_its_type_is_rejected_before_its_payload_arrives(string type, string length)
    {
        var buffer = new ReadOnlySequence<byte>(Convert.FromHexString("668e33ef" + "0001" + type + "0123456789ABCDEF" + length));
        Assert.True(ChunkHeader.TryRead(ref buffer, extended: false, out ChunkHeader header));

        Assert.Throws<NbdProtocolException>(() => ReadPayload(ref buffer, header));
    }

    [Theory]
    [InlineData("8001", "0000000A", "00000005" + "0005" + "6F6F6F6F")]          // message length past the chunk
    [InlineData("8002", "00000010", "00000005" + "0000" + "0000000000000000" + "0000")]   // bytes after the offset
    [InlineData("8001", "00000006", "00000000" + "0000")]                   // error zero
    [InlineData("0006", "00000018", "00000001" + "00000002" + "00000000000010000000000000000000")]  // count lies
    public void Chunk_payload_that_lies_about_its_lengths_is_rejected(string type, string length, string payload)
    {
        var buffer = new ReadOnlySequence<byte>(Convert.FromHexString("668e33ef" + "0001" + type + "0123456789ABCDEF" + length + payload));
        Assert.True(ChunkHeader.TryRead(ref buffer, extended: false, out ChunkHeader header));

        Assert.Throws<NbdProtocolException>(() => ReadPayload(ref buffer, header));
    }

    [Fact]
    public void Extended_status_above_32_bits_is_rejected()
    {
        var buffer = new ReadOnlySequence<byte>(Convert.FromHexString(
            "668e33ef" + "0001" + "0006" + "0123456789ABCDEF" + "00000018" + "00000001" + "00000001" + "0000000000001000" + "0000000100000000"));
        Assert.True(ChunkHeader.TryRead(ref buffer, extended: false, out ChunkHeader header));
        Assert.True(ChunkPayload.TryReadBlockStatus(ref buffer, header, out BlockStatusChunk status));

        Assert.Throws<NbdProtocolException>(() => Descriptors(status));
    }

    [Fact]
    public void Error_message_longer_than_4096_bytes_is_refused_by_the_writer()
    {
        Assert.Throws<ArgumentException>(() => Written(w => Replies.WriteError(w, To(false), NbdError.Io, message: new string('x', 4097))));
    }

    private static object ReadPayload(ref ReadOnlySequence<byte> buffer, in ChunkHeader header) => header.Type switch
    {
        ReplyType.OffsetData => ChunkPayload.TryReadOffsetData(ref buffer, header, out _),
        ReplyType.OffsetHole => ChunkPayload.TryReadOffsetHole(ref buffer, header, out _),
        ReplyType.Error or ReplyType.ErrorOffset => ChunkPayload.TryReadError(ref buffer, header, out _),
        _ => ChunkPayload.TryReadBlockStatus(ref buffer, header, out _),
    };

    private static List<MetaExtent> Descriptors(BlockStatusChunk status)
    {
        var extents = new List<MetaExtent>();
        foreach (MetaExtent extent in status)
        {
            extents.Add(extent);
        }
        return extents;
    }
}
