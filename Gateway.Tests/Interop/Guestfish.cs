using System.Diagnostics;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// Real guests through <c>guestfish</c>: a libguestfs appliance (a QEMU VM with a Debian kernel)
/// whose disks are NBD exports of the gateway. Settings from docs/vm.md: the direct
/// backend under software emulation (the nested /dev/kvm here hangs stock kernels at boot),
/// 512 MiB of guest memory, and raw shell commands address disks by id, never as sdX (the
/// kernel's names race). Each launch costs about 20 s, so tests do several steps per guest.
/// </summary>
public static class Guestfish
{
    public const string InstallHint =
        "install libguestfs: apt-get install -y libguestfs-tools linux-image-amd64 (./ops/test does this)";

    /// <summary>One guestfish run: launch, commands, shutdown. Bounded so a hung guest fails the test.</summary>
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(180);

    /// <summary>The guest's name for the n-th disk (the n-th <c>-a</c>), stable unlike /dev/sdX.</summary>
    public static string DiskById(int index) => $"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_hd{index}";

    /// <summary>A file of seeded random bytes in the gateway's folder (to upload into a guest), and its SHA-256.</summary>
    public static (string Path, string Sha256) MakePayload(GatewayProcess gateway, string name, long size, int seed)
    {
        string path = Path.Combine(gateway.DataDirectory, name);
        byte[] bytes = new byte[size];
        new Random(seed).NextBytes(bytes);
        File.WriteAllBytes(path, bytes);
        return (path, Tool.Sha256(path));
    }

    /// <summary>A read-only check of the filesystem on the n-th disk; the run fails when it is damaged.</summary>
    public static string Fsck(int index) => $"debug sh \"e2fsck -fn {DiskById(index)}\"";

    /// <summary>The libguestfs settings, the environment's where set (ops/test exports them).</summary>
    internal static string[] Settings() =>
    [
        Setting("LIBGUESTFS_BACKEND", "direct"),
        Setting("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"),
        Setting("LIBGUESTFS_MEMSIZE", "512"),
    ];

    private static string Setting(string name, string fallback) =>
        $"{name}={(Environment.GetEnvironmentVariable(name) is { Length: > 0 } value ? value : fallback)}";

    /// <summary>guestfish's path; a missing guestfish or kernel fails the test (no silent skip).</summary>
    public static string Locate()
    {
        string? found = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Select(dir => Path.Combine(dir, "guestfish")).FirstOrDefault(File.Exists);
        if (found is null)
        {
            Assert.Fail($"required tool 'guestfish' is not on PATH; {InstallHint}");
        }
        if (!Directory.Exists("/boot") || !Directory.EnumerateFiles("/boot", "vmlinuz-*").Any())
        {
            Assert.Fail($"no kernel in /boot for the libguestfs appliance; {InstallHint}");
        }
        return found!;
    }

    /// <summary>
    /// Runs <paramref name="script"/> (guestfish commands, one per line, starting with <c>run</c>)
    /// in a new guest with <paramref name="disks"/> (NBD URIs or local raw files) attached in order.
    /// With <paramref name="readOnly"/> guestfish attaches through a local overlay: the guest can
    /// replay a journal or write, and the disks are never changed. A failing command fails the test.
    /// </summary>
    public static async Task<ToolResult> RunAsync(GatewayProcess gateway, IEnumerable<string> disks, string script, bool readOnly = false)
    {
        string guestfish = Locate();
        string file = Path.Combine(gateway.DataDirectory, $"guest-{Guid.NewGuid():N}.gf");
        await File.WriteAllTextAsync(file, script);
        string[] args =
        [
            .. Settings(), guestfish, "-x", .. readOnly ? ["--ro"] : Array.Empty<string>(), "--format=raw",
            .. disks.SelectMany(d => new[] { "-a", d }), "-f", file,
        ];
        return await gateway.RunAsync("env", args, Timeout);
    }

    /// <summary>
    /// The guest's stdout split by <c>echo @NAME</c> marker lines: NAME → the lines printed after it.
    /// </summary>
    public static Dictionary<string, List<string>> Sections(string stdout)
    {
        var sections = new Dictionary<string, List<string>>();
        List<string>? current = null;
        foreach (string line in stdout.Split('\n'))
        {
            if (line.StartsWith('@'))
            {
                current = sections[line[1..].Trim()] = [];
            }
            else if (current is not null && line.Length > 0)
            {
                current.Add(line);
            }
        }
        return sections;
    }
}

/// <summary>
/// A guest that stays up between commands (<c>guestfish --listen</c>, driven with
/// <c>--remote</c>), so a test can act on the gateway while the guest has its disk mounted.
/// </summary>
public sealed class GuestfishSession : IAsyncDisposable
{
    private readonly GatewayProcess _gateway;
    private readonly int _listenerPid;
    private int? _qemuPid;

    private GuestfishSession(GatewayProcess gateway, int listenerPid)
    {
        _gateway = gateway;
        _listenerPid = listenerPid;
    }

    /// <summary>Starts the background guestfish with <paramref name="disk"/> attached (not launched yet: send <c>run</c>).</summary>
    public static async Task<GuestfishSession> StartAsync(GatewayProcess gateway, string disk)
    {
        string guestfish = Guestfish.Locate();
        string output = Path.Combine(gateway.DataDirectory, $"guestfish-listen-{Guid.NewGuid():N}.out");
        // The forked listener keeps its stdout: send it to a file, or the tool runner would wait for it.
        await gateway.RunAsync("sh", ["-c", "exec env \"$@\" >\"$0\" 2>&1", output,
            .. Guestfish.Settings(), guestfish, "--listen", "--format=raw", "-a", disk]);
        string text = await File.ReadAllTextAsync(output);
        System.Text.RegularExpressions.Match pid = System.Text.RegularExpressions.Regex.Match(text, @"GUESTFISH_PID=(\d+)");
        Assert.True(pid.Success, $"guestfish --listen printed no GUESTFISH_PID:\n{text}");
        return new GuestfishSession(gateway, int.Parse(pid.Groups[1].Value));
    }

    /// <summary>One guestfish command (its words as arguments), run in the live guest.</summary>
    public Task<ToolResult> RunAsync(params string[] command) =>
        _gateway.RunAsync(Guestfish.Locate(), [$"--remote={_listenerPid}", .. command], Guestfish.Timeout);

    /// <summary>Power loss of the guest: SIGKILL to its QEMU process, then the listener is told to exit.</summary>
    public async Task PowerOffAsync()
    {
        _qemuPid ??= int.Parse((await RunAsync("get-pid")).Stdout.Trim());
        KillIfRunning(_qemuPid.Value);
        await _gateway.RunAsync(Guestfish.Locate(), [$"--remote={_listenerPid}", "exit"], TimeSpan.FromSeconds(30), check: false);
    }

    public async ValueTask DisposeAsync()
    {
        if (IsRunning(_listenerPid))
        {
            await _gateway.RunAsync(Guestfish.Locate(), [$"--remote={_listenerPid}", "exit"], TimeSpan.FromSeconds(60), check: false);
        }
        KillIfRunning(_listenerPid);
        if (_qemuPid is { } qemu)
        {
            KillIfRunning(qemu);
        }
    }

    private static bool IsRunning(int pid)
    {
        try
        {
            using Process process = Process.GetProcessById(pid);
            return !process.HasExited;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }

    private static void KillIfRunning(int pid)
    {
        try
        {
            using Process process = Process.GetProcessById(pid);
            process.Kill();
            process.WaitForExit(10_000);
        }
        catch (ArgumentException)
        {
            // already gone
        }
        catch (InvalidOperationException)
        {
            // exited meanwhile
        }
    }
}
