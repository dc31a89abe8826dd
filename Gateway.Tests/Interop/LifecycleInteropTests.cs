using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>Start, SIGTERM, kill -9 and restart of the real gateway process: each test has its own.</summary>
public sealed class LifecycleInteropTests
{
    private const long MiB = 1 << 20;

    private static async Task CreateExportAsync(GatewayProcess gateway, string name, long size, string description)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", new { name, size, description });
        Assert.True(response.StatusCode == HttpStatusCode.Created,
            $"creating {name} answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
    }

    private static Task<ToolResult> QemuIoAsync(GatewayProcess gateway, string export, params string[] commands) =>
        gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })]);

    [Fact]
    public async Task Export_and_its_data_survive_sigterm_and_restart_on_the_same_data_dir()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, "durable", 64 * MiB, "survives restarts");
        await QemuIoAsync(gateway, "durable", "write -P 0x5a 0 1M", "write -P 0xa5 32M 64k", "write -P 0x3c 65532k 4k");

        await gateway.StopAsync(); // SIGTERM, exit code 0
        await gateway.RestartAsync();

        ToolResult list = await gateway.CliAsync("export", "list");
        Assert.True(list.Succeeded, list.Describe());
        string row = list.Stdout.Split('\n').SingleOrDefault(l => l.StartsWith("durable ", StringComparison.Ordinal))
            ?? throw new Xunit.Sdk.XunitException($"export list after restart lacks 'durable'\n{list.Stdout}\n{gateway.Describe()}");
        Assert.Contains("64 MiB", row);
        Assert.Contains("survives restarts", row);
        Assert.Contains(list.Stdout.Split('\n'), l => l.StartsWith("disk0 ", StringComparison.Ordinal));
        await QemuIoAsync(gateway, "durable",
            "read -P 0x5a 0 1M", "read -P 0 1M 31M", "read -P 0xa5 32M 64k", "read -P 0 32832k 32700k", "read -P 0x3c 65532k 4k");
    }

    [Fact]
    public async Task Operator_akka_settings_apply_to_a_standalone_gateway_over_its_idle_friendly_scheduler_tick()
    {
        // Gateway:Akka:Hocon was read only in cluster mode: a standalone gateway ignored it.
        string config = Path.Combine(Directory.CreateTempSubdirectory("gateway-hocon-").FullName, "gateway.json");
        await File.WriteAllTextAsync(config, """{ "Gateway": { "Akka": { "Hocon": "akka.log-config-on-start = on" } } }""");
        await using GatewayProcess gateway = await GatewayProcess.StartAsync(extraArgs: ["--config", config]);

        // log-config-on-start prints the whole effective configuration once the system starts.
        Assert.True(gateway.Output.Contains("log-config-on-start : on", StringComparison.Ordinal),
            $"the operator's setting did not reach Akka\n{gateway.Describe()}");
        Assert.Matches(@"scheduler : \{\s+tick-duration : 50ms", gateway.Output);
    }

    [Fact]
    public async Task Export_and_flushed_data_survive_kill_9_and_restart()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, "crashy", 16 * MiB, "survives kill -9");
        await QemuIoAsync(gateway, "crashy", "write -P 0x77 1M 1M", "flush");

        gateway.Kill();
        await gateway.RestartAsync();

        ToolResult show = await gateway.CliAsync("export", "show", "crashy");
        Assert.True(show.Succeeded, show.Describe());
        Assert.Contains("survives kill -9", show.Stdout);
        await QemuIoAsync(gateway, "crashy", "read -P 0x77 1M 1M", "read -P 0 0 1M");
    }

    [Fact]
    public async Task Removed_export_stays_removed_after_restart()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, "short-lived", 1 * MiB, "removed before restart");
        ToolResult remove = await gateway.CliAsync("export", "remove", "short-lived");
        Assert.True(remove.Succeeded, remove.Describe());

        await gateway.StopAsync();
        await gateway.RestartAsync();

        ToolResult list = await gateway.CliAsync("export", "list");
        Assert.True(list.Succeeded, list.Describe());
        Assert.DoesNotContain("short-lived", list.Stdout);
        Assert.Contains(list.Stdout.Split('\n'), l => l.StartsWith("disk0 ", StringComparison.Ordinal));
    }

    /// <summary>
    /// The host's defaults watched the working directory and every folder under it (inotify) for
    /// appsettings.json; the data directory is under it, so every write to an export's file
    /// raised an event the gateway read and checked (0.6 per 4 KiB random write). No folder of
    /// the data directory may be watched.
    /// </summary>
    [Fact]
    public async Task The_gateway_does_not_watch_its_data_directory_so_writes_to_exports_raise_no_file_events()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await QemuIoAsync(gateway, "disk0", "write -P 0x42 0 64k");

        ToolResult folders = await gateway.RunAsync("find", [gateway.DataDirectory, "-type", "d", "-exec", "stat", "-c", "%i %n", "{}", "+"]);
        Dictionary<ulong, string> dataFolders = folders.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(line => line.Split(' ', 2))
            .ToDictionary(parts => ulong.Parse(parts[0], System.Globalization.CultureInfo.InvariantCulture), parts => parts[1]);
        Assert.Contains(gateway.DataDirectory, dataFolders.Values);
        var watched = new List<string>();
        foreach (string info in Directory.EnumerateFiles($"/proc/{gateway.ProcessId}/fdinfo"))
        {
            string text;
            try
            {
                text = await File.ReadAllTextAsync(info);
            }
            catch (IOException)
            {
                continue; // the descriptor closed meanwhile
            }
            // "inotify wd:1 ino:b720a8 sdev:fe00000 mask:40003c6 ...": one line per watch, the inode in hex.
            foreach (string line in text.Split('\n').Where(l => l.StartsWith("inotify ", StringComparison.Ordinal)))
            {
                string ino = line.Split(' ').Single(f => f.StartsWith("ino:", StringComparison.Ordinal))[4..];
                if (dataFolders.TryGetValue(ulong.Parse(ino, System.Globalization.NumberStyles.HexNumber, System.Globalization.CultureInfo.InvariantCulture), out string? folder))
                {
                    watched.Add(folder);
                }
            }
        }
        Assert.True(watched.Count == 0, $"the gateway watches {string.Join(", ", watched)}\n{gateway.Describe()}");
    }

    [Fact]
    public async Task Sigterm_drains_flushes_and_exits_0_promptly()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await QemuIoAsync(gateway, "disk0", "write -P 0x42 0 64k");

        (int exitCode, TimeSpan elapsed) = await gateway.TerminateAsync();

        Assert.True(exitCode == 0, $"exit code {exitCode} after SIGTERM\n{gateway.Describe()}");
        // Nothing in flight and no client: the drain has nothing to wait for.
        Assert.True(elapsed < TimeSpan.FromSeconds(10), $"SIGTERM took {elapsed.TotalSeconds:F1} s with no clients\n{gateway.Describe()}");
        Assert.DoesNotContain("did not finish draining", gateway.Output);
        Assert.DoesNotContain("Flushing exports failed", gateway.Output);
    }

    [Fact]
    public async Task Sigterm_with_a_client_connected_still_exits_0()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        // A client that keeps its connection busy with small reads until the server closes it.
        string script = Path.Combine(gateway.DataDirectory, "busy_client.py");
        await File.WriteAllTextAsync(script, """
            import sys, time, nbd
            h = nbd.NBD()
            h.connect_uri(sys.argv[1])
            h.pwrite(b"\x99" * 65536, 0)
            print("connected", flush=True)
            try:
                for _ in range(600):
                    time.sleep(0.1)
                    h.pread(512, 0)
            except nbd.Error as e:
                print("server closed:", e, flush=True)
            """);
        var client = new ProcessStartInfo(Tool.Locate("/usr/bin/python3"), [script, gateway.NbdUri("disk0")])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using Process busy = Process.Start(client)!;
        try
        {
            Task<string?> connected = busy.StandardOutput.ReadLineAsync();
            if (await Task.WhenAny(connected, Task.Delay(TimeSpan.FromSeconds(20))) != connected || await connected != "connected")
            {
                busy.Kill();
                Assert.Fail($"the python client did not connect: {await busy.StandardError.ReadToEndAsync()}\n{gateway.Describe()}");
            }
            (int exitCode, TimeSpan elapsed) = await gateway.TerminateAsync(TimeSpan.FromSeconds(45));

            Assert.True(exitCode == 0, $"exit code {exitCode} after SIGTERM with a client connected ({elapsed.TotalSeconds:F1} s)\n{gateway.Describe()}");
            Assert.DoesNotContain("did not finish draining", gateway.Output);
            // The server closed the connection: the client notices and ends.
            Task<string> rest = busy.StandardOutput.ReadToEndAsync();
            Assert.True(await Task.WhenAny(rest, Task.Delay(TimeSpan.FromSeconds(10))) == rest,
                $"the client still runs 10 s after the gateway exited\n{gateway.Describe()}");
            Assert.Contains("server closed", await rest);
        }
        finally
        {
            if (!busy.HasExited)
            {
                busy.Kill();
            }
        }
        // The write the client made before SIGTERM is in the export file.
        await using FileStream file = File.OpenRead(gateway.ExportFile("disk0"));
        byte[] head = new byte[65536];
        await file.ReadExactlyAsync(head);
        Assert.All(head, b => Assert.Equal(0x99, b));
    }

    [Fact]
    public async Task Disk0_is_served_from_the_moment_the_nbd_port_accepts_on_first_start()
    {
        // The listener comment promises "a client that connects is always served". On a first start
        // disk0 is created asynchronously; a client arriving in that window must still get disk0.
        await using GatewayProcess gateway = GatewayProcess.StartUnready();
        var clock = Stopwatch.StartNew();
        while (!GatewayProcess.CanConnect(gateway.NbdPort))
        {
            Assert.True(gateway.IsRunning && clock.Elapsed < GatewayProcess.ReadyTimeout, $"NBD port never accepted\n{gateway.Describe()}");
            await Task.Delay(10);
        }

        ToolResult info = await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri("disk0")], check: false);

        Assert.True(info.Succeeded, $"a client connecting as soon as the NBD port accepts did not get disk0\n{info.Describe()}\n{gateway.Describe()}");
        Assert.Equal((1L << 30).ToString(System.Globalization.CultureInfo.InvariantCulture), info.Stdout.Trim());
    }
}
