using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Tests.Backends.S3;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Backup;

/// <summary>
/// The repository's store failing mid-backup: a full disk (a small tmpfs as the repository) and an
/// S3 outage (the test's own s3rver killed). Each must fail with a clear error and exit 1, leave no
/// backup that points at missing chunks, and resume: the next run, once space or the store is back,
/// stores only what the failed run had not, and restores byte-exact.
/// </summary>
public sealed class BackupFaultTests
{
    private const long MiB = 1 << 20;

    private static Task<ToolResult> CliAsync(GatewayProcess gateway, string[] env, params string[] args) =>
        Tool.RunAsync("env", [.. env, GatewayProcess.DotnetHost, GatewayProcess.GatewayDll, "backup", .. args],
            timeout: TimeSpan.FromMinutes(3), check: false, workingDirectory: gateway.DataDirectory, context: gateway.Describe);

    /// <summary>An export of <paramref name="size"/> random (incompressible) bytes, and a copy of them in <paramref name="work"/>.</summary>
    private static async Task<string> RandomExportAsync(GatewayProcess gateway, string work, long size)
    {
        using (HttpResponseMessage created = await gateway.Http.PostAsJsonAsync("v1/exports", new { name = "vm", size }))
        {
            Assert.Equal(HttpStatusCode.Created, created.StatusCode);
        }
        string source = Path.Combine(work, "source.img");
        byte[] data = new byte[size];
        new Random(20).NextBytes(data);
        await File.WriteAllBytesAsync(source, data);
        // --flush: stored before the backup reads it, so the gateway's stop has nothing left to sync.
        await gateway.RunAsync("nbdcopy", ["--flush", source, gateway.NbdUri("vm")]);
        return source;
    }

    private static string[] Target(GatewayProcess gateway) =>
        ["--nbd", $"127.0.0.1:{gateway.NbdPort}", "--admin", gateway.AdminUri.ToString(), "--json"];

    [Fact]
    public async Task A_full_disk_fails_the_backup_and_the_restore_cleanly_and_the_backup_resumes_once_there_is_space()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-enospc-");
        string mount = Path.Combine(work.FullName, "small");
        Directory.CreateDirectory(mount);
        await gateway.RunAsync("mount", ["-t", "tmpfs", "-o", "size=16m", "tmpfs", mount]);
        try
        {
            string source = await RandomExportAsync(gateway, work.FullName, 64 * MiB);
            string repo = Path.Combine(mount, "repo");

            ToolResult full = await CliAsync(gateway, [], ["create", "vm", "--repo", repo, .. Target(gateway)]);
            Assert.Equal(1, full.ExitCode);
            Assert.Contains("No space left on device", full.Stderr);
            Assert.Contains("free space", full.Stderr);
            Assert.Empty(Directory.EnumerateFiles(repo, ".tmp-*", SearchOption.AllDirectories));
            ToolResult listed = await CliAsync(gateway, [], "list", "--repo", repo, "--json");
            Assert.True(listed.Succeeded, listed.Describe());
            Assert.Equal(0, JsonDocument.Parse(listed.Stdout).RootElement.GetArrayLength());
            int stored = Directory.EnumerateFiles(Path.Combine(repo, "chunks"), "*", SearchOption.AllDirectories).Count();
            Assert.True(stored >= 1, $"the failed run stored {stored} chunks");
            ToolResult check = await CliAsync(gateway, [], "check", "--repo", repo);
            Assert.True(check.Succeeded, check.Describe());

            // More space: the rerun finds what the failed run stored and stores only the rest.
            await gateway.RunAsync("mount", ["-o", "remount,size=128m", mount]);
            ToolResult rerun = await CliAsync(gateway, [], ["create", "vm", "--repo", repo, .. Target(gateway)]);
            Assert.True(rerun.Succeeded, rerun.Describe());
            using JsonDocument summary = JsonDocument.Parse(rerun.Stdout);
            Assert.Equal(stored, summary.RootElement.GetProperty("chunksReused").GetInt64());
            Assert.Equal(16 - stored, summary.RootElement.GetProperty("chunksNew").GetInt64());
            string id = summary.RootElement.GetProperty("id").GetString()!;
            string restored = Path.Combine(work.FullName, "restored.img");
            ToolResult restore = await CliAsync(gateway, [], "restore", id, "--repo", repo, "--to-file", restored);
            Assert.True(restore.Succeeded, restore.Describe());
            ToolResult cmp = await gateway.RunAsync("cmp", [source, restored], check: false);
            Assert.True(cmp.Succeeded, cmp.Describe());

            // A restore onto a full disk: exit 1, and neither the file nor its temporary is left.
            await gateway.RunAsync("mount", ["-o", "remount,size=80m", mount]);
            string onFull = Path.Combine(mount, "restored.img");
            ToolResult noRoom = await CliAsync(gateway, [], "restore", id, "--repo", repo, "--to-file", onFull);
            Assert.Equal(1, noRoom.ExitCode);
            Assert.Contains("No space left on device", noRoom.Stderr);
            Assert.False(File.Exists(onFull));
            Assert.Empty(Directory.EnumerateFiles(mount, ".restore-*"));
            await gateway.StopAsync();
        }
        finally
        {
            await gateway.RunAsync("umount", [mount], check: false);
            work.Delete(recursive: true);
        }
    }

    [Fact]
    public async Task An_S3_outage_mid_backup_fails_it_cleanly_and_the_next_run_resumes_with_what_was_stored()
    {
        await S3TestServer.EnsureBucketAsync();
        using var network = new LoopbackCut(new Uri(S3TestServer.Endpoint).Port);
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-outage-");
        try
        {
            const long Size = 256 * MiB;
            string source = await RandomExportAsync(gateway, work.FullName, Size);
            string prefix = S3TestServer.NewPrefix("backup-outage");
            string repo = $"s3://{S3TestServer.Bucket}/{prefix}";
            // The backup reaches the store through the relay; the test looks at the store directly.
            string[] env = [$"AWS_ENDPOINT_URL_S3={network.Endpoint}", $"AWS_ACCESS_KEY_ID={S3TestServer.AccessKey}", $"AWS_SECRET_ACCESS_KEY={S3TestServer.SecretKey}"];
            async Task<int> StoredAsync() => (await S3TestServer.KeysAsync(prefix + "/chunks")).Count;

            // The network to the store goes down once the backup has stored a few chunks (64 in all).
            Task<ToolResult> running = CliAsync(gateway, env, ["create", "vm", "--repo", repo, .. Target(gateway)]);
            for (int i = 0; i < 1500 && await StoredAsync() < 4 && !running.IsCompleted; i++)
            {
                await Task.Delay(20);
            }
            network.Cut();
            ToolResult failed = await running;
            int stored = await StoredAsync();
            Assert.True(stored is >= 4 and < 64, $"the backup stored {stored} of 64 chunks before the outage\n{failed.Describe()}");
            Assert.Equal(1, failed.ExitCode);
            Assert.Contains($"S3 at bucket '{S3TestServer.Bucket}' unreachable", failed.Stderr);
            Assert.DoesNotContain("   at ", failed.Stderr); // an error line, not a stack trace

            // Back up: no manifest from the failed run, and the rerun stores only what it had not.
            network.Restore();
            ToolResult listed = await CliAsync(gateway, env, "list", "--repo", repo, "--json");
            Assert.True(listed.Succeeded, listed.Describe());
            Assert.Equal(0, JsonDocument.Parse(listed.Stdout).RootElement.GetArrayLength());
            ToolResult rerun = await CliAsync(gateway, env, ["create", "vm", "--repo", repo, .. Target(gateway)]);
            Assert.True(rerun.Succeeded, rerun.Describe());
            using JsonDocument summary = JsonDocument.Parse(rerun.Stdout);
            // s3rver keeps the part of an upload the cut interrupted as an object: that one is found
            // damaged and stored again (a warning says so); the whole ones are reused.
            long reused = summary.RootElement.GetProperty("chunksReused").GetInt64();
            Assert.True(reused >= stored - 4 && reused <= stored, rerun.Stdout);
            Assert.Equal(64 - reused, summary.RootElement.GetProperty("chunksNew").GetInt64());
            if (reused < stored)
            {
                Assert.Contains("damaged", rerun.Stdout);
            }
            string id = summary.RootElement.GetProperty("id").GetString()!;

            ToolResult check = await CliAsync(gateway, env, "check", "--repo", repo, "--read-data");
            Assert.True(check.Succeeded, check.Describe());
            string restored = Path.Combine(work.FullName, "restored.img");
            ToolResult restore = await CliAsync(gateway, env, "restore", id, "--repo", repo, "--to-file", restored);
            Assert.True(restore.Succeeded, restore.Describe());
            ToolResult cmp = await gateway.RunAsync("cmp", [source, restored], check: false);
            Assert.True(cmp.Succeeded, cmp.Describe());
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }
}
