namespace Gateway.Backends.S3;

/// <summary>Where the newest bytes of a range are.</summary>
internal enum ExtentSource : byte
{
    /// <summary>Not in the log: the base chunk objects (a missing one reads as zeros).</summary>
    Base = 0,

    /// <summary>Data in a log segment.</summary>
    Segment = 1,

    /// <summary>Trimmed (or zeroed, hole allowed): zeros, a hole.</summary>
    Trim = 2,

    /// <summary>Zeroed with NO_HOLE: zeros, allocated.</summary>
    Zero = 3,
}

/// <summary>A range of the disk and its source; for <see cref="ExtentSource.Segment"/>, where in the segment object its first byte is.</summary>
internal readonly record struct IndexPiece(long Offset, long Length, ExtentSource Source, LogSegmentBuffer? Segment, long SegmentOffset);

/// <summary>
/// The write log's extent index: for every byte of the disk, the newest record that wrote it (or
/// none: the base). Cut into pages of 1 MiB, each a sorted list of non-overlapping extents, so a
/// write costs a binary search and a short list move however many extents the disk holds. One lock:
/// appends and lookups are short and in memory, the I/O happens outside it.
/// </summary>
internal sealed class ExtentIndex
{
    private const int PageShift = 20;
    private const long PageSize = 1L << PageShift;

    private struct Entry
    {
        public int Start;
        public int Length;
        public ExtentSource Source;
        public LogSegmentBuffer? Segment;
        public long SegmentOffset;

        public readonly int End => Start + Length;
    }

    private readonly Dictionary<long, List<Entry>> _pages = [];
    private readonly Lock _lock = new();
    private long _entries;

    /// <summary>Extents held, over all pages (for tests and metrics).</summary>
    public long Count
    {
        get
        {
            lock (_lock)
            {
                return _entries;
            }
        }
    }

    /// <summary>Makes <paramref name="source"/> the newest for the range; a segment's data starts at <paramref name="segmentOffset"/>.</summary>
    public void Set(long offset, long length, ExtentSource source, LogSegmentBuffer? segment = null, long segmentOffset = 0)
    {
        lock (_lock)
        {
            long end = offset + length;
            for (long at = offset; at < end;)
            {
                long page = at >> PageShift;
                long pageStart = page << PageShift;
                long to = Math.Min(end, pageStart + PageSize);
                if (!_pages.TryGetValue(page, out List<Entry>? list))
                {
                    list = [];
                    _pages[page] = list;
                }
                var entry = new Entry
                {
                    Start = (int)(at - pageStart),
                    Length = (int)(to - at),
                    Source = source,
                    Segment = segment,
                    SegmentOffset = source == ExtentSource.Segment ? segmentOffset + (at - offset) : 0,
                };
                _entries += SetInPage(list, entry);
                at = to;
            }
        }
    }

    /// <summary>Replaces what the list holds under <paramref name="entry"/>; returns the change in entries.</summary>
    private static int SetInPage(List<Entry> list, Entry entry)
    {
        int before = list.Count;
        int from = entry.Start;
        int to = entry.End;
        int i = FirstEndingAfter(list, from);
        if (i < list.Count && list[i].Start < from)
        {
            Entry old = list[i];
            var left = old;
            left.Length = from - old.Start;
            list[i] = left;
            i++;
            if (old.End > to)
            {
                // The new extent falls inside one old one: it splits in three.
                list.Insert(i, entry);
                list.Insert(i + 1, Tail(old, to));
                return list.Count - before;
            }
        }
        int j = i;
        while (j < list.Count && list[j].End <= to)
        {
            j++;
        }
        if (j < list.Count && list[j].Start < to)
        {
            list[j] = Tail(list[j], to);
        }
        list.RemoveRange(i, j - i);
        list.Insert(i, entry);
        return list.Count - before;
    }

    /// <summary>The part of <paramref name="old"/> from <paramref name="from"/> on.</summary>
    private static Entry Tail(Entry old, int from)
    {
        Entry tail = old;
        tail.Start = from;
        tail.Length = old.End - from;
        if (old.Source == ExtentSource.Segment)
        {
            tail.SegmentOffset = old.SegmentOffset + (from - old.Start);
        }
        return tail;
    }

    private static int FirstEndingAfter(List<Entry> list, int offset)
    {
        int lo = 0, hi = list.Count;
        while (lo < hi)
        {
            int mid = (lo + hi) >>> 1;
            if (list[mid].End > offset)
            {
                hi = mid;
            }
            else
            {
                lo = mid + 1;
            }
        }
        return lo;
    }

    /// <summary>
    /// The sources of the range, in order, covering it whole; neighbours that continue each other
    /// are merged. Stops after <paramref name="maxPieces"/> pieces (the last one then ends early).
    /// </summary>
    public void Lookup(long offset, long length, List<IndexPiece> pieces, int maxPieces = int.MaxValue)
    {
        pieces.Clear();
        long end = offset + length;
        lock (_lock)
        {
            for (long at = offset; at < end;)
            {
                long page = at >> PageShift;
                long pageStart = page << PageShift;
                long to = Math.Min(end, pageStart + PageSize);
                if (!_pages.TryGetValue(page, out List<Entry>? list) || list.Count == 0)
                {
                    if (!Add(pieces, new IndexPiece(at, to - at, ExtentSource.Base, null, 0), maxPieces))
                    {
                        return;
                    }
                    at = to;
                    continue;
                }
                int from = (int)(at - pageStart);
                int stop = (int)(to - pageStart);
                for (int i = FirstEndingAfter(list, from); i < list.Count && list[i].Start < stop; i++)
                {
                    Entry e = list[i];
                    if (e.Start > from)
                    {
                        if (!Add(pieces, new IndexPiece(pageStart + from, e.Start - from, ExtentSource.Base, null, 0), maxPieces))
                        {
                            return;
                        }
                        from = e.Start;
                    }
                    int pieceEnd = Math.Min(e.End, stop);
                    long segmentOffset = e.Source == ExtentSource.Segment ? e.SegmentOffset + (from - e.Start) : 0;
                    if (!Add(pieces, new IndexPiece(pageStart + from, pieceEnd - from, e.Source, e.Segment, segmentOffset), maxPieces))
                    {
                        return;
                    }
                    from = pieceEnd;
                }
                if (from < stop && !Add(pieces, new IndexPiece(pageStart + from, stop - from, ExtentSource.Base, null, 0), maxPieces))
                {
                    return;
                }
                at = to;
            }
        }
    }

    private static bool Add(List<IndexPiece> pieces, IndexPiece piece, int maxPieces)
    {
        if (pieces.Count > 0)
        {
            IndexPiece last = pieces[^1];
            if (last.Source == piece.Source && last.Segment == piece.Segment && last.Offset + last.Length == piece.Offset &&
                (piece.Source != ExtentSource.Segment || last.SegmentOffset + last.Length == piece.SegmentOffset))
            {
                pieces[^1] = last with { Length = last.Length + piece.Length };
                return true;
            }
        }
        if (pieces.Count == maxPieces)
        {
            return false;
        }
        pieces.Add(piece);
        return true;
    }
}
