using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Amazon.S3;
using Amazon.S3.Model;
using Gateway.Backends.Qcow2;
using Gateway.Backends.S3;
using Gateway.Tests.Backends.S3;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>
/// A base image that is an S3 object, read by range (issue 23, item 5), against the loopback s3rver
/// (GATEWAY_TEST_S3_ENDPOINT; the tests fail without it): a qcow2 chain uploaded with its relative
/// backing names (a raw file under a compressed 4 KiB-cluster qcow2 under an extended-L2 qcow2)
/// reads through the gateway as <c>qemu-img convert -O raw</c> gives the same chain on disk, and
/// maps (<c>qemu:allocation-depth</c>, <c>base:allocation</c>) as qemu-nbd serves it.
/// </summary>
public sealed class Qcow2S3BaseTests
{
    private const long MiB = 1 << 20;

    [Fact]
    public async Task An_overlay_over_a_qcow2_chain_in_S3_reads_and_maps_as_qemu_serves_the_chain()
    {
        await S3TestServer.EnsureBucketAsync();
        string prefix = S3TestServer.NewPrefix("qcow2-base");
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        string golden = Path.Combine(gateway.DataDirectory, "golden");
        string top = await MakeChainAsync(golden);
        await UploadAsync(golden, prefix, "base.raw", "mid.qcow2", "golden.qcow2");
        string image = $"s3://{S3TestServer.Bucket}/{prefix}/golden/golden.qcow2";
        var s3 = new { endpoint = S3TestServer.Endpoint, accessKey = S3TestServer.AccessKey, secretKey = S3TestServer.SecretKey };

        await gateway.CreateExportAsync(new { name = "vm", size = 8 * MiB, backend = new { type = "overlay", baseImage = image, s3 } });
        using (JsonDocument export = JsonDocument.Parse(await gateway.Http.GetStringAsync("v1/exports/vm")))
        {
            JsonElement backend = export.RootElement.GetProperty("backend");
            Assert.Equal(image, backend.GetProperty("baseImage").GetString());
            Assert.False(backend.GetProperty("s3").TryGetProperty("secretKey", out JsonElement secret) && secret.ValueKind != JsonValueKind.Null, "the API shows the secret key");
        }

        string expected = Path.Combine(gateway.DataDirectory, "expected.raw");
        string copy = Path.Combine(gateway.DataDirectory, "copy.raw");
        await gateway.RunAsync("qemu-img", ["convert", "-O", "raw", top, expected]);
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri("vm"), copy]);
        Assert.True(Tool.Sha256(expected) == Tool.Sha256(copy), "the overlay over the qcow2 chain in S3, read with nbdcopy, differs from qemu-img convert of the chain");
        // Small reads too (the cached path): 4 KiB pieces across the compressed and zero clusters.
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x24 2M 4k", "-c", "read -P 0 2560k 8k", "-c", "read -P 0x34 3M 4k", "-c", "read -P 0x11 0 4k", gateway.NbdUri("vm")]);

        // qemu-nbd serving the chain on disk under an empty qcow2 top (the overlay's own empty top).
        string reference = Path.Combine(gateway.DataDirectory, "reference.qcow2");
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-b", top, "-F", "qcow2", reference, "8M"]);
        foreach (string context in new[] { "qemu:allocation-depth", "base:allocation" })
        {
            List<(long, long, uint)> ours = await gateway.MapRunsAsync(context, [gateway.NbdUri("vm")]);
            List<(long, long, uint)> qemu = await gateway.MapRunsAsync(context, ["--", "[", Tool.Locate("qemu-nbd"), "-r", "-A", "-f", "qcow2", reference, "]"]);
            Assert.True(qemu.SequenceEqual(ours), $"{context}: the gateway serves\n{string.Join("\n", ours)}\nqemu-nbd serves\n{string.Join("\n", qemu)}");
        }

        // Through the CLI, and a raw object as the base.
        ToolResult add = await gateway.CliAsync("export", "add", "cli", "--size", "8M", "--base-image", image, "--base-format", "qcow2",
            "--s3-endpoint", S3TestServer.Endpoint, "--s3-access-key", S3TestServer.AccessKey, "--s3-secret-key", S3TestServer.SecretKey);
        Assert.True(add.Succeeded, add.Describe());
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x33 1536k 64k", "-c", "read -P 0x23 7M 64k", gateway.NbdUri("cli")]);
        await gateway.CreateExportAsync(new { name = "raw", size = 8 * MiB, backend = new { type = "overlay", baseImage = $"s3://{S3TestServer.Bucket}/{prefix}/golden/base.raw", s3 } });
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x11 0 6M", "-c", "read -P 0 6M 2M", gateway.NbdUri("raw")]);

        // A clone of the overlay shares its S3 base, across a restart.
        await gateway.CreateExportAsync(new { name = "clone", size = 8 * MiB, backend = new { type = "overlay", @base = "vm" } });
        await gateway.StopAsync();
        await gateway.RestartAsync();
        string again = Path.Combine(gateway.DataDirectory, "again.raw");
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri("clone"), again]);
        Assert.True(Tool.Sha256(expected) == Tool.Sha256(again), "a clone of the overlay on the S3 base, after a restart, differs from qemu-img convert of the chain");
    }

    [Fact]
    public async Task An_S3_image_naming_a_backing_file_outside_its_bucket_or_missing_is_refused_at_creation()
    {
        await S3TestServer.EnsureBucketAsync();
        string prefix = S3TestServer.NewPrefix("qcow2-base-refused");
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        string folder = Path.Combine(gateway.DataDirectory, "images");
        Directory.CreateDirectory(folder);
        // An absolute backing name: followed, it would read a file of the gateway's host.
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", "-u", Path.Combine(folder, "host.qcow2"), "8M"]);
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-b", "../../../x.raw", "-F", "raw", "-u", Path.Combine(folder, "climb.qcow2"), "8M"]);
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", "-u", Path.Combine(folder, "gone.qcow2"), "8M"]);
        await UploadAsync(folder, prefix, "host.qcow2", "climb.qcow2", "gone.qcow2");
        var s3 = new { endpoint = S3TestServer.Endpoint, accessKey = S3TestServer.AccessKey, secretKey = S3TestServer.SecretKey };
        foreach ((string name, string reason) in new[] { ("host.qcow2", "not a key relative to its own"), ("climb.qcow2", "climbs above the bucket"), ("gone.qcow2", "cannot be opened") })
        {
            using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports",
                new { name = "vm-" + name.Replace(".", "-", StringComparison.Ordinal), size = 8 * MiB, backend = new { type = "overlay", baseImage = $"s3://{S3TestServer.Bucket}/{prefix}/images/{name}", s3 } });
            string body = await response.Content.ReadAsStringAsync();
            Assert.True(response.StatusCode == HttpStatusCode.BadRequest, $"{name}: answered {(int)response.StatusCode}: {body}");
            Assert.Contains(reason, body);
        }
        using HttpResponseMessage missing = await gateway.Http.PostAsJsonAsync("v1/exports",
            new { name = "vm-none", size = 8 * MiB, backend = new { type = "overlay", baseImage = $"s3://{S3TestServer.Bucket}/{prefix}/none.qcow2", s3 } });
        Assert.Equal(HttpStatusCode.BadRequest, missing.StatusCode);
        using HttpResponseMessage noSettings = await gateway.Http.PostAsJsonAsync("v1/exports",
            new { name = "vm-nos3", size = 8 * MiB, backend = new { type = "overlay", baseImage = $"s3://{S3TestServer.Bucket}/{prefix}/images/gone.qcow2" } });
        Assert.Contains("give s3 settings with its endpoint", await noSettings.Content.ReadAsStringAsync());
    }

    [Fact]
    public async Task The_reader_over_S3_reads_as_qemu_and_caches_small_reads()
    {
        await S3TestServer.EnsureBucketAsync();
        string prefix = S3TestServer.NewPrefix("qcow2-reader");
        using var images = new QemuImages();
        string top = await MakeChainAsync(images.PathOf("golden"));
        await UploadAsync(images.PathOf("golden"), prefix, "base.raw", "mid.qcow2", "golden.qcow2");
        string expectedPath = images.PathOf("expected.raw");
        await images.Img("convert", "-O", "raw", top, expectedPath);
        byte[] expected = await File.ReadAllBytesAsync(expectedPath);

        var store = new CountingStore(new S3ObjectStore(S3TestServer.Location()));
        using var location = new S3ImageLocation(store, S3TestServer.Endpoint, S3TestServer.Bucket);
        using Qcow2Image image = Qcow2Image.Open(location.NameOf($"{prefix}/golden/golden.qcow2"), location);
        Assert.Equal(
            [$"s3://{S3TestServer.Bucket}/{prefix}/golden/golden.qcow2", $"s3://{S3TestServer.Bucket}/{prefix}/golden/mid.qcow2", $"s3://{S3TestServer.Bucket}/{prefix}/golden/base.raw"],
            image.Chain.Select(f => f.Path));
        byte[] whole = new byte[expected.Length];
        image.Read(0, whole);
        Assert.True(expected.AsSpan().SequenceEqual(whole), "the chain read from S3 differs from qemu-img convert");

        // The same 4 KiB read again costs no GET: its L2 tables and block are cached.
        byte[] piece = new byte[4096];
        image.Read(3 * MiB, piece);
        int gets = store.Gets;
        for (int i = 0; i < 10; i++)
        {
            image.Read(3 * MiB, piece);
        }
        Assert.Equal(gets, store.Gets);
        Assert.True(expected.AsSpan((int)(3 * MiB), 4096).SequenceEqual(piece));

        // gateway image inspect reads it the same way (credentials from the AWS environment).
        Environment.SetEnvironmentVariable("AWS_ACCESS_KEY_ID", S3TestServer.AccessKey);
        Environment.SetEnvironmentVariable("AWS_SECRET_ACCESS_KEY", S3TestServer.SecretKey);
        ToolResult inspect = await Tool.RunAsync(GatewayProcess.DotnetHost,
            [GatewayProcess.GatewayDll, "image", "inspect", location.NameOf($"{prefix}/golden/golden.qcow2"), "--s3-endpoint", S3TestServer.Endpoint, "--json"],
            timeout: TimeSpan.FromMinutes(1), check: false);
        Assert.True(inspect.Succeeded, inspect.Describe());
        using JsonDocument report = JsonDocument.Parse(inspect.Stdout);
        Assert.Equal("qcow2", report.RootElement.GetProperty("format").GetString());
        Assert.Equal(
            image.Chain.Select(f => f.Path),
            report.RootElement.GetProperty("chain").EnumerateArray().Select(f => f.GetProperty("path").GetString()));
        ToolResult missing = await Tool.RunAsync(GatewayProcess.DotnetHost,
            [GatewayProcess.GatewayDll, "image", "inspect", location.NameOf($"{prefix}/none.qcow2"), "--s3-endpoint", S3TestServer.Endpoint],
            timeout: TimeSpan.FromMinutes(1), check: false);
        Assert.Equal(1, missing.ExitCode);
    }

    /// <summary>
    /// base.raw (6 MiB of 0x11) under mid.qcow2 (4 KiB clusters: data, a compressed run, zero
    /// clusters) under golden.qcow2 (extended L2: subclusters, a discard, zeros), backing names relative.
    /// </summary>
    private static async Task<string> MakeChainAsync(string folder)
    {
        Directory.CreateDirectory(folder);
        Task<ToolResult> Run(string tool, params string[] args) => Tool.RunAsync(tool, args, workingDirectory: folder);
        await Run("qemu-img", "create", "-f", "raw", "base.raw", "6M");
        await Run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 6M", "base.raw");
        await Run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw", "mid.qcow2", "8M");
        await Run("qemu-io", "-c", "write -P 0x22 1M 1M", "-c", "write -c -P 0x24 2M 64k", "-c", "write -z 2560k 8k", "-c", "write -P 0x23 7M 64k", "mid.qcow2");
        await Run("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", "golden.qcow2", "8M");
        await Run("qemu-io", "-c", "write -P 0x33 1536k 64k", "-c", "write -P 0x34 3M 6k", "-c", "discard 4M 64k", "-c", "write -z 5M 128k", "golden.qcow2");
        return Path.Combine(folder, "golden.qcow2");
    }

    private static async Task UploadAsync(string folder, string prefix, params string[] names)
    {
        using AmazonS3Client client = S3TestServer.Client();
        string under = Path.GetFileName(folder);
        foreach (string name in names)
        {
            await client.PutObjectAsync(new PutObjectRequest
            {
                BucketName = S3TestServer.Bucket,
                Key = $"{prefix}/{under}/{name}",
                FilePath = Path.Combine(folder, name),
                UseChunkEncoding = false,
            });
        }
    }

    private sealed class CountingStore(IObjectStore inner) : IObjectStore
    {
        private int _gets;

        public int Gets => Volatile.Read(ref _gets);

        public Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken)
        {
            Interlocked.Increment(ref _gets);
            return inner.GetAsync(key, start, destination, cancellationToken);
        }

        public Task<long> GetLengthAsync(string key, CancellationToken cancellationToken) => inner.GetLengthAsync(key, cancellationToken);

        public Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken) => inner.PutAsync(key, data, length, cancellationToken);

        public Task DeleteAsync(string key, CancellationToken cancellationToken) => inner.DeleteAsync(key, cancellationToken);

        public IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken) => inner.ListAsync(prefix, cancellationToken);

        public void Dispose() => inner.Dispose();
    }
}
