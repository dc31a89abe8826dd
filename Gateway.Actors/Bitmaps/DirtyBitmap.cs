using System.Numerics;

namespace Gateway.Actors.Bitmaps;

/// <summary>
/// One bit per granule of an export: set = the granule changed since the last clear.
/// <para>
/// One writer (the bitmaps actor, which sets bits only once they are durable) and many readers
/// (every write checks "already dirty?" on the data path, BLOCK_STATUS reads extents). Readers
/// use <see cref="Volatile.Read(ref readonly ulong)"/> and take no lock: a bit, once set, stays
/// set until a clear, so a reader can only see too few bits, never a bit that is not durable.
/// </para>
/// <para>
/// When the export grows, the same bitmap grows (<see cref="Grow"/>, by the writer): connections
/// that selected it keep reading it. The new granules are clean; every bit set before is kept.
/// The words are replaced by a longer copy, published before the new size, so a reader that
/// sees the new size sees the longer words; one still holding the old words sees too few bits.
/// </para>
/// </summary>
public sealed class DirtyBitmap
{
    public const int MinGranularity = 512;
    public const int MaxGranularity = 16 << 20;
    public const int DefaultGranularity = 64 << 10;

    private volatile ulong[] _words;
    private readonly int _shift;
    private long _size;
    private long _granuleCount;

    public DirtyBitmap(long size, int granularity)
    {
        if (!IsValidGranularity(granularity))
        {
            throw new ArgumentOutOfRangeException(nameof(granularity), granularity, "granularity must be a power of two from 512 B to 16 MiB");
        }
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        _size = size;
        Granularity = granularity;
        _shift = BitOperations.Log2((uint)granularity);
        _granuleCount = (size + granularity - 1) >> _shift;
        _words = new ulong[(_granuleCount + 63) >> 6];
    }

    public static bool IsValidGranularity(long granularity) =>
        granularity is >= MinGranularity and <= MaxGranularity && BitOperations.IsPow2(granularity);

    /// <summary>Bytes of the export the bitmap covers.</summary>
    public long Size => Volatile.Read(ref _size);

    public int Granularity { get; }

    public long GranuleCount => Volatile.Read(ref _granuleCount);

    /// <summary>
    /// Covers an export grown to <paramref name="size"/> bytes: the new granules are clean, every
    /// dirty granule stays dirty. Called by the one writer (the bitmaps actor), never concurrently
    /// with its own <see cref="SetGranules"/> or <see cref="Clear"/>; a smaller size changes nothing.
    /// </summary>
    public void Grow(long size)
    {
        if (size <= Size)
        {
            return;
        }
        long granules = (size + Granularity - 1) >> _shift;
        ulong[] words = _words;
        if ((granules + 63) >> 6 > words.Length)
        {
            var longer = new ulong[(granules + 63) >> 6];
            words.CopyTo(longer, 0);
            _words = longer;
        }
        Volatile.Write(ref _granuleCount, granules);
        Volatile.Write(ref _size, size);
    }

    /// <summary>The granules a byte range touches, clipped to the export; false when it touches none.</summary>
    public bool TryGranules(long offset, long length, out long first, out long last)
    {
        long end = Math.Min(offset + length, Size);
        if (length <= 0 || offset >= end || offset < 0)
        {
            first = last = 0;
            return false;
        }
        first = offset >> _shift;
        last = (end - 1) >> _shift;
        return true;
    }

    public bool IsGranuleDirty(long granule) =>
        (Volatile.Read(ref _words[granule >> 6]) & (1UL << (int)(granule & 63))) != 0;

    /// <summary>True when every granule the range touches is dirty (the data-path check: no allocation, no lock).</summary>
    public bool IsDirty(long offset, long length)
    {
        if (!TryGranules(offset, length, out long first, out long last))
        {
            return true;
        }
        long firstWord = first >> 6, lastWord = last >> 6;
        for (long w = firstWord; w <= lastWord; w++)
        {
            ulong mask = WordMask(w, first, last);
            if ((Volatile.Read(ref _words[w]) & mask) != mask)
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>Marks every granule the byte range touches.</summary>
    public void SetRange(long offset, long length)
    {
        if (TryGranules(offset, length, out long first, out long last))
        {
            SetGranules(first, last);
        }
    }

    /// <summary>Marks granules <paramref name="first"/>..<paramref name="last"/> inclusive.</summary>
    public void SetGranules(long first, long last)
    {
        last = Math.Min(last, GranuleCount - 1);
        if (first > last)
        {
            return;
        }
        for (long w = first >> 6; w <= last >> 6; w++)
        {
            ulong mask = WordMask(w, first, last);
            ulong current = Volatile.Read(ref _words[w]);
            if ((current & mask) != mask)
            {
                Volatile.Write(ref _words[w], current | mask);
            }
        }
    }

    public void Clear() => Array.Clear(_words);

    public long DirtyGranules
    {
        get
        {
            long count = 0;
            ulong[] words = _words;
            for (int i = 0; i < words.Length; i++)
            {
                count += BitOperations.PopCount(Volatile.Read(ref words[i]));
            }
            return count;
        }
    }

    /// <summary>Dirty bytes of the export (a dirty last granule counts only up to the export's end).</summary>
    public long DirtyBytes
    {
        get
        {
            long bytes = DirtyGranules * Granularity;
            if (GranuleCount > 0 && IsGranuleDirty(GranuleCount - 1))
            {
                bytes -= (GranuleCount << _shift) - Size;
            }
            return bytes;
        }
    }

    /// <summary>
    /// Adds the dirty granules of <paramref name="source"/>, whatever its granularity: each dirty
    /// source granule marks every target granule it overlaps. Coarser to finer marks several
    /// target granules per source granule; finer to coarser marks the one that contains it.
    /// Dirtiness is never lost; a coarser target may over-report (a whole granule is dirty).
    /// </summary>
    public void MergeFrom(DirtyBitmap source)
    {
        if (ReferenceEquals(source, this))
        {
            return;
        }
        foreach ((long start, long count) in source.DirtyRuns())
        {
            long from = start << source._shift;
            long to = Math.Min((start + count) << source._shift, source.Size);
            SetRange(from, to - from);
        }
    }

    /// <summary>Runs of dirty granules as (first granule, count), in order.</summary>
    public IEnumerable<(long Start, long Count)> DirtyRuns()
    {
        long at = 0;
        while (at < GranuleCount)
        {
            long start = NextWithState(at, dirty: true);
            if (start >= GranuleCount)
            {
                yield break;
            }
            long end = NextWithState(start, dirty: false);
            yield return (start, end - start);
            at = end;
        }
    }

    /// <summary>The first granule at or after <paramref name="from"/> whose state is <paramref name="dirty"/> (GranuleCount if none).</summary>
    public long NextWithState(long from, bool dirty)
    {
        long granuleCount = GranuleCount;
        ulong[] words = _words;
        if (from >= granuleCount)
        {
            return granuleCount;
        }
        long w = from >> 6;
        ulong word = Volatile.Read(ref words[w]);
        if (!dirty)
        {
            word = ~word;
        }
        word &= ulong.MaxValue << (int)(from & 63);
        while (word == 0)
        {
            if (++w >= words.Length)
            {
                return granuleCount;
            }
            word = Volatile.Read(ref words[w]);
            if (!dirty)
            {
                word = ~word;
            }
        }
        return Math.Min((w << 6) + BitOperations.TrailingZeroCount(word), granuleCount);
    }

    /// <summary>
    /// Describes [offset, offset+length) as alternating clean/dirty runs, each clipped to the
    /// range: fills <paramref name="lengths"/>/<paramref name="dirty"/> and returns how many (at least 1).
    /// </summary>
    public int GetExtents(long offset, long length, Span<long> lengths, Span<bool> dirty)
    {
        long end = Math.Min(offset + length, Size);
        int n = 0;
        long at = offset;
        while (at < end && n < lengths.Length)
        {
            long granule = at >> _shift;
            bool state = IsGranuleDirty(granule);
            long next = NextWithState(granule, !state);
            long runEnd = Math.Min(next << _shift, end);
            lengths[n] = runEnd - at;
            dirty[n] = state;
            n++;
            at = runEnd;
        }
        return n;
    }

    private static ulong WordMask(long word, long first, long last)
    {
        long lo = word << 6, hi = lo + 63;
        int from = first > lo ? (int)(first - lo) : 0;
        int to = last < hi ? (int)(last - lo) : 63;
        ulong upper = to == 63 ? ulong.MaxValue : (1UL << (to + 1)) - 1;
        return upper & (ulong.MaxValue << from);
    }
}
