using System.Diagnostics;
using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>
/// The flush of a graceful stop (SIGTERM, a handoff, a removal). A client's FLUSH gets EIO once
/// the store's own bounded retries are spent; this one tries again while the device fails with
/// EIO (the store unreachable or answering errors), because what it does not store now is lost
/// when the export closes. It gives up after <see cref="Budget"/>, inside the host's shutdown
/// timeout, and then throws the last failure. A refusal (ESHUTDOWN: the export's fence is closed,
/// another node may own it now) and any other kind of error are not tried again.
/// </summary>
public static class FinalFlush
{
    /// <summary>How long a final flush keeps trying: the host's shutdown timeout is 60 s.</summary>
    public static readonly TimeSpan Budget = TimeSpan.FromSeconds(40);

    private static readonly TimeSpan FirstPause = TimeSpan.FromMilliseconds(250);
    private static readonly TimeSpan LongestPause = TimeSpan.FromSeconds(2);

    /// <param name="warn">Told of the first failure, every fifth after it, and of a flush that succeeded only after failing.</param>
    public static async Task RunAsync(IBlockDevice device, string export, Action<string> warn, TimeSpan? budget = null)
    {
        TimeSpan limit = budget ?? Budget;
        var clock = Stopwatch.StartNew();
        TimeSpan pause = FirstPause;
        for (int attempt = 1; ; attempt++)
        {
            try
            {
                await device.FlushAsync().ConfigureAwait(false);
                if (attempt > 1)
                {
                    warn($"Final flush of export {export} succeeded at attempt {attempt}, after {clock.Elapsed.TotalSeconds:F1} s");
                }
                return;
            }
            catch (BlockDeviceException e) when (e.Kind == BlockErrorKind.Io && clock.Elapsed + pause < limit)
            {
                if (attempt == 1 || attempt % 5 == 0)
                {
                    warn($"Final flush of export {export} failed (attempt {attempt}): {e.Message}; trying again for up to {limit.TotalSeconds:F0} s, as writes not yet stored would be lost");
                }
                await Task.Delay(pause).ConfigureAwait(false);
                pause = pause * 2 < LongestPause ? pause * 2 : LongestPause;
            }
        }
    }
}
