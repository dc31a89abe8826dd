using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using System.Net.Sockets;
using System.Text.Json;
using Gateway.Tests.Backends.S3;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// S3 exports driven by real clients through the real gateway, against the loopback s3rver that
/// ops/test starts (GATEWAY_TEST_S3_ENDPOINT; the tests fail without it), and nbdkit's S3 plugin
/// on the same bucket and prefix to prove the layouts are the same.
/// </summary>
public sealed class S3InteropTests : IClassFixture<GatewayFixture>, IAsyncLifetime
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private readonly GatewayProcess _gateway;
    private readonly List<string> _work = [];

    public S3InteropTests(GatewayFixture fixture) => _gateway = fixture.Gateway;

    public Task InitializeAsync() => S3TestServer.EnsureBucketAsync();

    public Task DisposeAsync()
    {
        foreach (string dir in _work)
        {
            Directory.Delete(dir, recursive: true);
        }
        return Task.CompletedTask;
    }

    private string WorkDirectory()
    {
        string dir = Directory.CreateTempSubdirectory("gateway-s3-").FullName;
        _work.Add(dir);
        return dir;
    }

    private static async Task<string> RandomImageAsync(string dir, int size)
    {
        string path = Path.Combine(dir, "in.img");
        byte[] random = new byte[size];
        Random.Shared.NextBytes(random);
        await File.WriteAllBytesAsync(path, random);
        return path;
    }

    internal static async Task CreateS3ExportAsync(GatewayProcess gateway, string name, long size, string prefix, int? objectSize = null, string? endpoint = null)
    {
        var body = new
        {
            name,
            size,
            backend = new
            {
                type = "s3",
                s3 = new { endpoint = endpoint ?? S3TestServer.Endpoint, bucket = S3TestServer.Bucket, prefix, objectSize, accessKey = S3TestServer.AccessKey, secretKey = S3TestServer.SecretKey },
            },
        };
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", body);
        string text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.Created, $"create {name}: {(int)response.StatusCode} {text}\n{gateway.Describe()}");
        Assert.DoesNotContain(S3TestServer.SecretKey, text.Replace(S3TestServer.AccessKey, ""));
    }

    /// <summary>
    /// Runs nbdkit's S3 plugin. Seen twice on this machine (not reproduced by hand): nbdkit exiting
    /// at once with 143 (SIGTERM) and no output, before it served anything. Such a start is tried
    /// again (at most twice); any other failure, or a failure after it started, fails the test.
    /// </summary>
    private Task RunNbdkitS3Async(string[] args) => RunNbdkitS3Async(_gateway, args);

    internal static async Task RunNbdkitS3Async(GatewayProcess gateway, string[] args)
    {
        for (int attempt = 1; ; attempt++)
        {
            ToolResult result = await gateway.RunAsync("nbdkit", args, TimeSpan.FromSeconds(180), check: attempt == 3);
            bool stillborn = result.ExitCode == 143 && result.Elapsed < TimeSpan.FromSeconds(1) && result.Stderr.Length == 0;
            if (result.Succeeded)
            {
                return;
            }
            Assert.True(stillborn, $"nbdkit failed\n{result.Describe()}");
        }
    }

    internal static string[] NbdkitS3Args(string prefix, long size, string? endpoint = null) =>
    [
        "-U", "-", "S3",
        $"endpoint-url={endpoint ?? S3TestServer.Endpoint}", $"access-key={S3TestServer.AccessKey}", $"secret-key={S3TestServer.SecretKey}",
        $"bucket={S3TestServer.Bucket}", $"key={prefix}", $"size={size}", "object-size=64K",
    ];

    [Fact]
    public async Task S3_export_nbdcopy_of_a_random_64_MiB_image_in_and_out_keeps_the_checksum()
    {
        string prefix = S3TestServer.NewPrefix("nbdcopy");
        await CreateS3ExportAsync(_gateway, "s3copy", 64 * MiB, prefix);
        string work = WorkDirectory();
        string input = await RandomImageAsync(work, 64 * MiB);
        string output = Path.Combine(work, "out.img");

        await _gateway.RunAsync("nbdcopy", ["--flush", input, _gateway.NbdUri("s3copy")], TimeSpan.FromSeconds(120));
        await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("s3copy"), output], TimeSpan.FromSeconds(120));

        Assert.Equal(Tool.Sha256(input), Tool.Sha256(output));
        // 4 MiB objects by default: 16 of them, all in the bucket after the flush.
        Assert.Equal(16, (await S3TestServer.KeysAsync(prefix)).Count);
    }

    [Fact]
    public async Task S3_export_fio_random_writes_verify_with_crc32c()
    {
        await CreateS3ExportAsync(_gateway, "s3fio", 64 * MiB, S3TestServer.NewPrefix("fio"));
        ToolResult fio = await _gateway.RunAsync("fio",
        [
            "--name=verify", "--ioengine=nbd", $"--uri={_gateway.NbdUri("s3fio")}",
            "--rw=randwrite", "--bsrange=4k-64k", "--size=32M", "--iodepth=16",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--runtime=60",
        ], timeout: TimeSpan.FromSeconds(120));
        Assert.Contains("err= 0", fio.Stdout);
        Assert.DoesNotContain("verify:", fio.Stderr);
    }

    [Fact]
    public async Task Disk_written_through_the_gateway_reads_back_through_nbdkit_S3()
    {
        string prefix = S3TestServer.NewPrefix("gw-to-nbdkit");
        const int Size = 16 * MiB;
        await CreateS3ExportAsync(_gateway, "s3-to-nbdkit", Size, prefix, objectSize: 64 * KiB);
        string work = WorkDirectory();
        string input = await RandomImageAsync(work, Size);
        // A hole in the middle: nbdkit must read the missing objects as zeros too.
        await using (FileStream f = File.OpenWrite(input))
        {
            f.Position = 4 * MiB;
            await f.WriteAsync(new byte[2 * MiB]);
        }
        string output = Path.Combine(work, "out.img");

        await _gateway.RunAsync("nbdcopy", ["--flush", input, _gateway.NbdUri("s3-to-nbdkit")], TimeSpan.FromSeconds(120));
        await RunNbdkitS3Async([.. NbdkitS3Args(prefix, Size), "--run", $"nbdcopy \"$uri\" '{output}'"]);

        Assert.Equal(Tool.Sha256(input), Tool.Sha256(output));
    }

    [Fact]
    public async Task Disk_written_through_nbdkit_S3_is_served_by_the_gateway()
    {
        string prefix = S3TestServer.NewPrefix("nbdkit-to-gw");
        const int Size = 8 * MiB;
        string work = WorkDirectory();
        string input = await RandomImageAsync(work, Size);
        string output = Path.Combine(work, "out.img");

        await RunNbdkitS3Async([.. NbdkitS3Args(prefix, Size), "--run", $"nbdcopy --flush '{input}' \"$uri\""]);
        await CreateS3ExportAsync(_gateway, "s3-from-nbdkit", Size, prefix, objectSize: 64 * KiB);
        await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("s3-from-nbdkit"), output], TimeSpan.FromSeconds(120));

        Assert.Equal(Tool.Sha256(input), Tool.Sha256(output));
        ToolResult map = await _gateway.RunAsync("nbdinfo", ["--map", _gateway.NbdUri("s3-from-nbdkit")]);
        Assert.Contains("data", map.Stdout);
    }

    [Fact]
    public async Task S3_export_settings_are_checked_and_the_secret_is_never_shown()
    {
        using HttpResponseMessage bad = await _gateway.Http.PostAsJsonAsync("v1/exports", new
        {
            name = "s3bad",
            size = MiB,
            backend = new { type = "s3", s3 = new { endpoint = S3TestServer.Endpoint, bucket = S3TestServer.Bucket, prefix = "p", objectSize = 3000 } },
        });
        Assert.Equal(HttpStatusCode.BadRequest, bad.StatusCode);
        Assert.Contains("objectSize", await bad.Content.ReadAsStringAsync());

        using HttpResponseMessage missing = await _gateway.Http.PostAsJsonAsync("v1/exports", new { name = "s3bad2", size = MiB, backend = new { type = "s3" } });
        Assert.Equal(HttpStatusCode.BadRequest, missing.StatusCode);

        ToolResult add = await _gateway.CliAsync("export", "add", "s3cli", "--size", "1M", "--s3-endpoint", S3TestServer.Endpoint,
            "--s3-bucket", S3TestServer.Bucket, "--s3-prefix", S3TestServer.NewPrefix("cli"), "--s3-object-size", "64K",
            "--s3-access-key", S3TestServer.AccessKey, "--s3-secret-key", "not-shown-secret");
        Assert.True(add.Succeeded, add.Describe());
        string shown = await _gateway.Http.GetStringAsync("v1/exports/s3cli");
        Assert.Contains("\"objectSize\": 65536", shown);
        Assert.DoesNotContain("not-shown-secret", shown);
        Assert.DoesNotContain("not-shown-secret", add.Stdout);
        Assert.DoesNotContain("not-shown-secret", _gateway.Output);
    }
}

/// <summary>
/// Faults: its own s3rver (GATEWAY_TEST_S3RVER) that the test stops mid-workload and starts again on
/// the same folder and port.
/// </summary>
public sealed class S3FaultInteropTests : IAsyncLifetime
{
    private const int MiB = 1024 * 1024;
    private GatewayProcess _gateway = null!;
    private Process? _s3rver;
    private readonly string _s3Data = Directory.CreateTempSubdirectory("gateway-s3fault-").FullName;
    private readonly int _port = FreePort();

    private string Endpoint => $"http://127.0.0.1:{_port}";

    public async Task InitializeAsync()
    {
        await StartS3rverAsync();
        await S3TestServer.EnsureBucketAsync(Endpoint);
        _gateway = await GatewayProcess.StartAsync();
    }

    public async Task DisposeAsync()
    {
        StopS3rver();
        if (_gateway is not null)
        {
            await _gateway.DisposeAsync();
        }
        Directory.Delete(_s3Data, recursive: true);
    }

    private async Task StartS3rverAsync()
    {
        string s3rver = Environment.GetEnvironmentVariable("GATEWAY_TEST_S3RVER") is { Length: > 0 } path
            ? path
            : throw new Xunit.Sdk.XunitException("GATEWAY_TEST_S3RVER is not set: run the tests through ./ops/test, which installs s3rver");
        var start = new ProcessStartInfo(s3rver) { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string arg in new[] { "-d", _s3Data, "-a", "127.0.0.1", "-p", _port.ToString(System.Globalization.CultureInfo.InvariantCulture), "-s" })
        {
            start.ArgumentList.Add(arg);
        }
        start.Environment["NODE_OPTIONS"] = "--openssl-legacy-provider";
        _s3rver = Process.Start(start)!;
        _s3rver.BeginOutputReadLine();
        _s3rver.BeginErrorReadLine();
        for (int i = 0; i < 100 && !GatewayProcess.CanConnect(_port); i++)
        {
            await Task.Delay(100);
        }
        Assert.True(GatewayProcess.CanConnect(_port), "the test's s3rver did not start");
    }

    private void StopS3rver()
    {
        if (_s3rver is { HasExited: false })
        {
            _s3rver.Kill(entireProcessTree: true);
            _s3rver.WaitForExit();
        }
        _s3rver?.Dispose();
        _s3rver = null;
    }

    /// <summary>Python with libnbd: writes with FUA and flushes while the store is down; prints what each got.</summary>
    private const string OutageScript = """
        import errno, os, sys
        import nbd
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        phase = sys.argv[2]
        data = bytes([0x5A]) * 65536
        def attempt(name, fn):
            try:
                fn()
                print(f"{name}: ok")
            except nbd.Error as e:
                print(f"{name}: {errno.errorcode.get(e.errno, e.errno)}")
        if phase == "down":
            attempt("fua-write", lambda: h.pwrite(data, 40 * 1048576, nbd.CMD_FLAG_FUA))
            attempt("write", lambda: h.pwrite(data, 41 * 1048576))
            attempt("flush", lambda: h.flush())
            attempt("read-uncached", lambda: h.pread(65536, 20 * 1048576))
        else:
            attempt("flush", lambda: h.flush())
        h.shutdown()
        """;

    [Fact]
    public async Task S3_server_stopped_mid_workload_gives_EIO_and_a_live_gateway_and_flushed_data_survives()
    {
        const int Size = 64 * MiB;
        await S3InteropTests.CreateS3ExportAsync(_gateway, "fault", Size, "fault-disk", objectSize: 64 * 1024, endpoint: Endpoint);
        string work = Directory.CreateTempSubdirectory("gateway-s3fault-work-").FullName;
        try
        {
            string input = Path.Combine(work, "in.img");
            byte[] image = new byte[32 * MiB];
            Random.Shared.NextBytes(image);
            await File.WriteAllBytesAsync(input, image);
            await _gateway.RunAsync("nbdcopy", ["--flush", input, _gateway.NbdUri("fault")], TimeSpan.FromSeconds(120));
            // Restart the gateway so the flushed data is no longer cached: later reads must come from the store.
            await _gateway.StopAsync();
            await _gateway.RestartAsync();
            string script = Path.Combine(work, "outage.py");
            await File.WriteAllTextAsync(script, OutageScript);

            // The export opens (and lists its objects) while the store is up; the outage comes mid-workload.
            await _gateway.RunAsync("nbdinfo", ["--size", _gateway.NbdUri("fault")]);
            StopS3rver();
            ToolResult down = await _gateway.RunAsync("/usr/bin/python3", [script, _gateway.NbdUri("fault"), "down"], TimeSpan.FromSeconds(180));

            Assert.Contains("fua-write: EIO", down.Stdout);
            Assert.Contains("write: ok", down.Stdout); // into the cache
            Assert.Contains("flush: EIO", down.Stdout);
            Assert.Contains("read-uncached: EIO", down.Stdout);
            // The gateway and its other exports live on.
            Assert.True(_gateway.IsRunning, _gateway.Describe());
            Assert.Equal("ok\n", await _gateway.Http.GetStringAsync("healthz"));
            await _gateway.RunAsync("qemu-io", ["-f", "raw", _gateway.NbdUri("disk0"), "-c", "write -P 7 0 64k", "-c", "read -P 7 0 64k"]);

            await StartS3rverAsync();
            ToolResult up = await _gateway.RunAsync("/usr/bin/python3", [script, _gateway.NbdUri("fault"), "up"], TimeSpan.FromSeconds(120));
            Assert.Contains("flush: ok", up.Stdout);

            // Cold read of everything from the store: the first image, and the writes made during the outage.
            await _gateway.StopAsync();
            await _gateway.RestartAsync();
            string output = Path.Combine(work, "out.img");
            await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("fault"), output], TimeSpan.FromSeconds(120));
            byte[] read = await File.ReadAllBytesAsync(output);
            Assert.True(image.AsSpan().SequenceEqual(read.AsSpan(0, image.Length)), "the data flushed before the outage changed");
            byte[] written = new byte[64 * 1024];
            written.AsSpan().Fill(0x5A);
            Assert.True(written.AsSpan().SequenceEqual(read.AsSpan(40 * MiB, written.Length)), "the FUA write retried by the flush is missing");
            Assert.True(written.AsSpan().SequenceEqual(read.AsSpan(41 * MiB, written.Length)), "the cached write flushed after the outage is missing");
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}
