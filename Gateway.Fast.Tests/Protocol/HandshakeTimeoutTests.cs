using System.Diagnostics;
using Gateway.Actors.Nbd;
using Gateway.Actors.Tls;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// The handshake deadline (<see cref="NbdServerSettings.HandshakeTimeout"/>, shortened to 1 s
/// here) over real loopback sockets: a client that has not attached by then is closed wherever it
/// stalls; one that has attached may idle as long as it likes.
/// </summary>
public sealed class HandshakeTimeoutTests : IAsyncLifetime
{
    private const string Rw = "rw";
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(1);

    private readonly TestCertificates _pki = new();
    private readonly NbdTestServer _server;

    public HandshakeTimeoutTests()
    {
        _server = Server(new NbdServerSettings { HandshakeTimeout = Deadline });
    }

    private static NbdTestServer Server(NbdServerSettings settings)
    {
        var exports = new TestExportDirectory();
        exports.Add(Rw, new MemoryBackend(4L * 1024 * 1024));
        return new NbdTestServer(exports, settings);
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync()
    {
        await _server.DisposeAsync();
        _pki.Dispose();
    }

    /// <summary>Waits for the server to close <paramref name="client"/>, and says how long it took.</summary>
    private static async Task<TimeSpan> TimeToCloseAsync(RawClient client, long since)
    {
        Assert.True(await client.ServerClosedAsync(TimeSpan.FromSeconds(10)), "the server should have closed the stalled handshake");
        return Stopwatch.GetElapsedTime(since);
    }

    private static void AssertAboutTheDeadline(TimeSpan elapsed) =>
        Assert.InRange(elapsed, Deadline - TimeSpan.FromMilliseconds(100), Deadline + TimeSpan.FromSeconds(4));

    [Fact]
    public async Task Client_that_sends_nothing_is_closed_at_the_deadline_while_an_attached_one_keeps_working()
    {
        await using RawClient attached = await _server.OpenAsync(Rw);
        long start = Stopwatch.GetTimestamp();
        await using RawClient silent = await _server.ConnectAsync();
        await silent.ReadGreetingAsync();

        AssertAboutTheDeadline(await TimeToCloseAsync(silent, start));

        await attached.AssertWorksAsync(offset: 0, seed: 3);
        Assert.True(await NbdTestServer.EventuallyAsync(() => _server.Active == 1), "only the attached connection should be left");
    }

    [Fact]
    public async Task Client_that_stalls_in_the_middle_of_an_option_is_closed_at_the_deadline()
    {
        long start = Stopwatch.GetTimestamp();
        await using RawClient stalled = await _server.ConnectAsync();
        await stalled.StartAsync();
        await stalled.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        byte[] go = RawClient.InfoRequest(Rw);
        // The header announces the whole GO; a third of its data ever arrives.
        await stalled.SendOptionAsync(NbdOption.Go, go.AsMemory(0, go.Length / 3), declaredLength: (uint)go.Length);

        AssertAboutTheDeadline(await TimeToCloseAsync(stalled, start));
    }

    [Fact]
    public async Task Client_that_trickles_options_is_closed_at_the_deadline_though_it_never_goes_quiet()
    {
        long start = Stopwatch.GetTimestamp();
        await using RawClient trickling = await _server.ConnectAsync();
        await trickling.StartAsync();
        Exception? closed = null;
        // A LIST every 200 ms: each is answered, but the handshake never ends.
        for (int i = 0; i < 50 && closed is null; i++)
        {
            try
            {
                await trickling.OptionAsync(NbdOption.List, ReadOnlyMemory<byte>.Empty);
                await Task.Delay(200);
            }
            catch (Exception e) when (e is IOException or EndOfStreamException)
            {
                closed = e;
            }
        }

        Assert.NotNull(closed);
        AssertAboutTheDeadline(Stopwatch.GetElapsedTime(start));
    }

    [Fact]
    public async Task Client_that_stalls_in_the_TLS_handshake_is_closed_at_the_deadline()
    {
        await using NbdTestServer tls = Server(_pki.Settings(TlsMode.Required) with { HandshakeTimeout = Deadline });
        long start = Stopwatch.GetTimestamp();
        await using RawClient stalled = await tls.ConnectAsync();
        await stalled.StartAsync();
        await stalled.SendOptionAsync(NbdOption.StartTls, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.Ack, (await stalled.ReadOptionReplyAsync()).Type);
        // No ClientHello: the TLS handshake's own limit is 30 s, the handshake deadline cuts it short.

        AssertAboutTheDeadline(await TimeToCloseAsync(stalled, start));
    }

    [Fact]
    public async Task Attached_client_that_idles_past_the_deadline_is_not_closed()
    {
        await using RawClient idle = await _server.OpenAsync(Rw);
        await idle.AssertWorksAsync(offset: 4096, seed: 5);

        Assert.False(await idle.ServerClosedAsync(Deadline * 3), "an attached client must not be closed by the handshake deadline");

        await idle.AssertWorksAsync(offset: 8192, seed: 6);
    }

    /// <summary>A server whose exports take 2.5 deadlines to open (an export opening after a restart or a failover).</summary>
    private static NbdTestServer SlowToOpen()
    {
        var exports = new TestExportDirectory { OpenDelay = Deadline * 2.5 };
        exports.Add(Rw, new MemoryBackend(4L * 1024 * 1024));
        return new NbdTestServer(exports, new NbdServerSettings { HandshakeTimeout = Deadline });
    }

    [Fact]
    public async Task Time_the_server_spends_opening_the_export_does_not_count_against_the_client()
    {
        await using NbdTestServer slowToOpen = SlowToOpen();
        await using RawClient client = await slowToOpen.ConnectAsync();
        await client.StartAsync();

        IReadOnlyList<OptionReply> go = await client.InfoOrGoAsync(NbdOption.Go, Rw);

        Assert.Equal(OptionReplyType.Ack, go[^1].Type);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task The_clock_runs_again_after_the_export_opened_so_a_client_that_then_stalls_is_closed()
    {
        await using NbdTestServer slowToOpen = SlowToOpen();
        await using RawClient client = await slowToOpen.ConnectAsync();
        await client.StartAsync();
        IReadOnlyList<OptionReply> info = await client.InfoOrGoAsync(NbdOption.Info, Rw);
        Assert.Equal(OptionReplyType.Ack, info[^1].Type);

        AssertAboutTheDeadline(await TimeToCloseAsync(client, Stopwatch.GetTimestamp()));
    }

    [Fact]
    public async Task Zero_means_no_handshake_deadline()
    {
        await using NbdTestServer unlimited = Server(new NbdServerSettings { HandshakeTimeout = TimeSpan.Zero });
        await using RawClient slow = await unlimited.ConnectAsync();
        await slow.StartAsync();

        Assert.False(await slow.ServerClosedAsync(Deadline * 3), "with no deadline a slow client is left alone");

        IReadOnlyList<OptionReply> go = await slow.InfoOrGoAsync(NbdOption.Go, Rw);
        Assert.Equal(OptionReplyType.Ack, go[^1].Type);
        await slow.AssertWorksAsync();
    }
}
