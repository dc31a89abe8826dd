using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Nbd;

/// <summary>
/// A simple reply (proto.md, "Simple reply message"); written by <see cref="Replies.WriteSimple"/>.
/// The data of a successful READ, if any, follows on the wire and is left in the buffer.
/// </summary>
public readonly record struct SimpleReply(NbdError Error, ulong Cookie)
{
    // S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
    // S: 32 bits, error (MAY be zero)
    // S: 64 bits, cookie
    // S: (length bytes of data if the request is of type NBD_CMD_READ and error is zero)
    /// <exception cref="NbdProtocolException">The magic is not the simple reply's.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, out SimpleReply reply)
    {
        reply = default;
        if (!TryPeekMagic(buffer, out uint magic))
        {
            return false;
        }
        if (magic != NbdMagic.SimpleReply)
        {
            throw new NbdProtocolException($"bad simple reply magic 0x{magic:x8}");
        }
        if (buffer.Length < NbdWire.SimpleReplyHeaderSize)
        {
            return false;
        }
        ReadOnlySpan<byte> span = Contiguous.Prefix(buffer, stackalloc byte[NbdWire.SimpleReplyHeaderSize]);
        reply = new SimpleReply((NbdError)BinaryPrimitives.ReadUInt32BigEndian(span[4..]), BinaryPrimitives.ReadUInt64BigEndian(span[8..]));
        buffer = buffer.Slice(NbdWire.SimpleReplyHeaderSize);
        return true;
    }

    /// <summary>
    /// The magic a reply starts with, so that a client which negotiated structured replies can tell
    /// a simple reply (which the server still MAY send) from a chunk before reading either.
    /// </summary>
    public static bool TryPeekMagic(in ReadOnlySequence<byte> buffer, out uint magic)
    {
        magic = 0;
        if (buffer.Length < 4)
        {
            return false;
        }
        magic = BinaryPrimitives.ReadUInt32BigEndian(Contiguous.Prefix(buffer, stackalloc byte[4]));
        return true;
    }
}

/// <summary>
/// The header of one structured or extended reply chunk, as <see cref="Replies.WriteChunkHeader"/>
/// writes it: <see cref="To"/> carries the cookie, the echoed offset (extended only) and the style.
/// <see cref="Length"/> bytes of payload follow, left in the buffer for <see cref="ChunkPayload"/>.
/// </summary>
public readonly record struct ChunkHeader(ReplyTo To, ReplyFlags Flags, ReplyType Type, ulong Length)
{
    public bool Done => (Flags & ReplyFlags.Done) != 0;

    // Structured (proto.md, "Structured reply chunk message")   Extended ("Extended reply chunk message")
    // S: 32 bits, 0x668e33ef, magic                              S: 32 bits, 0x6e8a278c, magic
    // S: 16 bits, flags                                          S: 16 bits, flags
    // S: 16 bits, type                                           S: 16 bits, type
    // S: 64 bits, cookie                                         S: 64 bits, cookie
    //                                                            S: 64 bits, offset
    // S: 32 bits, length of payload (unsigned)                   S: 64 bits, length of payload (unsigned)
    /// <exception cref="NbdProtocolException">The magic is wrong for the negotiated style.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, bool extended, out ChunkHeader chunk)
    {
        chunk = default;
        if (!SimpleReply.TryPeekMagic(buffer, out uint magic))
        {
            return false;
        }
        // Checked before the rest arrives: a header of the other style has another size, and
        // waiting for the rest of it could wait forever.
        if (magic != (extended ? NbdMagic.ExtendedReply : NbdMagic.StructuredReply))
        {
            throw new NbdProtocolException($"bad {(extended ? "extended" : "structured")} reply magic 0x{magic:x8}");
        }
        int size = extended ? NbdWire.ExtendedReplyHeaderSize : NbdWire.StructuredReplyHeaderSize;
        if (buffer.Length < size)
        {
            return false;
        }
        Span<byte> scratch = stackalloc byte[NbdWire.ExtendedReplyHeaderSize];
        ReadOnlySpan<byte> span = Contiguous.Prefix(buffer, scratch[..size]);
        ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(span[8..]);
        chunk = new ChunkHeader(
            extended ? new ReplyTo(cookie, BinaryPrimitives.ReadUInt64BigEndian(span[16..]), Extended: true) : new ReplyTo(cookie),
            (ReplyFlags)BinaryPrimitives.ReadUInt16BigEndian(span[4..]),
            (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(span[6..]),
            extended ? BinaryPrimitives.ReadUInt64BigEndian(span[24..]) : BinaryPrimitives.ReadUInt32BigEndian(span[16..]));
        buffer = buffer.Slice(size);
        return true;
    }
}
