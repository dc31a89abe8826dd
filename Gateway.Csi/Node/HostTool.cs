using System.Diagnostics;
using Grpc.Core;

namespace Gateway.Csi.Node;

/// <summary>What a host tool (mount, blkid, mkfs, nbd-client) answered.</summary>
public sealed record HostToolResult(string CommandLine, int ExitCode, string Stdout, string Stderr)
{
    public bool Succeeded => ExitCode == 0;
}

/// <summary>Runs the node's host tools: the kernel's mounts and file systems are theirs to change, not the plugin's.</summary>
public static class HostTool
{
    public static async Task<HostToolResult> RunAsync(string file, IEnumerable<string> args, CancellationToken ct)
    {
        var start = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string arg in args)
        {
            start.ArgumentList.Add(arg);
        }
        string commandLine = file + " " + string.Join(' ', start.ArgumentList);
        Process process;
        try
        {
            process = Process.Start(start) ?? throw new InvalidOperationException($"{file} did not start");
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition, $"{file} is not installed on this node ({e.Message}): the image needs it"));
        }
        using (process)
        {
            Task<string> stdout = process.StandardOutput.ReadToEndAsync(ct);
            Task<string> stderr = process.StandardError.ReadToEndAsync(ct);
            try
            {
                await process.WaitForExitAsync(ct);
            }
            catch (OperationCanceledException)
            {
                process.Kill(entireProcessTree: true);
                throw;
            }
            return new HostToolResult(commandLine, process.ExitCode, await stdout, await stderr);
        }
    }

    /// <summary>Runs the tool and fails the call with INTERNAL and what it said when it fails.</summary>
    public static async Task<HostToolResult> CheckAsync(string file, IEnumerable<string> args, CancellationToken ct)
    {
        HostToolResult result = await RunAsync(file, args, ct);
        return result.Succeeded
            ? result
            : throw new RpcException(new Status(StatusCode.Internal, $"{result.CommandLine} failed ({result.ExitCode}): {result.Stderr.Trim()}{result.Stdout.Trim()}"));
    }
}
