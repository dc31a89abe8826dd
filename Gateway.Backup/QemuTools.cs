using System.ComponentModel;
using System.Diagnostics;
using System.Text;

namespace Gateway.Backup;

/// <summary>
/// qemu-img and qemu-nbd (Debian's qemu-utils) for the qcow2 output of a restore: qemu writes its
/// own format, so the gateway never has to. Every failure is an <see cref="IOException"/> saying
/// what the tool said (the CLI prints it, exit 1).
/// </summary>
internal static class QemuTools
{
    /// <summary>Runs <paramref name="tool"/> to its end.</summary>
    /// <exception cref="IOException">It is missing or fails.</exception>
    public static async Task RunAsync(string tool, IReadOnlyList<string> args, CancellationToken cancellationToken)
    {
        using Server run = Serve(tool, args);
        await run.WaitForExitAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Starts <paramref name="tool"/>; the caller waits for it or disposes it (which kills it).</summary>
    /// <exception cref="IOException">It is missing.</exception>
    public static Server Serve(string tool, IReadOnlyList<string> args)
    {
        var start = new ProcessStartInfo(tool) { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string arg in args)
        {
            start.ArgumentList.Add(arg);
        }
        try
        {
            return new Server(Process.Start(start) ?? throw new IOException($"{tool} did not start"), tool);
        }
        catch (Win32Exception e)
        {
            throw new IOException($"a qcow2 restore needs {tool} (Debian: apt-get install qemu-utils): {e.Message}", e);
        }
    }

    public sealed class Server : IDisposable
    {
        private static readonly TimeSpan ExitTimeout = TimeSpan.FromSeconds(60);
        private readonly Process _process;
        private readonly string _tool;
        private readonly StringBuilder _output = new();

        internal Server(Process process, string tool)
        {
            _process = process;
            _tool = tool;
            _process.OutputDataReceived += (_, e) => Append(e.Data);
            _process.ErrorDataReceived += (_, e) => Append(e.Data);
            _process.BeginOutputReadLine();
            _process.BeginErrorReadLine();
        }

        private void Append(string? line)
        {
            lock (_output)
            {
                if (line is not null && _output.Length < 4096)
                {
                    _output.Append(line).Append(' ');
                }
            }
        }

        private string Said()
        {
            lock (_output)
            {
                return _output.ToString().Trim();
            }
        }

        /// <summary>Until <paramref name="socket"/> exists (10 s at most).</summary>
        /// <exception cref="IOException">The tool exited first, or the socket never came.</exception>
        public async Task WaitForSocketAsync(string socket, CancellationToken cancellationToken)
        {
            for (int i = 0; i < 200 && !File.Exists(socket); i++)
            {
                if (_process.HasExited)
                {
                    await _process.WaitForExitAsync(cancellationToken).ConfigureAwait(false);
                    throw new IOException($"{_tool} exited ({_process.ExitCode}) before serving: {Said()}");
                }
                await Task.Delay(50, cancellationToken).ConfigureAwait(false);
            }
            if (!File.Exists(socket))
            {
                throw new IOException($"{_tool} did not open {socket} within 10 s: {Said()}");
            }
        }

        /// <summary>Until the tool exits by itself (60 s at most), which must be with 0.</summary>
        /// <exception cref="IOException">It failed or did not exit.</exception>
        public async Task WaitForExitAsync(CancellationToken cancellationToken)
        {
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            timeout.CancelAfter(ExitTimeout);
            try
            {
                await _process.WaitForExitAsync(timeout.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
            {
                throw new IOException($"{_tool} did not exit within {ExitTimeout.TotalSeconds} s: {Said()}");
            }
            if (_process.ExitCode != 0)
            {
                throw new IOException($"{_tool} failed ({_process.ExitCode}): {Said()}");
            }
        }

        public void Dispose()
        {
            try
            {
                if (!_process.HasExited)
                {
                    _process.Kill(entireProcessTree: true);
                    _process.WaitForExit();
                }
            }
            catch (InvalidOperationException)
            {
                // Exited between the check and the kill.
            }
            _process.Dispose();
        }
    }
}
