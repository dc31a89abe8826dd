using System.Buffers.Binary;
using System.Text;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// Tests that touch process-wide state (<see cref="PayloadPool.Outstanding"/>, the process's
/// socket counters) run alone, after the parallel ones, so another test's connections cannot move
/// the counters. Keep it to those tests: everything in it runs one at a time.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class NbdServerCollection
{
    public const string Name = "NBD server (serial)";
}

/// <summary>
/// Bad and awkward input against the in-process server: each case checks the exact answer the spec
/// gives it (proto.md), and that afterwards the same connection, or another one when the spec says
/// to close, still works. Run twice: over an in-memory pipe (<see cref="BadInputInMemoryTests"/>,
/// nothing but the server's code between client and server) and over a real loopback socket
/// (<see cref="BadInputTests"/>, where resets and half-closes are the kernel's).
/// </summary>
public abstract class BadInputSuite : IAsyncLifetime
{
    private const int KiB = 1024;
    private const int MiB = 1024 * KiB;
    private const long RwSize = 128L * MiB; // larger than the 64 MiB payload limit
    private const long RoSize = 1L * MiB;
    private const string Rw = "rw";
    private const string Ro = "ro";
    private const string Slow = "slow";

    private readonly NbdTestServer _server;
    private readonly TestDevice _rw;
    private readonly TestDevice _slow;

    protected BadInputSuite(bool inMemory)
    {
        var exports = new TestExportDirectory();
        _rw = exports.Add(Rw, new MemoryBackend(RwSize), "read-write test export");
        exports.Add(Ro, new MemoryBackend(RoSize, readOnly: true));
        _slow = exports.Add(Slow, new MemoryBackend(4L * MiB));
        _server = new NbdTestServer(exports, inMemory: inMemory);
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _server.DisposeAsync();

    private Task<RawClient> OpenAsync(string export = Rw, bool structured = true, params string[] contexts) =>
        _server.OpenAsync(export, structured, contexts);

    /// <summary>A fresh connection can still attach and do I/O: the server as a whole is fine.</summary>
    private async Task AssertServerStillWorksAsync()
    {
        await using RawClient client = await OpenAsync();
        await client.AssertWorksAsync(offset: 12 * KiB, seed: 99);
    }

    private static async Task AssertClosedAsync(RawClient client) =>
        Assert.True(await client.ServerClosedAsync(), "the server should have closed the connection");

    private static OptionReply Single(IReadOnlyList<OptionReply> replies)
    {
        Assert.Single(replies);
        return replies[0];
    }

    /// <summary>A write payload made of well-formed READ headers: if the server ever took the payload
    /// for requests, replies to cookie 0xBAD would show up.</summary>
    private static byte[] PayloadLookingLikeRequests(int length)
    {
        byte[] payload = new byte[length];
        for (int at = 0; at + NbdLimits.RequestHeaderSize <= length; at += NbdLimits.RequestHeaderSize)
        {
            new NbdRequest(CommandFlags.None, NbdCommand.Read, 0xBAD, 0, 512).WriteTo(payload.AsSpan(at));
        }
        return payload;
    }

    // ---- Handshake ---------------------------------------------------------------------------

    [Fact]
    public async Task Wrong_IHAVEOPT_magic_closes_the_connection()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        await client.SendOptionAsync(NbdOption.List, ReadOnlyMemory<byte>.Empty, magic: NbdMagic.IHaveOpt ^ 0x0100);

        await AssertClosedAsync(client);
        await AssertServerStillWorksAsync();
    }

    [Theory]
    [InlineData(1u << 2)]
    [InlineData(1u << 31)]
    public async Task Unknown_client_flags_close_the_connection(uint unknown)
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.ReadGreetingAsync();

        await client.SendClientFlagsAsync((uint)(ClientFlags.FixedNewstyle | ClientFlags.NoZeroes) | unknown);

        await AssertClosedAsync(client);
        await AssertServerStillWorksAsync();
    }

    [Fact]
    public async Task Option_over_the_length_limit_is_ERR_TOO_BIG_and_negotiation_continues()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        await client.SendOptionAsync(NbdOption.Info, new byte[NbdLimits.MaxOptionLength + 1]);
        OptionReply reply = Single(await client.ReadOptionRepliesAsync(NbdOption.Info));

        Assert.Equal(OptionReplyType.ErrTooBig, reply.Type);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Option_too_large_even_to_skip_closes_the_connection()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        // Only the header: the server must not wait for (or buffer) a megabyte-plus of option data.
        await client.SendOptionAsync(NbdOption.Info, ReadOnlyMemory<byte>.Empty, declaredLength: NbdLimits.MaxOptionDiscard + 1);

        await AssertClosedAsync(client);
        await AssertServerStillWorksAsync();
    }

    [Theory]
    [InlineData(NbdOption.Info, "name longer than the data")]
    [InlineData(NbdOption.Go, "name longer than the data")]
    [InlineData(NbdOption.Info, "more requests than the data")]
    [InlineData(NbdOption.Go, "more requests than the data")]
    [InlineData(NbdOption.Info, "trailing byte")]
    [InlineData(NbdOption.Info, "shorter than the fixed fields")]
    public async Task Info_or_Go_with_inconsistent_lengths_is_ERR_INVALID(NbdOption option, string defect)
    {
        byte[] data = defect switch
        {
            "name longer than the data" => [0, 0, 0, 100, (byte)'r', (byte)'w', 0, 0],
            "more requests than the data" => ClaimingRequests(RawClient.InfoRequest(Rw, InfoType.Name), 3),
            "trailing byte" => [.. RawClient.InfoRequest(Rw, InfoType.Name), 0],
            "shorter than the fixed fields" => [0, 0, 0],
            _ => throw new ArgumentOutOfRangeException(nameof(defect)),
        };
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        OptionReply reply = Single(await client.OptionAsync(option, data));

        Assert.Equal(OptionReplyType.ErrInvalid, reply.Type);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        await client.AssertWorksAsync();

        // The request count follows the 4-byte name length and the 2-byte name "rw".
        static byte[] ClaimingRequests(byte[] data, ushort count)
        {
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(6), count);
            return data;
        }
    }

    [Fact]
    public async Task Info_with_a_name_over_4096_bytes_is_ERR_TOO_BIG()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        // Laid out here: the codec (and so RawClient.InfoRequest) refuses to write a name over the spec's limit.
        byte[] name = Encoding.UTF8.GetBytes(new string('x', NbdLimits.MaxString + 1));
        byte[] nameLength = new byte[4];
        BinaryPrimitives.WriteInt32BigEndian(nameLength, name.Length);
        byte[] data = [.. nameLength, .. name, 0, 0];
        OptionReply reply = Single(await client.OptionAsync(NbdOption.Info, data));

        Assert.Equal(OptionReplyType.ErrTooBig, reply.Type);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Info, Rw))[^1].Type);
    }

    [Fact]
    public async Task Info_answers_export_name_description_and_block_size()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        IReadOnlyList<OptionReply> replies = await client.InfoOrGoAsync(NbdOption.Info, Rw, InfoType.Name, InfoType.Description, InfoType.BlockSize);

        Assert.Equal(OptionReplyType.Ack, replies[^1].Type);
        Dictionary<InfoType, byte[]> infos = replies.Where(r => r.Type == OptionReplyType.Info)
            .ToDictionary(r => (InfoType)BinaryPrimitives.ReadUInt16BigEndian(r.Data), r => r.Data[2..]);
        Assert.Equal((ulong)RwSize, client.ExportSize);
        Assert.True(client.ExportFlags.HasFlag(TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.SendFua | TransmissionFlags.CanMultiConn));
        Assert.False(client.ExportFlags.HasFlag(TransmissionFlags.ReadOnly));
        Assert.Equal(Rw, Encoding.UTF8.GetString(infos[InfoType.Name]));
        Assert.Equal("read-write test export", Encoding.UTF8.GetString(infos[InfoType.Description]));
        Assert.Equal(Convert.FromHexString("00000001" + "00001000" + "04000000"), infos[InfoType.BlockSize]);
    }

    [Theory]
    [InlineData((uint)NbdOption.PeekExport)]
    [InlineData(12u)]
    [InlineData(0xDEADu)]
    [InlineData(0u)]
    public async Task Unknown_option_is_ERR_UNSUP(uint option)
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        OptionReply reply = Single(await client.OptionAsync((NbdOption)option, new byte[] { 1, 2, 3 }));

        Assert.Equal(OptionReplyType.ErrUnsup, reply.Type);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task StartTls_without_TLS_configured_is_ERR_POLICY_and_the_session_stays_plain()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        OptionReply reply = Single(await client.OptionAsync(NbdOption.StartTls, ReadOnlyMemory<byte>.Empty));

        Assert.Equal(OptionReplyType.ErrPolicy, reply.Type);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        await client.AssertWorksAsync();
    }

    [Theory]
    [InlineData(NbdOption.List)]
    [InlineData(NbdOption.StructuredReply)]
    [InlineData(NbdOption.StartTls)]
    public async Task Option_with_data_it_does_not_take_is_ERR_INVALID(NbdOption option)
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        OptionReply reply = Single(await client.OptionAsync(option, new byte[] { 0, 0, 0, 0 }));

        Assert.Equal(OptionReplyType.ErrInvalid, reply.Type);
        Assert.False(client.Structured);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
    }

    [Fact]
    public async Task Second_STRUCTURED_REPLY_is_ERR_INVALID()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);

        OptionReply reply = Single(await client.OptionAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty));

        Assert.Equal(OptionReplyType.ErrInvalid, reply.Type);
    }

    [Fact]
    public async Task List_names_every_export_then_acks()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        IReadOnlyList<OptionReply> replies = await client.OptionAsync(NbdOption.List, ReadOnlyMemory<byte>.Empty);

        Assert.Equal(OptionReplyType.Ack, replies[^1].Type);
        Assert.Equal([Rw, Ro, Slow], replies.SkipLast(1).Select(r =>
        {
            Assert.Equal(OptionReplyType.Server, r.Type);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(r.Data);
            return Encoding.UTF8.GetString(r.Data, 4, (int)length);
        }));
    }

    [Theory]
    [InlineData(NbdOption.ListMetaContext)]
    [InlineData(NbdOption.SetMetaContext)]
    public async Task Meta_context_option_before_STRUCTURED_REPLY_is_ERR_INVALID(NbdOption option)
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        OptionReply refused = Single(await client.MetaContextAsync(option, Rw, NbdLimits.BaseAllocation));
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        IReadOnlyList<OptionReply> accepted = await client.MetaContextAsync(option, Rw, NbdLimits.BaseAllocation);

        Assert.Equal(OptionReplyType.ErrInvalid, refused.Type);
        Assert.Equal([OptionReplyType.MetaContext, OptionReplyType.Ack], accepted.Select(r => r.Type));
    }

    [Theory]
    [InlineData(NbdOption.ListMetaContext, "query longer than the data")]
    [InlineData(NbdOption.SetMetaContext, "query longer than the data")]
    [InlineData(NbdOption.SetMetaContext, "more queries than the data")]
    [InlineData(NbdOption.SetMetaContext, "trailing bytes")]
    [InlineData(NbdOption.SetMetaContext, "no query count")]
    public async Task Meta_context_option_with_inconsistent_lengths_is_ERR_INVALID(NbdOption option, string defect)
    {
        byte[] good = RawClient.MetaContextRequest(Rw, NbdLimits.BaseAllocation);
        byte[] data = defect switch
        {
            // name length 2 + "rw", 1 query, whose length says 200 bytes
            "query longer than the data" => [0, 0, 0, 2, (byte)'r', (byte)'w', 0, 0, 0, 1, 0, 0, 0, 200, (byte)'b'],
            "more queries than the data" => [.. good[..6], 0, 0, 0, 2, .. good[10..]],
            "trailing bytes" => [.. good, 0, 0],
            "no query count" => [0, 0, 0, 2, (byte)'r', (byte)'w'],
            _ => throw new ArgumentOutOfRangeException(nameof(defect)),
        };
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);

        OptionReply reply = Single(await client.OptionAsync(option, data));

        Assert.Equal(OptionReplyType.ErrInvalid, reply.Type);
        Assert.Equal([OptionReplyType.MetaContext, OptionReplyType.Ack],
            (await client.MetaContextAsync(option, Rw, NbdLimits.BaseAllocation)).Select(r => r.Type));
    }

    [Theory]
    [InlineData(NbdOption.Go)]
    [InlineData(NbdOption.Info)]
    public async Task Info_or_Go_on_an_unknown_export_is_ERR_UNKNOWN(NbdOption option)
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        OptionReply reply = Single(await client.InfoOrGoAsync(option, "no-such-export"));

        Assert.Equal(OptionReplyType.ErrUnknown, reply.Type);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Meta_context_on_an_unknown_export_is_ERR_UNKNOWN()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);

        OptionReply reply = Single(await client.MetaContextAsync(NbdOption.ListMetaContext, "no-such-export"));

        Assert.Equal(OptionReplyType.ErrUnknown, reply.Type);
    }

    // Matching as qemu-nbd does (nbd/server.c): no query lists everything; a namespace followed by
    // nothing lists the whole namespace (LIST only); an exact name matches itself; "" and unknown
    // namespaces match nothing. The test export has base:allocation and no qemu: contexts.
    [Theory]
    [InlineData(new string[0], new[] { "base:allocation" })]
    [InlineData(new[] { "" }, new string[0])]
    [InlineData(new[] { "base:" }, new[] { "base:allocation" })]
    [InlineData(new[] { "base:allocation" }, new[] { "base:allocation" })]
    [InlineData(new[] { "qemu:" }, new string[0])]
    [InlineData(new[] { "qemu:dirty-bitmap:" }, new string[0])]
    [InlineData(new[] { "base:alloc" }, new string[0])]
    [InlineData(new[] { "base:", "base:allocation" }, new[] { "base:allocation" })]
    [InlineData(new[] { "nbd-server:" }, new string[0])]
    public async Task List_meta_context_queries_match_as_qemu_does(string[] queries, string[] expected)
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);

        IReadOnlyList<OptionReply> replies = await client.MetaContextAsync(NbdOption.ListMetaContext, Rw, queries);

        Assert.Equal(OptionReplyType.Ack, replies[^1].Type);
        Assert.All(replies.SkipLast(1), r => Assert.Equal(OptionReplyType.MetaContext, r.Type));
        Assert.Equal(expected, replies.SkipLast(1).Select(r => Encoding.UTF8.GetString(r.Data.AsSpan(4))));
    }

    [Fact]
    public async Task Set_meta_context_with_only_a_namespace_selects_nothing()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);

        IReadOnlyList<OptionReply> replies = await client.MetaContextAsync(NbdOption.SetMetaContext, Rw, "base:");
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        NbdReply status = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.None, 1, 0, 4096);

        Assert.Equal([OptionReplyType.Ack], replies.Select(r => r.Type));
        Assert.Equal(NbdError.Inval, status.Error);
    }

    [Fact]
    public async Task Export_name_on_an_unknown_export_closes_the_connection()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        await client.SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes("no-such-export"));

        await AssertClosedAsync(client);
        await using RawClient other = await _server.ConnectAsync();
        await other.StartAsync();
        await other.ExportNameAsync(Rw);
        Assert.Equal((ulong)RwSize, other.ExportSize);
        await other.AssertWorksAsync();
    }

    [Fact]
    public async Task Export_name_without_NO_ZEROES_pads_the_reply_with_124_zeroes()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync((uint)ClientFlags.FixedNewstyle);

        await client.ExportNameAsync(Ro, noZeroes: false);

        Assert.Equal((ulong)RoSize, client.ExportSize);
        Assert.True(client.ExportFlags.HasFlag(TransmissionFlags.ReadOnly));
        NbdReply read = await client.ReadAsync(0, 4096);
        Assert.Equal(new byte[4096], read.Data(0, 4096));
    }

    [Fact]
    public async Task Export_name_over_4096_bytes_closes_the_connection()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        await client.SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes(new string('x', NbdLimits.MaxString + 1)));

        await AssertClosedAsync(client);
        await AssertServerStillWorksAsync();
    }

    // proto.md "Transmission flags": NBD_FLAG_SEND_DF - the server "MUST leave this flag clear if
    // structured replies have not been negotiated" (qemu sets it only in structured mode).
    [Theory]
    [InlineData(true, false)]
    [InlineData(false, false)]
    [InlineData(false, true)]
    public async Task Send_DF_is_advertised_only_with_structured_replies(bool structured, bool exportName)
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        if (structured)
        {
            await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        }

        if (exportName)
        {
            await client.ExportNameAsync(Rw);
        }
        else
        {
            Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Rw))[^1].Type);
        }

        Assert.Equal(structured, client.ExportFlags.HasFlag(TransmissionFlags.SendDf));
    }

    [Fact]
    public async Task Abort_is_acknowledged_and_closes()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        OptionReply reply = Single(await client.OptionAsync(NbdOption.Abort, ReadOnlyMemory<byte>.Empty));

        Assert.Equal(OptionReplyType.Ack, reply.Type);
        await AssertClosedAsync(client);
    }

    // ---- Transmission: requests the server must refuse ---------------------------------------

    [Fact]
    public async Task Wrong_request_magic_closes_only_that_connection()
    {
        await using RawClient bad = await OpenAsync();
        await using RawClient good = await OpenAsync();
        await good.AssertWorksAsync(offset: 0, seed: 1);
        byte[] garbage = RawClient.Request(NbdCommand.Read, CommandFlags.None, 2, 0, 512);
        BinaryPrimitives.WriteUInt32BigEndian(garbage, 0x25609514);

        // A valid request, then garbage: the valid one, already received, is still answered.
        bad.Expect(NbdCommand.Write, 1, 512);
        byte[] bytes = [.. RawClient.Request(NbdCommand.Write, CommandFlags.None, 1, 64 * KiB, 512, new byte[512]), .. garbage];
        await bad.SendAsync(bytes);

        NbdReply answered = await bad.ReadReplyAsync();
        Assert.Equal((1ul, NbdError.None), (answered.Cookie, answered.Error));
        await AssertClosedAsync(bad);
        await good.AssertWorksAsync(offset: 8192, seed: 2);
        await AssertServerStillWorksAsync();
    }

    [Theory]
    [InlineData(NbdCommand.Read, RwSize - 100, 4096, NbdError.Inval)]
    [InlineData(NbdCommand.Read, RwSize, 1, NbdError.Inval)]
    [InlineData(NbdCommand.Read, RwSize + 4096, 512, NbdError.Inval)]
    [InlineData(NbdCommand.Read, ulong.MaxValue - 10, 4096, NbdError.Inval)] // offset + length overflows
    [InlineData(NbdCommand.Trim, RwSize - 512, 4096, NbdError.Inval)]
    [InlineData(NbdCommand.Trim, ulong.MaxValue, 1, NbdError.Inval)]
    [InlineData(NbdCommand.Cache, RwSize, 1, NbdError.Inval)]
    [InlineData(NbdCommand.BlockStatus, RwSize, 1, NbdError.Inval)]
    [InlineData(NbdCommand.WriteZeroes, RwSize - 512, 4096, NbdError.NoSpc)]
    public async Task Request_beyond_the_end_is_refused(NbdCommand command, ulong offset, uint length, NbdError expected)
    {
        await using RawClient client = await OpenAsync(Rw, structured: true, NbdLimits.BaseAllocation);

        NbdReply reply = await client.RequestAsync(command, CommandFlags.None, 42, offset, length);

        Assert.Equal(expected, reply.Error);
        await client.AssertWorksAsync();
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Read_past_end_returns_EINVAL(bool structured)
    {
        await using RawClient client = await OpenAsync(Rw, structured);

        NbdReply reply = await client.ReadAsync(RwSize - 4095, 4096);

        Assert.Equal(NbdError.Inval, reply.Error);
        Assert.Equal(structured, reply.Structured);
        await client.AssertWorksAsync();
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Write_past_end_returns_ENOSPC_and_consumes_the_payload(bool structured)
    {
        await using RawClient client = await OpenAsync(Rw, structured);
        byte[] payload = PayloadLookingLikeRequests(8 * KiB);

        NbdReply reply = await client.WriteAsync(RwSize - 512, payload);

        Assert.Equal(NbdError.NoSpc, reply.Error);
        // In step: the next reply is to the next request, not to a "request" inside the payload.
        NbdReply tail = await client.ReadAsync(RwSize - 8 * KiB, 8 * KiB);
        Assert.Equal(new byte[8 * KiB], tail.Data(RwSize - 8 * KiB, 8 * KiB));
        await client.AssertWorksAsync();
    }

    [Theory]
    [InlineData(NbdCommand.Read)]
    [InlineData(NbdCommand.Write)]
    [InlineData(NbdCommand.Trim)]
    [InlineData(NbdCommand.WriteZeroes)]
    [InlineData(NbdCommand.Cache)]
    [InlineData(NbdCommand.BlockStatus)]
    public async Task Zero_length_request_returns_EINVAL(NbdCommand command)
    {
        await using RawClient client = await OpenAsync(Rw, structured: true, NbdLimits.BaseAllocation);

        NbdReply reply = await client.RequestAsync(command, CommandFlags.None, 5, 4096, 0);

        Assert.Equal(NbdError.Inval, reply.Error);
        await client.AssertWorksAsync();
    }

    [Theory]
    [InlineData((ushort)NbdCommand.Resize)]
    [InlineData((ushort)9)]
    [InlineData((ushort)0x100)]
    [InlineData((ushort)0xFFFF)]
    public async Task Unknown_command_returns_EINVAL(ushort command)
    {
        await using RawClient client = await OpenAsync(Rw, structured: true, NbdLimits.BaseAllocation);

        NbdReply reply = await client.RequestAsync((NbdCommand)command, CommandFlags.None, 6, 0, 4096);

        Assert.Equal(NbdError.Inval, reply.Error);
        await client.AssertWorksAsync();
    }

    [Theory]
    [InlineData(NbdCommand.Read, (ushort)CommandFlags.NoHole, true)]
    [InlineData(NbdCommand.Read, (ushort)CommandFlags.DontFragment, false)] // DF needs structured replies
    [InlineData(NbdCommand.Read, (ushort)CommandFlags.ReqOne, true)]
    [InlineData(NbdCommand.Read, (ushort)CommandFlags.FastZero, true)]
    [InlineData(NbdCommand.Read, (ushort)(1 << 6), true)]
    [InlineData(NbdCommand.Read, (ushort)(1 << 15), false)]
    [InlineData(NbdCommand.Write, (ushort)CommandFlags.NoHole, true)]
    [InlineData(NbdCommand.Write, (ushort)CommandFlags.DontFragment, true)]
    [InlineData(NbdCommand.Write, (ushort)(1 << 9), false)]
    [InlineData(NbdCommand.Flush, (ushort)CommandFlags.NoHole, true)]
    [InlineData(NbdCommand.Trim, (ushort)CommandFlags.FastZero, true)]
    [InlineData(NbdCommand.WriteZeroes, (ushort)CommandFlags.DontFragment, true)]
    [InlineData(NbdCommand.Cache, (ushort)CommandFlags.ReqOne, true)]
    [InlineData(NbdCommand.BlockStatus, (ushort)CommandFlags.DontFragment, true)]
    public async Task Unknown_or_inapplicable_flag_returns_EINVAL(NbdCommand command, ushort flags, bool structured)
    {
        await using RawClient client = await OpenAsync(Rw, structured, structured ? [NbdLimits.BaseAllocation] : []);
        uint length = command == NbdCommand.Flush ? 0u : 4096u;
        byte[] payload = command == NbdCommand.Write ? PayloadLookingLikeRequests(4096) : [];

        NbdReply reply = await client.RequestAsync(command, (CommandFlags)flags, 7, 0, length, payload);

        Assert.Equal(NbdError.Inval, reply.Error);
        Assert.Equal(new byte[4096], (await client.ReadAsync(0, 4096)).Data(0, 4096)); // the refused write wrote nothing
        await client.AssertWorksAsync();
    }

    // proto.md "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA
    // has been negotiated, in which case the server MUST accept all commands with this bit set".
    [Theory]
    [InlineData(NbdCommand.Read)]
    [InlineData(NbdCommand.Write)]
    [InlineData(NbdCommand.Flush)]
    [InlineData(NbdCommand.Trim)]
    [InlineData(NbdCommand.WriteZeroes)]
    [InlineData(NbdCommand.Cache)]
    [InlineData(NbdCommand.BlockStatus)]
    public async Task Fua_is_accepted_on_every_command_when_SEND_FUA_is_advertised(NbdCommand command)
    {
        await using RawClient client = await OpenAsync(Rw, structured: true, NbdLimits.BaseAllocation);
        Assert.True(client.ExportFlags.HasFlag(TransmissionFlags.SendFua));
        uint length = command == NbdCommand.Flush ? 0u : 4096u;
        byte[] payload = command == NbdCommand.Write ? new byte[4096] : [];

        NbdReply reply = await client.RequestAsync(command, CommandFlags.Fua, 8, 0, length, payload);

        Assert.Equal(NbdError.None, reply.Error);
    }

    [Fact]
    public async Task Read_over_the_maximum_payload_returns_EINVAL()
    {
        await using RawClient client = await OpenAsync();

        NbdReply reply = await client.ReadAsync(0, NbdLimits.MaxPayload + 1);

        Assert.Equal(NbdError.Inval, reply.Error);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Read_of_exactly_the_maximum_payload_succeeds()
    {
        await using RawClient client = await OpenAsync(Rw, structured: false);
        await _rw.WriteAsync(NbdLimits.MaxPayload - 1, new byte[] { 0x5A }, fua: false);

        NbdReply reply = await client.ReadAsync(0, NbdLimits.MaxPayload);

        byte[] data = reply.Data(0, NbdLimits.MaxPayload);
        Assert.Equal(0x5A, data[^1]);
    }

    [Fact]
    public async Task Write_of_exactly_the_maximum_payload_succeeds()
    {
        await using RawClient client = await OpenAsync();
        byte[] payload = RawClient.Pattern(NbdLimits.MaxPayload, 3);

        NbdReply reply = await client.WriteAsync(MiB, payload);

        Assert.Equal(NbdError.None, reply.Error);
        byte[] stored = new byte[payload.Length];
        await _rw.ReadAsync(MiB, stored);
        Assert.True(stored.AsSpan().SequenceEqual(payload), "the 64 MiB write did not store its payload");
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Write_over_the_maximum_payload_returns_EINVAL_and_skips_the_payload()
    {
        await using RawClient client = await OpenAsync();
        int length = NbdLimits.MaxPayload + 1;
        byte[] payload = PayloadLookingLikeRequests(length);

        NbdReply reply = await client.WriteAsync(0, payload);

        Assert.Equal(NbdError.Inval, reply.Error);
        Assert.Equal(new byte[64 * KiB], (await client.ReadAsync(0, 64 * KiB)).Data(0, 64 * KiB));
        await client.AssertWorksAsync();
    }

    /// <summary>
    /// A refused WRITE is answered only once its whole payload has been read (proto.md: the
    /// server must stay in step with the stream): a client that reads replies while it is still
    /// sending (libnbd) would otherwise take the reply for part of a later one, or wait forever.
    /// </summary>
    [Theory]
    [InlineData(Ro, 0u, 0u, 4 * MiB, NbdError.Perm)]                       // read-only export
    [InlineData(Rw, 0u, 0x80u, 4 * MiB, NbdError.Inval)]                   // a flag WRITE does not take
    [InlineData(Rw, 126u * MiB, 0u, 4 * MiB, NbdError.NoSpc)]              // past the end
    [InlineData(Rw, 0u, 0u, NbdLimits.MaxPayload + 1, NbdError.Inval)]     // over the maximum payload
    public async Task Refused_write_is_answered_after_its_whole_payload(string export, uint offset, uint flags, int length, NbdError expected)
    {
        await using RawClient client = await OpenAsync(export);
        byte[] payload = PayloadLookingLikeRequests(length);
        const ulong cookie = 0x51;
        client.Expect(NbdCommand.Write, cookie, (uint)length);

        byte[] header = RawClient.Request(NbdCommand.Write, (CommandFlags)flags, cookie, offset, (uint)length);
        await client.SendAsync(header);
        await client.SendAsync(payload.AsMemory(0, MiB));
        Assert.True(client.SilentFor(TimeSpan.FromMilliseconds(500)), "the server replied in the middle of the write's payload");
        await client.SendAsync(payload.AsMemory(MiB));
        NbdReply reply = await client.ReadReplyAsync();

        Assert.Equal(cookie, reply.Cookie);
        Assert.Equal(expected, reply.Error);
        NbdReply read = await client.ReadAsync(0, 4096);
        Assert.Equal(NbdError.None, read.Error);
        Assert.Equal(new byte[4096], read.Data(0, 4096)); // the refused write wrote nothing
    }

    [Fact]
    public async Task Write_beyond_what_the_server_skips_gets_EINVAL_then_a_clean_close()
    {
        await using RawClient client = await OpenAsync();
        const ulong cookie = 0x52;
        client.Expect(NbdCommand.Write, cookie, NbdLimits.MaxDiscard + 1);

        await client.SendAsync(RawClient.Request(NbdCommand.Write, CommandFlags.None, cookie, 0, NbdLimits.MaxDiscard + 1));
        NbdReply reply = await client.ReadReplyAsync();

        Assert.Equal(cookie, reply.Cookie);
        Assert.Equal(NbdError.Inval, reply.Error);
        Assert.True(await client.ServerClosedAsync(), "the server kept a connection whose payload it will not read");
        await AssertServerStillWorksAsync();
    }

    [Theory]
    [InlineData(NbdCommand.Write)]
    [InlineData(NbdCommand.Trim)]
    [InlineData(NbdCommand.WriteZeroes)]
    public async Task Write_on_a_read_only_export_returns_EPERM(NbdCommand command)
    {
        await using RawClient client = await OpenAsync(Ro);
        Assert.True(client.ExportFlags.HasFlag(TransmissionFlags.ReadOnly));
        Assert.False(client.ExportFlags.HasFlag(TransmissionFlags.SendTrim) || client.ExportFlags.HasFlag(TransmissionFlags.SendWriteZeroes)
            || client.ExportFlags.HasFlag(TransmissionFlags.SendFlush) || client.ExportFlags.HasFlag(TransmissionFlags.SendFua));
        byte[] payload = command == NbdCommand.Write ? PayloadLookingLikeRequests(4096) : [];

        NbdReply reply = await client.RequestAsync(command, CommandFlags.None, 9, 0, 4096, payload);

        Assert.Equal(NbdError.Perm, reply.Error);
        Assert.Equal(new byte[4096], (await client.ReadAsync(0, 4096)).Data(0, 4096));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Block_status_without_a_selected_context_returns_EINVAL(bool structured)
    {
        await using RawClient client = await OpenAsync(Rw, structured);

        NbdReply reply = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.None, 10, 0, 4096);

        Assert.Equal(NbdError.Inval, reply.Error);
        await client.AssertWorksAsync();
    }

    // ---- Transmission: clients that vanish ---------------------------------------------------

    [Fact]
    public async Task Client_vanishing_mid_header_is_cleaned_up()
    {
        int endedBefore = _server.Ended;
        RawClient leaver = await OpenAsync();

        await leaver.SendAsync(RawClient.Request(NbdCommand.Read, CommandFlags.None, 1, 0, 512).AsMemory(0, 11));
        leaver.ShutdownSend();

        Assert.True(await NbdTestServer.EventuallyAsync(() => _server.Ended == endedBefore + 1));
        await leaver.DisposeAsync();
        await AssertServerStillWorksAsync();
    }

    // ---- Transmission: concurrency and reply forms -------------------------------------------

    [Fact]
    public async Task A_slow_request_does_not_hold_back_later_replies()
    {
        _slow.Delay = offset => offset == 0 ? TimeSpan.FromMilliseconds(500) : TimeSpan.Zero;
        await using RawClient client = await OpenAsync(Slow);

        client.Expect(NbdCommand.Read, 1, 4096);
        client.Expect(NbdCommand.Read, 2, 4096);
        byte[] bytes = [.. RawClient.Request(NbdCommand.Read, CommandFlags.None, 1, 0, 4096),
            .. RawClient.Request(NbdCommand.Read, CommandFlags.None, 2, 4096, 4096)];
        await client.SendAsync(bytes);

        Assert.Equal(2ul, (await client.ReadReplyAsync()).Cookie);
        Assert.Equal(1ul, (await client.ReadReplyAsync()).Cookie);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Every_cookie_is_answered_exactly_once(bool structured)
    {
        const int count = 400; // more than Transmission.MaxInFlightRequests
        const int block = 4 * KiB;
        var random = new Random(1234);
        byte[] delays = new byte[count];
        random.NextBytes(delays);
        _slow.Delay = offset => TimeSpan.FromMilliseconds(delays[offset / block % count] % 4);
        for (int i = 0; i < count; i++)
        {
            await _slow.Inner.WriteAsync((long)i * block, RawClient.Pattern(block, (byte)i), fua: false);
        }
        await using RawClient client = await OpenAsync(Slow, structured);

        // Writes go to the second half of the export, reads come from the first; cookies are
        // spread out so a server that truncated or mixed them up would be caught.
        var send = new List<byte>();
        var expected = new HashSet<ulong>();
        for (int i = 0; i < count; i++)
        {
            ulong cookie = 0xC0FFEE00_00000000ul + (ulong)i * 0x1_0001;
            expected.Add(cookie);
            NbdCommand command = i % 3 == 0 ? NbdCommand.Write : NbdCommand.Read;
            ulong offset = (ulong)i * block + (command == NbdCommand.Write ? 2ul * MiB : 0);
            client.Expect(command, cookie, block);
            send.AddRange(RawClient.Request(command, CommandFlags.None, cookie, offset, block,
                command == NbdCommand.Write ? RawClient.Pattern(block, (byte)(i + 100)) : []));
        }
        Task sending = client.SendAsync(send.ToArray());

        var answered = new List<ulong>();
        for (int i = 0; i < count; i++)
        {
            NbdReply reply = await client.ReadReplyAsync();
            Assert.Equal(NbdError.None, reply.Error);
            int index = (int)((reply.Cookie - 0xC0FFEE00_00000000ul) / 0x1_0001);
            if (index % 3 != 0)
            {
                Assert.Equal(RawClient.Pattern(block, (byte)index), reply.Data((ulong)index * block, block));
            }
            answered.Add(reply.Cookie);
        }
        await sending;

        Assert.Equal(count, answered.Distinct().Count());
        Assert.True(expected.SetEquals(answered));
        for (int i = 0; i < count; i += 3)
        {
            byte[] written = new byte[block];
            await _slow.Inner.ReadAsync(2L * MiB + (long)i * block, written);
            Assert.Equal(RawClient.Pattern(block, (byte)(i + 100)), written);
        }
    }

    [Fact]
    public async Task Disconnect_with_requests_in_flight_answers_them_all_before_closing()
    {
        _slow.Delay = _ => TimeSpan.FromMilliseconds(200);
        await using RawClient client = await OpenAsync(Slow);
        var send = new List<byte>();
        for (ulong cookie = 1; cookie <= 30; cookie++)
        {
            NbdCommand command = cookie % 2 == 0 ? NbdCommand.Write : NbdCommand.Read;
            client.Expect(command, cookie, 4096);
            send.AddRange(RawClient.Request(command, CommandFlags.None, cookie, cookie * 4096, 4096,
                command == NbdCommand.Write ? new byte[4096] : []));
        }
        send.AddRange(RawClient.Request(NbdCommand.Disconnect, CommandFlags.None, 999, 0, 0));

        await client.SendAsync(send.ToArray());

        var answered = new HashSet<ulong>();
        for (int i = 0; i < 30; i++)
        {
            NbdReply reply = await client.ReadReplyAsync();
            Assert.Equal(NbdError.None, reply.Error);
            answered.Add(reply.Cookie);
        }
        Assert.Equal(30, answered.Count);
        await AssertClosedAsync(client);
    }

    [Fact]
    public async Task Structured_read_over_holes_returns_OFFSET_HOLE_and_OFFSET_DATA_chunks()
    {
        const int page = MemoryBackend.PageSize;
        byte[] data = RawClient.Pattern(page, 11);
        await _rw.WriteAsync(page, data, fua: false);
        await using RawClient client = await OpenAsync();

        NbdReply reply = await client.ReadAsync(0, 3 * page);

        Assert.Equal(
            [(ReplyType.OffsetHole, 0ul, (uint)page), (ReplyType.OffsetData, (ulong)page, (uint)page), (ReplyType.OffsetHole, 2ul * page, (uint)page)],
            reply.Chunks.Select(c => (c.Type, c.Offset, c.Length)).OrderBy(c => c.Offset));
        Assert.Single(reply.Chunks, c => c.Done);
        Assert.True(reply.Chunks[^1].Done);
        Assert.Equal([.. new byte[page], .. data, .. new byte[page]], reply.Data(0, 3 * page));
    }

    [Fact]
    public async Task Structured_read_with_DF_returns_a_single_OFFSET_DATA_chunk()
    {
        const int page = MemoryBackend.PageSize;
        byte[] data = RawClient.Pattern(page, 12);
        await _rw.WriteAsync(page, data, fua: false);
        await using RawClient client = await OpenAsync();
        Assert.True(client.ExportFlags.HasFlag(TransmissionFlags.SendDf));

        NbdReply reply = await client.ReadAsync(0, 3 * page, CommandFlags.DontFragment);

        ReplyChunk chunk = Assert.Single(reply.Chunks);
        Assert.Equal((ReplyType.OffsetData, 0ul, (uint)(3 * page), true), (chunk.Type, chunk.Offset, chunk.Length, chunk.Done));
        Assert.Equal([.. new byte[page], .. data, .. new byte[page]], reply.Data(0, 3 * page));
    }

    [Fact]
    public async Task Without_structured_replies_every_reply_is_simple()
    {
        const int page = MemoryBackend.PageSize;
        await _rw.WriteAsync(page, RawClient.Pattern(page, 13), fua: false);
        await using RawClient client = await OpenAsync(Rw, structured: false);

        NbdReply read = await client.ReadAsync(0, 3 * page);
        NbdReply write = await client.WriteAsync(0, RawClient.Pattern(512, 14), CommandFlags.Fua);
        NbdReply flush = await client.RequestAsync(NbdCommand.Flush, CommandFlags.None, 1, 0, 0);
        NbdReply trim = await client.RequestAsync(NbdCommand.Trim, CommandFlags.None, 2, 2 * page, page);
        NbdReply zero = await client.RequestAsync(NbdCommand.WriteZeroes, CommandFlags.None, 3, 2 * page, page);
        NbdReply refused = await client.ReadAsync(RwSize, 1);

        Assert.All(new[] { read, write, flush, trim, zero, refused }, r => Assert.False(r.Structured));
        Assert.Equal([NbdError.None, NbdError.None, NbdError.None, NbdError.None, NbdError.None, NbdError.Inval],
            new[] { read, write, flush, trim, zero, refused }.Select(r => r.Error));
        Assert.Equal([.. new byte[page], .. RawClient.Pattern(page, 13), .. new byte[page]], read.Data(0, 3 * page));
        Assert.Equal(RawClient.Pattern(512, 14), (await client.ReadAsync(0, 512)).Data(0, 512));
    }

    [Fact]
    public async Task Block_status_describes_holes_and_data_and_REQ_ONE_returns_exactly_one_descriptor()
    {
        const int page = MemoryBackend.PageSize;
        const uint holeZero = (uint)(AllocationState.Hole | AllocationState.Zero);
        await _rw.WriteAsync(page, RawClient.Pattern(page, 15), fua: false);
        await using RawClient client = await OpenAsync(Rw, structured: true, NbdLimits.BaseAllocation);
        uint id = client.ContextIds[NbdLimits.BaseAllocation];

        NbdReply all = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.None, 1, 0, 3 * page);
        NbdReply one = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.ReqOne, 2, 0, 3 * page);
        NbdReply oneData = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.ReqOne, 3, page + 100, 3 * page);

        ReplyChunk allChunk = Assert.Single(all.Chunks);
        Assert.Equal((ReplyType.BlockStatus, id, true), (allChunk.Type, allChunk.ContextId, allChunk.Done));
        Assert.Equal([((uint)page, holeZero), ((uint)page, 0u), ((uint)page, holeZero)], allChunk.Descriptors);
        ReplyChunk oneChunk = Assert.Single(one.Chunks);
        Assert.Equal([((uint)page, holeZero)], oneChunk.Descriptors);
        ReplyChunk oneDataChunk = Assert.Single(oneData.Chunks);
        Assert.Equal([((uint)page - 100, 0u)], oneDataChunk.Descriptors);
    }
}

/// <summary>The bad-input suite over a real loopback socket.</summary>
public sealed class BadInputTests() : BadInputSuite(inMemory: false);

/// <summary>The bad-input suite over an in-memory pipe: no socket, no kernel between client and server.</summary>
public sealed class BadInputInMemoryTests() : BadInputSuite(inMemory: true);
