using System.Buffers;
using System.Buffers.Binary;
using System.Text;

namespace Gateway.Nbd;

/// <summary>
/// Strings on the wire (proto.md, "Conventions"): UTF-8, never NUL-terminated, "MUST be no longer
/// than 4096 bytes", their length always given by the surrounding message.
/// </summary>
internal static class NbdString
{
    public static string Decode(ReadOnlySpan<byte> bytes)
    {
        CheckLength(bytes.Length);
        return Encoding.UTF8.GetString(bytes);
    }

    public static string Decode(in ReadOnlySequence<byte> bytes)
    {
        CheckLength(bytes.Length);
        return Encoding.UTF8.GetString(bytes);
    }

    /// <summary>Takes a string preceded by its 32-bit length, which must lie within <paramref name="span"/>.</summary>
    public static string TakePrefixed(ref ReadOnlySpan<byte> span, string what)
    {
        uint length = TakeUInt32(ref span, what);
        if (length > span.Length)
        {
            throw new NbdProtocolException($"{what} of {length} bytes in {span.Length} remaining");
        }
        string value = Decode(span[..(int)length]);
        span = span[(int)length..];
        return value;
    }

    public static uint TakeUInt32(ref ReadOnlySpan<byte> span, string what)
    {
        if (span.Length < 4)
        {
            throw new NbdProtocolException($"{what} cut short");
        }
        uint value = BinaryPrimitives.ReadUInt32BigEndian(span);
        span = span[4..];
        return value;
    }

    /// <exception cref="ArgumentException">The string is longer than the spec allows.</exception>
    public static int ByteCount(string value)
    {
        int count = Encoding.UTF8.GetByteCount(value);
        return count <= NbdWire.MaxString ? count : throw TooLong(count, nameof(value));
    }

    private static ArgumentException TooLong(int count, string name) =>
        new($"{count} bytes of UTF-8, more than the {NbdWire.MaxString} the spec allows", name);

    /// <exception cref="ArgumentException">The string is longer than the spec allows.</exception>
    public static int Write(Span<byte> destination, string value)
    {
        int count = Encoding.UTF8.GetBytes(value, destination);
        return count <= NbdWire.MaxString ? count : throw TooLong(count, nameof(value));
    }

    public static int WritePrefixed(Span<byte> destination, string value)
    {
        int count = Write(destination[4..], value);
        BinaryPrimitives.WriteUInt32BigEndian(destination, (uint)count);
        return 4 + count;
    }

    private static void CheckLength(long length)
    {
        if (length > NbdWire.MaxString)
        {
            throw new NbdProtocolException($"string of {length} bytes, more than the {NbdWire.MaxString} the spec allows");
        }
    }
}
