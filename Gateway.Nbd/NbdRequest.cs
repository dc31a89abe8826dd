using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Nbd;

/// <summary>
/// One transmission-phase request header (proto.md, "Request message"). <see cref="Length"/> is
/// 64 bits because extended headers carry 64-bit lengths; compact headers fill only 32.
/// </summary>
public readonly record struct NbdRequest(CommandFlags Flags, NbdCommand Command, ulong Cookie, ulong Offset, ulong Length)
{
    /// <summary>
    /// Whether a payload of <see cref="Length"/> bytes follows the header on the wire: always with
    /// NBD_CMD_WRITE, and with extended headers for any command flagged NBD_CMD_FLAG_PAYLOAD_LEN.
    /// The spec asks extended clients to flag their WRITEs too, but qemu 10 does not, and qemu's
    /// server reads a WRITE's payload either way: so does this one.
    /// </summary>
    public bool HasPayloadIn(bool extended) => Command == NbdCommand.Write || (extended && Flags.HasFlag(CommandFlags.PayloadLen));

    // Compact (NBD_REQUEST_MAGIC)              Extended (NBD_EXTENDED_REQUEST_MAGIC)
    // C: 32 bits, 0x25609513, magic            C: 32 bits, 0x21e41c71, magic
    // C: 16 bits, command flags                C: 16 bits, command flags
    // C: 16 bits, type                         C: 16 bits, type
    // C: 64 bits, cookie                       C: 64 bits, cookie
    // C: 64 bits, offset (unsigned)            C: 64 bits, offset (unsigned)
    // C: 32 bits, length (unsigned)            C: 64 bits, payload/effect length (unsigned)
    // C: (length bytes of data for a WRITE)    C: (length bytes of data with NBD_CMD_FLAG_PAYLOAD_LEN)
    /// <summary>
    /// Takes one request header from the front of <paramref name="buffer"/>, if a whole one is there.
    /// The payload, if any, is left in the buffer for the caller.
    /// </summary>
    /// <exception cref="NbdProtocolException">The magic is wrong (or of the other header style): the stream cannot be resynchronised.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, bool extended, out NbdRequest request)
    {
        return TryReadHeader(ref buffer, extended, out request);
    }

    /// <summary>Takes one compact request header (no extended headers negotiated).</summary>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, out NbdRequest request) => TryReadHeader(ref buffer, extended: false, out request);

    private static bool TryReadHeader(ref ReadOnlySequence<byte> buffer, bool extended, out NbdRequest request)
    {
        int size = extended ? NbdWire.ExtendedRequestHeaderSize : NbdWire.RequestHeaderSize;
        Span<byte> header = stackalloc byte[NbdWire.ExtendedRequestHeaderSize];
        if (buffer.Length < size)
        {
            // The magic is checked as soon as it is in: a header of the other style is shorter or
            // longer, and waiting for the rest of it could wait forever.
            if (buffer.Length >= 4)
            {
                CheckMagic(BinaryPrimitives.ReadUInt32BigEndian(CopyHeader(buffer, header[..4])), extended);
            }
            request = default;
            return false;
        }

        ReadOnlySpan<byte> span = buffer.FirstSpan.Length >= size
            ? buffer.FirstSpan[..size]
            : CopyHeader(buffer, header[..size]);
        CheckMagic(BinaryPrimitives.ReadUInt32BigEndian(span), extended);

        request = new NbdRequest(
            (CommandFlags)BinaryPrimitives.ReadUInt16BigEndian(span[4..]),
            (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(span[6..]),
            BinaryPrimitives.ReadUInt64BigEndian(span[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(span[16..]),
            extended ? BinaryPrimitives.ReadUInt64BigEndian(span[24..]) : BinaryPrimitives.ReadUInt32BigEndian(span[24..]));
        buffer = buffer.Slice(size);
        return true;
    }

    private static void CheckMagic(uint magic, bool extended)
    {
        if (magic != (extended ? NbdMagic.ExtendedRequest : NbdMagic.Request))
        {
            throw new NbdProtocolException(extended && magic == NbdMagic.Request
                ? "compact request header after extended headers were negotiated"
                : $"bad request magic 0x{magic:x8}");
        }
    }

    private static ReadOnlySpan<byte> CopyHeader(in ReadOnlySequence<byte> buffer, Span<byte> header)
    {
        buffer.Slice(0, header.Length).CopyTo(header);
        return header;
    }

    /// <summary>Bytes of the header <see cref="WriteTo"/> writes in the given style.</summary>
    public static int HeaderSize(bool extended) => extended ? NbdWire.ExtendedRequestHeaderSize : NbdWire.RequestHeaderSize;

    /// <summary>
    /// Writes a request header, compact or extended; returns its size. A compact header cannot
    /// carry a length over 32 bits: the caller splits such requests.
    /// </summary>
    public int WriteTo(Span<byte> destination, bool extended = false)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, extended ? NbdMagic.ExtendedRequest : NbdMagic.Request);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], (ushort)Flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], (ushort)Command);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(destination[16..], Offset);
        if (extended)
        {
            BinaryPrimitives.WriteUInt64BigEndian(destination[24..], Length);
            return NbdWire.ExtendedRequestHeaderSize;
        }
        BinaryPrimitives.WriteUInt32BigEndian(destination[24..], checked((uint)Length));
        return NbdWire.RequestHeaderSize;
    }
}

/// <summary>
/// A violation after which the stream can't be trusted (wrong magic, unknown client flags):
/// the connection is closed, nothing is answered.
/// </summary>
public sealed class NbdProtocolException(string message) : Exception(message);
