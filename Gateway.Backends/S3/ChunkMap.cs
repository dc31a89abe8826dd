namespace Gateway.Backends.S3;

/// <summary>
/// One bit per chunk: set when the chunk holds data (its object exists, or will once the cache
/// writes it back). Pages are allocated on first set, so a large empty disk costs nothing.
/// </summary>
internal sealed class ChunkMap(long chunkCount)
{
    private const int PageShift = 18; // 256 Ki chunks (32 KiB of bits) per page
    private const long PageBits = 1L << PageShift;

    // Replaced by a longer copy when the map grows; the pages themselves are shared, so a bit set in
    // one is in both.
    private volatile ulong[]?[] _pages = new ulong[(chunkCount + PageBits - 1) >> PageShift][];
    private readonly Lock _lock = new();
    private long _chunkCount = chunkCount;

    public long ChunkCount => Volatile.Read(ref _chunkCount);

    /// <summary>Room for <paramref name="chunkCount"/> chunks; the new ones are clear.</summary>
    public void Grow(long chunkCount)
    {
        lock (_lock)
        {
            if (chunkCount <= _chunkCount)
            {
                return;
            }
            ulong[]?[] pages = _pages;
            long needed = (chunkCount + PageBits - 1) >> PageShift;
            if (needed > pages.Length)
            {
                var longer = new ulong[needed][];
                pages.CopyTo(longer, 0);
                _pages = longer;
            }
            Volatile.Write(ref _chunkCount, chunkCount);
        }
    }

    public bool Get(long index)
    {
        ulong[]?[] pages = _pages;
        if (index >> PageShift >= pages.Length)
        {
            return false;
        }
        ulong[]? page = Volatile.Read(ref pages[index >> PageShift]);
        long bit = index & (PageBits - 1);
        return page is not null && (Volatile.Read(ref page[bit >> 6]) & (1UL << (int)(bit & 63))) != 0;
    }

    public void Set(long index, bool value)
    {
        lock (_lock)
        {
            ref ulong[]? page = ref _pages[index >> PageShift];
            if (page is null)
            {
                if (!value)
                {
                    return;
                }
                page = new ulong[PageBits >> 6];
            }
            long bit = index & (PageBits - 1);
            ulong mask = 1UL << (int)(bit & 63);
            page[bit >> 6] = value ? page[bit >> 6] | mask : page[bit >> 6] & ~mask;
        }
    }

    /// <summary>The first chunk at or after <paramref name="from"/> (and before <paramref name="limit"/>) whose bit differs from <paramref name="value"/>; limit when none.</summary>
    public long NextDifferent(long from, bool value, long limit)
    {
        long index = from;
        ulong[]?[] pages = _pages;
        while (index < limit)
        {
            ulong[]? page = index >> PageShift < pages.Length ? Volatile.Read(ref pages[index >> PageShift]) : null;
            if (page is null)
            {
                if (value)
                {
                    return index; // an absent page is all clear, so it differs from "set" at once
                }
                index = ((index >> PageShift) + 1) << PageShift; // all clear: skip the page
                continue;
            }
            long bit = index & (PageBits - 1);
            ulong word = Volatile.Read(ref page[bit >> 6]);
            if (value)
            {
                word = ~word;
            }
            word &= ~0UL << (int)(bit & 63);
            if (word != 0)
            {
                return Math.Min(limit, index - (bit & 63) + System.Numerics.BitOperations.TrailingZeroCount(word));
            }
            index += 64 - (bit & 63);
        }
        return limit;
    }
}
