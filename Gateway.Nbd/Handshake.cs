using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Nbd;

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
        if (buffer.Length < 4)
        {
            return false;
        }
        flags = (ClientFlags)BinaryPrimitives.ReadUInt32BigEndian(Contiguous.Prefix(buffer, stackalloc byte[4]));
        buffer = buffer.Slice(4);
        return true;
    }

    public static int WriteClientFlags(Span<byte> destination, ClientFlags flags)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, (uint)flags);
        return 4;
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
