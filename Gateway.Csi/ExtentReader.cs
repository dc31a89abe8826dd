using Gateway.Actors.Cluster;

namespace Gateway.Csi;

/// <summary>Reads a metadata context's extents over NBD into byte ranges.</summary>
public static class ExtentReader
{
    /// <summary>Per window: the union is built and sent a window at a time.</summary>
    private const uint Window = 1u << 30;

    /// <summary>The ranges in [<paramref name="start"/>, <paramref name="end"/>) whose status <paramref name="wanted"/> accepts, adjacent ones joined.</summary>
    public static async Task<List<(long Offset, long Length)>> ReadAsync(PeerNbdClient client, string context, long start, long end, Func<uint, bool> wanted, CancellationToken ct)
    {
        var ranges = new List<(long Offset, long Length)>();
        await client.WalkExtentsAsync(context, start, end, (offset, length, status) =>
        {
            if (wanted(status))
            {
                Add(ranges, offset, length);
            }
        }, ct);
        return ranges;
    }

    /// <summary>
    /// The union of what <paramref name="wanted"/> accepts in every one of <paramref name="contexts"/>
    /// over [<paramref name="start"/>, <paramref name="end"/>), handed to <paramref name="send"/> in
    /// batches of at most <paramref name="batch"/> sorted, disjoint, joined ranges. The disk is read
    /// a window at a time, so memory stays bounded by one window's extents whatever the disk's size.
    /// </summary>
    public static async Task StreamUnionAsync(PeerNbdClient client, IReadOnlyList<string> contexts, long start, long end, Func<uint, bool> wanted,
        int batch, Func<IReadOnlyList<(long Offset, long Length)>, Task> send, CancellationToken ct)
    {
        var ready = new List<(long Offset, long Length)>();
        (long Offset, long Length)? open = null;
        for (long window = start; window < end; window += Window)
        {
            long windowEnd = Math.Min(end, window + Window);
            var found = new List<(long Offset, long Length)>();
            foreach (string context in contexts)
            {
                found.AddRange(await ReadAsync(client, context, window, windowEnd, wanted, ct));
            }
            foreach ((long offset, long length) in Union(found))
            {
                // A range that ends at the window's edge may go on in the next one: kept open until then.
                if (open is { } o && o.Offset + o.Length == offset)
                {
                    open = (o.Offset, o.Length + length);
                    continue;
                }
                if (open is { } done)
                {
                    ready.Add(done);
                }
                open = (offset, length);
            }
            while (ready.Count >= batch)
            {
                await send(ready.GetRange(0, batch));
                ready.RemoveRange(0, batch);
            }
        }
        if (open is { } last)
        {
            ready.Add(last);
        }
        for (int i = 0; i < ready.Count; i += batch)
        {
            await send(ready.GetRange(i, Math.Min(batch, ready.Count - i)));
        }
    }

    /// <summary>Sorted, overlapping and adjacent ranges joined.</summary>
    public static List<(long Offset, long Length)> Union(IEnumerable<(long Offset, long Length)> ranges)
    {
        var joined = new List<(long Offset, long Length)>();
        foreach ((long offset, long length) in ranges.OrderBy(r => r.Offset))
        {
            if (joined.Count > 0 && joined[^1].Offset + joined[^1].Length >= offset)
            {
                (long o, long l) = joined[^1];
                joined[^1] = (o, Math.Max(l, offset + length - o));
            }
            else
            {
                joined.Add((offset, length));
            }
        }
        return joined;
    }

    private static void Add(List<(long Offset, long Length)> ranges, long offset, long length)
    {
        if (ranges.Count > 0 && ranges[^1].Offset + ranges[^1].Length == offset)
        {
            ranges[^1] = (ranges[^1].Offset, ranges[^1].Length + length);
        }
        else
        {
            ranges.Add((offset, length));
        }
    }
}
