using System.Net;
using System.Net.Http.Json;
using Gateway.Backends.S3;
using Gateway.Tests.Backends.S3;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// S3 exports with the write log (<c>writeLog: true</c>) driven by real clients through the real
/// gateway, against the loopback s3rver (GATEWAY_TEST_S3_ENDPOINT; the tests fail without it): fio
/// with verification, nbdcopy, and kill -9 of the gateway after FLUSH.
/// </summary>
public sealed class S3LogInteropTests : IAsyncLifetime
{
    private const int MiB = 1024 * 1024;
    private GatewayProcess _gateway = null!;
    private readonly string _work = Directory.CreateTempSubdirectory("gateway-s3log-").FullName;

    public async Task InitializeAsync()
    {
        await S3TestServer.EnsureBucketAsync();
        _gateway = await GatewayProcess.StartAsync();
    }

    public async Task DisposeAsync()
    {
        if (_gateway is not null)
        {
            await _gateway.DisposeAsync();
        }
        Directory.Delete(_work, recursive: true);
    }

    private async Task CreateLogExportAsync(string name, long size, string prefix, int? objectSize = null)
    {
        var body = new
        {
            name,
            size,
            backend = new
            {
                type = "s3",
                s3 = new { endpoint = S3TestServer.Endpoint, bucket = S3TestServer.Bucket, prefix, objectSize, writeLog = true, accessKey = S3TestServer.AccessKey, secretKey = S3TestServer.SecretKey },
            },
        };
        using HttpResponseMessage response = await _gateway.Http.PostAsJsonAsync("v1/exports", body);
        string text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.Created, $"create {name}: {(int)response.StatusCode} {text}\n{_gateway.Describe()}");
        Assert.Contains("\"writeLog\": true", text);
    }

    private Task WaitOpenAsync(string name) => WaitOpenAsync(_gateway, name);

    /// <summary>
    /// Waits (at most a minute) until the export answers: until checkpoints, opening replays every
    /// segment, and a handshake that waits longer than the server's 10 s for the export is dropped.
    /// </summary>
    internal static async Task WaitOpenAsync(GatewayProcess gateway, string name)
    {
        for (int i = 0; i < 60; i++)
        {
            ToolResult info = await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri(name)], TimeSpan.FromSeconds(30), check: false);
            if (info.Succeeded)
            {
                return;
            }
            await Task.Delay(1000);
        }
        Assert.Fail($"export {name} did not open within a minute of the restart\n{gateway.Describe()}");
    }

    [Fact]
    public async Task Log_export_fio_random_writes_verify_and_nbdcopy_round_trips_through_a_restart()
    {
        string prefix = S3TestServer.NewPrefix("log-fio");
        await CreateLogExportAsync("s3log", 64 * MiB, prefix);
        ToolResult fio = await _gateway.RunAsync("fio",
        [
            "--name=verify", "--ioengine=nbd", $"--uri={_gateway.NbdUri("s3log")}",
            "--rw=randwrite", "--bsrange=4k-64k", "--size=32M", "--iodepth=16",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--runtime=60",
        ], timeout: TimeSpan.FromSeconds(120));
        Assert.Contains("err= 0", fio.Stdout);
        Assert.DoesNotContain("verify:", fio.Stderr);

        string input = Path.Combine(_work, "in.img");
        byte[] image = new byte[16 * MiB];
        Random.Shared.NextBytes(image);
        await File.WriteAllBytesAsync(input, image);
        await _gateway.RunAsync("nbdcopy", ["--flush", input, _gateway.NbdUri("s3log")], TimeSpan.FromSeconds(120));
        // Segments, and chunk objects only if a compaction ran (the export is quiet for 10 s at most between the jobs).
        List<string> keys = await S3TestServer.KeysAsync(prefix);
        Assert.Contains(keys, k => k.StartsWith(prefix + "/log/", StringComparison.Ordinal));

        await _gateway.StopAsync();
        await _gateway.RestartAsync();
        await WaitOpenAsync("s3log");
        string output = Path.Combine(_work, "out.img");
        await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("s3log"), output], TimeSpan.FromSeconds(120));
        byte[] read = await File.ReadAllBytesAsync(output);
        Assert.True(image.AsSpan().SequenceEqual(read.AsSpan(0, image.Length)), "the image read back after a restart differs");
    }

    [Fact]
    public async Task A_quiet_log_export_is_compacted_into_chunks_that_nbdkit_S3_reads_as_the_disk()
    {
        string prefix = S3TestServer.NewPrefix("log-to-nbdkit");
        const int Size = 8 * MiB;
        await CreateLogExportAsync("s3log-nbdkit", Size, prefix, objectSize: 64 * 1024); // the most Debian's plugin takes
        string input = Path.Combine(_work, "compact-in.img");
        byte[] image = new byte[Size];
        Random.Shared.NextBytes(image);
        image.AsSpan(2 * MiB, MiB).Clear(); // zeros: no chunk objects there after compaction
        await File.WriteAllBytesAsync(input, image);
        await _gateway.RunAsync("nbdcopy", ["--flush", input, _gateway.NbdUri("s3log-nbdkit")], TimeSpan.FromSeconds(120));

        // Quiet for the idle time (10 s): the log is folded into the chunk objects and its segments deleted.
        List<string> keys = [];
        for (int i = 0; i < 120; i++)
        {
            keys = await S3TestServer.KeysAsync(prefix);
            if (!keys.Exists(k => LogSegment.TryParseKey(prefix, k, out _, out _)))
            {
                break;
            }
            await Task.Delay(500);
        }
        Assert.DoesNotContain(keys, k => LogSegment.TryParseKey(prefix, k, out _, out _));
        Assert.DoesNotContain(S3DeviceOptions.Key(prefix, 2 * MiB / (64 * 1024)), keys);

        string output = Path.Combine(_work, "compact-out.img");
        await S3InteropTests.RunNbdkitS3Async(_gateway, [.. S3InteropTests.NbdkitS3Args(prefix, Size), "--run", $"nbdcopy \"$uri\" '{output}'"]);
        byte[] read = await File.ReadAllBytesAsync(output);
        Assert.True(image.AsSpan().SequenceEqual(read), "nbdkit read a different disk from the compacted bucket");
    }

    [Fact]
    public async Task Kill_9_after_FLUSH_loses_no_flushed_byte_over_three_cycles_with_writes_in_flight()
    {
        const int Size = 64 * MiB;
        const int Checked = 32 * MiB; // flushed writes go here; unflushed fio writes go to the other half
        await CreateLogExportAsync("s3kill", Size, S3TestServer.NewPrefix("log-kill"));
        byte[] model = new byte[Checked];
        var random = new Random(18);
        for (int cycle = 0; cycle < 3; cycle++)
        {
            var commands = new List<string>();
            for (int i = 0; i < 12; i++)
            {
                int offset = random.Next(Checked / 4096 - 16) * 4096;
                int length = (1 + random.Next(16)) * 4096;
                byte value = (byte)(1 + cycle * 12 + i);
                commands.AddRange(["-c", $"write -P {value} {offset} {length}"]);
                model.AsSpan(offset, length).Fill(value);
            }
            commands.AddRange(["-c", "flush"]);
            await _gateway.RunAsync("qemu-io", ["-f", "raw", _gateway.NbdUri("s3kill"), .. commands], TimeSpan.FromSeconds(60));

            // Unflushed writes in flight when the gateway dies.
            Task<ToolResult> inFlight = _gateway.RunAsync("fio",
            [
                "--name=inflight", "--ioengine=nbd", $"--uri={_gateway.NbdUri("s3kill")}", "--rw=randwrite", "--bs=4k",
                "--iodepth=32", $"--offset={Checked}", $"--size={Size - Checked}", "--time_based=1", "--runtime=30",
            ], TimeSpan.FromSeconds(60), check: false);
            await Task.Delay(1500);
            _gateway.Kill();
            await inFlight;
            await _gateway.RestartAsync();
            await WaitOpenAsync("s3kill");

            string output = Path.Combine(_work, $"out{cycle}.img");
            await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("s3kill"), output], TimeSpan.FromSeconds(120));
            byte[] read = await File.ReadAllBytesAsync(output);
            int first = model.AsSpan().CommonPrefixLength(read.AsSpan(0, Checked));
            Assert.True(first == Checked, $"cycle {cycle}: flushed byte {first} differs after kill -9 and restart\n{_gateway.Describe()}");
        }
    }
}
