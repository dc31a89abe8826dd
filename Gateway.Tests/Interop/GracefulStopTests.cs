using System.Security.Cryptography;
using Gateway.Tests.Backends.S3;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Interop;

/// <summary>
/// Issue 30 (2): SIGTERM of a gateway whose S3 export holds unflushed writes. The shutdown flush
/// takes as long as the uploads do; it used to resume off the export actor, which then read
/// <c>Sender</c> outside its context, failed, and left SIGTERM waiting out the 30 s drain timeout.
/// </summary>
public sealed class GracefulStopTests(ITestOutputHelper log) : IAsyncLifetime
{
    private const int MiB = 1024 * 1024;
    private const int Written = 128 * MiB;

    /// <summary>Well under the 30 s drain timeout the failure ran into, with room for a slow machine.</summary>
    private static readonly TimeSpan ExitDeadline = TimeSpan.FromSeconds(15);

    private GatewayProcess _gateway = null!;
    private readonly string _work = Directory.CreateTempSubdirectory("gateway-graceful-").FullName;

    public async Task InitializeAsync()
    {
        await S3TestServer.EnsureBucketAsync();
        _gateway = await GatewayProcess.StartAsync();
    }

    public async Task DisposeAsync()
    {
        await _gateway.DisposeAsync();
        Directory.Delete(_work, recursive: true);
    }

    /// <summary>The last 4 KiB of each 4 MiB object are left unwritten (see the script).</summary>
    private const int Gap = 4096;

    /// <summary>
    /// Python with libnbd: writes the file at offset 0 in 4 MiB requests, each short of its object by
    /// <see cref="Gap"/> bytes (a whole object written is uploaded at once; these stay dirty in the
    /// cache until their idle write-back, a second later), never flushes, disconnects.
    /// </summary>
    private const string WriteNoFlushScript = """
        import sys
        import nbd
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        with open(sys.argv[2], "rb") as f:
            data = f.read()
        step = 4 * 1048576
        gap = int(sys.argv[3])
        for o in range(0, len(data), step):
            h.pwrite(data[o:o + step - gap], o)
        h.shutdown()  # NBD_CMD_DISC: no flush
        print("written")
        """;

    [Fact]
    public async Task SIGTERM_with_128_MiB_unflushed_on_an_S3_export_exits_0_within_seconds_and_every_write_survives()
    {
        string prefix = S3TestServer.NewPrefix("sigterm");
        await S3InteropTests.CreateS3ExportAsync(_gateway, "s3stop", 256 * MiB, prefix);
        byte[] image = new byte[Written];
        Random.Shared.NextBytes(image);
        string input = Path.Combine(_work, "in.img");
        await File.WriteAllBytesAsync(input, image);
        for (int o = 4 * MiB - Gap; o < Written; o += 4 * MiB)
        {
            image.AsSpan(o, Gap).Clear(); // what the disk holds where the script wrote nothing
        }
        string script = Path.Combine(_work, "write.py");
        await File.WriteAllTextAsync(script, WriteNoFlushScript);
        ToolResult wrote = await _gateway.RunAsync("/usr/bin/python3", [script, _gateway.NbdUri("s3stop"), input, Gap.ToString(System.Globalization.CultureInfo.InvariantCulture)], TimeSpan.FromSeconds(180));
        Assert.Contains("written", wrote.Stdout);
        // The export's write-back cache (256 MiB by default) holds what was written: no upload has to have happened yet.

        (int exitCode, TimeSpan elapsed) = await _gateway.TerminateAsync(TimeSpan.FromSeconds(60));
        string gatewayLog = _gateway.Output;
        log.WriteLine($"SIGTERM to exit: {elapsed.TotalSeconds:F1} s, exit code {exitCode}");
        Assert.True(exitCode == 0, $"exit code {exitCode} after SIGTERM ({elapsed.TotalSeconds:F1} s)\n{_gateway.Describe()}");
        Assert.DoesNotContain("There is no active ActorContext", gatewayLog);
        Assert.DoesNotContain("did not finish draining", gatewayLog);
        Assert.DoesNotContain("Flushing exports failed", gatewayLog);
        Assert.True(elapsed < ExitDeadline, $"SIGTERM took {elapsed.TotalSeconds:F1} s to exit (deadline {ExitDeadline.TotalSeconds} s)\n{_gateway.Describe()}");

        // Everything written is in the bucket: a fresh gateway reads it back cold.
        await _gateway.RestartAsync();
        string output = Path.Combine(_work, "out.img");
        await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("s3stop"), output], TimeSpan.FromSeconds(180));
        byte[] read = await File.ReadAllBytesAsync(output);
        Assert.True(SHA256.HashData(image).AsSpan().SequenceEqual(SHA256.HashData(read.AsSpan(0, Written))),
            "the 128 MiB written before SIGTERM differ after the restart");
    }
    /// <summary>
    /// The store unreachable when SIGTERM comes: the final flush cannot finish, so the stop waits
    /// for it, and the log says every few seconds what it waits for (an operator, or a test that
    /// times out, sees the cause rather than silence). Once the store is back the flush ends, the
    /// gateway exits 0, and nothing written is lost.
    /// </summary>
    [Fact]
    public async Task SIGTERM_while_the_store_is_unreachable_waits_for_the_final_flush_says_so_and_loses_nothing_once_it_is_back()
    {
        using var network = new LoopbackCut(new Uri(S3TestServer.Endpoint).Port);
        string prefix = S3TestServer.NewPrefix("sigterm-outage");
        const int Size = 16 * MiB;
        await S3InteropTests.CreateS3ExportAsync(_gateway, "s3cut", 64 * MiB, prefix, endpoint: network.Endpoint);
        byte[] image = new byte[Size];
        Random.Shared.NextBytes(image);
        string input = Path.Combine(_work, "in.img");
        await File.WriteAllBytesAsync(input, image);
        for (int o = 4 * MiB - Gap; o < Size; o += 4 * MiB)
        {
            image.AsSpan(o, Gap).Clear();
        }
        string script = Path.Combine(_work, "write.py");
        await File.WriteAllTextAsync(script, WriteNoFlushScript);
        ToolResult wrote = await _gateway.RunAsync("/usr/bin/python3", [script, _gateway.NbdUri("s3cut"), input, Gap.ToString(System.Globalization.CultureInfo.InvariantCulture)], TimeSpan.FromSeconds(60));
        Assert.Contains("written", wrote.Stdout);

        network.Cut();
        Task<(int ExitCode, TimeSpan Elapsed)> stopping = _gateway.TerminateAsync(TimeSpan.FromSeconds(60));
        var waited = System.Diagnostics.Stopwatch.StartNew();
        while (!_gateway.Output.Contains("Shutdown has waited", StringComparison.Ordinal) && !stopping.IsCompleted && waited.Elapsed < TimeSpan.FromSeconds(20))
        {
            await Task.Delay(100);
        }
        Assert.False(stopping.IsCompleted, $"the gateway exited while its store was unreachable\n{_gateway.Describe()}");
        Assert.Contains("Shutdown has waited 5 s for the exports' final flush", _gateway.Output);
        Assert.Contains("Final flush of export s3cut failed (attempt 1)", _gateway.Output);
        network.Restore();
        (int exitCode, TimeSpan elapsed) = await stopping;
        log.WriteLine($"SIGTERM to exit with the store cut for {waited.Elapsed.TotalSeconds:F1} s: {elapsed.TotalSeconds:F1} s, exit code {exitCode}");
        Assert.True(exitCode == 0, $"exit code {exitCode} after SIGTERM ({elapsed.TotalSeconds:F1} s)\n{_gateway.Describe()}");
        Assert.DoesNotContain("Flushing exports failed", _gateway.Output);

        await _gateway.RestartAsync();
        string output = Path.Combine(_work, "out.img");
        await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("s3cut"), output], TimeSpan.FromSeconds(60));
        byte[] read = await File.ReadAllBytesAsync(output);
        Assert.True(SHA256.HashData(image).AsSpan().SequenceEqual(SHA256.HashData(read.AsSpan(0, Size))),
            "what was written before SIGTERM differs after the store came back and the gateway restarted");
    }
}
