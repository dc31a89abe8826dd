using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Backup;
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

    private static async Task<JsonElement> CreateBackupAsync(GatewayProcess gateway, string repo, string export, params string[] more)
    {
        ToolResult result = await BackupCliAsync(gateway, ["create", export, "--repo", repo, "--nbd", $"127.0.0.1:{gateway.NbdPort}", "--admin", gateway.AdminUri.ToString(), "--json", .. more]);
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

            // 1 MiB changed: the bitmap marks one chunk, which alone is read; one new chunk, little uploaded.
            await QemuIoAsync(gateway, "vm", "write -P 0x66 2M 1M");
            JsonElement second = await CreateBackupAsync(gateway, repo, "vm");
            string secondId = second.GetProperty("id").GetString()!;
            string state2 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state2.img"));
            Assert.True(second.GetProperty("incremental").GetBoolean(), second.ToString());
            // Only the dirty megabyte is read from the export; the chunk's other 3 MiB come from the previous backup's chunk.
            Assert.Equal(1 * MiB, second.GetProperty("bytesRead").GetInt64());
            Assert.Equal(3 * MiB, second.GetProperty("bytesFromPrevious").GetInt64());
            Assert.Equal(1, second.GetProperty("chunksNew").GetInt64());
            Assert.Equal(63, second.GetProperty("chunksUnchanged").GetInt64());
            Assert.True(second.GetProperty("bytesUploaded").GetInt64() < MiB / 4, second.ToString());

            // Without the bitmap everything allocated is read again, and the unchanged chunks deduplicate.
            JsonElement untracked = await CreateBackupAsync(gateway, repo, "vm", "--no-bitmap");
            Assert.False(untracked.GetProperty("incremental").GetBoolean(), untracked.ToString());
            Assert.Equal(0, untracked.GetProperty("chunksNew").GetInt64());
            Assert.Equal(4, untracked.GetProperty("chunksReused").GetInt64());
            Assert.Equal(4 * 4 * MiB, untracked.GetProperty("bytesDeduplicated").GetInt64());
            File.Delete(Path.Combine(repo, "backups", untracked.GetProperty("id").GetString() + ".json"));
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

            // qcow2 through qemu-nbd: qemu-img compares it with the export's copy, and the holes stay unallocated clusters.
            string qcow2 = Path.Combine(work.FullName, "second.qcow2");
            ToolResult toQcow2 = await BackupCliAsync(gateway, "restore", secondId, "--repo", repo, "--to-file", qcow2, "--json");
            Assert.True(toQcow2.Succeeded, toQcow2.Describe());
            ToolResult info = await gateway.RunAsync("qemu-img", ["info", "--output=json", qcow2]);
            using (JsonDocument image = JsonDocument.Parse(info.Stdout))
            {
                Assert.Equal("qcow2", image.RootElement.GetProperty("format").GetString());
                Assert.Equal(DiskSize, image.RootElement.GetProperty("virtual-size").GetInt64());
                Assert.True(image.RootElement.GetProperty("actual-size").GetInt64() <= 12 * MiB, info.Stdout);
            }
            ToolResult compare = await gateway.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", state2, qcow2], check: false);
            Assert.True(compare.Succeeded, compare.Describe());
            ToolResult asRaw = await BackupCliAsync(gateway, "restore", firstId, "--repo", repo, "--to-file", qcow2, "--format", "raw");
            Assert.True(asRaw.Succeeded, asRaw.Describe());
            await AssertSameAsync(gateway, state1, qcow2);
            Assert.Empty(Directory.EnumerateFiles(work.FullName, ".restore-*"));

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

            // The next backup (incremental: nothing changed) stores the chunk again: chunks it takes
            // from the previous manifest are looked up, not assumed, and its restore is whole.
            JsonElement again = await CreateBackupAsync(gateway, repo, "vm");
            Assert.True(again.GetProperty("incremental").GetBoolean(), again.ToString());
            Assert.Equal(1, again.GetProperty("chunksNew").GetInt64());
            Assert.Contains("missing", Assert.Single(again.GetProperty("warnings").EnumerateArray()).GetString());
            await AssertSameAsync(gateway, state, await RestoreAsync(gateway, repo, again.GetProperty("id").GetString()!, work.FullName));

            // Errors, not stack traces: an unknown export, an unknown backup, a missing repository.
            ToolResult missing = await BackupCliAsync(gateway, "create", "nope", "--repo", repo, "--nbd", $"127.0.0.1:{gateway.NbdPort}", "--no-bitmap");
            Assert.Equal(1, missing.ExitCode);
            Assert.Contains("no export 'nope'", missing.Stderr);
            missing = await BackupCliAsync(gateway, "create", "nope", "--repo", repo, "--nbd", $"127.0.0.1:{gateway.NbdPort}", "--admin", gateway.AdminUri.ToString());
            Assert.Equal(1, missing.ExitCode);
            Assert.Contains("export 'nope'", missing.Stderr);
            Assert.Contains("HTTP 404", missing.Stderr);
            missing = await BackupCliAsync(gateway, "create", "vm", "--repo", repo, "--nbd", $"127.0.0.1:{gateway.NbdPort}", "--admin", $"127.0.0.1:{GatewayProcess.FreePort()}");
            Assert.Equal(1, missing.ExitCode);
            Assert.Contains("cannot reach the gateway admin API", missing.Stderr);
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

    private static async Task<string[]> BitmapNamesAsync(GatewayProcess gateway, string export)
    {
        using JsonDocument bitmaps = JsonDocument.Parse(await gateway.Http.GetStringAsync($"v1/exports/{export}/bitmaps"));
        return [.. bitmaps.RootElement.EnumerateArray().Select(b => b.GetProperty("name").GetString()!).Order(StringComparer.Ordinal)];
    }

    [Fact]
    public async Task An_incremental_reads_only_the_chunks_the_bitmap_marks_and_restores_byte_exact_with_writes_trims_and_zeroes()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-test-");
        try
        {
            string repo = Path.Combine(work.FullName, "repo");
            await CreateExportAsync(gateway, "vm", DiskSize);
            await QemuIoAsync(gateway, "vm", [.. Enumerable.Range(0, 16).Select(i => $"write -P {i + 1} {i * 4}M 4M")]); // chunks 0-15

            JsonElement first = await CreateBackupAsync(gateway, repo, "vm");
            string firstId = first.GetProperty("id").GetString()!;
            string state1 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state1.img"));
            Assert.False(first.GetProperty("incremental").GetBoolean(), first.ToString());
            Assert.Contains("no earlier backup", first.GetProperty("fullBecause").GetString());
            Assert.Equal(DiskSize, first.GetProperty("bytesDirty").GetInt64());
            // The bitmap is named after the repository (its id) and the backup.
            using JsonDocument info = JsonDocument.Parse(await File.ReadAllBytesAsync(Path.Combine(repo, "repository.json")));
            string owned = $"backup.{info.RootElement.GetProperty("id").GetString()}.";
            Assert.Matches("^backup\\.[0-9a-f]{8}\\.$", owned);
            Assert.Equal(owned + firstId, first.GetProperty("bitmap").GetString());
            Assert.Equal([owned + firstId], await BitmapNamesAsync(gateway, "vm"));

            // A write inside chunk 2, zeroes over chunk 5, a trim of chunk 8, new data in chunk 50 (a hole before).
            await QemuIoAsync(gateway, "vm", "write -P 0x99 9M 64k", "write -z 20M 4M", "discard 32M 4M", "write -P 0xaa 200M 1M");
            JsonElement second = await CreateBackupAsync(gateway, repo, "vm");
            string secondId = second.GetProperty("id").GetString()!;
            string state2 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state2.img"));
            Assert.True(second.GetProperty("incremental").GetBoolean(), second.ToString());
            Assert.Equal(firstId, second.GetProperty("basedOn").GetString());
            Assert.Equal(4 * 4 * MiB, second.GetProperty("bytesDirty").GetInt64());
            Assert.Equal(60, second.GetProperty("chunksUnchanged").GetInt64());
            // Of chunks 2 and 50 only the dirty granules (64 KiB) are read, the rest comes from the
            // previous backup; the zeroed and the trimmed chunk are known from base:allocation alone.
            Assert.Equal(64 * 1024 + MiB, second.GetProperty("bytesRead").GetInt64());
            Assert.Equal(2 * 4 * MiB - 64 * 1024 - MiB, second.GetProperty("bytesFromPrevious").GetInt64());
            Assert.Equal(2, second.GetProperty("chunksNew").GetInt64());
            Assert.Equal([owned + secondId], await BitmapNamesAsync(gateway, "vm"));

            await AssertSameAsync(gateway, state2, await RestoreAsync(gateway, repo, secondId, work.FullName));
            await AssertSameAsync(gateway, state1, await RestoreAsync(gateway, repo, firstId, work.FullName));
            foreach (string id in new[] { firstId, secondId })
            {
                ToolResult compare = await gateway.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", id == firstId ? state1 : state2, Path.Combine(work.FullName, id + ".img")], check: false);
                Assert.True(compare.Succeeded, compare.Describe());
            }

            // The export grows: the new chunks are read (and are holes), the old ones stay incremental.
            using (HttpResponseMessage grown = await gateway.Http.PostAsJsonAsync("v1/exports/vm/resize", new { size = DiskSize + 8 * MiB }))
            {
                Assert.True(grown.IsSuccessStatusCode, await grown.Content.ReadAsStringAsync());
            }
            // What a create killed before its manifest leaves: its bitmap. Beside it, another
            // repository's bitmap and a user's. The next create removes only the leftover.
            string leftover = owned + "20261206T000000Z-0badf00d", otherRepository = "backup.0123abcd.20261206T000000Z-0badf00d";
            foreach (string name in new[] { leftover, otherRepository, "mine" })
            {
                using HttpResponseMessage added = await gateway.Http.PostAsJsonAsync("v1/exports/vm/bitmaps", new { name });
                Assert.True(added.IsSuccessStatusCode, await added.Content.ReadAsStringAsync());
            }
            JsonElement third = await CreateBackupAsync(gateway, repo, "vm");
            Assert.True(third.GetProperty("incremental").GetBoolean(), third.ToString());
            Assert.Equal(new[] { owned + third.GetProperty("id").GetString(), otherRepository, "mine" }.Order(StringComparer.Ordinal), await BitmapNamesAsync(gateway, "vm"));
            Assert.Contains(third.GetProperty("warnings").EnumerateArray(), w => w.GetString()!.Contains($"removed bitmap '{leftover}'"));
            foreach (string name in new[] { otherRepository, "mine" })
            {
                using HttpResponseMessage removed = await gateway.Http.DeleteAsync($"v1/exports/vm/bitmaps/{name}");
                Assert.True(removed.IsSuccessStatusCode, await removed.Content.ReadAsStringAsync());
            }
            Assert.Equal(DiskSize + 8 * MiB, third.GetProperty("bytesTotal").GetInt64());
            Assert.Equal(2 * 4 * MiB, third.GetProperty("bytesDirty").GetInt64());
            Assert.Equal(0, third.GetProperty("bytesRead").GetInt64());
            string state3 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state3.img"));
            await AssertSameAsync(gateway, state3, await RestoreAsync(gateway, repo, third.GetProperty("id").GetString()!, work.FullName));

            // Someone removes the backup's bitmap: the next backup cannot trust what it would say, so it is full and says why.
            string thirdBitmap = third.GetProperty("bitmap").GetString()!;
            using (HttpResponseMessage removed = await gateway.Http.DeleteAsync($"v1/exports/vm/bitmaps/{thirdBitmap}"))
            {
                Assert.True(removed.IsSuccessStatusCode, await removed.Content.ReadAsStringAsync());
            }
            await QemuIoAsync(gateway, "vm", "write -P 0xbb 100M 4k");
            JsonElement fourth = await CreateBackupAsync(gateway, repo, "vm");
            Assert.False(fourth.GetProperty("incremental").GetBoolean(), fourth.ToString());
            Assert.Contains($"'{thirdBitmap}'", fourth.GetProperty("fullBecause").GetString());
            Assert.Contains("gone", fourth.GetProperty("fullBecause").GetString());
            string state4 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state4.img"));
            await AssertSameAsync(gateway, state4, await RestoreAsync(gateway, repo, fourth.GetProperty("id").GetString()!, work.FullName));

            // A failed backup (no such export) leaves no bitmap behind; a bad prefix is refused before anything.
            ToolResult badPrefix = await BackupCliAsync(gateway, "create", "vm", "--repo", repo, "--nbd", $"127.0.0.1:{gateway.NbdPort}", "--admin", gateway.AdminUri.ToString(), "--bitmap", ".x");
            Assert.Equal(2, badPrefix.ExitCode);
            Assert.Equal([fourth.GetProperty("bitmap").GetString()!], await BitmapNamesAsync(gateway, "vm"));
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }

    /// <summary>A test's progress hook: runs <paramref name="action"/> once, on the first report after a chunk was read.</summary>
    private sealed class OnFirstChunk(Action action) : IProgress<Gateway.Backup.BackupProgress>
    {
        private int _done;

        public void Report(Gateway.Backup.BackupProgress value)
        {
            if (value.BytesRead > 0 && Interlocked.Exchange(ref _done, 1) == 0)
            {
                action();
            }
        }
    }

    [Fact]
    public async Task Writes_that_land_while_a_backup_reads_are_in_the_next_backup()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-test-");
        try
        {
            const long size = 64 * MiB;
            int chunk = (int)(4 * MiB);
            await CreateExportAsync(gateway, "vm", size);
            await QemuIoAsync(gateway, "vm", "write -P 0x01 0 64M");
            var repository = await Gateway.Backup.BackupRepository.OpenFolderAsync(Path.Combine(work.FullName, "repo"), create: true, CancellationToken.None);
            var tracking = new Gateway.Backup.BackupTracking(new Gateway.Host.BackupAdminClient(gateway.AdminUri));
            var nbd = new IPEndPoint(IPAddress.Loopback, gateway.NbdPort);

            // One chunk at a time, in order: once chunk 0 is read, a guest writes to chunk 0 (already
            // read: this backup keeps the old bytes) and to chunk 15 (not yet read: this backup has the new).
            var creator = new Gateway.Backup.BackupCreator(repository)
            {
                Parallelism = 1,
                Progress = new OnFirstChunk(() => QemuIoAsync(gateway, "vm", "write -P 0x02 0 4k", "write -P 0x03 60M 4k").GetAwaiter().GetResult()),
            };
            Gateway.Backup.BackupSummary first = await creator.CreateAsync(nbd, "vm", tracking, CancellationToken.None);
            string after = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "after.img"));

            string restored1 = Path.Combine(work.FullName, "first.img");
            await new BackupRestore(repository).ToFileAsync(first.Id, restored1, RestoreFormat.Raw, CancellationToken.None);
            byte[] one = await File.ReadAllBytesAsync(restored1), now = await File.ReadAllBytesAsync(after);
            Assert.True(one.AsSpan(0, chunk).IndexOfAnyExcept((byte)0x01) < 0, "the first backup's chunk 0 should be as it was when it was read");
            Assert.True(one.AsSpan(15 * chunk, chunk).SequenceEqual(now.AsSpan(15 * chunk, chunk)), "the first backup's chunk 15 should hold the write made before it was read");
            Assert.Equal(0x02, now[0]);

            // The next backup reads both written chunks again (the bitmap added at the first's start marked them) and equals the disk.
            Gateway.Backup.BackupSummary second = await new Gateway.Backup.BackupCreator(repository).CreateAsync(nbd, "vm", tracking, CancellationToken.None);
            Assert.True(second.Incremental, second.ToString());
            Assert.Equal(2 * chunk, second.BytesDirty);
            string restored2 = Path.Combine(work.FullName, "second.img");
            await new BackupRestore(repository).ToFileAsync(second.Id, restored2, RestoreFormat.Raw, CancellationToken.None);
            await AssertSameAsync(gateway, after, restored2);
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }

    [Fact]
    public async Task Restore_to_a_new_export_and_verify_against_the_live_export_catch_a_corrupt_chunk_and_a_byte_the_bitmap_missed()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-test-");
        try
        {
            string repo = Path.Combine(work.FullName, "repo");
            string nbd = $"127.0.0.1:{gateway.NbdPort}", admin = gateway.AdminUri.ToString();
            await CreateExportAsync(gateway, "vm", 64 * MiB);
            await QemuIoAsync(gateway, "vm", [.. Enumerable.Range(0, 8).Select(i => $"write -P {i + 1} {i * 4}M 4M"), "write -z 4M 1M", "discard 8M 4M"]);
            string id = (await CreateBackupAsync(gateway, repo, "vm")).GetProperty("id").GetString()!;
            string state = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state.img"));

            // Into a new export, sparse, equal to the disk at the backup.
            ToolResult restored = await BackupCliAsync(gateway, "restore", id, "--repo", repo, "--to-export", "copy", "--nbd", nbd, "--admin", admin, "--json");
            Assert.True(restored.Succeeded, restored.Describe());
            await AssertSameAsync(gateway, state, await CopyAsync(gateway, "copy", Path.Combine(work.FullName, "copy.img")));
            ToolResult map = await gateway.RunAsync("nbdinfo", ["--map", gateway.NbdUri("copy")]);
            Assert.Contains("hole", map.Stdout); // the trimmed chunk and the rest of the disk were not written
            ToolResult exists = await BackupCliAsync(gateway, "restore", id, "--repo", repo, "--to-export", "copy", "--nbd", nbd, "--admin", admin);
            Assert.Equal(1, exists.ExitCode);
            Assert.Contains("'copy'", exists.Stderr);
            ToolResult small = await BackupCliAsync(gateway, "restore", id, "--repo", repo, "--to-export", "small", "--size", "1M", "--nbd", nbd, "--admin", admin);
            Assert.Equal(2, small.ExitCode);
            ToolResult bigger = await BackupCliAsync(gateway, "restore", id, "--repo", repo, "--to-export", "bigger", "--size", "80M", "--nbd", nbd, "--admin", admin);
            Assert.True(bigger.Succeeded, bigger.Describe());
            Assert.Equal((80 * MiB).ToString(System.Globalization.CultureInfo.InvariantCulture), (await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri("bigger")])).Stdout.Trim());

            // A guest write is marked by the bitmap: verify compares only the rest, and it matches.
            await QemuIoAsync(gateway, "vm", "write -P 0x77 13M 4k");
            ToolResult clean = await BackupCliAsync(gateway, "verify", id, "--repo", repo, "--against-export", "vm", "--nbd", nbd, "--admin", admin, "--json");
            Assert.True(clean.Succeeded, clean.Describe());
            using (JsonDocument report = JsonDocument.Parse(clean.Stdout))
            {
                JsonElement live = report.RootElement.GetProperty("live");
                Assert.Equal(4 * MiB, live.GetProperty("bytesChanged").GetInt64());
                Assert.Equal(60 * MiB, live.GetProperty("bytesCompared").GetInt64());
                Assert.Empty(live.GetProperty("mismatches").EnumerateArray());
            }

            // A byte changed behind the gateway's back (in the export's file, so no bitmap sees it), in a clean chunk.
            // The file the gateway made for an export without a path (BackendFactory: DATA/exports/NAME.img).
            string file = Path.Combine(gateway.DataDirectory, "exports", "vm.img");
            Assert.True(File.Exists(file), $"no export file {file}");
            long flipped = 5 * MiB + 123;
            await using (FileStream stream = new(file, FileMode.Open, FileAccess.ReadWrite))
            {
                stream.Position = flipped;
                int old = stream.ReadByte();
                stream.Position = flipped;
                stream.WriteByte((byte)(old ^ 0x40));
            }
            ToolResult missed = await BackupCliAsync(gateway, "verify", id, "--repo", repo, "--against-export", "vm", "--nbd", nbd, "--admin", admin);
            Assert.Equal(1, missed.ExitCode);
            Assert.Contains($"disk offsets {4 * MiB}+{4 * MiB}", missed.Stderr);
            Assert.Contains($"1 bytes differ", missed.Stderr);
            Assert.Contains($"first at disk offset {flipped}", missed.Stderr);

            // A corrupt stored chunk is reported too (the chunk of offset 0: all 0x01), with its offset.
            string sha = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(Enumerable.Repeat((byte)0x01, (int)(4 * MiB)).ToArray()));
            string chunk = Path.Combine(repo, "chunks", sha[..2], sha);
            byte[] bytes = File.ReadAllBytes(chunk);
            bytes[bytes.Length / 2] ^= 0xff;
            File.WriteAllBytes(chunk, bytes);
            ToolResult corrupt = await BackupCliAsync(gateway, "verify", id, "--repo", repo, "--against-export", "vm", "--nbd", nbd, "--admin", admin);
            Assert.Equal(1, corrupt.ExitCode);
            Assert.Contains($"chunk {sha}", corrupt.Stderr);
            Assert.Contains("disk offsets 0+", corrupt.Stderr);

            // Only a backup whose bitmap is still on the export can be checked against it.
            JsonElement untracked = await CreateBackupAsync(gateway, repo, "vm", "--no-bitmap");
            ToolResult noBitmap = await BackupCliAsync(gateway, "verify", untracked.GetProperty("id").GetString()!, "--repo", repo, "--against-export", "vm", "--nbd", nbd, "--admin", admin);
            Assert.Equal(1, noBitmap.ExitCode);
            Assert.Contains("without a bitmap", noBitmap.Stderr);
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }

    [Fact]
    public async Task A_4_GiB_export_with_1_percent_changed_restores_full_and_incremental_into_new_exports_byte_equal()
    {
        const long size = 4L << 30;
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-test-");
        try
        {
            string repo = Path.Combine(work.FullName, "repo");
            string nbd = $"127.0.0.1:{gateway.NbdPort}", admin = gateway.AdminUri.ToString();
            await CreateExportAsync(gateway, "vm", size);
            // A sparse disk: 1 MiB of data at the start of every 64 MiB (64 MiB in all).
            await QemuIoAsync(gateway, "vm", [.. Enumerable.Range(0, 64).Select(i => $"write -P {(i % 250) + 1} {i * 64}M 1M")]);
            JsonElement full = await CreateBackupAsync(gateway, repo, "vm");
            string state1 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state1.img"));

            // 1 % (41 MiB) changed as a guest would: writes, write-zeroes and trims of 64 KiB to 1 MiB at fixed random places.
            var random = new Random(20);
            var commands = new List<string>();
            for (long changed = 0; changed < size / 100;)
            {
                long length = new[] { 64L << 10, 256L << 10, 1L << 20 }[random.Next(3)];
                long offset = random.NextInt64(0, size - length) / 65536 * 65536;
                double kind = random.NextDouble();
                commands.Add(kind < 0.6 ? $"write -P {random.Next(1, 255)} {offset} {length}" : kind < 0.8 ? $"write -z {offset} {length}" : $"discard {offset} {length}");
                changed += length;
            }
            await QemuIoAsync(gateway, "vm", [.. commands]);
            JsonElement incremental = await CreateBackupAsync(gateway, repo, "vm");
            Assert.True(incremental.GetProperty("incremental").GetBoolean(), incremental.ToString());
            Assert.True(incremental.GetProperty("bytesRead").GetInt64() <= size / 100 + (4L << 20), incremental.ToString());
            string state2 = await CopyAsync(gateway, "vm", Path.Combine(work.FullName, "state2.img"));

            foreach ((JsonElement backup, string state, string target) in new[] { (full, state1, "restored-full"), (incremental, state2, "restored-incremental") })
            {
                ToolResult restore = await BackupCliAsync(gateway, "restore", backup.GetProperty("id").GetString()!, "--repo", repo, "--to-export", target, "--nbd", nbd, "--admin", admin);
                Assert.True(restore.Succeeded, restore.Describe());
                ToolResult compare = await gateway.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", state, gateway.NbdUri(target)], check: false);
                Assert.True(compare.Succeeded, compare.Describe());
                await AssertSameAsync(gateway, state, await CopyAsync(gateway, target, Path.Combine(work.FullName, target + ".img")));
            }
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }
}
