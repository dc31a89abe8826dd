using System.Buffers;
using System.Buffers.Binary;
using System.Text;
using Xunit;
using static Gateway.Nbd.Tests.Framing;

namespace Gateway.Nbd.Tests;

/// <summary>The greeting, options, option replies and their payloads: round trips, golden bytes, bad input.</summary>
public sealed class HandshakeFramingTests
{
    private static readonly string LongestName = new('n', NbdWire.MaxString);

    [Fact]
    public void Greeting_round_trips_split_at_every_byte()
    {
        byte[] frame = Written(d => Handshake.WriteGreeting(d, HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes));

        AssertReadsAtEverySplit<HandshakeFlags>(frame, Handshake.TryReadGreeting, f => Assert.Equal(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes, f));
    }

    [Fact]
    public void Greeting_is_NBDMAGIC_IHAVEOPT_and_the_flags()
    {
        byte[] frame = Written(d => Handshake.WriteGreeting(d, HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes));

        Assert.Equal([.. "NBDMAGIC"u8, .. "IHAVEOPT"u8, 0x00, 0x03], frame);
    }

    [Fact]
    public void Oldstyle_greeting_is_rejected()
    {
        // Oldstyle: NBDMAGIC, then 0x00420281861253 where newstyle has IHAVEOPT.
        var buffer = new ReadOnlySequence<byte>([.. "NBDMAGIC"u8, .. Convert.FromHexString("0000420281861253"), 0, 0]);

        Assert.Throws<NbdProtocolException>(() => Handshake.TryReadGreeting(ref buffer, out _));
    }

    [Fact]
    public void Client_flags_round_trip_split_at_every_byte()
    {
        byte[] frame = Written(d => Handshake.WriteClientFlags(d, ClientFlags.FixedNewstyle | ClientFlags.NoZeroes));

        Assert.Equal(Convert.FromHexString("00000003"), frame);
        AssertReadsAtEverySplit<ClientFlags>(frame, Handshake.TryReadClientFlags, f => Assert.Equal(ClientFlags.FixedNewstyle | ClientFlags.NoZeroes, f));
    }

    [Fact]
    public void Option_header_round_trips_split_at_every_byte()
    {
        byte[] frame = Written(d => OptionHeader.Write(d, new OptionHeader(NbdOption.StructuredReply, 0)));

        AssertReadsAtEverySplit<OptionHeader>(frame, OptionHeader.TryRead, h => Assert.Equal(new OptionHeader(NbdOption.StructuredReply, 0), h));
    }

    [Fact]
    public void Option_reply_header_round_trips_split_at_every_byte()
    {
        var header = new OptionReplyHeader(NbdOption.Go, OptionReplyType.ErrUnknown, 0);
        byte[] frame = Written(d => OptionReplyHeader.Write(d, header));

        AssertReadsAtEverySplit<OptionReplyHeader>(frame, OptionReplyHeader.TryRead, h =>
        {
            Assert.Equal(header, h);
            Assert.True(h.IsError);
        });
    }

    [Fact]
    public void Option_reply_ack_is_laid_out_as_the_spec_draws_it()
    {
        byte[] frame = Written(d => OptionReplyHeader.Write(d, new OptionReplyHeader(NbdOption.Go, OptionReplyType.Ack, 0)));

        Assert.Equal(Convert.FromHexString("0003e889045565a9" + "00000007" + "00000001" + "00000000"), frame);
    }

    [Fact]
    public void Option_with_the_wrong_magic_is_rejected()
    {
        var buffer = new ReadOnlySequence<byte>(Written(d => OptionReplyHeader.Write(d, new OptionReplyHeader(NbdOption.Go, OptionReplyType.Ack, 0))));

        Assert.Throws<NbdProtocolException>(() => OptionHeader.TryRead(ref buffer, out _));
    }

    [Fact]
    public void Option_reply_with_the_wrong_magic_is_rejected()
    {
        var buffer = new ReadOnlySequence<byte>(Written(d => OptionHeader.Write(d, new OptionHeader(NbdOption.Go, 0))));

        Assert.Throws<NbdProtocolException>(() => OptionReplyHeader.TryRead(ref buffer, out _));
    }

    [Theory]
    [InlineData("disk")]
    [InlineData("")]
    [InlineData("é")]
    public void Go_request_round_trips_split_at_every_byte(string name)
    {
        var request = new InfoRequest(name, [InfoType.BlockSize, InfoType.Name]);
        byte[] frame = Option(NbdOption.Go, request.Size, d => InfoRequest.Write(d, request));

        AssertReadsAtEverySplit(frame, OptionData(InfoRequest.Read), f =>
        {
            Assert.Equal(new OptionHeader(NbdOption.Go, (uint)request.Size), f.Header);
            Assert.Equal(name, f.Data.ExportName);
            Assert.Equal(request.Requests, f.Data.Requests);
        });
    }

    [Fact]
    public void Go_request_is_laid_out_as_the_spec_draws_it()
    {
        var request = new InfoRequest("ab", [InfoType.BlockSize]);
        byte[] frame = Option(NbdOption.Go, request.Size, d => InfoRequest.Write(d, request));

        Assert.Equal(Convert.FromHexString("49484156454F5054" + "00000007" + "0000000A" + "00000002" + "6162" + "0001" + "0003"), frame);
    }

    [Fact]
    public void Go_request_with_the_longest_name_the_spec_allows_round_trips()
    {
        var request = new InfoRequest(LongestName, []);
        byte[] data = Written(d => InfoRequest.Write(d, request));

        Assert.Equal(request.Size, data.Length);
        Assert.Equal(LongestName, InfoRequest.Read(data).ExportName);
    }

    [Theory]
    [InlineData("00000005" + "6162" + "0000")]            // name length past the data
    [InlineData("00000002" + "6162" + "0002" + "0003")]   // two requests declared, one sent
    [InlineData("00000002" + "6162" + "0000" + "00")]     // a byte after the requests
    [InlineData("00000002" + "6162")]                     // no request count
    public void Go_request_whose_lengths_lie_is_rejected(string data)
    {
        Assert.Throws<NbdProtocolException>(() => InfoRequest.Read(Convert.FromHexString(data)));
    }

    [Fact]
    public void Export_name_longer_than_4096_bytes_is_rejected()
    {
        byte[] data = [.. BigEndian(NbdWire.MaxString + 1), .. Encoding.UTF8.GetBytes(LongestName + "n"), 0, 0];

        Assert.Throws<NbdProtocolException>(() => InfoRequest.Read(data));
        Assert.Throws<ArgumentException>(() => new InfoRequest(LongestName + "n", []).Size);
        Assert.Throws<ArgumentException>(() => Written(d => InfoRequest.Write(d, new InfoRequest(LongestName + "n", []))));
    }

    [Fact]
    public void Info_export_reply_round_trips_split_at_every_byte()
    {
        var info = new InfoExport(0x1_0000_0000, TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.CanMultiConn);
        byte[] frame = Reply(NbdOption.Go, OptionReplyType.Info, InfoReply.ExportSize, d => InfoReply.WriteExport(d, info));

        AssertReadsAtEverySplit(frame, ReplyData(InfoReply.ReadExport), f =>
        {
            Assert.Equal(new OptionReplyHeader(NbdOption.Go, OptionReplyType.Info, InfoReply.ExportSize), f.Header);
            Assert.Equal(info, f.Data);
        });
    }

    [Fact]
    public void Info_export_reply_is_laid_out_as_the_spec_draws_it()
    {
        byte[] data = Written(d => InfoReply.WriteExport(d, new InfoExport(0x40000000, TransmissionFlags.HasFlags | TransmissionFlags.SendFlush)));

        Assert.Equal(Convert.FromHexString("0000" + "0000000040000000" + "0005"), data);
    }

    [Theory]
    [InlineData(InfoType.Name, "disk")]
    [InlineData(InfoType.Description, "a disk, described")]
    [InlineData(InfoType.Description, "")]
    public void Info_text_reply_round_trips_split_at_every_byte(InfoType type, string text)
    {
        byte[] frame = Reply(NbdOption.Info, OptionReplyType.Info, InfoReply.TextSize(text), d => InfoReply.WriteText(d, type, text));

        AssertReadsAtEverySplit(frame, ReplyData(d => (InfoReply.ReadType(d), InfoReply.ReadText(d))),
            f => Assert.Equal((type, text), f.Data));
    }

    [Fact]
    public void Info_block_size_reply_round_trips_split_at_every_byte()
    {
        var sizes = new InfoBlockSize(1, 4096, 64 * 1024 * 1024);
        byte[] frame = Reply(NbdOption.Go, OptionReplyType.Info, InfoReply.BlockSizeSize, d => InfoReply.WriteBlockSize(d, sizes));

        AssertReadsAtEverySplit(frame, ReplyData(InfoReply.ReadBlockSize), f => Assert.Equal(sizes, f.Data));
    }

    [Theory]
    [InlineData("0000" + "0000000040000000")]                   // EXPORT without its flags
    [InlineData("0003" + "00000001" + "00001000")]              // BLOCK_SIZE without its maximum
    [InlineData("0003" + "00000001" + "00001000" + "0000100000")] // BLOCK_SIZE with a byte too many
    public void Info_reply_whose_length_does_not_fit_its_type_is_rejected(string data)
    {
        byte[] bytes = Convert.FromHexString(data);

        Assert.Throws<NbdProtocolException>(() => InfoReply.ReadType(bytes) == InfoType.Export ? (object)InfoReply.ReadExport(bytes) : InfoReply.ReadBlockSize(bytes));
    }

    [Fact]
    public void Info_text_longer_than_4096_bytes_is_rejected()
    {
        byte[] data = [0, 2, .. Encoding.UTF8.GetBytes(LongestName + "n")];

        Assert.Throws<NbdProtocolException>(() => InfoReply.ReadText(data));
    }

    [Theory]
    [InlineData("disk", "the first disk")]
    [InlineData("disk", "")]
    public void Server_reply_round_trips_split_at_every_byte(string name, string description)
    {
        var entry = new ServerEntry(name, description);
        byte[] frame = Reply(NbdOption.List, OptionReplyType.Server, entry.Size, d => ServerEntry.Write(d, entry));

        AssertReadsAtEverySplit(frame, ReplyData(ServerEntry.Read), f => Assert.Equal(entry, f.Data));
    }

    [Fact]
    public void Server_reply_whose_name_length_lies_is_rejected()
    {
        Assert.Throws<NbdProtocolException>(() => ServerEntry.Read(Convert.FromHexString("00000005" + "6469736B")));
    }

    [Theory]
    [InlineData(NbdOption.SetMetaContext, new[] { NbdWire.BaseAllocation, "qemu:dirty-bitmap:b" })]
    [InlineData(NbdOption.ListMetaContext, new string[0])]
    public void Meta_context_request_round_trips_split_at_every_byte(NbdOption option, string[] queries)
    {
        var request = new MetaContextRequest("disk", queries);
        byte[] frame = Option(option, request.Size, d => MetaContextRequest.Write(d, request));

        AssertReadsAtEverySplit(frame, OptionData(MetaContextRequest.Read), f =>
        {
            Assert.Equal(option, f.Header.Option);
            Assert.Equal("disk", f.Data.ExportName);
            Assert.Equal(queries, f.Data.Queries);
        });
    }

    [Fact]
    public void Meta_context_request_is_laid_out_as_the_spec_draws_it()
    {
        byte[] data = Written(d => MetaContextRequest.Write(d, new MetaContextRequest("d", ["base:"])));

        Assert.Equal(Convert.FromHexString("00000001" + "64" + "00000001" + "00000005" + "626173653A"), data);
    }

    [Theory]
    [InlineData("00000001" + "64" + "00000002" + "00000001" + "62")]      // two queries declared, one sent
    [InlineData("00000001" + "64" + "FFFFFFFF")]                          // a count no data could hold
    [InlineData("00000001" + "64" + "00000001" + "00000009" + "62")]      // query length past the data
    [InlineData("00000001" + "64" + "00000000" + "00")]                   // a byte after the last query
    public void Meta_context_request_whose_lengths_lie_is_rejected(string data)
    {
        Assert.Throws<NbdProtocolException>(() => MetaContextRequest.Read(Convert.FromHexString(data)));
    }

    [Fact]
    public void Meta_context_reply_round_trips_split_at_every_byte()
    {
        var reply = new MetaContextReply(1, NbdWire.BaseAllocation);
        byte[] frame = Reply(NbdOption.SetMetaContext, OptionReplyType.MetaContext, reply.Size, d => MetaContextReply.Write(d, reply));

        AssertReadsAtEverySplit(frame, ReplyData(MetaContextReply.Read), f => Assert.Equal(reply, f.Data));
    }

    [Fact]
    public void Meta_context_name_longer_than_4096_bytes_is_rejected()
    {
        byte[] data = [0, 0, 0, 1, .. Encoding.UTF8.GetBytes(LongestName + "n")];

        Assert.Throws<NbdProtocolException>(() => MetaContextReply.Read(data));
        Assert.Throws<ArgumentException>(() => Written(d => MetaContextReply.Write(d, new MetaContextReply(1, LongestName + "n"))));
    }

    [Theory]
    [InlineData("0000")]                                              // no room for the name's length and the count
    [InlineData("00000000" + "00")]                                   // one byte of count
    public void Go_request_shorter_than_its_fixed_fields_is_too_short(string data) =>
        AssertInfoFault(Convert.FromHexString(data), OptionDataFault.TooShort);

    [Theory]
    [InlineData("00000005" + "6162" + "0000")]                        // name length past the data
    [InlineData("00000004" + "61626364" + "00")]                      // a name that eats into the count
    [InlineData("00000002" + "6162")]                                 // no request count
    public void Go_request_whose_name_runs_past_its_data_is_a_name_length_fault(string data) =>
        AssertInfoFault(Convert.FromHexString(data), OptionDataFault.NameLength);

    [Theory]
    [InlineData("00000002" + "6162" + "0002" + "0003")]               // two requests declared, one sent
    [InlineData("00000002" + "6162" + "0000" + "00")]                 // a byte after the requests
    public void Go_request_whose_requests_do_not_match_their_count_is_a_request_count_fault(string data) =>
        AssertInfoFault(Convert.FromHexString(data), OptionDataFault.RequestCount);

    [Fact]
    public void Go_request_with_a_name_over_4096_bytes_is_a_name_too_long_fault()
    {
        AssertInfoFault([.. BigEndian(NbdWire.MaxString + 1), .. Encoding.UTF8.GetBytes(LongestName + "n"), 0, 0], OptionDataFault.NameTooLong);
    }

    [Fact]
    public void Go_request_name_is_checked_against_the_data_before_the_limit()
    {
        // proto.md: the name length "MUST be no larger than the option data length - 6"; a name
        // over 4096 bytes that also runs into the count is inconsistent first, not too big.
        AssertInfoFault([.. BigEndian(NbdWire.MaxString + 1), .. Encoding.UTF8.GetBytes(LongestName + "n"), 0], OptionDataFault.NameLength);
    }

    [Theory]
    [InlineData("000000", OptionDataFault.TooShort)]                                         // no name length
    [InlineData("00000009" + "64", OptionDataFault.NameLength)]                              // name past the data
    [InlineData("00000001" + "64" + "0000", OptionDataFault.TooShort)]                        // no query count
    [InlineData("00000001" + "64" + "00000002" + "00000001" + "62", OptionDataFault.Query)]   // two queries declared, one sent
    [InlineData("00000001" + "64" + "FFFFFFFF", OptionDataFault.Query)]                       // a count no data could hold
    [InlineData("00000001" + "64" + "00000001" + "00000009" + "62", OptionDataFault.Query)]   // query length past the data
    [InlineData("00000001" + "64" + "00000000" + "00", OptionDataFault.Trailing)]             // a byte after the last query
    public void Meta_context_request_faults_say_what_is_wrong(string data, OptionDataFault expected)
    {
        Assert.False(MetaContextRequest.TryRead(Convert.FromHexString(data), out _, out OptionDataFault fault));
        Assert.Equal(expected, fault);
    }

    [Fact]
    public void Meta_context_request_with_strings_over_4096_bytes_is_refused()
    {
        byte[] longName = [.. BigEndian(NbdWire.MaxString + 1), .. Encoding.UTF8.GetBytes(LongestName + "n"), 0, 0, 0, 0];
        byte[] longQuery = [0, 0, 0, 1, (byte)'d', 0, 0, 0, 1, .. BigEndian(NbdWire.MaxString + 1), .. Encoding.UTF8.GetBytes(LongestName + "n")];

        Assert.False(MetaContextRequest.TryRead(longName, out _, out OptionDataFault nameFault));
        Assert.Equal(OptionDataFault.NameTooLong, nameFault);
        Assert.False(MetaContextRequest.TryRead(longQuery, out _, out OptionDataFault queryFault));
        Assert.Equal(OptionDataFault.Query, queryFault);
    }

    [Fact]
    public void Meta_context_request_read_by_TryRead_is_what_Read_reads()
    {
        byte[] data = Written(d => MetaContextRequest.Write(d, new MetaContextRequest("disk", [NbdWire.BaseAllocation])));

        Assert.True(MetaContextRequest.TryRead(data, out MetaContextRequest request, out OptionDataFault fault));
        Assert.Equal(OptionDataFault.None, fault);
        Assert.Equal("disk", request.ExportName);
        Assert.Equal([NbdWire.BaseAllocation], request.Queries);
    }

    [Theory]
    [InlineData("disk")]
    [InlineData("")]
    [InlineData("é")]
    public void Export_name_option_round_trips_split_at_every_byte(string name)
    {
        byte[] frame = Option(NbdOption.ExportName, ExportNameOption.Size(name), d => ExportNameOption.Write(d, name));

        AssertReadsAtEverySplit(frame, OptionData(ExportNameOption.Read), f =>
        {
            Assert.Equal(new OptionHeader(NbdOption.ExportName, (uint)ExportNameOption.Size(name)), f.Header);
            Assert.Equal(name, f.Data);
        });
    }

    [Fact]
    public void Export_name_option_over_4096_bytes_is_rejected()
    {
        Assert.Equal(LongestName, ExportNameOption.Read(Encoding.UTF8.GetBytes(LongestName)));
        Assert.Throws<NbdProtocolException>(() => ExportNameOption.Read(Encoding.UTF8.GetBytes(LongestName + "n")));
        Assert.Throws<ArgumentException>(() => ExportNameOption.Size(LongestName + "n"));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Export_name_reply_round_trips_split_at_every_byte(bool noZeroes)
    {
        var reply = new ExportNameReply(0x1_0000_0000, TransmissionFlags.HasFlags | TransmissionFlags.SendFlush);
        byte[] frame = Written(d => ExportNameReply.Write(d, reply, noZeroes));

        Assert.Equal(ExportNameReply.Size(noZeroes), frame.Length);
        AssertReadsAtEverySplit<ExportNameReply>(frame, (ref ReadOnlySequence<byte> b, out ExportNameReply r) => ExportNameReply.TryRead(ref b, noZeroes, out r),
            r => Assert.Equal(reply, r));
    }

    [Fact]
    public void Export_name_reply_is_laid_out_as_the_spec_draws_it()
    {
        byte[] frame = Written(d => ExportNameReply.Write(d, new ExportNameReply(0x40000000, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly), noZeroes: false));

        Assert.Equal(Convert.FromHexString("0000000040000000" + "0003" + new string('0', 2 * 124)), frame);
    }

    [Fact]
    public void Export_name_reply_with_a_reserved_byte_set_is_rejected()
    {
        byte[] frame = Written(d => ExportNameReply.Write(d, new ExportNameReply(1, TransmissionFlags.HasFlags), noZeroes: false));
        frame[^1] = 1;
        var buffer = new ReadOnlySequence<byte>(frame);

        Assert.Throws<NbdProtocolException>(() => ExportNameReply.TryRead(ref buffer, noZeroes: false, out _));
    }

    private static void AssertInfoFault(byte[] data, OptionDataFault expected)
    {
        Assert.False(InfoRequest.TryRead(data, out _, out OptionDataFault fault));
        Assert.Equal(expected, fault);
        Assert.Throws<NbdProtocolException>(() => InfoRequest.Read(data));
    }

    private static byte[] Option(NbdOption option, int length, SpanWriter data) =>
        Written(d =>
        {
            int at = OptionHeader.Write(d, new OptionHeader(option, (uint)length));
            return at + data(d[at..]);
        });

    private static byte[] Reply(NbdOption option, OptionReplyType type, int length, SpanWriter data) =>
        Written(d =>
        {
            int at = OptionReplyHeader.Write(d, new OptionReplyHeader(option, type, (uint)length));
            return at + data(d[at..]);
        });

    private static byte[] BigEndian(int value)
    {
        byte[] bytes = new byte[4];
        BinaryPrimitives.WriteInt32BigEndian(bytes, value);
        return bytes;
    }
}
