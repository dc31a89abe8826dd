using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Nbd;

/// <summary>
/// Writers for transmission-phase replies, straight into the connection's output buffer
/// (<c>GetSpan</c>, write, <c>Advance</c>); <see cref="SimpleReply"/>, <see cref="ChunkHeader"/> and
/// <see cref="ChunkPayload"/> read what they write.
/// </summary>
public static class Replies
{
    // S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
    // S: 32 bits, error (MAY be zero)
    // S: 64 bits, cookie
    // S: (length bytes of data if the request is of type NBD_CMD_READ and error is zero)
    public static void WriteSimple(IBufferWriter<byte> writer, ulong cookie, NbdError error)
    {
        Span<byte> span = writer.GetSpan(NbdWire.SimpleReplyHeaderSize);
        BinaryPrimitives.WriteUInt32BigEndian(span, NbdMagic.SimpleReply);
        BinaryPrimitives.WriteUInt32BigEndian(span[4..], (uint)error);
        BinaryPrimitives.WriteUInt64BigEndian(span[8..], cookie);
        writer.Advance(NbdWire.SimpleReplyHeaderSize);
    }

    // Structured (NBD_STRUCTURED_REPLY_MAGIC)  Extended (NBD_EXTENDED_REPLY_MAGIC)
    // S: 32 bits, 0x668e33ef, magic           S: 32 bits, 0x6e8a278c, magic
    // S: 16 bits, reply flags                 S: 16 bits, reply flags
    // S: 16 bits, type                        S: 16 bits, type
    // S: 64 bits, cookie                      S: 64 bits, cookie
    //                                         S: 64 bits, offset (MUST match the request)
    // S: 32 bits, length of payload           S: 64 bits, length of payload
    // S: length bytes of payload data         S: length bytes of payload data
    public static void WriteChunkHeader(IBufferWriter<byte> writer, in ReplyTo to, ReplyFlags flags, ReplyType type, uint length)
    {
        Span<byte> span = writer.GetSpan(to.HeaderSize);
        WriteChunkHeader(span, to, flags, type, length);
        writer.Advance(to.HeaderSize);
    }

    private static void WriteChunkHeader(Span<byte> span, in ReplyTo to, ReplyFlags flags, ReplyType type, uint length)
    {
        BinaryPrimitives.WriteUInt32BigEndian(span, to.Extended ? NbdMagic.ExtendedReply : NbdMagic.StructuredReply);
        BinaryPrimitives.WriteUInt16BigEndian(span[4..], (ushort)flags);
        BinaryPrimitives.WriteUInt16BigEndian(span[6..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(span[8..], to.Cookie);
        if (to.Extended)
        {
            BinaryPrimitives.WriteUInt64BigEndian(span[16..], to.Offset);
            BinaryPrimitives.WriteUInt64BigEndian(span[24..], length);
        }
        else
        {
            BinaryPrimitives.WriteUInt32BigEndian(span[16..], length);
        }
    }

    /// <summary>A final NBD_REPLY_TYPE_NONE chunk: success of a command with no content.</summary>
    public static void WriteDone(IBufferWriter<byte> writer, in ReplyTo to) =>
        WriteChunkHeader(writer, to, ReplyFlags.Done, ReplyType.None, 0);

    /// <summary>NBD_REPLY_TYPE_OFFSET_DATA: 64 bits offset, then the data.</summary>
    public static void WriteOffsetData(IBufferWriter<byte> writer, in ReplyTo to, bool done, ulong offset, ReadOnlySpan<byte> data)
    {
        WriteOffsetDataHeader(writer, to, done, offset, data.Length);
        writer.Write(data);
    }

    /// <summary>The header of an OFFSET_DATA chunk; the caller sends the <paramref name="dataLength"/> bytes.</summary>
    public static void WriteOffsetDataHeader(IBufferWriter<byte> writer, in ReplyTo to, bool done, ulong offset, int dataLength)
    {
        int size = to.HeaderSize + 8;
        Span<byte> span = writer.GetSpan(size);
        WriteChunkHeader(span, to, done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.OffsetData, (uint)(8 + dataLength));
        BinaryPrimitives.WriteUInt64BigEndian(span[to.HeaderSize..], offset);
        writer.Advance(size);
    }

    /// <summary>NBD_REPLY_TYPE_OFFSET_HOLE: 64 bits offset, 32 bits hole size.</summary>
    public static void WriteOffsetHole(IBufferWriter<byte> writer, in ReplyTo to, bool done, ulong offset, uint length)
    {
        int size = to.HeaderSize + 12;
        Span<byte> span = writer.GetSpan(size);
        WriteChunkHeader(span, to, done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.OffsetHole, 12);
        BinaryPrimitives.WriteUInt64BigEndian(span[to.HeaderSize..], offset);
        BinaryPrimitives.WriteUInt32BigEndian(span[(to.HeaderSize + 8)..], length);
        writer.Advance(size);
    }

    /// <summary>
    /// NBD_REPLY_TYPE_ERROR (32 bits error, 16 bits message length, message) or, with an
    /// offset, NBD_REPLY_TYPE_ERROR_OFFSET (the same followed by the 64-bit offset).
    /// </summary>
    public static void WriteError(IBufferWriter<byte> writer, in ReplyTo to, NbdError error, ulong? offset = null, string? message = null)
    {
        int at = to.HeaderSize;
        int messageLength = message is null ? 0 : NbdString.ByteCount(message);
        int length = 6 + messageLength + (offset is null ? 0 : 8);
        Span<byte> span = writer.GetSpan(at + length);
        WriteChunkHeader(span, to, ReplyFlags.Done, offset is null ? ReplyType.Error : ReplyType.ErrorOffset, (uint)length);
        BinaryPrimitives.WriteUInt32BigEndian(span[at..], (uint)error);
        BinaryPrimitives.WriteUInt16BigEndian(span[(at + 4)..], (ushort)messageLength);
        if (message is not null)
        {
            NbdString.Write(span[(at + 6)..], message);
        }
        if (offset is ulong o)
        {
            BinaryPrimitives.WriteUInt64BigEndian(span[(at + 6 + messageLength)..], o);
        }
        writer.Advance(at + length);
    }

    /// <summary>
    /// One status chunk for a metadata context. Compact headers: NBD_REPLY_TYPE_BLOCK_STATUS,
    /// 32 bits context id, then per extent 32 bits length and 32 bits status. Extended headers:
    /// NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 32 bits context id, 32 bits descriptor count, then per
    /// extent 64 bits length, 64 bits status (written as 32 zero bits and the 32-bit status, the
    /// spec's earlier "padding, status" layout, the same bytes).
    /// </summary>
    public static void WriteBlockStatus(IBufferWriter<byte> writer, in ReplyTo to, bool done, uint contextId, ReadOnlySpan<MetaExtent> extents)
    {
        int descriptor = to.Extended ? 16 : 8;
        int fixedPart = to.Extended ? 8 : 4;
        int length = fixedPart + descriptor * extents.Length;
        Span<byte> span = writer.GetSpan(to.HeaderSize + length);
        WriteChunkHeader(span, to, done ? ReplyFlags.Done : ReplyFlags.None, to.Extended ? ReplyType.BlockStatusExt : ReplyType.BlockStatus, (uint)length);
        int at = to.HeaderSize;
        BinaryPrimitives.WriteUInt32BigEndian(span[at..], contextId);
        if (to.Extended)
        {
            BinaryPrimitives.WriteUInt32BigEndian(span[(at + 4)..], (uint)extents.Length);
        }
        at += fixedPart;
        foreach (MetaExtent extent in extents)
        {
            if (to.Extended)
            {
                BinaryPrimitives.WriteUInt64BigEndian(span[at..], extent.Length);
                BinaryPrimitives.WriteUInt32BigEndian(span[(at + 8)..], 0);
                BinaryPrimitives.WriteUInt32BigEndian(span[(at + 12)..], extent.Status);
            }
            else
            {
                // A compact request covers at most 2^32 - 1 bytes, and so does each extent of its answer.
                BinaryPrimitives.WriteUInt32BigEndian(span[at..], (uint)Math.Min(extent.Length, uint.MaxValue));
                BinaryPrimitives.WriteUInt32BigEndian(span[(at + 4)..], extent.Status);
            }
            at += descriptor;
        }
        writer.Advance(to.HeaderSize + length);
    }
}

/// <summary>
/// Whom a reply chunk answers: the request's cookie and offset (echoed by extended headers) and
/// the header style the handshake settled.
/// </summary>
public readonly record struct ReplyTo(ulong Cookie, ulong Offset = 0, bool Extended = false)
{
    public int HeaderSize => Extended ? NbdWire.ExtendedReplyHeaderSize : NbdWire.StructuredReplyHeaderSize;
}

/// <summary>One block-status descriptor: a length and the context's status bits for it.</summary>
public readonly record struct MetaExtent(ulong Length, uint Status);
