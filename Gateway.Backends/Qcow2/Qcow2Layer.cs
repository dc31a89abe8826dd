using System.Buffers;
using System.Buffers.Binary;
using System.IO.Compression;

namespace Gateway.Backends.Qcow2;

/// <summary>
/// One qcow2 file of a chain, read-only: its L1 table in memory (at most 32 MiB, checked at open),
/// its L2 tables through a bounded cache, its clusters in the image file or an external data file.
/// Every entry is checked against the files' lengths before it is used; a bad one raises
/// <see cref="Qcow2Exception"/> for the read that meets it.
/// </summary>
internal sealed class Qcow2Layer : ImageLayer
{
    /// <summary>Bytes of L2 tables one layer keeps (at least a few tables, whatever the cluster size).</summary>
    public const long L2CacheBytes = 32L << 20;

    // L1 and standard L2 entries (qcow2.txt "Cluster mapping").
    private const ulong OffsetMask = 0x00ff_ffff_ffff_fe00;
    private const ulong Copied = 1UL << 63;
    private const ulong CompressedFlag = 1UL << 62;
    private const ulong ZeroFlag = 1UL;
    private const ulong L1Reserved = 0x7f00_0000_0000_01ff;
    private const ulong L2Reserved = 0x3f00_0000_0000_01fe;
    private const int Subclusters = 32;

    private readonly ImageSource _file;
    private readonly ImageSource? _dataFile;
    private readonly long _fileLength;
    private readonly long _dataLength;
    private readonly ulong[] _l1;
    private readonly L2Cache _l2;
    private readonly int _subclusterBits;
    private readonly int _compressedShift;
    private volatile DecompressedCluster? _lastCompressed;

    private Qcow2Layer(ImageSource file, ImageSource? dataFile, Qcow2Header header, ulong[] l1, long fileLength, long dataLength)
    {
        _file = file;
        _dataFile = dataFile;
        Header = header;
        _l1 = l1;
        _fileLength = fileLength;
        _dataLength = dataLength;
        _l2 = new L2Cache(Math.Max(4, (int)(L2CacheBytes >> header.ClusterBits)));
        _subclusterBits = header.ClusterBits - (header.ExtendedL2 ? 5 : 0);
        _compressedShift = 62 - (header.ClusterBits - 8);
    }

    public Qcow2Header Header { get; }

    public override string Format => "qcow2";

    public override long VirtualSize => Header.VirtualSize;

    /// <summary>Opens an image file whose header was read and checked; takes ownership of <paramref name="file"/>.</summary>
    public static Qcow2Layer Open(ImageSource file, Qcow2Header header, ImageLocation location)
    {
        string path = file.Name;
        long fileLength = file.Length;
        byte[] bytes = new byte[header.L1Size * 8L];
        if (bytes.Length > 0 && file.Read(bytes, header.L1Offset) != bytes.Length)
        {
            throw new Qcow2Exception(path, "the L1 table could not be read whole");
        }
        ulong[] l1 = new ulong[header.L1Size];
        ulong clusterMask = (ulong)header.ClusterSize - 1;
        for (int i = 0; i < l1.Length; i++)
        {
            ulong entry = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * 8));
            ulong table = entry & OffsetMask;
            if ((entry & L1Reserved) != 0)
            {
                throw new Qcow2Exception(path, $"L1 entry {i} (0x{entry:x16}) has reserved bits set");
            }
            if (table != 0 && ((table & clusterMask) != 0 || table > (ulong)fileLength || (ulong)fileLength - table < (ulong)header.ClusterSize))
            {
                throw new Qcow2Exception(path, $"L1 entry {i} points at an L2 table at 0x{table:x} that is misaligned or past the end of the file ({fileLength} bytes)");
            }
            l1[i] = table;
        }

        ImageSource? dataFile = null;
        long dataLength = fileLength;
        if (header.DataFile is { } name)
        {
            string dataPath = location.Resolve(path, name);
            try
            {
                dataFile = location.Open(dataPath);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new Qcow2Exception(path, $"external data file '{dataPath}' cannot be opened: {e.Message}", e);
            }
            dataLength = dataFile.Length;
        }
        return new Qcow2Layer(file, dataFile, header, l1, fileLength, dataLength) { Path = path };
    }

    /// <summary>
    /// The run from <paramref name="offset"/>. It goes on across L2 tables while its kind goes on
    /// (and, for data, its host offset): an image whose data clusters lie one after another in the
    /// file (preallocated metadata, an external data file) is read with one call per guest read,
    /// not one per L2 table.
    /// </summary>
    public override LayerRun Map(long offset, long length)
    {
        MapRun(offset, length, noWait: false, out LayerRun run);
        return run;
    }

    public override bool TryMapNoWait(long offset, long length, out LayerRun run) => MapRun(offset, length, noWait: true, out run);

    /// <summary>The run as <see cref="Map"/> gives it; with <paramref name="noWait"/>, false instead of reading an L2 table that is not cached.</summary>
    private bool MapRun(long offset, long length, bool noWait, out LayerRun run)
    {
        int spanBits = Header.ClusterBits + Header.L2Bits;
        long end = offset + length;
        run = default;
        long at = offset;
        while (at < end)
        {
            long l1Index = at >> spanBits;
            long tableEnd = Math.Min(end, (l1Index + 1) << spanBits);
            ulong table = _l1[l1Index];
            if (table == 0)
            {
                if (!Extend(ref run, offset, at, tableEnd - at, RunKind.Unallocated, 0))
                {
                    break;
                }
                at = tableEnd;
                continue;
            }
            byte[] l2;
            if (!noWait)
            {
                l2 = LoadL2((long)table);
            }
            else if (!_l2.TryGet((long)table, out byte[]? cached))
            {
                // The run so far is whole; only its first table may not be missing.
                return at > offset;
            }
            else
            {
                l2 = cached;
            }
            while (at < tableEnd)
            {
                (RunKind kind, long host, long unitEnd) = Classify(l2, at);
                long piece = Math.Min(unitEnd, tableEnd) - at;
                if (!Extend(ref run, offset, at, piece, kind, host) || kind == RunKind.Compressed)
                {
                    return true;
                }
                at += piece;
            }
        }
        return true;
    }

    /// <summary>Adds the piece at <paramref name="at"/> to the run that began at <paramref name="offset"/>; false when it cannot join it (a compressed cluster is a run of its own).</summary>
    private static bool Extend(ref LayerRun run, long offset, long at, long piece, RunKind kind, long host)
    {
        if (at == offset)
        {
            run = new LayerRun(piece, kind, host);
            return true;
        }
        if (kind == run.Kind && kind != RunKind.Compressed && (kind != RunKind.Data || host == run.HostOffset + run.Length))
        {
            run = run with { Length = run.Length + piece };
            return true;
        }
        return false;
    }

    /// <summary>What the L2 entry says about the guest byte at <paramref name="offset"/>, and where its cluster or subcluster ends.</summary>
    private (RunKind Kind, long Host, long UnitEnd) Classify(byte[] l2, long offset)
    {
        int clusterBits = Header.ClusterBits;
        long clusterSize = 1L << clusterBits;
        int index = (int)((offset >> clusterBits) & ((1L << Header.L2Bits) - 1));
        ulong entry = BinaryPrimitives.ReadUInt64BigEndian(l2.AsSpan(index * Header.L2EntrySize));
        long clusterStart = offset & ~(clusterSize - 1);
        long clusterEnd = clusterStart + clusterSize;
        if ((entry & CompressedFlag) != 0)
        {
            if (_dataFile is not null)
            {
                throw Corrupt($"L2 entry for guest offset 0x{clusterStart:x} is compressed in an image with an external data file");
            }
            return (RunKind.Compressed, (long)(entry & ~(Copied | CompressedFlag)), clusterEnd);
        }
        if ((entry & L2Reserved) != 0)
        {
            throw Corrupt($"L2 entry for guest offset 0x{clusterStart:x} (0x{entry:x16}) has reserved bits set");
        }
        ulong host = entry & OffsetMask;
        bool allocated = host != 0 || (_dataFile is not null && (entry & Copied) != 0);
        if (allocated && ((host & ((ulong)clusterSize - 1)) != 0 || host >= (ulong)_dataLength))
        {
            throw Corrupt($"L2 entry for guest offset 0x{clusterStart:x} points at a cluster at 0x{host:x} that is misaligned or past the end of its data file ({_dataLength} bytes)");
        }
        long hostAt = (long)host + (offset - clusterStart);
        if (!Header.ExtendedL2)
        {
            if ((entry & ZeroFlag) != 0)
            {
                return (RunKind.Zero, 0, clusterEnd);
            }
            return allocated ? (RunKind.Data, hostAt, clusterEnd) : (RunKind.Unallocated, 0, clusterEnd);
        }
        ulong bitmap = BinaryPrimitives.ReadUInt64BigEndian(l2.AsSpan(index * 16 + 8));
        uint allocation = (uint)bitmap;
        uint zeros = (uint)(bitmap >> 32);
        if ((allocation & zeros) != 0 || (!allocated && allocation != 0))
        {
            throw Corrupt($"subcluster bitmap for guest offset 0x{clusterStart:x} (0x{bitmap:x16}) is invalid");
        }
        int sub = (int)((offset - clusterStart) >> _subclusterBits);
        long subEnd = clusterStart + ((long)(sub + 1) << _subclusterBits);
        if ((zeros & (1u << sub)) != 0)
        {
            return (RunKind.Zero, 0, subEnd);
        }
        return (allocation & (1u << sub)) != 0 ? (RunKind.Data, hostAt, subEnd) : (RunKind.Unallocated, 0, subEnd);
    }

    public override void Read(LayerRun run, long guestOffset, Span<byte> destination)
    {
        if (run.Kind == RunKind.Data)
        {
            (_dataFile ?? _file).ReadZeroPadded(run.HostOffset, destination);
            return;
        }
        long clusterSize = Header.ClusterSize;
        byte[] cluster = Decompress(run.HostOffset, guestOffset & ~(clusterSize - 1));
        cluster.AsSpan((int)(guestOffset & (clusterSize - 1)), destination.Length).CopyTo(destination);
    }

    /// <summary>Uncompressed data from the page cache; a compressed cluster only when it is the one kept decompressed.</summary>
    public override bool TryReadNoWait(LayerRun run, long guestOffset, Span<byte> destination)
    {
        if (run.Kind == RunKind.Data)
        {
            return (_dataFile ?? _file).TryReadNoWait(destination, run.HostOffset);
        }
        if (_lastCompressed is { } last && last.Descriptor == run.HostOffset)
        {
            last.Bytes.AsSpan((int)(guestOffset & (Header.ClusterSize - 1)), destination.Length).CopyTo(destination);
            return true;
        }
        return false;
    }

    /// <summary>
    /// The cluster a compressed descriptor names, decompressed. The last one is kept: a guest
    /// reading a compressed cluster in small pieces decompresses it once.
    /// </summary>
    private byte[] Decompress(long descriptor, long guestCluster)
    {
        if (_lastCompressed is { } last && last.Descriptor == descriptor)
        {
            return last.Bytes;
        }
        int clusterBits = Header.ClusterBits;
        long host = descriptor & ((1L << _compressedShift) - 1);
        long sectors = ((descriptor >> _compressedShift) & ((1L << (clusterBits - 8)) - 1)) + 1;
        long size = sectors * 512 - (host & 511);
        if (host == 0 || host >= _fileLength)
        {
            throw Corrupt($"compressed cluster for guest offset 0x{guestCluster:x} is at 0x{host:x}, outside the file ({_fileLength} bytes)");
        }
        // The sector count may run past the file's end (qemu rounds it up): read what there is.
        size = Math.Min(size, _fileLength - host);
        byte[] compressed = ArrayPool<byte>.Shared.Rent((int)size);
        byte[] cluster = new byte[1 << clusterBits];
        try
        {
            int read = _file.Read(compressed.AsSpan(0, (int)size), host);
            using var input = new MemoryStream(compressed, 0, read, writable: false);
            using Stream decoder = Header.Compression == Qcow2Compression.Zstd
                ? new ZstdSharp.DecompressionStream(input, leaveOpen: true)
                : new DeflateStream(input, CompressionMode.Decompress, leaveOpen: true);
            int got = decoder.ReadAtLeast(cluster, cluster.Length, throwOnEndOfStream: false);
            if (got != cluster.Length)
            {
                throw Corrupt($"compressed cluster for guest offset 0x{guestCluster:x} decompresses to {got} bytes, not {cluster.Length}");
            }
        }
        catch (Exception e) when (e is not Qcow2Exception)
        {
            throw new Qcow2Exception(Path, $"compressed cluster for guest offset 0x{guestCluster:x} at 0x{host:x} does not decompress ({Header.Compression}): {e.Message}", e);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(compressed);
        }
        _lastCompressed = new DecompressedCluster(descriptor, cluster);
        return cluster;
    }

    private byte[] LoadL2(long offset)
    {
        if (_l2.TryGet(offset, out byte[]? table))
        {
            return table;
        }
        // Read outside the cache's lock: two readers missing the same table both read it, harmlessly.
        table = new byte[Header.ClusterSize];
        if (_file.Read(table, offset) != table.Length)
        {
            throw Corrupt($"L2 table at 0x{offset:x} could not be read whole");
        }
        _l2.Add(offset, table);
        return table;
    }

    private Qcow2Exception Corrupt(string reason) => new(Path, reason);

    public override void Dispose()
    {
        _file.Dispose();
        _dataFile?.Dispose();
    }

    private sealed record DecompressedCluster(long Descriptor, byte[] Bytes);
}

/// <summary>A bounded least-recently-used cache of L2 tables, keyed by their file offset; safe for concurrent readers.</summary>
internal sealed class L2Cache(int capacity)
{
    private readonly Dictionary<long, LinkedListNode<(long Offset, byte[] Table)>> _index = [];
    private readonly LinkedList<(long Offset, byte[] Table)> _order = new();
    private readonly Lock _lock = new();

    public int Capacity { get; } = capacity;

    public int Count
    {
        get
        {
            lock (_lock)
            {
                return _index.Count;
            }
        }
    }

    public bool TryGet(long offset, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out byte[]? table)
    {
        lock (_lock)
        {
            if (_index.TryGetValue(offset, out var node))
            {
                _order.Remove(node);
                _order.AddFirst(node);
                table = node.Value.Table;
                return true;
            }
        }
        table = null;
        return false;
    }

    public void Add(long offset, byte[] table)
    {
        lock (_lock)
        {
            if (_index.ContainsKey(offset))
            {
                return;
            }
            _index[offset] = _order.AddFirst((offset, table));
            if (_index.Count > Capacity)
            {
                _index.Remove(_order.Last!.Value.Offset);
                _order.RemoveLast();
            }
        }
    }
}
