using Gateway.Actors.Nbd;
using Gateway.Actors.Tls;
using Gateway.Backends;
using Microsoft.Extensions.Time.Testing;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// The handshake deadline (<see cref="NbdServerSettings.HandshakeTimeout"/>) over real loopback
/// sockets, on a clock the test moves (<see cref="NbdServerSettings.Time"/>): a client that has not
/// attached by then is closed wherever it stalls, not a tick before; one that has attached may idle
/// as long as it likes; the server's own time opening an export does not count.
/// </summary>
public sealed class HandshakeTimeoutTests : IAsyncLifetime
{
    private const string Rw = "rw";
    private static readonly TimeSpan Deadline = NbdServerSettings.DefaultHandshakeTimeout;
    private static readonly TimeSpan Tick = TimeSpan.FromMilliseconds(1);
    /// <summary>Real time in which a connection the server means to close would have been closed.</summary>
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(250);
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    private readonly FakeTimeProvider _time = new();
    private readonly TestCertificates _pki = new();
    private readonly NbdTestServer _server;

    public HandshakeTimeoutTests()
    {
        _server = Server(Settings());
    }

    private NbdServerSettings Settings(NbdServerSettings? settings = null) =>
        (settings ?? NbdServerSettings.Default) with { HandshakeTimeout = Deadline, Time = _time };

    private static NbdTestServer Server(NbdServerSettings settings, TestExportDirectory? exports = null)
    {
        exports ??= new TestExportDirectory();
        exports.Add(Rw, new MemoryBackend(4L * 1024 * 1024));
        return new NbdTestServer(exports, settings);
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync()
    {
        await _server.DisposeAsync();
        _pki.Dispose();
    }

    /// <summary>
    /// Moves the clock to a tick before the client's deadline (it has used <paramref name="used"/>
    /// so far): still open; then to the deadline: closed.
    /// </summary>
    private async Task AssertClosedAtTheDeadlineAsync(RawClient client, TimeSpan used = default)
    {
        _time.Advance(Deadline - used - Tick);
        Assert.False(await client.ServerClosedAsync(Quiet), "the server closed the handshake before its deadline");
        _time.Advance(Tick);
        Assert.True(await client.ServerClosedAsync(Patience), "the server should have closed the stalled handshake at its deadline");
    }

    [Fact]
    public async Task Client_that_sends_nothing_is_closed_at_the_deadline_while_an_attached_one_keeps_working()
    {
        await using RawClient attached = await _server.OpenAsync(Rw);
        await using RawClient silent = await _server.ConnectAsync();
        await silent.ReadGreetingAsync();

        await AssertClosedAtTheDeadlineAsync(silent);

        await attached.AssertWorksAsync(offset: 0, seed: 3);
        Assert.True(await NbdTestServer.EventuallyAsync(() => _server.Active == 1), "only the attached connection should be left");
    }

    [Fact]
    public async Task Client_that_stalls_in_the_middle_of_an_option_is_closed_at_the_deadline()
    {
        await using RawClient stalled = await _server.ConnectAsync();
        await stalled.StartAsync();
        await stalled.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        byte[] go = RawClient.InfoRequest(Rw);
        // The header announces the whole GO; a third of its data ever arrives.
        await stalled.SendOptionAsync(NbdOption.Go, go.AsMemory(0, go.Length / 3), declaredLength: (uint)go.Length);

        await AssertClosedAtTheDeadlineAsync(stalled);
    }

    [Fact]
    public async Task Client_that_trickles_options_is_closed_at_the_deadline_though_it_never_goes_quiet()
    {
        await using RawClient trickling = await _server.ConnectAsync();
        await trickling.StartAsync();
        // A LIST every fifth of the deadline: each is answered, but the handshake never ends.
        TimeSpan step = Deadline / 5;
        for (int i = 0; i < 4; i++)
        {
            await trickling.OptionAsync(NbdOption.List, ReadOnlyMemory<byte>.Empty);
            _time.Advance(step);
        }
        await trickling.OptionAsync(NbdOption.List, ReadOnlyMemory<byte>.Empty);

        await AssertClosedAtTheDeadlineAsync(trickling, used: step * 4);
    }

    [Fact]
    public async Task Client_that_stalls_in_the_TLS_handshake_is_closed_at_the_deadline()
    {
        await using NbdTestServer tls = Server(Settings(_pki.Settings(TlsMode.Required)));
        await using RawClient stalled = await tls.ConnectAsync();
        await stalled.StartAsync();
        await stalled.SendOptionAsync(NbdOption.StartTls, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.Ack, (await stalled.ReadOptionReplyAsync()).Type);
        // No ClientHello: the TLS handshake's own limit is 30 s, the handshake deadline cuts it short.

        await AssertClosedAtTheDeadlineAsync(stalled);
    }

    [Fact]
    public async Task Attached_client_that_idles_past_the_deadline_is_not_closed()
    {
        await using RawClient idle = await _server.OpenAsync(Rw);
        await idle.AssertWorksAsync(offset: 4096, seed: 5);

        _time.Advance(Deadline * 3);
        Assert.False(await idle.ServerClosedAsync(Quiet), "an attached client must not be closed by the handshake deadline");

        await idle.AssertWorksAsync(offset: 8192, seed: 6);
    }

    [Fact]
    public async Task Time_the_server_spends_opening_the_export_does_not_count_against_the_client()
    {
        var opened = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var exports = new TestExportDirectory { HoldOpens = opened.Task };
        await using NbdTestServer slowToOpen = Server(Settings(), exports);
        await using RawClient client = await slowToOpen.ConnectAsync();
        await client.StartAsync();

        Task<IReadOnlyList<OptionReply>> go = client.InfoOrGoAsync(NbdOption.Go, Rw);
        await exports.OpenBegun.Task.WaitAsync(Patience);
        // The export takes 2.5 deadlines to open (a restart, a failover).
        _time.Advance(Deadline * 2.5);
        Assert.False(await client.ServerClosedAsync(Quiet), "the server's time opening the export was counted against the client");
        opened.SetResult();

        Assert.Equal(OptionReplyType.Ack, (await go.WaitAsync(Patience))[^1].Type);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task The_clock_runs_again_after_the_export_opened_so_a_client_that_then_stalls_is_closed()
    {
        var opened = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var exports = new TestExportDirectory { HoldOpens = opened.Task };
        await using NbdTestServer slowToOpen = Server(Settings(), exports);
        await using RawClient client = await slowToOpen.ConnectAsync();
        await client.StartAsync();
        TimeSpan before = Deadline / 4;
        _time.Advance(before);

        Task<IReadOnlyList<OptionReply>> info = client.InfoOrGoAsync(NbdOption.Info, Rw);
        await exports.OpenBegun.Task.WaitAsync(Patience);
        _time.Advance(Deadline * 2.5);
        opened.SetResult();
        Assert.Equal(OptionReplyType.Ack, (await info.WaitAsync(Patience))[^1].Type);

        // What the client had used before the open still counts; the open's time does not.
        await AssertClosedAtTheDeadlineAsync(client, used: before);
    }

    [Fact]
    public async Task Zero_means_no_handshake_deadline()
    {
        await using NbdTestServer unlimited = Server(Settings() with { HandshakeTimeout = TimeSpan.Zero });
        await using RawClient slow = await unlimited.ConnectAsync();
        await slow.StartAsync();

        _time.Advance(Deadline * 3);
        Assert.False(await slow.ServerClosedAsync(Quiet), "with no deadline a slow client is left alone");

        IReadOnlyList<OptionReply> go = await slow.InfoOrGoAsync(NbdOption.Go, Rw);
        Assert.Equal(OptionReplyType.Ack, go[^1].Type);
        await slow.AssertWorksAsync();
    }
}
