using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Actors.Nbd;

/// <summary>Writers for transmission-phase replies, straight into the connection's output buffer.</summary>
public static class Replies
{
    // S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
    // S: 32 bits, error (MAY be zero)
    // S: 64 bits, cookie
    // S: (length bytes of data if the request is of type NBD_CMD_READ and error is zero)
    public static void WriteSimple(IBufferWriter<byte> writer, ulong cookie, NbdError error)
    {
        Span<byte> span = writer.GetSpan(NbdLimits.SimpleReplyHeaderSize);
        BinaryPrimitives.WriteUInt32BigEndian(span, NbdMagic.SimpleReply);
        BinaryPrimitives.WriteUInt32BigEndian(span[4..], (uint)error);
        BinaryPrimitives.WriteUInt64BigEndian(span[8..], cookie);
        writer.Advance(NbdLimits.SimpleReplyHeaderSize);
    }

    // S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)
    // S: 16 bits, flags
    // S: 16 bits, type
    // S: 64 bits, cookie
    // S: 32 bits, length of payload (unsigned)
    // S: length bytes of payload data (if length is nonzero)
    public static void WriteChunkHeader(IBufferWriter<byte> writer, ulong cookie, ReplyFlags flags, ReplyType type, uint length)
    {
        Span<byte> span = writer.GetSpan(NbdLimits.StructuredReplyHeaderSize);
        WriteChunkHeader(span, cookie, flags, type, length);
        writer.Advance(NbdLimits.StructuredReplyHeaderSize);
    }

    private static void WriteChunkHeader(Span<byte> span, ulong cookie, ReplyFlags flags, ReplyType type, uint length)
    {
        BinaryPrimitives.WriteUInt32BigEndian(span, NbdMagic.StructuredReply);
        BinaryPrimitives.WriteUInt16BigEndian(span[4..], (ushort)flags);
        BinaryPrimitives.WriteUInt16BigEndian(span[6..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(span[8..], cookie);
        BinaryPrimitives.WriteUInt32BigEndian(span[16..], length);
    }

    /// <summary>A final NBD_REPLY_TYPE_NONE chunk: success of a command with no content.</summary>
    public static void WriteDone(IBufferWriter<byte> writer, ulong cookie) =>
        WriteChunkHeader(writer, cookie, ReplyFlags.Done, ReplyType.None, 0);

    /// <summary>NBD_REPLY_TYPE_OFFSET_DATA: 64 bits offset, then the data.</summary>
    public static void WriteOffsetData(IBufferWriter<byte> writer, ulong cookie, bool done, ulong offset, ReadOnlySpan<byte> data)
    {
        WriteOffsetDataHeader(writer, cookie, done, offset, data.Length);
        writer.Write(data);
    }

    /// <summary>The header of an OFFSET_DATA chunk; the caller sends the <paramref name="dataLength"/> bytes.</summary>
    public static void WriteOffsetDataHeader(IBufferWriter<byte> writer, ulong cookie, bool done, ulong offset, int dataLength)
    {
        Span<byte> span = writer.GetSpan(NbdLimits.StructuredReplyHeaderSize + 8);
        WriteChunkHeader(span, cookie, done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.OffsetData, (uint)(8 + dataLength));
        BinaryPrimitives.WriteUInt64BigEndian(span[NbdLimits.StructuredReplyHeaderSize..], offset);
        writer.Advance(NbdLimits.StructuredReplyHeaderSize + 8);
    }

    /// <summary>NBD_REPLY_TYPE_OFFSET_HOLE: 64 bits offset, 32 bits hole size.</summary>
    public static void WriteOffsetHole(IBufferWriter<byte> writer, ulong cookie, bool done, ulong offset, uint length)
    {
        const int size = NbdLimits.StructuredReplyHeaderSize + 12;
        Span<byte> span = writer.GetSpan(size);
        WriteChunkHeader(span, cookie, done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.OffsetHole, 12);
        BinaryPrimitives.WriteUInt64BigEndian(span[20..], offset);
        BinaryPrimitives.WriteUInt32BigEndian(span[28..], length);
        writer.Advance(size);
    }

    /// <summary>
    /// NBD_REPLY_TYPE_ERROR (32 bits error, 16 bits message length, message) or, with an
    /// offset, NBD_REPLY_TYPE_ERROR_OFFSET (the same followed by the 64-bit offset).
    /// </summary>
    public static void WriteError(IBufferWriter<byte> writer, ulong cookie, NbdError error, ulong? offset = null)
    {
        int length = 6 + (offset is null ? 0 : 8);
        Span<byte> span = writer.GetSpan(NbdLimits.StructuredReplyHeaderSize + length);
        WriteChunkHeader(span, cookie, ReplyFlags.Done, offset is null ? ReplyType.Error : ReplyType.ErrorOffset, (uint)length);
        BinaryPrimitives.WriteUInt32BigEndian(span[20..], (uint)error);
        BinaryPrimitives.WriteUInt16BigEndian(span[24..], 0);
        if (offset is ulong o)
        {
            BinaryPrimitives.WriteUInt64BigEndian(span[26..], o);
        }
        writer.Advance(NbdLimits.StructuredReplyHeaderSize + length);
    }

    /// <summary>
    /// NBD_REPLY_TYPE_BLOCK_STATUS: 32 bits context id, then per extent 32 bits length and
    /// 32 bits status.
    /// </summary>
    public static void WriteBlockStatus(IBufferWriter<byte> writer, ulong cookie, bool done, uint contextId, ReadOnlySpan<MetaExtent> extents)
    {
        int length = 4 + 8 * extents.Length;
        Span<byte> span = writer.GetSpan(NbdLimits.StructuredReplyHeaderSize + length);
        WriteChunkHeader(span, cookie, done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.BlockStatus, (uint)length);
        BinaryPrimitives.WriteUInt32BigEndian(span[20..], contextId);
        int at = 24;
        foreach (MetaExtent extent in extents)
        {
            BinaryPrimitives.WriteUInt32BigEndian(span[at..], extent.Length);
            BinaryPrimitives.WriteUInt32BigEndian(span[(at + 4)..], extent.Status);
            at += 8;
        }
        writer.Advance(NbdLimits.StructuredReplyHeaderSize + length);
    }
}

/// <summary>One block-status descriptor: a length and the context's status bits for it.</summary>
public readonly record struct MetaExtent(uint Length, uint Status);
