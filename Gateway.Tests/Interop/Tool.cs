using System.Diagnostics;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>What a command-line tool did: its command line, exit code and output.</summary>
public sealed record ToolResult(string CommandLine, int ExitCode, string Stdout, string Stderr, TimeSpan Elapsed)
{
    public bool Succeeded => ExitCode == 0;

    public string Describe() =>
        $"$ {CommandLine}\nexit code {ExitCode} after {Elapsed.TotalSeconds:F1} s\n--- stdout ---\n{Tail(Stdout)}\n--- stderr ---\n{Tail(Stderr)}";

    internal static string Tail(string text, int maxLines = 80)
    {
        string[] lines = text.Split('\n');
        return lines.Length <= maxLines
            ? text
            : $"[... {lines.Length - maxLines} lines omitted ...]\n" + string.Join('\n', lines[^maxLines..]);
    }
}

/// <summary>
/// Runs the real clients the interop tests drive (qemu-io, nbdinfo, nbdcopy, fio, python3...).
/// A missing tool FAILS the test: interop coverage that silently skips is no coverage
/// (ops/test installs them).
/// </summary>
public static class Tool
{
    public const string InstallHint =
        "install the interop tools: apt-get install -y qemu-utils libnbd-bin nbdkit fio python3-libnbd nbd-client (./ops/test does this)";

    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(60);

    /// <summary>Full path of a tool: an absolute path as given, else the first match on PATH.</summary>
    public static string Locate(string name)
    {
        if (Path.IsPathRooted(name))
        {
            if (File.Exists(name))
            {
                return name;
            }
            Assert.Fail($"required tool '{name}' is missing; {InstallHint}");
        }
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, name);
            if (File.Exists(candidate) && (OperatingSystem.IsWindows() || (File.GetUnixFileMode(candidate) & (UnixFileMode.UserExecute | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute)) != 0))
            {
                return candidate;
            }
        }
        Assert.Fail($"required tool '{name}' is not on PATH; {InstallHint}");
        return null!;
    }

    /// <summary>Blocking form of <see cref="RunAsync"/> for non-async callers.</summary>
    public static ToolResult Run(string name, IEnumerable<string> args, TimeSpan? timeout = null, bool check = true,
        string? workingDirectory = null, Func<string>? context = null) =>
        RunAsync(name, args, timeout, check, workingDirectory, context).GetAwaiter().GetResult();

    /// <summary>
    /// Runs <paramref name="name"/> with <paramref name="args"/> (no shell, no quoting), killing it
    /// after <paramref name="timeout"/>. With <paramref name="check"/>, a non-zero exit fails the test
    /// with the command line, both outputs and <paramref name="context"/> (e.g. the gateway's log).
    /// </summary>
    public static async Task<ToolResult> RunAsync(string name, IEnumerable<string> args, TimeSpan? timeout = null, bool check = true,
        string? workingDirectory = null, Func<string>? context = null)
    {
        string path = Locate(name);
        var start = new ProcessStartInfo(path)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
            WorkingDirectory = workingDirectory ?? Path.GetTempPath(),
        };
        foreach (string arg in args)
        {
            start.ArgumentList.Add(arg);
        }
        string commandLine = string.Join(' ', new[] { name }.Concat(start.ArgumentList.Select(Quote)));
        TimeSpan limit = timeout ?? DefaultTimeout;
        var clock = Stopwatch.StartNew();
        using Process process = Process.Start(start) ?? throw new InvalidOperationException($"could not start {commandLine}");
        process.StandardInput.Close();
        Task<string> stdout = process.StandardOutput.ReadToEndAsync();
        Task<string> stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(limit);
        bool timedOut = false;
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            timedOut = true;
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }
        var result = new ToolResult(commandLine, process.ExitCode, await stdout, await stderr, clock.Elapsed);
        if (timedOut)
        {
            Assert.Fail($"{name} did not finish within {limit.TotalSeconds} s and was killed\n{result.Describe()}{Context(context)}");
        }
        if (check && !result.Succeeded)
        {
            Assert.Fail($"{name} failed\n{result.Describe()}{Context(context)}");
        }
        return result;
    }

    private static string Context(Func<string>? context) => context is null ? "" : "\n" + context();

    private static string Quote(string arg) =>
        arg.Length > 0 && arg.All(c => char.IsLetterOrDigit(c) || "-_./:=,+@%".Contains(c)) ? arg : "'" + arg.Replace("'", "'\\''") + "'";

    /// <summary>Hex SHA-256 of a file.</summary>
    public static string Sha256(string path)
    {
        using FileStream file = File.OpenRead(path);
        return Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(file));
    }
}
