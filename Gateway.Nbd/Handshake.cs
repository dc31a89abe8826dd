using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Nbd;

/// <summary>
/// The shape of every reader of a frame: false, consuming nothing, until the whole frame is in
/// <paramref name="buffer"/>; then the frame, and <paramref name="buffer"/> sliced past it.
/// </summary>
public delegate bool FrameReader<T>(ref ReadOnlySequence<byte> buffer, out T frame);

/// <summary>The fixed newstyle handshake before the options (proto.md, "Newstyle negotiation").</summary>
public static class Handshake
{
    // S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC')
    // S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
    // S: 16 bits, handshake flags
    /// <exception cref="NbdProtocolException">Not a newstyle server (oldstyle servers send another magic).</exception>
    public static bool TryReadGreeting(ref ReadOnlySequence<byte> buffer, out HandshakeFlags flags)
    {
        flags = default;
        if (buffer.Length < NbdWire.GreetingSize)
        {
            return false;
        }
        ReadOnlySpan<byte> span = Contiguous.Prefix(buffer, stackalloc byte[NbdWire.GreetingSize]);
        if (BinaryPrimitives.ReadUInt64BigEndian(span) != NbdMagic.InitPassword || BinaryPrimitives.ReadUInt64BigEndian(span[8..]) != NbdMagic.IHaveOpt)
        {
            throw new NbdProtocolException($"not a newstyle NBD greeting: {Convert.ToHexString(span[..16])}");
        }
        flags = (HandshakeFlags)BinaryPrimitives.ReadUInt16BigEndian(span[16..]);
        buffer = buffer.Slice(NbdWire.GreetingSize);
        return true;
    }

    public static int WriteGreeting(Span<byte> destination, HandshakeFlags flags)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.InitPassword);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], NbdMagic.IHaveOpt);
        BinaryPrimitives.WriteUInt16BigEndian(destination[16..], (ushort)flags);
        return NbdWire.GreetingSize;
    }

    // C: 32 bits, client flags
    /// <summary>Unknown bits are returned as they came: the server decides to close (proto.md, "Client flags").</summary>
    public static bool TryReadClientFlags(ref ReadOnlySequence<byte> buffer, out ClientFlags flags)
    {
        flags = default;
        if (buffer.Length < NbdWire.ClientFlagsSize)
        {
            return false;
        }
        flags = (ClientFlags)BinaryPrimitives.ReadUInt32BigEndian(Contiguous.Prefix(buffer, stackalloc byte[NbdWire.ClientFlagsSize]));
        buffer = buffer.Slice(NbdWire.ClientFlagsSize);
        return true;
    }

    public static int WriteClientFlags(Span<byte> destination, ClientFlags flags)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, (uint)flags);
        return NbdWire.ClientFlagsSize;
    }
}

/// <summary>
/// The header of one option the client sends (proto.md, "Newstyle negotiation"); its
/// <see cref="Length"/> bytes of data follow, left in the buffer: the server bounds them, answering
/// ERR_TOO_BIG or closing, before it waits for them.
/// </summary>
public readonly record struct OptionHeader(NbdOption Option, uint Length)
{
    // C: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
    // C: 32 bits, option
    // C: 32 bits, length of option data (unsigned)
    // C: any data needed for the chosen option, of length as specified above
    /// <exception cref="NbdProtocolException">The magic is not IHAVEOPT: the client is out of step.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, out OptionHeader header)
    {
        header = default;
        // The magic is checked as soon as it is in: a peer out of step may never send the rest.
        if (buffer.Length >= 8)
        {
            ulong magic = BinaryPrimitives.ReadUInt64BigEndian(Contiguous.Prefix(buffer, stackalloc byte[8]));
            if (magic != NbdMagic.IHaveOpt)
            {
                throw new NbdProtocolException($"bad option magic 0x{magic:x16}");
            }
        }
        if (buffer.Length < NbdWire.OptionHeaderSize)
        {
            return false;
        }
        ReadOnlySpan<byte> span = Contiguous.Prefix(buffer, stackalloc byte[NbdWire.OptionHeaderSize]);
        header = new OptionHeader((NbdOption)BinaryPrimitives.ReadUInt32BigEndian(span[8..]), BinaryPrimitives.ReadUInt32BigEndian(span[12..]));
        buffer = buffer.Slice(NbdWire.OptionHeaderSize);
        return true;
    }

    public static int Write(Span<byte> destination, in OptionHeader header)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.IHaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], (uint)header.Option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], header.Length);
        return NbdWire.OptionHeaderSize;
    }
}

/// <summary>
/// The header of one option reply (proto.md, "Option reply types"); its <see cref="Length"/> bytes
/// of data follow, left in the buffer.
/// </summary>
public readonly record struct OptionReplyHeader(NbdOption Option, OptionReplyType Type, uint Length)
{
    public bool IsError => ((uint)Type & (1u << 31)) != 0;

    // S: 64 bits, 0x3e889045565a9 (magic number for replies)
    // S: 32 bits, the option as sent by the client to which this is a reply
    // S: 32 bits, reply type (e.g., NBD_REP_ACK for successful completion, or NBD_REP_ERR_UNSUP)
    // S: 32 bits, length of the reply
    // S: any data as required by the reply
    /// <exception cref="NbdProtocolException">The magic is wrong: the server is out of step.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, out OptionReplyHeader header)
    {
        header = default;
        // The magic is checked as soon as it is in: a peer out of step may never send the rest.
        if (buffer.Length >= 8)
        {
            ulong magic = BinaryPrimitives.ReadUInt64BigEndian(Contiguous.Prefix(buffer, stackalloc byte[8]));
            if (magic != NbdMagic.OptionReply)
            {
                throw new NbdProtocolException($"bad option reply magic 0x{magic:x16}");
            }
        }
        if (buffer.Length < NbdWire.OptionReplyHeaderSize)
        {
            return false;
        }
        ReadOnlySpan<byte> span = Contiguous.Prefix(buffer, stackalloc byte[NbdWire.OptionReplyHeaderSize]);
        header = new OptionReplyHeader(
            (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(span[8..]),
            (OptionReplyType)BinaryPrimitives.ReadUInt32BigEndian(span[12..]),
            BinaryPrimitives.ReadUInt32BigEndian(span[16..]));
        buffer = buffer.Slice(NbdWire.OptionReplyHeaderSize);
        return true;
    }

    public static int Write(Span<byte> destination, in OptionReplyHeader header)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.OptionReply);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], (uint)header.Option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], (uint)header.Type);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], header.Length);
        return NbdWire.OptionReplyHeaderSize;
    }
}

/// <summary>
/// The server's answer to NBD_OPT_EXPORT_NAME (proto.md, "Newstyle negotiation"): no option reply
/// header, the export's size and flags, then 124 reserved zero bytes unless the client set
/// NBD_FLAG_C_NO_ZEROES. Transmission follows at once.
/// </summary>
public readonly record struct ExportNameReply(ulong ExportSize, TransmissionFlags Flags)
{
    public const int ReservedSize = 124;

    public static int Size(bool noZeroes) => noZeroes ? 10 : 10 + ReservedSize;

    // S: 64 bits, size of the export in bytes (unsigned)
    // S: 16 bits, transmission flags
    // S: 124 bytes, zeroes (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)
    /// <exception cref="NbdProtocolException">A reserved byte is not zero.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, bool noZeroes, out ExportNameReply reply)
    {
        reply = default;
        int size = Size(noZeroes);
        if (buffer.Length < size)
        {
            return false;
        }
        Span<byte> scratch = stackalloc byte[10 + ReservedSize];
        ReadOnlySpan<byte> span = Contiguous.Prefix(buffer, scratch[..size]);
        if (span[10..].ContainsAnyExcept((byte)0))
        {
            throw new NbdProtocolException($"EXPORT_NAME reply with reserved bytes {Convert.ToHexString(span[10..])}");
        }
        reply = new ExportNameReply(BinaryPrimitives.ReadUInt64BigEndian(span), (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(span[8..]));
        buffer = buffer.Slice(size);
        return true;
    }

    public static int Write(Span<byte> destination, in ExportNameReply reply, bool noZeroes)
    {
        int size = Size(noZeroes);
        BinaryPrimitives.WriteUInt64BigEndian(destination, reply.ExportSize);
        BinaryPrimitives.WriteUInt16BigEndian(destination[8..], (ushort)reply.Flags);
        destination[10..size].Clear();
        return size;
    }
}
