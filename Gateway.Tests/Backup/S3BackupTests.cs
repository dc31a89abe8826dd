using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Backup;
using Gateway.Tests.Backends.S3;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Backup;

/// <summary>Backup repositories in an S3 bucket (s3://BUCKET/PREFIX), against the loopback s3rver that ops/test starts.</summary>
public sealed class S3BackupTests
{
    private const long MiB = 1 << 20;

    [Fact]
    public async Task The_S3_store_puts_gets_lists_one_level_and_says_what_is_absent()
    {
        await S3TestServer.EnsureBucketAsync();
        using var store = new S3Store(S3TestServer.Location(), S3TestServer.NewPrefix("backup-store") + "/repo/");
        Assert.Null(await store.GetAsync("repository.json", CancellationToken.None));
        Assert.Null(await store.LengthAsync("repository.json", CancellationToken.None));

        Assert.True(await store.PutIfAbsentAsync("backups/a.json", "{}"u8.ToArray(), CancellationToken.None));
        Assert.True(await store.PutIfAbsentAsync("chunks/ab/ab01", new byte[] { 1, 2, 3 }, CancellationToken.None));
        Assert.Equal(3, await store.LengthAsync("chunks/ab/ab01", CancellationToken.None));
        Assert.Equal(new byte[] { 1, 2, 3 }, await store.GetAsync("chunks/ab/ab01", CancellationToken.None));

        var listed = new List<string>();
        await foreach (string key in store.ListAsync("backups/", CancellationToken.None))
        {
            listed.Add(key);
        }
        Assert.Equal(["backups/a.json"], listed);
        listed.Clear();
        await foreach (string key in store.ListAsync("chunks/", CancellationToken.None))
        {
            listed.Add(key);
        }
        Assert.Empty(listed); // one level: chunks/ab/ab01 is under chunks/ab/, not chunks/

        // Backups without repository.json are not taken over; in an empty prefix a repository works like a folder one.
        await Assert.ThrowsAsync<BackupFormatException>(() => BackupRepository.OpenOrCreateAsync(store, 64 * 1024, CancellationToken.None));
        using var empty = new S3Store(S3TestServer.Location(), S3TestServer.NewPrefix("backup-store"));
        BackupRepository repository = await BackupRepository.OpenOrCreateAsync(empty, 64 * 1024, CancellationToken.None);
        byte[] data = new byte[64 * 1024];
        Random.Shared.NextBytes(data);
        string sha = BackupRepository.Hash(data);
        Assert.True(await repository.PutChunkAsync(sha, data, CancellationToken.None) > 0);
        Assert.True(await repository.HasChunkAsync(sha, CancellationToken.None));
        byte[] back = new byte[data.Length];
        await repository.ReadChunkAsync(sha, back, CancellationToken.None);
        Assert.Equal(data, back);
    }

    private static Task<ToolResult> CliAsync(GatewayProcess gateway, string endpoint, params string[] args) =>
        Tool.RunAsync("env",
            [$"AWS_ENDPOINT_URL_S3={endpoint}", $"AWS_ACCESS_KEY_ID={S3TestServer.AccessKey}", $"AWS_SECRET_ACCESS_KEY={S3TestServer.SecretKey}",
             GatewayProcess.DotnetHost, GatewayProcess.GatewayDll, "backup", .. args],
            timeout: TimeSpan.FromMinutes(2), check: false, workingDirectory: gateway.DataDirectory, context: gateway.Describe);

    [Fact]
    public async Task Backups_into_an_S3_bucket_are_incremental_and_restore_byte_exact_and_a_missing_bucket_is_a_clear_error()
    {
        await S3TestServer.EnsureBucketAsync();
        string endpoint = S3TestServer.Endpoint;
        string repo = $"s3://{S3TestServer.Bucket}/{S3TestServer.NewPrefix("backup-repo")}";
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-s3-test-");
        try
        {
            using (HttpResponseMessage created = await gateway.Http.PostAsJsonAsync("v1/exports", new { name = "vm", size = 64 * MiB }))
            {
                Assert.Equal(HttpStatusCode.Created, created.StatusCode);
            }
            await gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri("vm"), "-c", "write -P 0x11 0 6M", "-c", "write -P 0x22 40M 1M"]);
            string[] target = ["--nbd", $"127.0.0.1:{gateway.NbdPort}", "--admin", gateway.AdminUri.ToString(), "--json"];

            ToolResult first = await CliAsync(gateway, endpoint, ["create", "vm", "--repo", repo, .. target]);
            Assert.True(first.Succeeded, first.Describe());
            await gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri("vm"), "-c", "write -P 0x33 1M 64k", "-c", "discard 40M 4M"]);
            ToolResult second = await CliAsync(gateway, endpoint, ["create", "vm", "--repo", repo, .. target]);
            Assert.True(second.Succeeded, second.Describe());
            using JsonDocument summary = JsonDocument.Parse(second.Stdout);
            Assert.True(summary.RootElement.GetProperty("incremental").GetBoolean(), second.Stdout);
            Assert.Equal(64 * 1024, summary.RootElement.GetProperty("bytesRead").GetInt64());
            string id = summary.RootElement.GetProperty("id").GetString()!;

            string state = Path.Combine(work.FullName, "state.img"), restored = Path.Combine(work.FullName, "restored.img");
            await gateway.RunAsync("nbdcopy", [gateway.NbdUri("vm"), state]);
            ToolResult restore = await CliAsync(gateway, endpoint, "restore", id, "--repo", repo, "--to-file", restored);
            Assert.True(restore.Succeeded, restore.Describe());
            ToolResult cmp = await gateway.RunAsync("cmp", [state, restored], check: false);
            Assert.True(cmp.Succeeded, cmp.Describe());

            // Into a new S3 export whose prefix still holds another disk's objects: those must not show
            // through where the backup has holes (the restore zeroes the disk first).
            string prefix = S3TestServer.NewPrefix("backup-restore-s3");
            string[] s3 = ["--s3-endpoint", endpoint, "--s3-bucket", S3TestServer.Bucket, "--s3-prefix", prefix, "--s3-access-key", S3TestServer.AccessKey, "--s3-secret-key", S3TestServer.SecretKey];
            using (HttpResponseMessage stale = await gateway.Http.PostAsJsonAsync("v1/exports", new
            {
                name = "stale",
                size = 64 * MiB,
                backend = new { type = "s3", s3 = new { endpoint, bucket = S3TestServer.Bucket, prefix, accessKey = S3TestServer.AccessKey, secretKey = S3TestServer.SecretKey } },
            }))
            {
                Assert.Equal(HttpStatusCode.Created, stale.StatusCode);
            }
            await gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri("stale"), "-c", "write -P 0x7e 0 64M", "-c", "flush"]);
            using (HttpResponseMessage removed = await gateway.Http.DeleteAsync("v1/exports/stale"))
            {
                Assert.True(removed.IsSuccessStatusCode, await removed.Content.ReadAsStringAsync());
            }
            ToolResult toS3 = await CliAsync(gateway, endpoint, ["restore", id, "--repo", repo, "--to-export", "s3copy", .. s3, "--nbd", $"127.0.0.1:{gateway.NbdPort}", "--admin", gateway.AdminUri.ToString()]);
            Assert.True(toS3.Succeeded, toS3.Describe());
            using (JsonDocument shown = JsonDocument.Parse(await gateway.Http.GetStringAsync("v1/exports/s3copy")))
            {
                Assert.Equal("s3", shown.RootElement.GetProperty("backend").GetProperty("type").GetString());
            }
            string s3copy = Path.Combine(work.FullName, "s3copy.img");
            await gateway.RunAsync("nbdcopy", [gateway.NbdUri("s3copy"), s3copy]);
            cmp = await gateway.RunAsync("cmp", [state, s3copy], check: false);
            Assert.True(cmp.Succeeded, cmp.Describe());

            ToolResult verify = await CliAsync(gateway, endpoint, "verify", id, "--repo", repo);
            Assert.True(verify.Succeeded, verify.Describe());
            ToolResult list = await CliAsync(gateway, endpoint, "list", "--repo", repo, "--json");
            Assert.True(list.Succeeded, list.Describe());
            Assert.Equal(2, JsonDocument.Parse(list.Stdout).RootElement.GetArrayLength());

            ToolResult noBucket = await CliAsync(gateway, endpoint, "list", "--repo", "s3://no-such-bucket-here/x");
            Assert.Equal(1, noBucket.ExitCode);
            Assert.Contains("no-such-bucket-here", noBucket.Stderr);
            ToolResult noRepo = await CliAsync(gateway, endpoint, "list", "--repo", repo + "-absent");
            Assert.Equal(1, noRepo.ExitCode);
            Assert.Contains("repository.json is missing", noRepo.Stderr);
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }
}
