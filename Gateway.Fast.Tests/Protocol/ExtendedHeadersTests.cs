using System.Buffers.Binary;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// NBD_OPT_EXTENDED_HEADERS over a real loopback socket (proto.md, extension-ext-header): 32-byte
/// requests and replies, 64-bit effect lengths, BLOCK_STATUS_EXT and the BLOCK_STATUS payload
/// form; and the rules around them (no EXPORT_NAME, no downgrade, no compact header after).
/// </summary>
[Collection(NbdServerCollection.Name)]
public sealed class ExtendedHeadersTests : IAsyncLifetime
{
    private const long MiB = 1024 * 1024;
    private const long GiB = 1024 * MiB;
    private const long Size = 6 * GiB; // more than 32 bits of length
    private const string Big = "big";

    private readonly NbdTestServer _server;
    private readonly TestDevice _big;

    public ExtendedHeadersTests()
    {
        var exports = new TestExportDirectory();
        _big = exports.Add(Big, new MemoryBackend(Size));
        _server = new NbdTestServer(exports);
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _server.DisposeAsync();

    private Task<RawClient> OpenExtendedAsync(params string[] contexts) => _server.OpenExtendedAsync(Big, contexts);

    private static async Task<NbdReply> Ok(Task<NbdReply> request)
    {
        NbdReply reply = await request;
        Assert.Equal(NbdError.None, reply.Error);
        return reply;
    }

    [Fact]
    public async Task Trim_zero_and_block_status_over_4_GiB_are_each_one_request()
    {
        await using RawClient client = await OpenExtendedAsync(NbdLimits.BaseAllocation);
        Assert.True(client.ExportFlags.HasFlag(TransmissionFlags.BlockStatusPayload), "BLOCK_STATUS_PAYLOAD not advertised with a context selected");
        byte[] low = RawClient.Pattern(4096, 1);
        byte[] high = RawClient.Pattern(4096, 2);
        await Ok(client.WriteAsync(GiB, low));
        await Ok(client.WriteAsync((ulong)(Size - 4096), high));

        // One TRIM of 5 GiB, then one WRITE_ZEROES of 5 GiB: both reach the device whole.
        await Ok(client.RequestAsync(NbdCommand.Trim, CommandFlags.None, 1, 0, (ulong)(5 * GiB)));
        Assert.Equal(new byte[4096], (await Ok(client.ReadAsync(GiB, 4096))).Data(GiB, 4096));
        await Ok(client.WriteAsync(GiB, low));
        await Ok(client.RequestAsync(NbdCommand.WriteZeroes, CommandFlags.None, 2, 0, (ulong)(5 * GiB)));
        Assert.Equal(new byte[4096], (await Ok(client.ReadAsync(GiB, 4096))).Data(GiB, 4096));
        Assert.Equal(high, (await Ok(client.ReadAsync((ulong)(Size - 4096), 4096))).Data((ulong)(Size - 4096), 4096));

        // One BLOCK_STATUS of the whole 6 GiB: an extended status chunk whose first extent, the
        // zeroed hole, is longer than 32 bits can say.
        NbdReply status = await Ok(client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.None, 3, 0, (ulong)Size));
        ReplyChunk chunk = Assert.Single(status.Chunks);
        Assert.Equal(ReplyType.BlockStatusExt, chunk.Type);
        Assert.Equal(client.ContextIds[NbdLimits.BaseAllocation], chunk.ContextId);
        IReadOnlyList<(ulong Length, uint Status)> extents = chunk.ExtendedDescriptors;
        Assert.True(extents[0].Length > uint.MaxValue, $"first extent {extents[0].Length} bytes");
        Assert.Equal((uint)(AllocationState.Hole | AllocationState.Zero), extents[0].Status);
        Assert.Equal((ulong)Size, extents.Aggregate(0UL, (sum, e) => sum + e.Length));
    }

    [Fact]
    public async Task Read_and_write_use_extended_chunks_that_echo_the_offset()
    {
        await using RawClient client = await OpenExtendedAsync();
        byte[] data = RawClient.Pattern(256 * 1024, 9);
        ulong offset = (ulong)(5 * GiB + 12345);

        // RawClient checks every extended chunk's offset against its request's.
        await Ok(client.WriteAsync(offset, data, CommandFlags.Fua));
        NbdReply read = await Ok(client.ReadAsync(offset, (uint)data.Length));

        Assert.True(read.Structured);
        Assert.Equal(data, read.Data(offset, (uint)data.Length));
        byte[] stored = new byte[data.Length];
        await _big.ReadAsync((long)offset, stored);
        Assert.Equal(data, stored);
    }

    /// <summary>qemu 10's client sends extended WRITEs without NBD_CMD_FLAG_PAYLOAD_LEN; qemu's server takes them.</summary>
    [Fact]
    public async Task Write_without_PAYLOAD_LEN_still_carries_its_payload_as_qemu_sends_it()
    {
        await using RawClient client = await OpenExtendedAsync();
        byte[] data = RawClient.Pattern(4096, 5);
        client.Expect(NbdCommand.Write, 7, 4096, offset: 8192);

        await client.SendAsync(RawClient.Request(NbdCommand.Write, CommandFlags.None, 7, 8192, 4096, data, extended: true));

        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).Error);
        Assert.Equal(data, (await Ok(client.ReadAsync(8192, 4096))).Data(8192, 4096));
        await client.AssertWorksAsync();
    }

    [Theory]
    [InlineData(NbdCommand.Trim)]
    [InlineData(NbdCommand.Read)]
    [InlineData(NbdCommand.Flush)]
    public async Task Payload_on_a_command_that_takes_none_is_skipped_then_EINVAL(NbdCommand command)
    {
        await using RawClient client = await OpenExtendedAsync();
        byte[] payload = RawClient.Request(NbdCommand.Disconnect, CommandFlags.None, 0, 0, 0, extended: true); // would end the session if parsed
        client.Expect(command, 8, (ulong)payload.Length);

        await client.SendAsync(RawClient.Request(command, CommandFlags.PayloadLen, 8, 0, (ulong)payload.Length, payload, extended: true));

        Assert.Equal(NbdError.Inval, (await client.ReadReplyAsync()).Error);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Block_status_payload_names_the_contexts_to_answer()
    {
        await using RawClient client = await OpenExtendedAsync(NbdLimits.BaseAllocation);
        uint id = client.ContextIds[NbdLimits.BaseAllocation];

        NbdReply filtered = await Ok(client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.PayloadLen, 20, 0, 12, StatusPayload((ulong)GiB, id)));
        Assert.Equal(id, Assert.Single(filtered.Chunks).ContextId);

        NbdReply unknown = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.PayloadLen, 21, 0, 12, StatusPayload((ulong)GiB, id + 1000));
        Assert.Equal(NbdError.Inval, unknown.Error);
        NbdReply twice = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.PayloadLen, 22, 0, 16, StatusPayload((ulong)GiB, id, id));
        Assert.Equal(NbdError.Inval, twice.Error);
        NbdReply pastEnd = await client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.PayloadLen, 23, (ulong)GiB, 12, StatusPayload((ulong)Size, id));
        Assert.Equal(NbdError.Inval, pastEnd.Error);
        await client.AssertWorksAsync();
    }

    private static byte[] StatusPayload(ulong effect, params uint[] ids)
    {
        byte[] payload = new byte[8 + 4 * ids.Length];
        BinaryPrimitives.WriteUInt64BigEndian(payload, effect);
        for (int i = 0; i < ids.Length; i++)
        {
            BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(8 + 4 * i), ids[i]);
        }
        return payload;
    }

    [Fact]
    public async Task Option_rules_no_downgrade_no_data_not_twice()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        Assert.Equal(OptionReplyType.ErrInvalid, (await client.OptionAsync(NbdOption.ExtendedHeaders, new byte[] { 1 }))[^1].Type);
        await client.ExpectAckAsync(NbdOption.ExtendedHeaders, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.ErrInvalid, (await client.OptionAsync(NbdOption.ExtendedHeaders, ReadOnlyMemory<byte>.Empty))[^1].Type);
        Assert.Equal(OptionReplyType.ErrExtHeaderReqd, (await client.OptionAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty))[^1].Type);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Big))[^1].Type);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Structured_replies_then_extended_headers_is_allowed()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();

        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        await client.ExpectAckAsync(NbdOption.ExtendedHeaders, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, Big))[^1].Type);

        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Export_name_after_extended_headers_closes_the_connection()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        await client.ExpectAckAsync(NbdOption.ExtendedHeaders, ReadOnlyMemory<byte>.Empty);

        await client.SendOptionAsync(NbdOption.ExportName, System.Text.Encoding.UTF8.GetBytes(Big));

        Assert.True(await client.ServerClosedAsync(), "EXPORT_NAME after EXTENDED_HEADERS was served");
        await using RawClient other = await OpenExtendedAsync();
        await other.AssertWorksAsync();
    }

    [Fact]
    public async Task Compact_request_after_extended_headers_closes_the_connection()
    {
        await using RawClient client = await OpenExtendedAsync();

        await client.SendAsync(RawClient.Request(NbdCommand.Read, CommandFlags.None, 5, 0, 512));

        Assert.True(await client.ServerClosedAsync(), "a compact header was taken after extended headers");
    }

    [Fact]
    public async Task Clients_that_do_not_ask_keep_compact_headers()
    {
        await using RawClient client = await _server.OpenAsync(Big, structured: true, NbdLimits.BaseAllocation);

        Assert.False(client.Extended);
        Assert.False(client.ExportFlags.HasFlag(TransmissionFlags.BlockStatusPayload));
        await client.AssertWorksAsync();
        NbdReply status = await Ok(client.RequestAsync(NbdCommand.BlockStatus, CommandFlags.None, 4, 0, uint.MaxValue));
        Assert.Equal(ReplyType.BlockStatus, Assert.Single(status.Chunks).Type);
    }
}
