using System.Diagnostics;
using System.Globalization;
using Gateway.Backup;

namespace Gateway.Host;

/// <summary>
/// A one-line progress bar on a terminal's stderr (<c>\r</c>-redrawn, at most five times a
/// second): percent, bytes read of bytes to read, rate. Never drawn when stderr is not a terminal,
/// so logs and pipes get only the summary.
/// </summary>
public sealed class ProgressBar : IProgress<BackupProgress>, IDisposable
{
    private const int Width = 30;
    private static readonly TimeSpan Interval = TimeSpan.FromMilliseconds(200);

    private readonly TextWriter _writer;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly Lock _lock = new();
    private TimeSpan _drawn = -Interval;
    private bool _visible;

    private ProgressBar(TextWriter writer) => _writer = writer;

    /// <summary>A bar on <paramref name="writer"/> when it is the process's stderr on a terminal and <paramref name="enabled"/>; otherwise null.</summary>
    public static ProgressBar? OnTerminal(TextWriter writer, bool enabled) =>
        enabled && writer == Console.Error && !Console.IsErrorRedirected ? new ProgressBar(writer) : null;

    public void Report(BackupProgress value)
    {
        lock (_lock)
        {
            TimeSpan now = _clock.Elapsed;
            if (now - _drawn < Interval && value.BytesRead < value.BytesToRead)
            {
                return;
            }
            _drawn = now;
            _writer.Write('\r' + Render(value, now));
            _visible = true;
        }
    }

    /// <summary>The bar's text: <c>[#####---] 42% 1.1 of 2.6 GiB, 180 MiB/s</c>.</summary>
    public static string Render(BackupProgress value, TimeSpan elapsed)
    {
        double fraction = value.BytesToRead == 0 ? 1 : Math.Clamp((double)value.BytesRead / value.BytesToRead, 0, 1);
        int filled = (int)Math.Round(fraction * Width);
        double rate = elapsed.TotalSeconds > 0 ? value.BytesRead / elapsed.TotalSeconds : 0;
        return string.Create(CultureInfo.InvariantCulture,
            $"[{new string('#', filled)}{new string('-', Width - filled)}] {fraction * 100,3:F0}% {value.BytesRead / (double)(1 << 30):F2} of {value.BytesToRead / (double)(1 << 30):F2} GiB, {rate / (1 << 20):F0} MiB/s ");
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_visible)
            {
                _writer.WriteLine();
                _visible = false;
            }
        }
    }
}
