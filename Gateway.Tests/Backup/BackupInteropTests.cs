using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Backup;

/// <summary>
/// <c>gateway backup</c> against the real gateway process: qemu-io writes patterns, zeroes and
/// trims; the CLI backs up over NBD into a folder repository and restores into raw files that are
/// compared with <c>nbdcopy</c> copies of the export taken at each backup's moment.
/// </summary>
public sealed class BackupInteropTests
{
    private const long MiB = 1 << 20;
    private const long DiskSize = 256 * MiB;

    private static async Task CreateExportAsync(GatewayProcess gateway, string name, long size)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", new { name, size });
        Assert.True(response.StatusCode == HttpStatusCode.Created, $"creating {name}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
    }

    private static Task<ToolResult> QemuIoAsync(GatewayProcess gateway, string export, params string[] commands) =>
        gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })]);

    /// <summary>The <c>gateway backup ...</c> CLI (its own process, like a user's), with --nbd pointing at this gateway for create.</summary>
    private static Task<ToolResult> BackupCliAsync(GatewayProcess gateway, params string[] args) =>
        Tool.RunAsync(GatewayProcess.DotnetHost, [GatewayProcess.GatewayDll, "backup", .. args], timeout: TimeSpan.FromMinutes(2),
            check: false, workingDirectory: gateway.DataDirectory, context: gateway.Describe);

    private static async Task<JsonElement> CreateBackupAsync(GatewayProcess gateway, string repo, string export)
    {
        ToolResult result = await BackupCliAsync(gateway, "create", export, "--repo", repo, "--nbd", $"127.0.0.1:{gateway.NbdPort}", "--json");
        Assert.True(result.Succeeded, result.Describe() + "\n" + gateway.Describe());
        using JsonDocument summary = JsonDocument.Parse(result.Stdout);
        return summary.RootElement.Clone();
    }

    private static async Task<string> RestoreAsync(GatewayProcess gateway, string repo, string id, string folder)
    {
        string file = Path.Combine(folder, id + ".img");
        ToolResult result = await BackupCliAsync(gateway, "restore", id, "--repo", repo, "--to-file", file);
        Assert.True(result.Succeeded, result.Describe());
        return file;
    }

    /// <summary>The export as it is now, copied by a client that is not ours.</summary>
    private static async Task<string> CopyAsync(GatewayProcess gateway, string export, string file)
    {
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri(export), file]);
        return file;
    }

    private static async Task AssertSameAsync(GatewayProcess gateway, string expected, string actual)
    {
        Assert.Equal(new FileInfo(expected).Length, new FileInfo(actual).Length);
        ToolResult cmp = await gateway.RunAsync("cmp", [expected, actual], check: false);
        Assert.True(cmp.Succeeded, cmp.Describe());
    }

    private static long Allocated(string file) => FileExtents.Data(file).Sum(e => e.Length);

    [Fact]
    public async Task Backups_restore_byte_exact_and_sparse_reuse_unchanged_chunks_and_deduplicate_across_exports()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-test-");
        try
        {
            string repo = Path.Combine(work.FullName, "repo");
            await CreateExportAsync(gateway, "vm", DiskSize);
            await QemuIoAsync(gateway, "vm",
                "write -P 0x11 0 5M",           // chunks 0 and 1 (4 MiB chunks)
                "write -P 0x22 40M 1M",         // chunk 10
                "write -P 0x33 64M 8M",         // chunks 16 and 17, then zeroed
                "write -z 64M 8M",
                "write -P 0x44 100M 4M",        // chunk 25, then trimmed
                "discard 100M 4M",
                "write -P 0x55 255M 1M");       // the last chunk, 63

            JsonElement first = await CreateBackupAsync(gateway, repo, "vm");
            string firstId = first.GetProperty("id").GetString()!;
            string state1 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state1.img"));
            Assert.Equal(DiskSize, first.GetProperty("bytesTotal").GetInt64());
            Assert.Equal(4, first.GetProperty("chunksNew").GetInt64());
            Assert.Equal(0, first.GetProperty("chunksReused").GetInt64());
            Assert.Equal(60 * 4 * MiB, first.GetProperty("bytesZero").GetInt64() + first.GetProperty("bytesHole").GetInt64());
            // Holes and zero extents are not read: what was read is the allocated chunks, not the disk.
            Assert.True(first.GetProperty("bytesRead").GetInt64() <= 8 * 4 * MiB, first.ToString());
            Assert.True(first.GetProperty("bytesUploaded").GetInt64() is > 0 and < 1 * (int)MiB, first.ToString());

            string restored1 = await RestoreAsync(gateway, repo, firstId, work.FullName);
            await AssertSameAsync(gateway, state1, restored1);
            // Data chunks 0, 1, 10, 63 hold 5 + 1 + 1 MiB of data; their zeros are not written either.
            Assert.True(Allocated(restored1) <= 8 * MiB, $"the restored file has {Allocated(restored1)} bytes allocated");

            // 1 MiB changed: one new chunk, the other three reused, little uploaded.
            await QemuIoAsync(gateway, "vm", "write -P 0x66 2M 1M");
            JsonElement second = await CreateBackupAsync(gateway, repo, "vm");
            string secondId = second.GetProperty("id").GetString()!;
            string state2 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state2.img"));
            Assert.Equal(1, second.GetProperty("chunksNew").GetInt64());
            Assert.Equal(3, second.GetProperty("chunksReused").GetInt64());
            Assert.Equal(3 * 4 * MiB, second.GetProperty("bytesDeduplicated").GetInt64());
            Assert.True(second.GetProperty("bytesUploaded").GetInt64() < MiB / 4, second.ToString());
            Assert.True(string.CompareOrdinal(firstId, secondId) < 0, $"ids sort by time: {firstId} {secondId}");

            await AssertSameAsync(gateway, state2, await RestoreAsync(gateway, repo, secondId, work.FullName));
            File.Delete(restored1);
            await AssertSameAsync(gateway, state1, await RestoreAsync(gateway, repo, firstId, work.FullName));

            // A restore over an existing file of other content is still byte-exact (holes included).
            string reused = Path.Combine(work.FullName, "reused.img");
            File.Copy(state2, reused);
            await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x77 100M 8M", reused]);
            ToolResult over = await BackupCliAsync(gateway, "restore", firstId, "--repo", repo, "--to-file", reused);
            Assert.True(over.Succeeded, over.Describe());
            await AssertSameAsync(gateway, state1, reused);

            // Another export with the same content stores nothing new.
            await CreateExportAsync(gateway, "twin", DiskSize);
            await gateway.RunAsync("nbdcopy", [state2, gateway.NbdUri("twin")]);
            JsonElement twin = await CreateBackupAsync(gateway, repo, "twin");
            Assert.Equal(0, twin.GetProperty("chunksNew").GetInt64());
            Assert.Equal(4, twin.GetProperty("chunksReused").GetInt64());
            Assert.Equal(0, twin.GetProperty("bytesUploaded").GetInt64());
            Assert.Equal(5, Directory.EnumerateFiles(Path.Combine(repo, "chunks"), "*", SearchOption.AllDirectories).Count());

            ToolResult list = await BackupCliAsync(gateway, "list", "--repo", repo, "--json");
            Assert.True(list.Succeeded, list.Describe());
            using JsonDocument listed = JsonDocument.Parse(list.Stdout);
            Assert.Equal([firstId, secondId, twin.GetProperty("id").GetString()!], listed.RootElement.EnumerateArray().Select(b => b.GetProperty("id").GetString()!));
            Assert.Equal(["vm", "vm", "twin"], listed.RootElement.EnumerateArray().Select(b => b.GetProperty("export").GetString()!));

            foreach (string id in new[] { firstId, secondId })
            {
                ToolResult verify = await BackupCliAsync(gateway, "verify", id, "--repo", repo);
                Assert.True(verify.Succeeded, verify.Describe());
            }
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }

    [Fact]
    public async Task A_corrupt_or_missing_chunk_fails_verify_and_restore_naming_the_disk_offset()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-test-");
        try
        {
            string repo = Path.Combine(work.FullName, "repo");
            await CreateExportAsync(gateway, "vm", 64 * MiB);
            await QemuIoAsync(gateway, "vm", "write -P 0x11 0 4M", "write -P 0x22 8M 4M");
            string id = (await CreateBackupAsync(gateway, repo, "vm")).GetProperty("id").GetString()!;
            string state = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state.img"));

            // The chunk of disk offset 8 MiB: the one whose bytes are all 0x22.
            string sha = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(Enumerable.Repeat((byte)0x22, (int)(4 * MiB)).ToArray()));
            string chunk = Path.Combine(repo, "chunks", sha[..2], sha);
            Assert.True(File.Exists(chunk), $"no chunk file {chunk}");
            byte[] bytes = File.ReadAllBytes(chunk);
            bytes[bytes.Length / 2] ^= 0xff;
            File.WriteAllBytes(chunk, bytes);

            ToolResult verify = await BackupCliAsync(gateway, "verify", id, "--repo", repo);
            Assert.Equal(1, verify.ExitCode);
            Assert.Contains($"disk offsets {8 * MiB}+{4 * MiB}", verify.Stderr);
            Assert.Contains(sha, verify.Stderr);
            Assert.DoesNotContain("disk offsets 0+", verify.Stderr);

            string target = Path.Combine(work.FullName, "restored.img");
            ToolResult restore = await BackupCliAsync(gateway, "restore", id, "--repo", repo, "--to-file", target);
            Assert.Equal(1, restore.ExitCode);
            Assert.Contains($"disk offset {8 * MiB}", restore.Stderr);
            Assert.False(File.Exists(target), "a failed restore left the file it made");

            File.Delete(chunk);
            verify = await BackupCliAsync(gateway, "verify", id, "--repo", repo, "--json");
            Assert.Equal(1, verify.ExitCode);
            using (JsonDocument report = JsonDocument.Parse(verify.Stdout))
            {
                JsonElement problem = Assert.Single(report.RootElement.GetProperty("problems").EnumerateArray());
                Assert.Contains("missing", problem.GetProperty("problem").GetString());
                Assert.Equal(8 * MiB, Assert.Single(problem.GetProperty("ranges").EnumerateArray()).GetProperty("offset").GetInt64());
            }

            // The next backup stores the chunk again (it is looked up, not assumed), and its restore is whole.
            JsonElement again = await CreateBackupAsync(gateway, repo, "vm");
            Assert.Equal(1, again.GetProperty("chunksNew").GetInt64());
            await AssertSameAsync(gateway, state, await RestoreAsync(gateway, repo, again.GetProperty("id").GetString()!, work.FullName));

            // Errors, not stack traces: an unknown export, an unknown backup, a missing repository.
            ToolResult missing = await BackupCliAsync(gateway, "create", "nope", "--repo", repo, "--nbd", $"127.0.0.1:{gateway.NbdPort}");
            Assert.Equal(1, missing.ExitCode);
            Assert.Contains("no export 'nope'", missing.Stderr);
            ToolResult unknown = await BackupCliAsync(gateway, "verify", "20260101T000000Z-00000000", "--repo", repo);
            Assert.Equal(1, unknown.ExitCode);
            Assert.Contains("no backup 20260101T000000Z-00000000", unknown.Stderr);
            ToolResult noRepo = await BackupCliAsync(gateway, "list", "--repo", Path.Combine(work.FullName, "absent"));
            Assert.Equal(1, noRepo.ExitCode);
            Assert.Contains("does not exist", noRepo.Stderr);
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }

    [Fact]
    public async Task A_create_that_stopped_before_its_manifest_leaves_no_backup_and_the_rerun_reuses_its_chunks()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-test-");
        try
        {
            string repo = Path.Combine(work.FullName, "repo");
            await CreateExportAsync(gateway, "vm", 64 * MiB);
            await QemuIoAsync(gateway, "vm", [.. Enumerable.Range(0, 8).Select(i => $"write -P {i + 1} {i * 8}M 4M")]);
            JsonElement first = await CreateBackupAsync(gateway, repo, "vm");
            Assert.Equal(8, first.GetProperty("chunksNew").GetInt64());

            // What an interrupted run leaves: its chunks, no manifest (the manifest is the last write).
            File.Delete(Path.Combine(repo, "backups", first.GetProperty("id").GetString() + ".json"));
            ToolResult list = await BackupCliAsync(gateway, "list", "--repo", repo, "--json");
            Assert.True(list.Succeeded, list.Describe());
            Assert.Equal("[]", list.Stdout.Trim());

            JsonElement rerun = await CreateBackupAsync(gateway, repo, "vm");
            Assert.Equal(0, rerun.GetProperty("chunksNew").GetInt64());
            Assert.Equal(8, rerun.GetProperty("chunksReused").GetInt64());
            Assert.Equal(0, rerun.GetProperty("bytesUploaded").GetInt64());
            string state = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state.img"));
            await AssertSameAsync(gateway, state, await RestoreAsync(gateway, repo, rerun.GetProperty("id").GetString()!, work.FullName));
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }
}
