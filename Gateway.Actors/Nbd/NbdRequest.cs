using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Actors.Nbd;

/// <summary>One transmission-phase request header (proto.md, "Request message").</summary>
public readonly record struct NbdRequest(CommandFlags Flags, NbdCommand Command, ulong Cookie, ulong Offset, uint Length)
{
    /// <summary>Whether a payload of <see cref="Length"/> bytes follows the header on the wire.</summary>
    public bool HasPayload => Command == NbdCommand.Write;

    // C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)
    // C: 16 bits, command flags
    // C: 16 bits, type
    // C: 64 bits, cookie
    // C: 64 bits, offset (unsigned)
    // C: 32 bits, length (unsigned)
    // C: (length bytes of data if the request is of type NBD_CMD_WRITE)
    /// <summary>
    /// Takes one request header from the front of <paramref name="buffer"/>, if a whole one is there.
    /// The payload, if any, is left in the buffer for the caller.
    /// </summary>
    /// <exception cref="NbdProtocolException">The magic is wrong: the stream cannot be resynchronised.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, out NbdRequest request)
    {
        if (buffer.Length < NbdLimits.RequestHeaderSize)
        {
            request = default;
            return false;
        }

        Span<byte> header = stackalloc byte[NbdLimits.RequestHeaderSize];
        ReadOnlySpan<byte> span = buffer.FirstSpan.Length >= NbdLimits.RequestHeaderSize
            ? buffer.FirstSpan[..NbdLimits.RequestHeaderSize]
            : CopyHeader(buffer, header);

        uint magic = BinaryPrimitives.ReadUInt32BigEndian(span);
        if (magic != NbdMagic.Request)
        {
            throw new NbdProtocolException($"bad request magic 0x{magic:x8}");
        }

        request = new NbdRequest(
            (CommandFlags)BinaryPrimitives.ReadUInt16BigEndian(span[4..]),
            (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(span[6..]),
            BinaryPrimitives.ReadUInt64BigEndian(span[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(span[16..]),
            BinaryPrimitives.ReadUInt32BigEndian(span[24..]));
        buffer = buffer.Slice(NbdLimits.RequestHeaderSize);
        return true;
    }

    private static ReadOnlySpan<byte> CopyHeader(in ReadOnlySequence<byte> buffer, Span<byte> header)
    {
        buffer.Slice(0, NbdLimits.RequestHeaderSize).CopyTo(header);
        return header;
    }

    /// <summary>Writes a request header (used by tests and the benchmark client).</summary>
    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.Request);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], (ushort)Flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], (ushort)Command);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(destination[16..], Offset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[24..], Length);
    }
}

/// <summary>
/// A violation after which the stream can't be trusted (wrong magic, unknown client flags):
/// the connection is closed, nothing is answered.
/// </summary>
public sealed class NbdProtocolException(string message) : Exception(message);
