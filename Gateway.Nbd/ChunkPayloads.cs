using System.Buffers;
using System.Buffers.Binary;

namespace Gateway.Nbd;

/// <summary>The shape of the readers of <see cref="ChunkPayload"/>: a payload, read after its <paramref name="chunk"/> header.</summary>
public delegate bool ChunkPayloadReader<T>(ref ReadOnlySequence<byte> buffer, in ChunkHeader chunk, out T payload);

/// <summary>
/// Readers of the payloads that follow a <see cref="ChunkHeader"/> (proto.md, "Structured reply
/// types"); <see cref="Replies"/> writes them. Each checks the header's length against the type's
/// layout before waiting for any payload, then returns false, consuming nothing, until the payload
/// it needs is in the buffer.
/// </summary>
public static class ChunkPayload
{
    // NBD_REPLY_TYPE_OFFSET_DATA (1):
    // S: 64 bits, offset (unsigned)
    // S: (length - 8) bytes of data
    /// <summary>Takes the offset only: the data stays in the buffer for the caller to copy where it belongs.</summary>
    public static bool TryReadOffsetData(ref ReadOnlySequence<byte> buffer, in ChunkHeader chunk, out DataChunk data)
    {
        Expect(chunk, ReplyType.OffsetData);
        if (chunk.Length < 8)
        {
            throw new NbdProtocolException($"OFFSET_DATA chunk of length {chunk.Length}, shorter than its offset");
        }
        data = default;
        if (buffer.Length < 8)
        {
            return false;
        }
        data = new DataChunk(ReadUInt64(buffer), chunk.Length - 8);
        buffer = buffer.Slice(8);
        return true;
    }

    // NBD_REPLY_TYPE_OFFSET_HOLE (2):
    // S: 64 bits, offset (unsigned)
    // S: 32 bits, hole size (unsigned, MUST be nonzero)
    public static bool TryReadOffsetHole(ref ReadOnlySequence<byte> buffer, in ChunkHeader chunk, out HoleChunk hole)
    {
        Expect(chunk, ReplyType.OffsetHole);
        if (chunk.Length != 12)
        {
            throw new NbdProtocolException($"OFFSET_HOLE chunk of length {chunk.Length}, not 12");
        }
        hole = default;
        if (buffer.Length < 12)
        {
            return false;
        }
        var reader = new SequenceReader<byte>(buffer);
        reader.TryReadBigEndian(out long offset);
        reader.TryReadBigEndian(out int size);
        hole = new HoleChunk((ulong)offset, (uint)size);
        buffer = buffer.Slice(12);
        return true;
    }

    // NBD_REPLY_TYPE_ERROR (2^15 + 1)            NBD_REPLY_TYPE_ERROR_OFFSET (2^15 + 2)
    // S: 32 bits, error (MUST be nonzero)        S: 32 bits, error (MUST be nonzero)
    // S: 16 bits, message length (no more        S: 16 bits, message length
    //    than header length - 6)                 S: message length bytes of UTF-8 message
    // S: message length bytes of UTF-8 message   S: 64 bits, offset (unsigned)
    /// <summary>
    /// Takes the whole error chunk; the message (an allocation, off the data path) may be empty.
    /// Any type with bit 15 set is an error: "a client that receives an unknown error type MUST
    /// treat it as an error", and every error type starts with the error and the message (proto.md,
    /// "Structured reply types"); what follows the message of an ERROR or an unknown error type
    /// is skipped. Only ERROR_OFFSET's offset is read.
    /// </summary>
    public static bool TryReadError(ref ReadOnlySequence<byte> buffer, in ChunkHeader chunk, out ErrorChunk error)
    {
        if (!IsError(chunk.Type))
        {
            throw new ArgumentException($"a {chunk.Type} chunk is not an error", nameof(chunk));
        }
        int trailer = chunk.Type == ReplyType.ErrorOffset ? 8 : 0;
        int longest = 6 + NbdWire.MaxString + (chunk.Type == ReplyType.Error ? 0 : 8);
        if (chunk.Length < (ulong)(6 + trailer) || chunk.Length > (ulong)longest)
        {
            throw new NbdProtocolException($"{chunk.Type} chunk of length {chunk.Length}");
        }
        error = default;
        if (buffer.Length < (long)chunk.Length)
        {
            return false;
        }
        var reader = new SequenceReader<byte>(buffer);
        reader.TryReadBigEndian(out int code);
        reader.TryReadBigEndian(out short messageLength);
        int room = (int)chunk.Length - 6 - trailer;
        if (trailer != 0 ? (ushort)messageLength != room : (ushort)messageLength > room)
        {
            throw new NbdProtocolException($"{chunk.Type} message of {(ushort)messageLength} bytes in a chunk of {chunk.Length}");
        }
        if (code == 0)
        {
            throw new NbdProtocolException($"{chunk.Type} chunk with error zero");
        }
        string message = NbdString.Decode(buffer.Slice(6, (ushort)messageLength));
        reader.Advance((ushort)messageLength);
        ulong? offset = null;
        if (trailer != 0)
        {
            reader.TryReadBigEndian(out long at);
            offset = (ulong)at;
        }
        error = new ErrorChunk((NbdError)code, message, offset);
        buffer = buffer.Slice((long)chunk.Length);
        return true;
    }

    /// <summary>Bit 15 of a chunk type marks an error (proto.md, "Structured reply types").</summary>
    public static bool IsError(ReplyType type) => ((ushort)type & 0x8000) != 0;

    // NBD_REPLY_TYPE_BLOCK_STATUS (5)            NBD_REPLY_TYPE_BLOCK_STATUS_EXT (6)
    // S: 32 bits, metadata context ID            S: 32 bits, metadata context ID
    // S: one or more descriptors:                S: 32 bits, descriptor count (0: from length)
    //    32 bits, extent length (nonzero)        S: one or more descriptors:
    //    32 bits, status flags                      64 bits, extent length (nonzero)
    //                                               64 bits, status flags
    /// <summary>
    /// Takes the whole status chunk. Either type may arrive whatever headers were negotiated (the
    /// client "MUST be prepared for ... either the compact or extended chunk type"), so the
    /// descriptor size follows the chunk's type. The descriptors stay in the caller's buffer, read
    /// as they are enumerated: valid until the caller advances past them.
    /// </summary>
    public static bool TryReadBlockStatus(ref ReadOnlySequence<byte> buffer, in ChunkHeader chunk, out BlockStatusChunk status)
    {
        if (chunk.Type is not (ReplyType.BlockStatus or ReplyType.BlockStatusExt))
        {
            throw new ArgumentException($"a {chunk.Type} chunk is not a block status", nameof(chunk));
        }
        bool wide = chunk.Type == ReplyType.BlockStatusExt;
        int head = wide ? 8 : 4;
        int descriptor = BlockStatusChunk.DescriptorSize(wide);
        if (chunk.Length < (ulong)(head + descriptor) || (chunk.Length - (ulong)head) % (ulong)descriptor != 0 || chunk.Length > int.MaxValue)
        {
            throw new NbdProtocolException($"{chunk.Type} chunk of length {chunk.Length}: not a context id and whole {descriptor}-byte descriptors");
        }
        status = default;
        if (buffer.Length < (long)chunk.Length)
        {
            return false;
        }
        var reader = new SequenceReader<byte>(buffer);
        reader.TryReadBigEndian(out int contextId);
        int count = (int)(chunk.Length - (ulong)head) / descriptor;
        if (wide && reader.TryReadBigEndian(out int declared) && declared != 0 && declared != count)
        {
            throw new NbdProtocolException($"BLOCK_STATUS_EXT declares {(uint)declared} descriptors, its length holds {count}");
        }
        status = new BlockStatusChunk((uint)contextId, buffer.Slice(head, (long)chunk.Length - head), wide);
        buffer = buffer.Slice((long)chunk.Length);
        return true;
    }

    private static void Expect(in ChunkHeader chunk, ReplyType type)
    {
        if (chunk.Type != type)
        {
            throw new ArgumentException($"a {chunk.Type} chunk is not {type}", nameof(chunk));
        }
    }

    private static ulong ReadUInt64(in ReadOnlySequence<byte> buffer) =>
        BinaryPrimitives.ReadUInt64BigEndian(Contiguous.Prefix(buffer, stackalloc byte[8]));
}

/// <summary>An OFFSET_DATA chunk's offset, and how many data bytes follow it.</summary>
public readonly record struct DataChunk(ulong Offset, ulong DataLength);

/// <summary>An OFFSET_HOLE chunk: <see cref="Length"/> bytes at <see cref="Offset"/> read as zeroes.</summary>
public readonly record struct HoleChunk(ulong Offset, uint Length);

/// <summary>An ERROR chunk, or an ERROR_OFFSET one when <see cref="Offset"/> is set.</summary>
public readonly record struct ErrorChunk(NbdError Error, string Message, ulong? Offset);

/// <summary>
/// A BLOCK_STATUS or BLOCK_STATUS_EXT chunk. <see cref="Descriptors"/> is the caller's buffer:
/// enumerate it (no allocation) before advancing the pipe past it.
/// </summary>
public readonly record struct BlockStatusChunk(uint ContextId, ReadOnlySequence<byte> Descriptors, bool Extended)
{
    public static int DescriptorSize(bool extended) => extended ? 16 : 8;

    public int Count => (int)(Descriptors.Length / DescriptorSize(Extended));

    public Enumerator GetEnumerator() => new(Descriptors, Extended);

    public ref struct Enumerator(ReadOnlySequence<byte> descriptors, bool extended)
    {
        private SequenceReader<byte> _reader = new(descriptors);

        public MetaExtent Current { get; private set; }

        /// <exception cref="NbdProtocolException">An extended status uses the upper 32 bits, which no context this gateway knows does.</exception>
        public bool MoveNext()
        {
            if (!extended)
            {
                if (!_reader.TryReadBigEndian(out int length) || !_reader.TryReadBigEndian(out int flags))
                {
                    return false;
                }
                Current = new MetaExtent((uint)length, (uint)flags);
                return true;
            }
            if (!_reader.TryReadBigEndian(out long wideLength) || !_reader.TryReadBigEndian(out long wideFlags))
            {
                return false;
            }
            if ((ulong)wideFlags > uint.MaxValue)
            {
                throw new NbdProtocolException($"64-bit block status 0x{wideFlags:x16}");
            }
            Current = new MetaExtent((ulong)wideLength, (uint)wideFlags);
            return true;
        }
    }
}
