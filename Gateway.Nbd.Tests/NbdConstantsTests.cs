using System.Buffers;
using System.Buffers.Binary;
using System.Text;
using Xunit;

namespace Gateway.Nbd.Tests;

/// <summary>
/// Golden test of the wire constants against the numbers in the NBD spec (NetworkBlockDevice/nbd
/// doc/proto.md, section "Values"), in the manner of Garnet's PersistedEnumStabilityTests: every
/// member is listed with its spec value, and a member added or renumbered without updating this
/// table fails. The expected values are written as the spec writes them (bit numbers, 2^31 + n).
/// </summary>
public sealed class NbdConstantsTests
{
    private static void AssertEnum<TEnum>(params (string Name, ulong Value)[] expected)
        where TEnum : struct, Enum
    {
        var actual = Enum.GetValues<TEnum>()
            .Select(v => (Name: v.ToString(), Value: Convert.ToUInt64(v, System.Globalization.CultureInfo.InvariantCulture)))
            .OrderBy(p => p.Name, StringComparer.Ordinal)
            .ToList();
        Assert.Equal(expected.OrderBy(p => p.Name, StringComparer.Ordinal).ToList(), actual);
    }

    private static ulong Bit(int n) => 1UL << n;

    private static ulong Ascii(string eight) => BinaryPrimitives.ReadUInt64BigEndian(Encoding.ASCII.GetBytes(eight));

    [Fact]
    public void Magic_numbers_match_the_spec()
    {
        Assert.Equal(0x4e42444d41474943UL, NbdMagic.InitPassword);
        Assert.Equal(NbdMagic.InitPassword, Ascii("NBDMAGIC"));
        Assert.Equal(0x49484156454F5054UL, NbdMagic.IHaveOpt);
        Assert.Equal(NbdMagic.IHaveOpt, Ascii("IHAVEOPT"));
        Assert.Equal(0x0003e889045565a9UL, NbdMagic.OptionReply);
        Assert.Equal(0x25609513u, NbdMagic.Request);
        Assert.Equal(0x67446698u, NbdMagic.SimpleReply);
        Assert.Equal(0x668e33efu, NbdMagic.StructuredReply);
        Assert.Equal(0x21e41c71u, NbdMagic.ExtendedRequest);   // NBD_EXTENDED_REQUEST_MAGIC
        Assert.Equal(0x6e8a278cu, NbdMagic.ExtendedReply);     // NBD_EXTENDED_REPLY_MAGIC
    }

    [Fact]
    public void Handshake_flags_match_the_spec() => AssertEnum<HandshakeFlags>(
        ("FixedNewstyle", Bit(0)),   // NBD_FLAG_FIXED_NEWSTYLE
        ("NoZeroes", Bit(1)));       // NBD_FLAG_NO_ZEROES

    [Fact]
    public void Client_flags_match_the_spec() => AssertEnum<ClientFlags>(
        ("FixedNewstyle", Bit(0)),   // NBD_FLAG_C_FIXED_NEWSTYLE
        ("NoZeroes", Bit(1)));       // NBD_FLAG_C_NO_ZEROES

    [Fact]
    public void Transmission_flags_match_the_spec() => AssertEnum<TransmissionFlags>(
        ("HasFlags", Bit(0)),
        ("ReadOnly", Bit(1)),
        ("SendFlush", Bit(2)),
        ("SendFua", Bit(3)),
        ("Rotational", Bit(4)),
        ("SendTrim", Bit(5)),
        ("SendWriteZeroes", Bit(6)),
        ("SendDf", Bit(7)),
        ("CanMultiConn", Bit(8)),
        ("SendResize", Bit(9)),
        ("SendCache", Bit(10)),
        ("SendFastZero", Bit(11)),
        ("BlockStatusPayload", Bit(12)));   // NBD_FLAG_BLOCK_STAT_PAYLOAD

    [Fact]
    public void Option_types_match_the_spec() => AssertEnum<NbdOption>(
        ("ExportName", 1),
        ("Abort", 2),
        ("List", 3),
        ("PeekExport", 4),
        ("StartTls", 5),
        ("Info", 6),
        ("Go", 7),
        ("StructuredReply", 8),
        ("ListMetaContext", 9),
        ("SetMetaContext", 10),
        ("ExtendedHeaders", 11));

    [Fact]
    public void Option_reply_types_match_the_spec()
    {
        const ulong err = 1UL << 31;
        AssertEnum<OptionReplyType>(
            ("Ack", 1),
            ("Server", 2),
            ("Info", 3),
            ("MetaContext", 4),
            ("ErrUnsup", err + 1),
            ("ErrPolicy", err + 2),
            ("ErrInvalid", err + 3),
            ("ErrPlatform", err + 4),
            ("ErrTlsReqd", err + 5),
            ("ErrUnknown", err + 6),
            ("ErrShutdown", err + 7),
            ("ErrBlockSizeReqd", err + 8),
            ("ErrTooBig", err + 9),
            ("ErrExtHeaderReqd", err + 10));
    }

    [Fact]
    public void Info_types_match_the_spec() => AssertEnum<InfoType>(
        ("Export", 0),
        ("Name", 1),
        ("Description", 2),
        ("BlockSize", 3));

    [Fact]
    public void Commands_match_the_spec() => AssertEnum<NbdCommand>(
        ("Read", 0),
        ("Write", 1),
        ("Disconnect", 2),
        ("Flush", 3),
        ("Trim", 4),
        ("Cache", 5),
        ("WriteZeroes", 6),
        ("BlockStatus", 7),
        ("Resize", 8));

    [Fact]
    public void Command_flags_match_the_spec() => AssertEnum<CommandFlags>(
        ("None", 0),
        ("Fua", Bit(0)),
        ("NoHole", Bit(1)),
        ("DontFragment", Bit(2)),
        ("ReqOne", Bit(3)),
        ("FastZero", Bit(4)),
        ("PayloadLen", Bit(5)));

    [Fact]
    public void Structured_reply_flags_match_the_spec() => AssertEnum<ReplyFlags>(
        ("None", 0),
        ("Done", Bit(0)));

    [Fact]
    public void Structured_reply_types_match_the_spec()
    {
        const ulong err = 1UL << 15;
        AssertEnum<ReplyType>(
            ("None", 0),
            ("OffsetData", 1),
            ("OffsetHole", 2),
            ("BlockStatus", 5),
            ("BlockStatusExt", 6),
            ("Error", err + 1),
            ("ErrorOffset", err + 2));
    }

    [Fact]
    public void Error_values_match_the_spec() => AssertEnum<NbdError>(
        ("None", 0),
        ("Perm", 1),        // EPERM
        ("Io", 5),          // EIO
        ("NoMem", 12),      // ENOMEM
        ("Inval", 22),      // EINVAL
        ("NoSpc", 28),      // ENOSPC
        ("Overflow", 75),   // EOVERFLOW
        ("NotSup", 95),     // ENOTSUP
        ("Shutdown", 108)); // ESHUTDOWN

    [Fact]
    public void Base_allocation_bits_match_the_spec()
    {
        AssertEnum<AllocationState>(
            ("Hole", Bit(0)),   // NBD_STATE_HOLE
            ("Zero", Bit(1)));  // NBD_STATE_ZERO
        Assert.Equal("base:allocation", NbdWire.BaseAllocation);
    }

    [Fact]
    public void String_limit_and_header_sizes_match_the_spec()
    {
        Assert.Equal(4096, NbdWire.MaxString);            // "Strings ... MUST be no longer than 4096 bytes"
        Assert.Equal(4 + 2 + 2 + 8 + 8 + 4, NbdWire.RequestHeaderSize);
        Assert.Equal(4 + 4 + 8, NbdWire.SimpleReplyHeaderSize);
        Assert.Equal(4 + 2 + 2 + 8 + 4, NbdWire.StructuredReplyHeaderSize);
        Assert.Equal(4 + 2 + 2 + 8 + 8 + 8, NbdWire.ExtendedRequestHeaderSize);
        Assert.Equal(4 + 2 + 2 + 8 + 8 + 8, NbdWire.ExtendedReplyHeaderSize);
        Assert.Equal(8 + 8 + 2, NbdWire.GreetingSize);
        Assert.Equal(4, NbdWire.ClientFlagsSize);
        Assert.Equal(8 + 4 + 4, NbdWire.OptionHeaderSize);
        Assert.Equal(8 + 4 + 4 + 4, NbdWire.OptionReplyHeaderSize);
    }
}

public sealed class NbdRequestTests
{
    private static byte[] Header(NbdRequest request)
    {
        byte[] bytes = new byte[NbdWire.RequestHeaderSize];
        request.WriteTo(bytes);
        return bytes;
    }

    private static readonly NbdRequest Sample = new(CommandFlags.Fua | CommandFlags.NoHole, NbdCommand.WriteZeroes,
        0x0123456789ABCDEF, 0xFEDCBA9876543210, 0xCAFEBABE);

    [Fact]
    public void Header_is_laid_out_big_endian_as_the_spec_draws_it()
    {
        byte[] bytes = Header(Sample);

        Assert.Equal(Convert.FromHexString(
            "25609513" + "0003" + "0006" + "0123456789ABCDEF" + "FEDCBA9876543210" + "CAFEBABE"), bytes);
    }

    [Fact]
    public void Whole_header_is_read_and_sliced_off_leaving_the_payload()
    {
        byte[] bytes = [.. Header(Sample), 1, 2, 3];
        var buffer = new ReadOnlySequence<byte>(bytes);

        Assert.True(NbdRequest.TryRead(ref buffer, out NbdRequest request));

        Assert.Equal(Sample, request);
        Assert.Equal(new byte[] { 1, 2, 3 }, buffer.ToArray());
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(27)]
    public void Partial_header_returns_false_and_leaves_the_buffer_alone(int available)
    {
        var buffer = new ReadOnlySequence<byte>(Header(Sample).AsMemory(0, available));

        Assert.False(NbdRequest.TryRead(ref buffer, out _));

        Assert.Equal(available, buffer.Length);
    }

    [Theory]
    [InlineData(new[] { 1 })]
    [InlineData(new[] { 4 })]
    [InlineData(new[] { 13, 7 })]
    [InlineData(new[] { 27 })]
    [InlineData(new[] { 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1 })]
    public void Header_split_across_segments_is_read(int[] cuts)
    {
        byte[] bytes = [.. Header(Sample), .. Header(Sample with { Cookie = 2, Command = NbdCommand.Read, Flags = CommandFlags.None })];
        ReadOnlySequence<byte> buffer = Segmented(bytes, cuts);
        Assert.False(buffer.IsSingleSegment);

        Assert.True(NbdRequest.TryRead(ref buffer, out NbdRequest first));
        Assert.True(NbdRequest.TryRead(ref buffer, out NbdRequest second));
        Assert.False(NbdRequest.TryRead(ref buffer, out _));

        Assert.Equal(Sample, first);
        Assert.Equal(new NbdRequest(CommandFlags.None, NbdCommand.Read, 2, Sample.Offset, Sample.Length), second);
        Assert.True(buffer.IsEmpty);
    }

    [Fact]
    public void Wrong_magic_throws_NbdProtocolException()
    {
        byte[] bytes = Header(Sample);
        bytes[0] ^= 0x01;
        var buffer = new ReadOnlySequence<byte>(bytes);

        Assert.Throws<NbdProtocolException>(() => NbdRequest.TryRead(ref buffer, out _));
    }

    [Fact]
    public void Wrong_magic_split_across_segments_throws_NbdProtocolException()
    {
        byte[] bytes = Header(Sample);
        BinaryPrimitives.WriteUInt32BigEndian(bytes, NbdMagic.SimpleReply);
        ReadOnlySequence<byte> buffer = Segmented(bytes, [2]);

        Assert.Throws<NbdProtocolException>(() => NbdRequest.TryRead(ref buffer, out _));
    }

    [Theory]
    [InlineData(NbdCommand.Write, true)]
    [InlineData(NbdCommand.Read, false)]
    [InlineData(NbdCommand.WriteZeroes, false)]
    [InlineData(NbdCommand.BlockStatus, false)]
    public void Only_writes_carry_a_payload(NbdCommand command, bool hasPayload) =>
        Assert.Equal(hasPayload, (Sample with { Command = command }).HasPayloadIn(extended: false));

    private static ReadOnlySequence<byte> Segmented(byte[] bytes, int[] cuts) => Framing.Segmented(bytes, cuts);
}
