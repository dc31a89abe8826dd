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
        list.Insert(CutInPage(list, entry.Start, entry.End), entry);
        return list.Count - before;
    }

    /// <summary>Removes whatever the list holds in [from, to), splitting the extents across its edges; returns where the gap is.</summary>
    private static int CutInPage(List<Entry> list, int from, int to)
    {
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
                // The range falls inside one old extent: it splits in two around the gap.
                list.Insert(i, Tail(old, to));
                return i;
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
        return i;
    }

    /// <summary>The chunks (of 2^<paramref name="objectShift"/> bytes) that hold any extent, in order: what compaction has to fold.</summary>
    public List<long> Chunks(int objectShift)
    {
        var chunks = new SortedSet<long>();
        lock (_lock)
        {
            foreach ((long page, List<Entry> list) in _pages)
            {
                long pageStart = page << PageShift;
                foreach (Entry e in list)
                {
                    for (long c = (pageStart + e.Start) >> objectShift; c <= (pageStart + e.End - 1) >> objectShift; c++)
                    {
                        chunks.Add(c);
                    }
                }
            }
        }
        return [.. chunks];
    }

    /// <summary>
    /// Drops the extents of <paramref name="folded"/> (pieces of one <see cref="Lookup"/>) that still
    /// hold what that lookup saw, so their range reads the base chunk again; any part written since
    /// keeps its newer extent. A data extent is the same only with the same segment bytes, so a
    /// write that came during the fold is never undone by it.
    /// </summary>
    public void ReleaseFolded(List<IndexPiece> folded)
    {
        lock (_lock)
        {
            foreach (IndexPiece piece in folded)
            {
                if (piece.Source == ExtentSource.Base)
                {
                    continue;
                }
                long end = piece.Offset + piece.Length;
                for (long at = piece.Offset; at < end;)
                {
                    long page = at >> PageShift;
                    long pageStart = page << PageShift;
                    long to = Math.Min(end, pageStart + PageSize);
                    if (_pages.TryGetValue(page, out List<Entry>? list))
                    {
                        ReleaseInPage(list, piece, pageStart, (int)(at - pageStart), (int)(to - pageStart));
                        if (list.Count == 0)
                        {
                            _pages.Remove(page);
                        }
                    }
                    at = to;
                }
            }
        }
    }

    private void ReleaseInPage(List<Entry> list, IndexPiece piece, long pageStart, int from, int to)
    {
        var same = new List<(int From, int To)>();
        for (int i = FirstEndingAfter(list, from); i < list.Count && list[i].Start < to; i++)
        {
            Entry e = list[i];
            bool unchanged = e.Source == piece.Source && e.Segment == piece.Segment &&
                (e.Source != ExtentSource.Segment || e.SegmentOffset - (pageStart + e.Start) == piece.SegmentOffset - piece.Offset);
            if (unchanged)
            {
                same.Add((Math.Max(from, e.Start), Math.Min(to, e.End)));
            }
        }
        foreach ((int a, int b) in same)
        {
            int before = list.Count;
            CutInPage(list, a, b);
            _entries += list.Count - before;
        }
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
