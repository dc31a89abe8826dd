using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// The real <c>gateway serve</c> process (gateway.dll from this test's output folder, run with
/// <c>dotnet</c>) on free loopback ports with its own data folder. Its stdout and stderr are kept
/// and put into every failure message, so a red interop test shows what the server said.
/// </summary>
public sealed partial class GatewayProcess : IAsyncDisposable
{
    public static readonly TimeSpan ReadyTimeout = TimeSpan.FromSeconds(30);
    /// <summary>
    /// A guard against a stop that hangs, not a speed test (those set their own deadline): a
    /// graceful stop ends with the exports' fdatasync, which on ext4 (ordered mode) also waits for
    /// other processes' dirty data in the same journal commit, so under CI's parallel tests it can
    /// take many seconds. As long as the gateway's own shutdown timeout.
    /// </summary>
    public static readonly TimeSpan StopTimeout = TimeSpan.FromSeconds(60);

    // Gateways still running when the test host exits (a crashed or aborted run) are killed
    // rather than left listening on loopback.
    private static readonly HashSet<Process> Live = [];

    static GatewayProcess() => AppDomain.CurrentDomain.ProcessExit += (_, _) =>
    {
        lock (Live)
        {
            foreach (Process process in Live.Where(p => !p.HasExited))
            {
                process.Kill(entireProcessTree: true);
            }
        }
    };

    private readonly StringBuilder _log = new();
    private readonly bool _ownsDataDirectory;
    private Process? _process;

    private GatewayProcess(string dataDirectory, bool ownsDataDirectory)
    {
        DataDirectory = dataDirectory;
        _ownsDataDirectory = ownsDataDirectory;
    }

    public string DataDirectory { get; }

    /// <summary>More <c>gateway serve</c> arguments (TLS, Unix sockets, limits).</summary>
    public IReadOnlyList<string> ExtraArgs { get; private set; } = [];

    /// <summary>Variables set for the gateway process, over the test's own.</summary>
    public IReadOnlyDictionary<string, string> ExtraEnvironment { get; private init; } = new Dictionary<string, string>();
    public int NbdPort { get; private set; }
    public int AdminPort { get; private set; }
    public Uri AdminUri => new($"http://127.0.0.1:{AdminPort}/");
    public HttpClient Http { get; private set; } = null!;
    public bool IsRunning => _process is { HasExited: false };

    /// <summary>The running process's id (for a client that kills the gateway itself at a chosen moment).</summary>
    public int ProcessId => _process?.Id ?? throw new InvalidOperationException("the gateway is not started");

    /// <summary>The gateway's stdout and stderr so far (across restarts).</summary>
    public string Output
    {
        get
        {
            lock (_log)
            {
                return _log.ToString();
            }
        }
    }

    public static string GatewayDll
    {
        get
        {
            string dll = Path.Combine(AppContext.BaseDirectory, "gateway.dll");
            if (!File.Exists(dll))
            {
                Assert.Fail($"gateway.dll is not in the test output folder {AppContext.BaseDirectory}; Gateway.Tests must reference Gateway.Host");
            }
            return dll;
        }
    }

    /// <summary>The <c>dotnet</c> host that runs the tests also runs the gateway.</summary>
    public static string DotnetHost
    {
        get
        {
            if (Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host))
            {
                return host;
            }
            if (Environment.ProcessPath is { } self && Path.GetFileNameWithoutExtension(self) == "dotnet")
            {
                return self;
            }
            return "dotnet";
        }
    }

    public string NbdUri(string export) => $"nbd://127.0.0.1:{NbdPort}/{export}";

    /// <summary>Where the gateway keeps an export's data when no path was given.</summary>
    public string ExportFile(string export) => Path.Combine(DataDirectory, "exports", export + ".img");

    /// <summary>
    /// Starts a gateway on a new temporary data folder (or <paramref name="dataDirectory"/>), and
    /// returns once /healthz answers, the NBD port accepts and, on a first start, disk0 exists.
    /// </summary>
    /// <param name="environment">Variables set for the gateway process, over the test's own.</param>
    public static async Task<GatewayProcess> StartAsync(string? dataDirectory = null, IEnumerable<string>? extraArgs = null,
        IReadOnlyDictionary<string, string>? environment = null)
    {
        bool owns = dataDirectory is null;
        dataDirectory ??= Directory.CreateTempSubdirectory("gateway-interop-").FullName;
        var gateway = new GatewayProcess(dataDirectory, owns) { ExtraArgs = [.. extraArgs ?? []], ExtraEnvironment = environment ?? new Dictionary<string, string>() };
        bool firstStart = !File.Exists(Path.Combine(dataDirectory, "gateway.db"));
        await gateway.LaunchAsync(newPorts: true, awaitExport: firstStart ? "disk0" : null);
        return gateway;
    }

    /// <summary>Starts a gateway on a new temporary data folder and returns at once, before it is ready.</summary>
    public static GatewayProcess StartUnready(IEnumerable<string>? extraArgs = null, string? dataDirectory = null)
    {
        var gateway = new GatewayProcess(dataDirectory ?? Directory.CreateTempSubdirectory("gateway-interop-").FullName, ownsDataDirectory: dataDirectory is null)
        {
            ExtraArgs = [.. extraArgs ?? []],
        };
        (gateway.NbdPort, gateway.AdminPort) = (FreePort(), FreePort());
        gateway.Http = new HttpClient { BaseAddress = gateway.AdminUri, Timeout = TimeSpan.FromSeconds(30) };
        gateway.Spawn();
        return gateway;
    }

    /// <summary>Starts the process again on the same data folder and ports (new ports if those were taken).</summary>
    /// <param name="extraArgs">Arguments in place of those of the first start (and of later restarts); null: the same.</param>
    public async Task RestartAsync(IEnumerable<string>? extraArgs = null)
    {
        Assert.False(IsRunning, "RestartAsync needs a stopped gateway");
        if (extraArgs is not null)
        {
            ExtraArgs = [.. extraArgs];
        }
        AppendLog("===== restart =====");
        await LaunchAsync(newPorts: false, awaitExport: null);
    }

    private async Task LaunchAsync(bool newPorts, string? awaitExport)
    {
        for (int attempt = 1; ; attempt++)
        {
            if (newPorts || attempt > 1)
            {
                (NbdPort, AdminPort) = (FreePort(), FreePort());
            }
            Http?.Dispose();
            Http = new HttpClient { BaseAddress = AdminUri, Timeout = TimeSpan.FromSeconds(30) };
            Spawn();
            string? failure = await WaitReadyAsync(awaitExport);
            if (failure is null)
            {
                return;
            }
            // A free port may be taken between our probe and the gateway's bind: try other ports.
            if (attempt < 3 && !IsRunning && Output.Contains("Address already in use", StringComparison.Ordinal))
            {
                AppendLog($"===== ports taken, retrying (attempt {attempt + 1}) =====");
                continue;
            }
            Kill();
            Assert.Fail($"gateway did not become ready: {failure}\n{Describe()}");
        }
    }

    private void Spawn()
    {
        if (_process is not null)
        {
            Assert.True(_process.HasExited, "a gateway process is still running");
            lock (Live)
            {
                Live.Remove(_process);
            }
            _process.Dispose();
        }
        var start = new ProcessStartInfo(DotnetHost)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
            WorkingDirectory = DataDirectory,
        };
        foreach (string arg in new[]
                 {
                     GatewayDll, "serve", "--data", DataDirectory,
                     "--nbd", $"127.0.0.1:{NbdPort}", "--admin", $"127.0.0.1:{AdminPort}",
                 }.Concat(ExtraArgs))
        {
            start.ArgumentList.Add(arg);
        }
        foreach ((string name, string value) in ExtraEnvironment)
        {
            start.Environment[name] = value;
        }
        var process = new Process { StartInfo = start, EnableRaisingEvents = true };
        process.OutputDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                AppendLog(e.Data);
            }
        };
        process.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                AppendLog("[stderr] " + e.Data);
            }
        };
        process.Start();
        lock (Live)
        {
            Live.Add(process);
        }
        process.StandardInput.Close();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        _process = process;
    }

    /// <summary>Null when ready, else why not.</summary>
    private async Task<string?> WaitReadyAsync(string? awaitExport)
    {
        var clock = Stopwatch.StartNew();
        string last = "nothing tried yet";
        while (clock.Elapsed < ReadyTimeout)
        {
            if (!IsRunning)
            {
                return $"the process exited with code {_process!.ExitCode} during startup";
            }
            try
            {
                using HttpResponseMessage health = await Http.GetAsync("healthz");
                if (health.StatusCode != HttpStatusCode.OK)
                {
                    last = $"/healthz answered {(int)health.StatusCode}";
                }
                else if (!CanConnect(NbdPort))
                {
                    last = "the NBD port does not accept connections";
                }
                else if (awaitExport is not null && (await Http.GetAsync($"v1/exports/{awaitExport}")).StatusCode != HttpStatusCode.OK)
                {
                    last = $"export {awaitExport} does not exist yet";
                }
                else
                {
                    return null;
                }
            }
            catch (HttpRequestException e)
            {
                last = $"/healthz: {e.Message}";
            }
            catch (TaskCanceledException)
            {
                last = "/healthz timed out";
            }
            await Task.Delay(100);
        }
        return $"not ready after {ReadyTimeout.TotalSeconds} s ({last})";
    }

    /// <summary>True when something accepts TCP connections on the loopback port.</summary>
    public static bool CanConnect(int port)
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            socket.Connect(IPAddress.Loopback, port);
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    public static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    /// <summary>Sends SIGTERM and waits for the exit; returns the exit code and how long it took.</summary>
    public async Task<(int ExitCode, TimeSpan Elapsed)> TerminateAsync(TimeSpan? timeout = null)
    {
        Process process = _process ?? throw new InvalidOperationException("not started");
        var clock = Stopwatch.StartNew();
        if (!process.HasExited && SendSignal(process.Id, SigTerm) != 0)
        {
            Assert.Fail($"kill(SIGTERM) failed: errno {Marshal.GetLastPInvokeError()}");
        }
        using var cts = new CancellationTokenSource(timeout ?? StopTimeout);
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
            // The last lines first: a long failure message is cut in the middle by some reports.
            Assert.Fail($"gateway did not exit within {(timeout ?? StopTimeout).TotalSeconds} s of SIGTERM; killed it. Its last log lines:\n" +
                $"{ToolResult.Tail(Output.TrimEnd('\n'), 8)}\n{Describe()}");
        }
        return (process.ExitCode, clock.Elapsed);
    }

    /// <summary>Waits for the process to exit by itself; its exit code, or null if it still runs after <paramref name="timeout"/>.</summary>
    public async Task<int?> WaitForExitAsync(TimeSpan timeout)
    {
        Process process = _process ?? throw new InvalidOperationException("not started");
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token);
            return process.ExitCode;
        }
        catch (OperationCanceledException)
        {
            return null;
        }
    }

    /// <summary>SIGTERM, and the exit must be clean: code 0 within <see cref="StopTimeout"/>.</summary>
    public async Task StopAsync()
    {
        (int exitCode, TimeSpan elapsed) = await TerminateAsync();
        Assert.True(exitCode == 0, $"gateway exited with code {exitCode} after SIGTERM ({elapsed.TotalSeconds:F1} s)\n{Describe()}");
    }

    /// <summary>SIGKILL: no drain, no flush.</summary>
    public void Kill()
    {
        if (_process is { HasExited: false } process)
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
        }
    }

    /// <summary>Runs a tool; a failure message carries the gateway's log as well as the tool's output.</summary>
    public Task<ToolResult> RunAsync(string tool, IEnumerable<string> args, TimeSpan? timeout = null, bool check = true) =>
        Tool.RunAsync(tool, args, timeout, check, DataDirectory, Describe);

    /// <summary>Runs <c>gateway export ... --admin URL</c> (the CLI against this gateway).</summary>
    public Task<ToolResult> CliAsync(params string[] args) =>
        Tool.RunAsync(DotnetHost, [GatewayDll, .. args, "--admin", AdminUri.ToString()], check: false, workingDirectory: DataDirectory, context: Describe);

    /// <summary>POST v1/exports with <paramref name="request"/>; anything but 201 Created fails the test.</summary>
    public async Task CreateExportAsync(object request)
    {
        using HttpResponseMessage response = await Http.PostAsJsonAsync("v1/exports", request);
        Assert.True(response.StatusCode == HttpStatusCode.Created,
            $"creating an export answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}\n{Describe()}");
    }

    /// <summary><c>nbdinfo --json --map=CONTEXT TARGET</c>, adjacent runs of one value merged.</summary>
    public async Task<List<(long Offset, long Length, uint Value)>> MapRunsAsync(string context, string[] target)
    {
        ToolResult map = await RunAsync("nbdinfo", ["--json", $"--map={context}", .. target]);
        using JsonDocument json = JsonDocument.Parse(map.Stdout);
        var runs = new List<(long Offset, long Length, uint Value)>();
        foreach (JsonElement e in json.RootElement.EnumerateArray())
        {
            (long offset, long length, uint value) = (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("type").GetUInt32());
            if (runs.Count > 0 && runs[^1].Value == value)
            {
                runs[^1] = (runs[^1].Offset, runs[^1].Length + length, value);
            }
            else
            {
                runs.Add((offset, length, value));
            }
        }
        return runs;
    }

    /// <summary>The gateway's state and log, for failure messages.</summary>
    public string Describe() =>
        $"--- gateway (nbd 127.0.0.1:{NbdPort}, admin {AdminUri}, data {DataDirectory}, " +
        $"{(_process is null ? "not started" : _process.HasExited ? $"exited with {_process.ExitCode}" : $"running as pid {_process.Id}")}) log ---\n" +
        ToolResult.Tail(Output, 120);

    private void AppendLog(string line)
    {
        lock (_log)
        {
            _log.Append(line).Append('\n');
        }
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (IsRunning)
            {
                await TerminateAsync();
            }
        }
        finally
        {
            Kill();
            if (_process is not null)
            {
                lock (Live)
                {
                    Live.Remove(_process);
                }
                _process.Dispose();
            }
            Http?.Dispose();
            if (_ownsDataDirectory)
            {
                try
                {
                    Directory.Delete(DataDirectory, recursive: true);
                }
                catch (IOException)
                {
                }
            }
        }
    }

    private const int SigTerm = 15;

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int SendSignal(int pid, int signal);
}

/// <summary>One gateway process shared by the tests of a class (xunit class fixture).</summary>
public sealed class GatewayFixture : IAsyncLifetime
{
    public GatewayProcess Gateway { get; private set; } = null!;

    public async Task InitializeAsync() => Gateway = await GatewayProcess.StartAsync();

    public async Task DisposeAsync()
    {
        if (Gateway is null)
        {
            return; // it never started; InitializeAsync has reported why
        }
        // A clean SIGTERM exit is part of the contract: a shared gateway that cannot stop fails its class.
        await Gateway.StopAsync();
        await Gateway.DisposeAsync();
    }
}
