using System.Buffers.Binary;
using System.Numerics;

namespace Gateway.Backends.S3;

/// <summary>What a write-log record does to its range.</summary>
public enum LogRecordKind : uint
{
    /// <summary>The record's data follows it.</summary>
    Write = 1,

    /// <summary>TRIM, or WRITE_ZEROES that may punch a hole: reads zeros, a hole in <c>base:allocation</c>.</summary>
    Trim = 2,

    /// <summary>WRITE_ZEROES with NO_HOLE: reads zeros, allocated (zero, not a hole).</summary>
    Zero = 3,
}

/// <summary>One record as decoded from a segment: where its data starts inside the segment object.</summary>
public readonly record struct LogRecord(long Offset, long Length, LogRecordKind Kind, int DataOffset);

/// <summary>
/// A write-log segment object, <c>PREFIX/log/&lt;term&gt;-&lt;seq&gt;</c> (16 hex digits each, so the
/// keys sort in replay order). Little-endian throughout:
/// <code>
/// header   0  magic "GWLOGSG1"        8
///          8  term                    u64
///         16  seq                     u64
///         24  record count            u32
///         28  reserved (0)            u32
/// records 32  offset u64 | length u64 | kind u32 | reserved u32 | data (length bytes, Write only)
/// trailer     CRC-32C of every byte before it   u32 | magic "GWSE"  u32
/// </code>
/// A segment that fails any check (too short, bad magic, bad checksum, a record past the end) is
/// torn or corrupt and is not replayed, nor is anything after it in its term.
/// </summary>
public static class LogSegment
{
    public const int HeaderSize = 32;
    public const int RecordHeaderSize = 24;
    public const int TrailerSize = 8;

    private const ulong Magic = 0x3147535F474F4C57; // "WLOG_SG1" read little-endian: distinct from any chunk's bytes
    private const uint EndMagic = 0x45535747; // "GWSE"

    public static string Key(string prefix, long term, long seq) => $"{prefix}/log/{term:x16}-{seq:x16}";

    /// <summary>The term and sequence number in a segment key, or false when the key is not one.</summary>
    public static bool TryParseKey(string prefix, string key, out long term, out long seq)
    {
        term = seq = 0;
        string logPrefix = prefix + "/log/";
        if (!key.StartsWith(logPrefix, StringComparison.Ordinal) || key.Length != logPrefix.Length + 33 || key[logPrefix.Length + 16] != '-')
        {
            return false;
        }
        ReadOnlySpan<char> name = key.AsSpan(logPrefix.Length);
        return long.TryParse(name[..16], System.Globalization.NumberStyles.AllowHexSpecifier, null, out term) && term >= 0 &&
               long.TryParse(name[17..], System.Globalization.NumberStyles.AllowHexSpecifier, null, out seq) && seq >= 0;
    }

    public static void WriteHeader(Span<byte> buffer, long term, long seq)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(buffer, Magic);
        BinaryPrimitives.WriteInt64LittleEndian(buffer[8..], term);
        BinaryPrimitives.WriteInt64LittleEndian(buffer[16..], seq);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[24..], 0);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[28..], 0);
    }

    /// <summary>Writes a record header at <paramref name="buffer"/>; the caller copies a Write's data after it.</summary>
    public static void WriteRecordHeader(Span<byte> buffer, long offset, long length, LogRecordKind kind)
    {
        BinaryPrimitives.WriteInt64LittleEndian(buffer, offset);
        BinaryPrimitives.WriteInt64LittleEndian(buffer[8..], length);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[16..], (uint)kind);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[20..], 0);
    }

    /// <summary>Stamps the record count and appends the trailer at <paramref name="length"/>; returns the object's length.</summary>
    public static int Seal(Span<byte> buffer, int length, int records)
    {
        BinaryPrimitives.WriteInt32LittleEndian(buffer[24..], records);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[length..], Crc32C(buffer[..length]));
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[(length + 4)..], EndMagic);
        return length + TrailerSize;
    }

    /// <summary>Checks a whole segment object and decodes its records; false when it is torn or corrupt.</summary>
    public static bool TryDecode(ReadOnlySpan<byte> segment, long expectedTerm, long expectedSeq, List<LogRecord> records)
    {
        records.Clear();
        if (segment.Length < HeaderSize + TrailerSize ||
            BinaryPrimitives.ReadUInt64LittleEndian(segment) != Magic ||
            BinaryPrimitives.ReadUInt32LittleEndian(segment[^4..]) != EndMagic)
        {
            return false;
        }
        int body = segment.Length - TrailerSize;
        if (BinaryPrimitives.ReadUInt32LittleEndian(segment[body..]) != Crc32C(segment[..body]) ||
            BinaryPrimitives.ReadInt64LittleEndian(segment[8..]) != expectedTerm ||
            BinaryPrimitives.ReadInt64LittleEndian(segment[16..]) != expectedSeq)
        {
            return false;
        }
        int count = BinaryPrimitives.ReadInt32LittleEndian(segment[24..]);
        int at = HeaderSize;
        for (int i = 0; i < count; i++)
        {
            if (body - at < RecordHeaderSize)
            {
                return false;
            }
            long offset = BinaryPrimitives.ReadInt64LittleEndian(segment[at..]);
            long length = BinaryPrimitives.ReadInt64LittleEndian(segment[(at + 8)..]);
            var kind = (LogRecordKind)BinaryPrimitives.ReadUInt32LittleEndian(segment[(at + 16)..]);
            at += RecordHeaderSize;
            if (offset < 0 || length <= 0 || kind is not (LogRecordKind.Write or LogRecordKind.Trim or LogRecordKind.Zero))
            {
                return false;
            }
            records.Add(new LogRecord(offset, length, kind, at));
            if (kind == LogRecordKind.Write)
            {
                if (length > body - at)
                {
                    return false;
                }
                at += (int)length;
            }
        }
        return at == body;
    }

    /// <summary>
    /// The fold marker <c>PREFIX/log/folded-&lt;term&gt;-&lt;seq&gt;</c>: every segment whose key sorts below
    /// (term, seq) is folded into the chunk objects, so replay skips it and it may be deleted. A new
    /// key per fold, never an overwrite: a PUT cut off halfway (s3rver keeps the part it got) leaves
    /// the previous marker whole. Not a segment key (another length), nor a chunk name.
    /// <code>
    ///  0  magic "GWFOLD01"  8 | 8  term u64 | 16  seq u64 | 24  CRC-32C of bytes 0..24  u32
    /// </code>
    /// </summary>
    public static string FoldKey(string prefix, long term, long seq) => $"{prefix}/log/folded-{term:x16}-{seq:x16}";

    public const int FoldMarkerSize = 28;

    private const ulong FoldMagic = 0x31304C444F465747; // "GWFOLD01" read little-endian

    /// <summary>The (term, seq) a fold-marker key names, or false when the key is not one.</summary>
    public static bool TryParseFoldKey(string prefix, string key, out long term, out long seq)
    {
        term = seq = 0;
        string foldPrefix = prefix + "/log/folded-";
        if (!key.StartsWith(foldPrefix, StringComparison.Ordinal) || key.Length != foldPrefix.Length + 33 || key[foldPrefix.Length + 16] != '-')
        {
            return false;
        }
        ReadOnlySpan<char> name = key.AsSpan(foldPrefix.Length);
        return long.TryParse(name[..16], System.Globalization.NumberStyles.AllowHexSpecifier, null, out term) && term >= 0 &&
               long.TryParse(name[17..], System.Globalization.NumberStyles.AllowHexSpecifier, null, out seq) && seq >= 0;
    }

    public static byte[] FoldMarker(long term, long seq)
    {
        byte[] marker = new byte[FoldMarkerSize];
        BinaryPrimitives.WriteUInt64LittleEndian(marker, FoldMagic);
        BinaryPrimitives.WriteInt64LittleEndian(marker.AsSpan(8), term);
        BinaryPrimitives.WriteInt64LittleEndian(marker.AsSpan(16), seq);
        BinaryPrimitives.WriteUInt32LittleEndian(marker.AsSpan(24), Crc32C(marker.AsSpan(0, 24)));
        return marker;
    }

    /// <summary>True when <paramref name="marker"/> is a whole fold marker for (term, seq).</summary>
    public static bool IsFoldMarker(ReadOnlySpan<byte> marker, long term, long seq) =>
        marker.Length == FoldMarkerSize &&
        BinaryPrimitives.ReadUInt64LittleEndian(marker) == FoldMagic &&
        BinaryPrimitives.ReadInt64LittleEndian(marker[8..]) == term &&
        BinaryPrimitives.ReadInt64LittleEndian(marker[16..]) == seq &&
        BinaryPrimitives.ReadUInt32LittleEndian(marker[24..]) == Crc32C(marker[..24]);

    /// <summary>
    /// The term fence <c>PREFIX/log/term-&lt;term&gt;</c>: an owner's claim on the log. An open PUTs it
    /// twice: first as a claim (not complete, no ends) before it lists the bucket, so a stale writer
    /// that checks after that sees a higher term; then, after replay and before it acknowledges
    /// anything, complete, with where each older term's replayed segments end. A segment of an older
    /// term at or past its end (0 for a term the fence does not name) is a stale writer's, never seen
    /// by the owner: replay ignores it. Not a segment key, a fold-marker key, nor a chunk name, so an
    /// older gateway lists past it.
    /// <code>
    ///  0  magic "GWFENCE1"  8 | 8  term u64 | 16  flags u32 (1 = complete) | 20  count u32
    /// 24  count x (older term u64, end seq u64) | CRC-32C of every byte before it  u32
    /// </code>
    /// </summary>
    public static string FenceKey(string prefix, long term) => $"{prefix}/log/term-{term:x16}";

    /// <summary>The key prefix every fence of <paramref name="prefix"/> starts with (one LIST finds them).</summary>
    public static string FencePrefix(string prefix) => prefix + "/log/term-";

    private const ulong FenceMagic = 0x3145434E45465747; // "GWFENCE1" read little-endian

    /// <summary>The term a fence key names, or false when the key is not one.</summary>
    public static bool TryParseFenceKey(string prefix, string key, out long term)
    {
        term = 0;
        string fencePrefix = FencePrefix(prefix);
        return key.StartsWith(fencePrefix, StringComparison.Ordinal) && key.Length == fencePrefix.Length + 16 &&
               long.TryParse(key.AsSpan(fencePrefix.Length), System.Globalization.NumberStyles.AllowHexSpecifier, null, out term) && term >= 0;
    }

    /// <summary>A fence for <paramref name="term"/>: a claim when <paramref name="ends"/> is null, else complete.</summary>
    public static byte[] Fence(long term, IReadOnlyDictionary<long, long>? ends)
    {
        int count = ends?.Count ?? 0;
        byte[] fence = new byte[24 + 16 * count + 4];
        BinaryPrimitives.WriteUInt64LittleEndian(fence, FenceMagic);
        BinaryPrimitives.WriteInt64LittleEndian(fence.AsSpan(8), term);
        BinaryPrimitives.WriteUInt32LittleEndian(fence.AsSpan(16), ends is null ? 0u : 1u);
        BinaryPrimitives.WriteInt32LittleEndian(fence.AsSpan(20), count);
        int at = 24;
        foreach ((long older, long end) in (ends ?? new Dictionary<long, long>()).OrderBy(e => e.Key))
        {
            BinaryPrimitives.WriteInt64LittleEndian(fence.AsSpan(at), older);
            BinaryPrimitives.WriteInt64LittleEndian(fence.AsSpan(at + 8), end);
            at += 16;
        }
        BinaryPrimitives.WriteUInt32LittleEndian(fence.AsSpan(at), Crc32C(fence.AsSpan(0, at)));
        return fence;
    }

    /// <summary>
    /// Checks a fence object of <paramref name="term"/> and fills <paramref name="ends"/>; false when it
    /// is torn or corrupt. A whole claim decodes with <paramref name="complete"/> false and no ends.
    /// </summary>
    public static bool TryDecodeFence(ReadOnlySpan<byte> fence, long term, out bool complete, Dictionary<long, long> ends)
    {
        ends.Clear();
        complete = false;
        if (fence.Length < 28 || BinaryPrimitives.ReadUInt64LittleEndian(fence) != FenceMagic ||
            BinaryPrimitives.ReadInt64LittleEndian(fence[8..]) != term)
        {
            return false;
        }
        int count = BinaryPrimitives.ReadInt32LittleEndian(fence[20..]);
        if (count < 0 || fence.Length != 24 + 16L * count + 4 ||
            BinaryPrimitives.ReadUInt32LittleEndian(fence[^4..]) != Crc32C(fence[..^4]))
        {
            return false;
        }
        complete = BinaryPrimitives.ReadUInt32LittleEndian(fence[16..]) == 1;
        for (int i = 0, at = 24; i < count; i++, at += 16)
        {
            ends[BinaryPrimitives.ReadInt64LittleEndian(fence[at..])] = BinaryPrimitives.ReadInt64LittleEndian(fence[(at + 8)..]);
        }
        return true;
    }

    /// <summary>
    /// An index checkpoint <c>PREFIX/log/index-&lt;term&gt;-&lt;seq&gt;</c>: the extent index as it was
    /// once every segment sorting below (term, seq) was applied and none above, with the stored
    /// segments it covers (not yet folded). A new key each time, the previous one deleted after; a torn
    /// or corrupt one is ignored (the open replays the segments instead).
    /// <code>
    ///  0  magic "GWINDEX1" 8 | 8  term u64 | 16  seq u64 | 24  segments u32 | 28  extents u32
    /// 32  segments x (term u64, seq u64, length u32, reserved u32)
    ///     extents x (offset u64, length u64, source u32, segment number i32 (-1: none), segment offset u64)
    ///     CRC-32C of every byte before it  u32
    /// </code>
    /// </summary>
    public static string CheckpointKey(string prefix, long term, long seq) => $"{prefix}/log/index-{term:x16}-{seq:x16}";

    private const ulong CheckpointMagic = 0x315845444E495747; // "GWINDEX1" read little-endian

    /// <summary>The (term, seq) a checkpoint key names, or false when the key is not one.</summary>
    public static bool TryParseCheckpointKey(string prefix, string key, out long term, out long seq)
    {
        term = seq = 0;
        string indexPrefix = prefix + "/log/index-";
        if (!key.StartsWith(indexPrefix, StringComparison.Ordinal) || key.Length != indexPrefix.Length + 33 || key[indexPrefix.Length + 16] != '-')
        {
            return false;
        }
        ReadOnlySpan<char> name = key.AsSpan(indexPrefix.Length);
        return long.TryParse(name[..16], System.Globalization.NumberStyles.AllowHexSpecifier, null, out term) && term >= 0 &&
               long.TryParse(name[17..], System.Globalization.NumberStyles.AllowHexSpecifier, null, out seq) && seq >= 0;
    }

    /// <summary>One stored segment a checkpoint covers.</summary>
    public readonly record struct CheckpointSegment(long Term, long Seq, int Length);

    /// <summary>One extent of a checkpoint; <see cref="Segment"/> numbers the checkpoint's segments (-1: none).</summary>
    public readonly record struct CheckpointExtent(long Offset, long Length, uint Source, int Segment, long SegmentOffset);

    public static byte[] Checkpoint(long term, long seq, IReadOnlyList<CheckpointSegment> segments, IReadOnlyList<CheckpointExtent> extents)
    {
        byte[] data = new byte[32 + 24L * segments.Count + 32L * extents.Count + 4];
        Span<byte> span = data;
        BinaryPrimitives.WriteUInt64LittleEndian(span, CheckpointMagic);
        BinaryPrimitives.WriteInt64LittleEndian(span[8..], term);
        BinaryPrimitives.WriteInt64LittleEndian(span[16..], seq);
        BinaryPrimitives.WriteInt32LittleEndian(span[24..], segments.Count);
        BinaryPrimitives.WriteInt32LittleEndian(span[28..], extents.Count);
        int at = 32;
        foreach (CheckpointSegment segment in segments)
        {
            BinaryPrimitives.WriteInt64LittleEndian(span[at..], segment.Term);
            BinaryPrimitives.WriteInt64LittleEndian(span[(at + 8)..], segment.Seq);
            BinaryPrimitives.WriteInt32LittleEndian(span[(at + 16)..], segment.Length);
            BinaryPrimitives.WriteInt32LittleEndian(span[(at + 20)..], 0);
            at += 24;
        }
        foreach (CheckpointExtent extent in extents)
        {
            BinaryPrimitives.WriteInt64LittleEndian(span[at..], extent.Offset);
            BinaryPrimitives.WriteInt64LittleEndian(span[(at + 8)..], extent.Length);
            BinaryPrimitives.WriteUInt32LittleEndian(span[(at + 16)..], extent.Source);
            BinaryPrimitives.WriteInt32LittleEndian(span[(at + 20)..], extent.Segment);
            BinaryPrimitives.WriteInt64LittleEndian(span[(at + 24)..], extent.SegmentOffset);
            at += 32;
        }
        BinaryPrimitives.WriteUInt32LittleEndian(span[at..], Crc32C(span[..at]));
        return data;
    }

    /// <summary>Checks a whole checkpoint of (term, seq) and decodes it; false when it is torn or corrupt.</summary>
    public static bool TryDecodeCheckpoint(ReadOnlySpan<byte> data, long term, long seq, List<CheckpointSegment> segments, List<CheckpointExtent> extents)
    {
        segments.Clear();
        extents.Clear();
        if (data.Length < 36 || BinaryPrimitives.ReadUInt64LittleEndian(data) != CheckpointMagic ||
            BinaryPrimitives.ReadInt64LittleEndian(data[8..]) != term || BinaryPrimitives.ReadInt64LittleEndian(data[16..]) != seq)
        {
            return false;
        }
        int segmentCount = BinaryPrimitives.ReadInt32LittleEndian(data[24..]);
        int extentCount = BinaryPrimitives.ReadInt32LittleEndian(data[28..]);
        if (segmentCount < 0 || extentCount < 0 || data.Length != 32 + 24L * segmentCount + 32L * extentCount + 4 ||
            BinaryPrimitives.ReadUInt32LittleEndian(data[^4..]) != Crc32C(data[..^4]))
        {
            return false;
        }
        int at = 32;
        for (int i = 0; i < segmentCount; i++, at += 24)
        {
            segments.Add(new CheckpointSegment(BinaryPrimitives.ReadInt64LittleEndian(data[at..]), BinaryPrimitives.ReadInt64LittleEndian(data[(at + 8)..]),
                BinaryPrimitives.ReadInt32LittleEndian(data[(at + 16)..])));
        }
        for (int i = 0; i < extentCount; i++, at += 32)
        {
            var extent = new CheckpointExtent(BinaryPrimitives.ReadInt64LittleEndian(data[at..]), BinaryPrimitives.ReadInt64LittleEndian(data[(at + 8)..]),
                BinaryPrimitives.ReadUInt32LittleEndian(data[(at + 16)..]), BinaryPrimitives.ReadInt32LittleEndian(data[(at + 20)..]),
                BinaryPrimitives.ReadInt64LittleEndian(data[(at + 24)..]));
            if (extent.Offset < 0 || extent.Length <= 0 || extent.Segment < -1 || extent.Segment >= segmentCount || extent.Source is < 1 or > 3 ||
                (extent.Source == 1) != (extent.Segment >= 0))
            {
                return false;
            }
            extents.Add(extent);
        }
        return true;
    }

    /// <summary>CRC-32C (Castagnoli) with the processor's instruction where there is one.</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = ~0u;
        int i = 0;
        for (; i + 8 <= data.Length; i += 8)
        {
            crc = BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(data[i..]));
        }
        for (; i < data.Length; i++)
        {
            crc = BitOperations.Crc32C(crc, data[i]);
        }
        return ~crc;
    }
}
