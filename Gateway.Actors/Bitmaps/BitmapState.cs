using System.Collections.Immutable;
using System.Text.RegularExpressions;
using Gateway.Actors.Exports;

namespace Gateway.Actors.Bitmaps;

/// <summary>A named bitmap. The definition is immutable; <see cref="Bits"/> is shared by its versions.</summary>
public sealed record BitmapEntry(string Name, bool Enabled, DirtyBitmap Bits)
{
    public int Granularity => Bits.Granularity;

    public BitmapInfo Info => new(Name, Granularity, Enabled, Bits.DirtyBytes);
}

/// <summary>
/// The bitmaps of one export. <see cref="Decide"/> is pure: it checks a command and names the
/// event. <see cref="Apply"/> folds an event in; the definitions are immutable, but the bits are
/// changed in place (copying megabytes of bits per event is not an option), so only the bitmaps
/// actor calls it, and readers on the data path see bits appear, never half a definition.
/// </summary>
public sealed partial record BitmapState(long ExportSize, ImmutableSortedDictionary<string, BitmapEntry> Bitmaps)
{
    public static BitmapState Empty(long exportSize) =>
        new(exportSize, ImmutableSortedDictionary<string, BitmapEntry>.Empty.WithComparers(StringComparer.Ordinal));

    /// <summary>The enabled bitmaps, the ones writes must mark.</summary>
    public DirtyBitmap[] EnabledBits() => [.. Bitmaps.Values.Where(b => b.Enabled).Select(b => b.Bits)];

    /// <summary>
    /// The event a command leads to, or the error. (null, null) means it succeeds with nothing to
    /// record (enable an enabled bitmap). Queries are not commands here.
    /// </summary>
    public (IBitmapEvent? Event, BitmapResult? Error) Decide(IBitmapCommand command)
    {
        switch (command)
        {
            case AddBitmap add:
                if (ValidateName(add.Name) is string problem)
                {
                    return Fail(ExportErrorKind.Invalid, problem);
                }
                if (!DirtyBitmap.IsValidGranularity(add.Granularity))
                {
                    return Fail(ExportErrorKind.Invalid,
                        $"granularity {add.Granularity} is invalid: it must be a power of two from 512 bytes to 16 MiB");
                }
                if (Bitmaps.ContainsKey(add.Name))
                {
                    return Fail(ExportErrorKind.Conflict, $"bitmap '{add.Name}' already exists on export '{add.ExportName}'");
                }
                return (new BitmapAdded(add.Name, (int)add.Granularity, add.Enabled), null);
            case RemoveBitmap remove:
                return Bitmaps.ContainsKey(remove.Name) ? (new BitmapRemoved(remove.Name), null) : NotFound(remove.ExportName, remove.Name);
            case ClearBitmap clear:
                return Bitmaps.ContainsKey(clear.Name) ? (new BitmapCleared(clear.Name), null) : NotFound(clear.ExportName, clear.Name);
            case SetBitmapEnabled set:
                if (!Bitmaps.TryGetValue(set.Name, out BitmapEntry? entry))
                {
                    return NotFound(set.ExportName, set.Name);
                }
                return entry.Enabled == set.Enabled ? (null, null) : (new BitmapEnabledChanged(set.Name, set.Enabled), null);
            case MergeBitmaps merge:
                if (!Bitmaps.ContainsKey(merge.Target))
                {
                    return NotFound(merge.ExportName, merge.Target);
                }
                if (merge.Sources.Length == 0)
                {
                    return Fail(ExportErrorKind.Invalid, "sources is empty: name at least one bitmap to merge");
                }
                foreach (string source in merge.Sources)
                {
                    if (!Bitmaps.ContainsKey(source))
                    {
                        return Fail(ExportErrorKind.NotFound, $"source bitmap '{source}' not found on export '{merge.ExportName}'");
                    }
                }
                return (new BitmapsMerged(merge.Target, [.. merge.Sources]), null);
            default:
                return Fail(ExportErrorKind.Invalid, $"unknown bitmap command {command.GetType().Name}");
        }
    }

    public BitmapState Apply(IBitmapEvent @event)
    {
        switch (@event)
        {
            case BitmapAdded added:
                return this with { Bitmaps = Bitmaps.SetItem(added.Name, new BitmapEntry(added.Name, added.Enabled, new DirtyBitmap(ExportSize, added.Granularity))) };
            case BitmapRemoved removed:
                return this with { Bitmaps = Bitmaps.Remove(removed.Name) };
            case BitmapCleared cleared when Bitmaps.TryGetValue(cleared.Name, out BitmapEntry? entry):
                entry.Bits.Clear();
                return this;
            case BitmapEnabledChanged changed when Bitmaps.TryGetValue(changed.Name, out BitmapEntry? entry):
                return this with { Bitmaps = Bitmaps.SetItem(changed.Name, entry with { Enabled = changed.Enabled }) };
            case BitmapsMerged merged when Bitmaps.TryGetValue(merged.Target, out BitmapEntry? target):
                foreach (string source in merged.Sources)
                {
                    if (Bitmaps.TryGetValue(source, out BitmapEntry? from))
                    {
                        target.Bits.MergeFrom(from.Bits);
                    }
                }
                return this;
            case GranulesDirtied dirtied:
                foreach (BitmapEntry entry in Bitmaps.Values)
                {
                    if (entry.Enabled)
                    {
                        for (int i = 0; i + 1 < dirtied.Ranges.Length; i += 2)
                        {
                            entry.Bits.SetRange(dirtied.Ranges[i], dirtied.Ranges[i + 1]);
                        }
                    }
                }
                return this;
            default:
                return this;
        }
    }

    /// <summary>
    /// The export grew: every bitmap grows in place (its new granules clean, no bit lost). Not an
    /// event: a bitmap's size is its export's, which the export's spec records, and recovery makes
    /// the bitmaps that size before it replays their events.
    /// </summary>
    public BitmapState Grow(long exportSize)
    {
        if (exportSize <= ExportSize)
        {
            return this;
        }
        foreach (BitmapEntry entry in Bitmaps.Values)
        {
            entry.Bits.Grow(exportSize);
        }
        return this with { ExportSize = exportSize };
    }

    public BitmapsSnapshot ToSnapshot() =>
        new([.. Bitmaps.Values.Select(b => new BitmapSnapshotEntry(b.Name, b.Granularity, b.Enabled,
            [.. b.Bits.DirtyRuns().SelectMany(r => new[] { r.Start, r.Count })]))]);

    public static BitmapState FromSnapshot(long exportSize, BitmapsSnapshot snapshot)
    {
        BitmapState state = Empty(exportSize);
        foreach (BitmapSnapshotEntry entry in snapshot.Bitmaps)
        {
            var bits = new DirtyBitmap(exportSize, entry.Granularity);
            for (int i = 0; i + 1 < entry.Runs.Length; i += 2)
            {
                bits.SetGranules(entry.Runs[i], entry.Runs[i] + entry.Runs[i + 1] - 1);
            }
            state = state with { Bitmaps = state.Bitmaps.SetItem(entry.Name, new BitmapEntry(entry.Name, entry.Enabled, bits)) };
        }
        return state;
    }

    /// <summary>Sorts and coalesces (offset, length) pairs: the ranges of one group commit.</summary>
    public static long[] Coalesce(List<(long Offset, long Length)> ranges)
    {
        ranges.Sort();
        var result = new List<long>(ranges.Count * 2);
        long start = -1, end = -1;
        foreach ((long offset, long length) in ranges)
        {
            if (start >= 0 && offset <= end)
            {
                end = Math.Max(end, offset + length);
                continue;
            }
            if (start >= 0)
            {
                result.Add(start);
                result.Add(end - start);
            }
            (start, end) = (offset, offset + length);
        }
        if (start >= 0)
        {
            result.Add(start);
            result.Add(end - start);
        }
        return [.. result];
    }

    /// <summary>Names as for exports: they appear in URLs and in the context name qemu:dirty-bitmap:NAME.</summary>
    public static string? ValidateName(string? name) =>
        string.IsNullOrEmpty(name) ? "bitmap name is required"
        : NamePattern().IsMatch(name) ? null
        : $"bitmap name '{name}' is invalid: use 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-'";

    private static (IBitmapEvent?, BitmapResult?) Fail(ExportErrorKind kind, string message) => (null, BitmapResult.Fail(kind, message));

    private static (IBitmapEvent?, BitmapResult?) NotFound(string export, string name) =>
        Fail(ExportErrorKind.NotFound, $"bitmap '{name}' not found on export '{export}'");

    [GeneratedRegex("^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
    private static partial Regex NamePattern();
}
