using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Backup;

/// <summary>
/// <c>gateway backup create</c> killed with SIGKILL at random moments (counted from its lease
/// marker's appearance) against a real gateway:
/// the repository stays consistent after every kill (<c>backup check</c>), and the next complete
/// run skips the chunks the killed runs stored and restores byte-exact.
/// </summary>
public sealed class BackupKillTests
{
    private const long MiB = 1 << 20;
    private const long DiskSize = 512 * MiB;
    private const int ChunkSize = 4 << 20;
    private const int Kills = 10;

    private static Task<ToolResult> BackupCliAsync(GatewayProcess gateway, params string[] args) =>
        Tool.RunAsync(GatewayProcess.DotnetHost, [GatewayProcess.GatewayDll, "backup", .. args], timeout: TimeSpan.FromMinutes(3),
            check: false, workingDirectory: gateway.DataDirectory, context: gateway.Describe);

    private static async Task<JsonElement> JsonOfAsync(Task<ToolResult> run, GatewayProcess gateway)
    {
        ToolResult result = await run;
        Assert.True(result.Succeeded, result.Describe() + "\n" + gateway.Describe());
        using JsonDocument document = JsonDocument.Parse(result.Stdout);
        return document.RootElement.Clone();
    }

    private static int ChunkFiles(string repo) =>
        Directory.Exists(Path.Combine(repo, "chunks")) ? Directory.EnumerateFiles(Path.Combine(repo, "chunks"), "*", SearchOption.AllDirectories)
            .Count(f => !Path.GetFileName(f).StartsWith(".tmp-", StringComparison.Ordinal)) : 0;

    private static string[] Markers(string repo) =>
        Directory.Exists(Path.Combine(repo, "locks")) ? [.. Directory.EnumerateFiles(Path.Combine(repo, "locks"), "backup-*.json")] : [];

    [Fact]
    public async Task A_create_killed_at_random_moments_leaves_a_consistent_repository_and_the_complete_run_reuses_what_the_killed_runs_stored()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        DirectoryInfo work = Directory.CreateTempSubdirectory("backup-kill-");
        try
        {
            string repo = Path.Combine(work.FullName, "repo");
            string nbd = $"127.0.0.1:{gateway.NbdPort}";
            foreach ((string name, long size) in new[] { ("seed", 16 * MiB), ("big", DiskSize) })
            {
                using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", new { name, size });
                Assert.True(response.StatusCode == HttpStatusCode.Created, $"creating {name}: {await response.Content.ReadAsStringAsync()}");
            }

            // The repository exists before the first kill (a kill before repository.json is a
            // different story), with a backup of another export whose chunks must survive.
            await gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri("seed"), "-c", "write -P 0x5e 0 4M", "-c", "write -P 0x5f 4M 4M"]);
            await JsonOfAsync(BackupCliAsync(gateway, "create", "seed", "--repo", repo, "--nbd", nbd, "--no-bitmap", "--json"), gateway);
            int seedChunks = ChunkFiles(repo);
            Assert.Equal(2, seedChunks);

            // 512 MiB of random data: every chunk is data, none compresses, a backup takes seconds.
            string source = Path.Combine(work.FullName, "source.img");
            await using (FileStream file = File.Create(source))
            {
                byte[] block = new byte[MiB];
                var random = new Random(20);
                for (long written = 0; written < DiskSize; written += block.Length)
                {
                    random.NextBytes(block);
                    await file.WriteAsync(block);
                }
            }
            await gateway.RunAsync("nbdcopy", [source, gateway.NbdUri("big")], timeout: TimeSpan.FromMinutes(3));

            int seed = Environment.TickCount;
            var moments = new Random(seed);
            var log = new List<string>();
            int killedMidway = 0;
            for (int run = 0; run < Kills; run++)
            {
                int delay = moments.Next(100, 1501);
                var start = new ProcessStartInfo(GatewayProcess.DotnetHost)
                {
                    WorkingDirectory = gateway.DataDirectory,
                    RedirectStandardOutput = true,
                    RedirectStandardError = true,
                };
                foreach (string arg in new[] { GatewayProcess.GatewayDll, "backup", "create", "big", "--repo", repo, "--nbd", nbd, "--no-bitmap", "--json" })
                {
                    start.ArgumentList.Add(arg);
                }
                string[] markers = Markers(repo);
                using Process backup = Process.Start(start)!;
                Task<string> stdout = backup.StandardOutput.ReadToEndAsync(), stderr = backup.StandardError.ReadToEndAsync();
                // The moment counts from the backup's start proper, its lease marker (a loaded
                // machine can take seconds to start a process), not from the process's start.
                for (int poll = 0; poll < 600 && !backup.HasExited && Markers(repo).Except(markers).FirstOrDefault() is null; poll++)
                {
                    await Task.Delay(50);
                }
                await Task.Delay(delay);
                bool alive = !backup.HasExited;
                if (alive)
                {
                    backup.Kill(); // SIGKILL: no finally blocks, no lease release, temp files stay
                    killedMidway++;
                }
                using (var exited = new CancellationTokenSource(TimeSpan.FromMinutes(2)))
                {
                    await backup.WaitForExitAsync(exited.Token);
                }
                log.Add($"run {run}: {(alive ? "killed" : $"exited {backup.ExitCode} ({(await stderr).Trim()})")} after {delay} ms, {ChunkFiles(repo) - seedChunks} chunks of big stored");

                ToolResult check = await BackupCliAsync(gateway, "check", "--repo", repo, "--json");
                Assert.True(check.Succeeded, $"seed {seed}\n{string.Join("\n", log)}\n{check.Describe()}");
                using JsonDocument report = JsonDocument.Parse(check.Stdout);
                Assert.True(report.RootElement.GetProperty("ok").GetBoolean(), check.Stdout);
                _ = await stdout;
            }
            string history = $"seed {seed}\n{string.Join("\n", log)}";
            // Most runs must really be cut off half-way, or this tests nothing.
            Assert.True(killedMidway >= Kills / 2, history);
            int stored = ChunkFiles(repo) - seedChunks;
            Assert.True(stored > 0, "the killed runs stored no chunk: " + history);

            JsonElement complete = await JsonOfAsync(BackupCliAsync(gateway, "create", "big", "--repo", repo, "--nbd", nbd, "--no-bitmap", "--json"), gateway);
            long chunks = DiskSize / ChunkSize;
            Assert.Equal(chunks, complete.GetProperty("chunksNew").GetInt64() + complete.GetProperty("chunksReused").GetInt64());
            // Every chunk a killed run stored is skipped (random data: no chunk repeats), so less is uploaded than a cold backup's whole disk.
            Assert.True(complete.GetProperty("chunksReused").GetInt64() == stored, $"{stored} chunks stored before:\n{complete}\n{history}");
            Assert.Equal((long)stored * ChunkSize, complete.GetProperty("bytesDeduplicated").GetInt64());
            Assert.True(complete.GetProperty("bytesUploaded").GetInt64() < DiskSize, $"{complete}\n{history}");

            string restored = Path.Combine(work.FullName, "restored.img");
            ToolResult restore = await BackupCliAsync(gateway, "restore", complete.GetProperty("id").GetString()!, "--repo", repo, "--to-file", restored);
            Assert.True(restore.Succeeded, restore.Describe());
            ToolResult cmp = await gateway.RunAsync("cmp", [source, restored], check: false);
            Assert.True(cmp.Succeeded, cmp.Describe());

            JsonElement final = await JsonOfAsync(BackupCliAsync(gateway, "check", "--repo", repo, "--read-data", "--json"), gateway);
            Assert.True(final.GetProperty("ok").GetBoolean(), final.ToString());
            Assert.Equal(chunks + seedChunks, final.GetProperty("chunksReferenced").GetInt64());
            await gateway.StopAsync();
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }
}
