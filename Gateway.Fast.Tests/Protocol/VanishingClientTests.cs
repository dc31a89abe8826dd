using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// Clients that vanish, or a server that stops, while a write's payload is half received: the
/// payload buffer goes back to <see cref="PayloadPool"/> and the other connections are untouched.
/// Apart from <see cref="BadInputSuite"/> because they count the process-wide pool, so they run in
/// the serial <see cref="NbdServerCollection"/> while the rest of the suite runs in parallel.
/// </summary>
public abstract class VanishingClientSuite : IAsyncLifetime
{
    private const int KiB = 1024;
    private const int MiB = 1024 * KiB;
    private const string Rw = "rw";

    private readonly NbdTestServer _server;

    protected VanishingClientSuite(bool inMemory)
    {
        var exports = new TestExportDirectory();
        exports.Add(Rw, new MemoryBackend(4L * MiB));
        _server = new NbdTestServer(exports, inMemory: inMemory);
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _server.DisposeAsync();

    private Task<RawClient> OpenAsync() => _server.OpenAsync(Rw);

    /// <summary>A fresh connection can still attach and do I/O: the server as a whole is fine.</summary>
    private async Task AssertServerStillWorksAsync()
    {
        await using RawClient client = await OpenAsync();
        await client.AssertWorksAsync(offset: 12 * KiB, seed: 99);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Client_vanishing_mid_payload_is_cleaned_up_without_touching_others(bool reset)
    {
        await using RawClient other = await OpenAsync();
        await other.AssertWorksAsync(offset: 0, seed: 3);
        long before = PayloadPool.Outstanding;
        int endedBefore = _server.Ended;
        RawClient leaver = await OpenAsync();

        // A 1 MiB write of which only 100 KiB ever arrive.
        await leaver.SendAsync(RawClient.Request(NbdCommand.Write, CommandFlags.None, 1, 0, MiB, new byte[100 * KiB]));
        Assert.True(await NbdTestServer.EventuallyAsync(() => PayloadPool.Outstanding == before + 1),
            $"the server should hold one payload buffer for the partial write (outstanding {PayloadPool.Outstanding}, before {before})");
        if (reset)
        {
            leaver.Reset();
        }
        else
        {
            leaver.ShutdownSend();
        }

        Assert.True(await NbdTestServer.EventuallyAsync(() => _server.Ended == endedBefore + 1),
            "the server should have finished the vanished client's connection");
        Assert.True(await NbdTestServer.EventuallyAsync(() => PayloadPool.Outstanding == before),
            $"the partial write's buffer should be returned (outstanding {PayloadPool.Outstanding}, before {before})");
        await leaver.DisposeAsync();
        Assert.Equal(1, _server.Active);
        await other.AssertWorksAsync(offset: 0, seed: 4);
        await AssertServerStillWorksAsync();
    }

    [Fact]
    public async Task Server_stopping_while_a_client_is_mid_payload_ends_every_connection()
    {
        long before = PayloadPool.Outstanding;
        await using RawClient idle = await OpenAsync();
        await using RawClient stuck = await OpenAsync();
        await stuck.SendAsync(RawClient.Request(NbdCommand.Write, CommandFlags.None, 1, 0, MiB, new byte[100 * KiB]));
        Assert.True(await NbdTestServer.EventuallyAsync(() => PayloadPool.Outstanding == before + 1));

        // Graceful shutdown (SIGTERM): every connection must end, even one waiting for a payload.
        Exception? failure = await Record.ExceptionAsync(async () => await _server.DisposeAsync());

        Assert.Null(failure);
        Assert.Equal(0, _server.Active);
        Assert.True(await idle.ServerClosedAsync());
        Assert.True(await stuck.ServerClosedAsync());
        Assert.True(await NbdTestServer.EventuallyAsync(() => PayloadPool.Outstanding == before));
    }
}

/// <summary>Over a real loopback socket, where resets and half-closes are the kernel's.</summary>
[Collection(NbdServerCollection.Name)]
public sealed class VanishingClientTests() : VanishingClientSuite(inMemory: false);

/// <summary>Over an in-memory pipe.</summary>
[Collection(NbdServerCollection.Name)]
public sealed class VanishingClientInMemoryTests() : VanishingClientSuite(inMemory: true);
