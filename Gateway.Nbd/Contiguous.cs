using System.Buffers;

namespace Gateway.Nbd;

internal static class Contiguous
{
    /// <summary>
    /// The first <c>scratch.Length</c> bytes of <paramref name="buffer"/> as one span: the buffer's own
    /// memory when its first segment holds them (the common case), else a copy into
    /// <paramref name="scratch"/>. The caller has checked that the buffer is long enough.
    /// </summary>
    public static ReadOnlySpan<byte> Prefix(in ReadOnlySequence<byte> buffer, Span<byte> scratch)
    {
        ReadOnlySpan<byte> first = buffer.FirstSpan;
        if (first.Length >= scratch.Length)
        {
            return first[..scratch.Length];
        }
        buffer.Slice(0, scratch.Length).CopyTo(scratch);
        return scratch;
    }
}
