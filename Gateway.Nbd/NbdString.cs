using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
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
        ReadOnlySpan<byte> rest = span;
        if (!TryTakePrefixed(ref rest, out string? value, out bool tooLong))
        {
            throw new NbdProtocolException(tooLong
                ? $"{what} of {BinaryPrimitives.ReadUInt32BigEndian(span)} bytes, more than the {NbdWire.MaxString} the spec allows"
                : span.Length < 4 ? $"{what} cut short" : $"{what} of {BinaryPrimitives.ReadUInt32BigEndian(span)} bytes in {span.Length - 4} remaining");
        }
        span = rest;
        return value;
    }

    /// <summary>
    /// Takes a string preceded by its 32-bit length; false, taking nothing, when the length is cut
    /// short or runs past <paramref name="span"/>, or (<paramref name="tooLong"/>, checked last)
    /// when it is over the spec's limit.
    /// </summary>
    public static bool TryTakePrefixed(ref ReadOnlySpan<byte> span, [NotNullWhen(true)] out string? value, out bool tooLong)
    {
        value = null;
        tooLong = false;
        if (span.Length < 4)
        {
            return false;
        }
        uint length = BinaryPrimitives.ReadUInt32BigEndian(span);
        if (length > span.Length - 4)
        {
            return false;
        }
        if (length > NbdWire.MaxString)
        {
            tooLong = true;
            return false;
        }
        value = Encoding.UTF8.GetString(span.Slice(4, (int)length));
        span = span[(4 + (int)length)..];
        return true;
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
