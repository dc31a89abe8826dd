using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using Gateway.Csi.Node;
using Gateway.Tests.Interop;

namespace Gateway.Tests.Csi;

/// <summary>
/// The node's attach step where the kernel has no nbd module: the same export reached through a
/// real data path, <c>nbdfuse</c> (libnbd, with as many connections as the node asked) exposing it
/// as a file, and a loop device over that file. Everything the node does above the device
/// (mkfs, mounts, stats, grow) then runs for real against the gateway's export.
/// Every device, FUSE mount and nbdfuse process it made is undone on dispose, even after a failure.
/// </summary>
public sealed class FuseLoopAttacher : IBlockAttacher, IAsyncDisposable
{
    private readonly ConcurrentDictionary<string, (string Folder, Process Fuse)> _attached = new();

    /// <summary>Every target asked for, in order (what the node decided: export, connections, read-only).</summary>
    public ConcurrentQueue<NbdTarget> Targets { get; } = new();

    public async Task<string> AttachAsync(NbdTarget target, CancellationToken ct)
    {
        Targets.Enqueue(target);
        string folder = Directory.CreateTempSubdirectory("csi-nbdfuse-").FullName;
        var start = new ProcessStartInfo(Tool.Locate("nbdfuse")) { UseShellExecute = false, RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (string arg in (string[])["-C", target.Connections.ToString(CultureInfo.InvariantCulture), .. target.ReadOnly ? ["-r"] : Array.Empty<string>(),
                     folder, $"nbd://{target.Host}:{target.Port}/{target.Export}"])
        {
            start.ArgumentList.Add(arg);
        }
        Process fuse = Process.Start(start)!;
        string file = Path.Combine(folder, "nbd");
        for (int i = 0; i < 200 && !File.Exists(file); i++)
        {
            if (fuse.HasExited)
            {
                Directory.Delete(folder);
                throw new IOException($"nbdfuse exited {fuse.ExitCode}: {await fuse.StandardError.ReadToEndAsync(ct)}");
            }
            await Task.Delay(50, ct);
        }
        ToolResult loop = await Tool.RunAsync("losetup", ["--find", "--show", file], check: false);
        if (!loop.Succeeded)
        {
            await StopFuseAsync(folder, fuse);
            throw new IOException($"losetup failed: {loop.Stderr}");
        }
        string device = loop.Stdout.Trim();
        _attached[device] = (folder, fuse);
        return device;
    }

    public async Task DetachAsync(string device, CancellationToken ct)
    {
        if (_attached.TryRemove(device, out (string Folder, Process Fuse) attached))
        {
            await Tool.RunAsync("losetup", ["-d", device], check: false);
            await StopFuseAsync(attached.Folder, attached.Fuse);
        }
    }

    public async ValueTask DisposeAsync()
    {
        foreach (string device in _attached.Keys.ToArray())
        {
            await DetachAsync(device, CancellationToken.None);
        }
    }

    private static async Task StopFuseAsync(string folder, Process fuse)
    {
        await Tool.RunAsync("fusermount3", ["-u", folder], check: false);
        using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        try
        {
            await fuse.WaitForExitAsync(wait.Token);
        }
        catch (OperationCanceledException)
        {
            fuse.Kill();
            await Tool.RunAsync("umount", ["-l", folder], check: false);
        }
        fuse.Dispose();
        try
        {
            Directory.Delete(folder);
        }
        catch (IOException)
        {
            // Still a mount point if the unmount failed: left for the lazy unmount to clear.
        }
    }
}
