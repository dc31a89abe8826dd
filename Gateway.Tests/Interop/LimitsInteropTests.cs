using System.Diagnostics;
using System.Net;
using Gateway.Tests.Protocol;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// <c>--max-connections</c> and <c>--handshake-timeout</c> on the real gateway process, with real
/// clients: the client beyond the limit fails with a message that says so, the others and the
/// gateway go on, and a silent client is cut off at the handshake deadline.
/// </summary>
public sealed class LimitsInteropTests
{
    private const int Limit = 2;

    [Fact]
    public async Task Client_beyond_max_connections_fails_clearly_and_the_gateway_keeps_serving()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync(extraArgs: ["--max-connections", $"{Limit}", "--handshake-timeout", "2"]);
        var endpoint = new IPEndPoint(IPAddress.Loopback, gateway.NbdPort);
        await using RawClient first = await RawClient.OpenAsync(endpoint, "disk0");
        await using RawClient second = await RawClient.OpenAsync(endpoint, "disk0");

        ToolResult nbdinfo = await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri("disk0")], check: false);
        ToolResult qemu = await gateway.RunAsync("qemu-img", ["info", gateway.NbdUri("disk0")], check: false);

        Assert.False(nbdinfo.Succeeded, nbdinfo.Describe());
        // libnbd names the policy refusal of GO (the server's text is in its LIBNBD_DEBUG output);
        // qemu shows the refusal and the server's text. Closing at once would give "server
        // disconnected unexpectedly" and "Failed to read initial magic".
        Assert.Contains("server policy prevents NBD_OPT_GO", nbdinfo.Stderr, StringComparison.Ordinal);
        Assert.False(qemu.Succeeded, qemu.Describe());
        Assert.Contains($"limit of {Limit} NBD connections", qemu.Stderr, StringComparison.Ordinal);
        Assert.Contains("Refusing NBD connection", gateway.Output, StringComparison.Ordinal);

        await first.AssertWorksAsync(offset: 0, seed: 1);
        await second.AssertWorksAsync(offset: 4096, seed: 2);
        await first.SendAsync(RawClient.Request(Gateway.Nbd.NbdCommand.Disconnect, Gateway.Nbd.CommandFlags.None, 9, 0, 0));
        Assert.True(await first.ServerClosedAsync());

        // The slot is given back once the connection's actor has stopped: a moment after the close.
        ToolResult after = await EventuallySucceedsAsync(() => gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri("disk0")], check: false));
        Assert.True(after.Succeeded, $"a client after one left should be served\n{after.Describe()}\n{gateway.Describe()}");
        Assert.Equal((1L << 30).ToString(System.Globalization.CultureInfo.InvariantCulture), after.Stdout.Trim());

        string metrics = await gateway.Http.GetStringAsync("metrics");
        Assert.Matches(@"nbd_connections_refused_total\{[^}]*\} [1-9]", metrics);
    }

    [Fact]
    public async Task Client_silent_past_the_handshake_timeout_is_disconnected_and_logged()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync(extraArgs: ["--handshake-timeout", "2"]);
        var endpoint = new IPEndPoint(IPAddress.Loopback, gateway.NbdPort);
        await using RawClient attached = await RawClient.OpenAsync(endpoint, "disk0");
        long start = Stopwatch.GetTimestamp();
        await using RawClient silent = await RawClient.ConnectAsync(endpoint);
        await silent.ReadGreetingAsync();

        Assert.True(await silent.ServerClosedAsync(TimeSpan.FromSeconds(10)), $"the silent client should be closed\n{gateway.Describe()}");
        Assert.InRange(Stopwatch.GetElapsedTime(start), TimeSpan.FromSeconds(1.8), TimeSpan.FromSeconds(8));

        await attached.AssertWorksAsync(); // idle for 2 s and more, still served
        Assert.Contains("handshake not finished within 2 s", gateway.Output, StringComparison.Ordinal);
        ToolResult nbdinfo = await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri("disk0")]);
        Assert.True(nbdinfo.Succeeded, nbdinfo.Describe());
        string metrics = await gateway.Http.GetStringAsync("metrics");
        Assert.Matches(@"nbd_handshake_timeouts_total\{[^}]*\} [1-9]", metrics);
    }

    private static async Task<ToolResult> EventuallySucceedsAsync(Func<Task<ToolResult>> run)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            ToolResult result = await run();
            if (result.Succeeded || clock.Elapsed > TimeSpan.FromSeconds(10))
            {
                return result;
            }
            await Task.Delay(100);
        }
    }
}
