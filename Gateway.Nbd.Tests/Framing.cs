using System.Buffers;
using Xunit;

namespace Gateway.Nbd.Tests;

internal delegate T PayloadReader<T>(ReadOnlySpan<byte> data);

/// <summary>How a frame arrives: whole, in pieces, or not yet all there.</summary>
internal static class Framing
{
    private const byte Next = 0xEE;

    /// <summary>
    /// Reads <paramref name="frame"/> cut into two segments at every position (and into one-byte
    /// segments), followed by a byte of the next frame which must be left in the buffer; and reads
    /// every truncated prefix, cut at every position, as "not yet" without consuming anything.
    /// </summary>
    public static void AssertReadsAtEverySplit<T>(byte[] frame, FrameReader<T> read, Action<T> check)
    {
        byte[] stream = [.. frame, Next];
        for (int cut = 0; cut <= stream.Length; cut++)
        {
            AssertReadsWhole(Segmented(stream, [cut]), read, check);
        }
        AssertReadsWhole(Segmented(stream, [.. Enumerable.Repeat(1, stream.Length - 1)]), read, check);

        for (int available = 0; available < frame.Length; available++)
        {
            for (int cut = 0; cut <= available; cut++)
            {
                ReadOnlySequence<byte> buffer = Segmented(frame[..available], [cut]);
                ReadOnlySequence<byte> before = buffer;
                Assert.False(read(ref buffer, out _), $"a frame cut short at {available} of {frame.Length} bytes was read");
                Assert.Equal(before.Start, buffer.Start);
                Assert.Equal(available, buffer.Length);
            }
        }
    }

    private static void AssertReadsWhole<T>(ReadOnlySequence<byte> buffer, FrameReader<T> read, Action<T> check)
    {
        Assert.True(read(ref buffer, out T frame));
        check(frame);
        Assert.Equal([Next], buffer.ToArray());
    }

    public static FrameReader<(OptionHeader Header, T Data)> OptionData<T>(PayloadReader<T> parse) =>
        WithData<OptionHeader, T>(OptionHeader.TryRead, h => h.Length, parse);

    public static FrameReader<(OptionReplyHeader Header, T Data)> ReplyData<T>(PayloadReader<T> parse) =>
        WithData<OptionReplyHeader, T>(OptionReplyHeader.TryRead, h => h.Length, parse);

    /// <summary>
    /// An option or option reply whose data is parsed once all of it is in, as a negotiator does:
    /// <paramref name="header"/> takes the framing, <paramref name="parse"/> the data.
    /// </summary>
    private static FrameReader<(THeader Header, T Data)> WithData<THeader, T>(FrameReader<THeader> header, Func<THeader, uint> length, PayloadReader<T> parse) =>
        (ref ReadOnlySequence<byte> buffer, out (THeader, T) frame) =>
        {
            frame = default;
            ReadOnlySequence<byte> rest = buffer;
            if (!header(ref rest, out THeader h) || rest.Length < length(h))
            {
                return false;
            }
            frame = (h, parse(rest.Slice(0, length(h)).ToArray()));
            buffer = rest.Slice(length(h));
            return true;
        };

    /// <summary>
    /// A chunk header and the payload after it, read as a client does; a payload reader that says
    /// "not yet" must leave the buffer as the header reader left it.
    /// </summary>
    public static FrameReader<(ChunkHeader Header, T Payload)> Chunk<T>(bool extended, ChunkPayloadReader<T> payload) =>
        (ref ReadOnlySequence<byte> buffer, out (ChunkHeader, T) frame) =>
        {
            frame = default;
            ReadOnlySequence<byte> rest = buffer;
            if (!ChunkHeader.TryRead(ref rest, extended, out ChunkHeader header))
            {
                return false;
            }
            ReadOnlySequence<byte> afterHeader = rest;
            if (!payload(ref rest, header, out T read))
            {
                Assert.Equal(afterHeader.Start, rest.Start);
                Assert.Equal(afterHeader.Length, rest.Length);
                return false;
            }
            frame = (header, read);
            buffer = rest;
            return true;
        };

    /// <summary>Splits <paramref name="bytes"/> into segments after each of the given lengths.</summary>
    public static ReadOnlySequence<byte> Segmented(byte[] bytes, int[] cuts)
    {
        var pieces = new List<byte[]>();
        int at = 0;
        foreach (int cut in cuts)
        {
            pieces.Add(bytes[at..(at + cut)]);
            at += cut;
        }
        pieces.Add(bytes[at..]);

        var first = new Segment(pieces[0], 0);
        Segment last = first;
        foreach (byte[] piece in pieces.Skip(1))
        {
            last = last.Append(piece);
        }
        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }

    public static byte[] Written(Action<ArrayBufferWriter<byte>> write)
    {
        var writer = new ArrayBufferWriter<byte>();
        write(writer);
        return writer.WrittenSpan.ToArray();
    }

    public static byte[] Written(SpanWriter write)
    {
        byte[] bytes = new byte[16 * 1024];
        int written = write(bytes);
        return bytes[..written];
    }

    internal delegate int SpanWriter(Span<byte> destination);

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Segment Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Segment(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }
}
