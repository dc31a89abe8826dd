using System.Collections.Concurrent;

namespace Gateway.Actors.Nbd;

/// <summary>
/// Decides which EIO answers are logged. A backend failure names what failed (an S3 object and
/// the store's status, a file and the errno), and a guest that retries a failing read asks again
/// and again: logging each request would bury the one line that matters under thousands of the
/// same. So each distinct failure of an export is logged once, then at most once per
/// <see cref="Interval"/> with the number of repeats in between; every request still gets its EIO.
/// Shared by all connections of the process, so multi-conn clients do not multiply the lines.
/// </summary>
public static class IoFailureLog
{
    public static readonly TimeSpan Interval = TimeSpan.FromMinutes(1);

    /// <summary>Distinct failures remembered; beyond it the memory starts over (bounded, never a leak).</summary>
    private const int MaxRemembered = 4096;

    private static readonly ConcurrentDictionary<(string Export, string Message), Entry> Seen = new();

    /// <summary>
    /// True when this failure should be logged now; <paramref name="repeats"/> says how many of the
    /// same were not logged since the last line.
    /// </summary>
    public static bool ShouldLog(string export, string message, out long repeats) => ShouldLog(export, message, Environment.TickCount64, out repeats);

    internal static bool ShouldLog(string export, string message, long now, out long repeats)
    {
        if (!Seen.TryGetValue((export, message), out Entry? entry))
        {
            // A new failure: only here is the size checked (Count takes every lock of the dictionary).
            if (Seen.Count >= MaxRemembered)
            {
                Seen.Clear();
            }
            entry = Seen.GetOrAdd((export, message), static (_, now) => new Entry(now), now);
        }
        lock (entry)
        {
            if (entry.Fresh)
            {
                entry.Fresh = false;
                repeats = 0;
                return true;
            }
            if (now - entry.LastLogged >= (long)Interval.TotalMilliseconds)
            {
                repeats = entry.Repeats;
                entry.Repeats = 0;
                entry.LastLogged = now;
                return true;
            }
            entry.Repeats++;
            repeats = entry.Repeats;
            return false;
        }
    }

    /// <summary>Forgets everything (tests).</summary>
    internal static void Reset() => Seen.Clear();

    private sealed class Entry(long now)
    {
        public bool Fresh = true;
        public long LastLogged = now;
        public long Repeats;
    }
}
