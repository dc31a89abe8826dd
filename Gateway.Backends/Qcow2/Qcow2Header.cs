using System.Buffers.Binary;
using System.Text;

namespace Gateway.Backends.Qcow2;

/// <summary>How compressed clusters are compressed (header field compression_type, incompatible bit 3).</summary>
public enum Qcow2Compression : byte
{
    Deflate = 0,
    Zstd = 1,
}

/// <summary>
/// A qcow2 header (qemu docs/interop/qcow2.txt, "Header" and "Header extensions"), parsed and
/// checked against the file's length and itself before any table is read.
/// <code>
///  0 magic "QFI\xfb"     4 version (2|3)     8 backing_file_offset   16 backing_file_size
/// 20 cluster_bits       24 size             32 crypt_method          36 l1_size
/// 40 l1_table_offset    48 refcount_table_offset 56 refcount_table_clusters
/// 60 nb_snapshots       64 snapshots_offset
/// v3: 72 incompatible_features 80 compatible_features 88 autoclear_features
///     96 refcount_order 100 header_length [104 compression_type]
/// then extensions: type(4) length(4) data, padded to 8; type 0 ends them.
/// </code>
/// </summary>
public sealed class Qcow2Header
{
    public const uint Magic = 0x514649fb;
    public const int MinClusterBits = 9;
    public const int MaxClusterBits = 21;
    /// <summary>qemu's QCOW_MAX_L1_SIZE: no L1 table beyond 32 MiB is read.</summary>
    public const long MaxL1Bytes = 32L << 20;

    private const ulong IncompatibleDirty = 1UL << 0;
    private const ulong IncompatibleCorrupt = 1UL << 1;
    private const ulong IncompatibleDataFile = 1UL << 2;
    private const ulong IncompatibleCompression = 1UL << 3;
    private const ulong IncompatibleExtendedL2 = 1UL << 4;
    private const ulong IncompatibleKnown = (1UL << 5) - 1;

    private const uint ExtensionEnd = 0;
    private const uint ExtensionBackingFormat = 0xe2792aca;
    private const uint ExtensionFeatureTable = 0x6803f857;
    private const uint ExtensionEncryption = 0x0537be77;
    private const uint ExtensionDataFile = 0x44415441;

    public int Version { get; private init; }

    public int ClusterBits { get; private init; }

    public int ClusterSize => 1 << ClusterBits;

    public long VirtualSize { get; private init; }

    public int L1Size { get; private init; }

    public long L1Offset { get; private init; }

    public string? BackingFile { get; private init; }

    public string? BackingFormat { get; private init; }

    public string? DataFile { get; private init; }

    public bool ExtendedL2 { get; private init; }

    public Qcow2Compression Compression { get; private init; }

    public ulong IncompatibleFeatures { get; private init; }

    public ulong CompatibleFeatures { get; private init; }

    public ulong AutoclearFeatures { get; private init; }

    /// <summary>Bytes of one L2 entry: 8, or 16 with extended L2 entries (subclusters).</summary>
    public int L2EntrySize => ExtendedL2 ? 16 : 8;

    /// <summary>log2 of the entries in one L2 table.</summary>
    public int L2Bits => ClusterBits - (ExtendedL2 ? 4 : 3);

    /// <summary>Reads and checks the header of an open image file.</summary>
    public static Qcow2Header Read(ImageSource file)
    {
        string path = file.Name;
        long fileLength = file.Length;
        if (fileLength < 72)
        {
            throw new Qcow2Exception(path, $"file of {fileLength} bytes is shorter than a qcow2 header");
        }
        // Everything the header names sits in its first cluster; read at most the largest one.
        byte[] buffer = new byte[(int)Math.Min(fileLength, 1 << MaxClusterBits)];
        int got = file.Read(buffer, 0);
        return Parse(buffer.AsSpan(0, got), fileLength, path);
    }

    /// <summary>Parses a header from the image's first bytes (<paramref name="fileLength"/> is the whole file's).</summary>
    public static Qcow2Header Parse(ReadOnlySpan<byte> head, long fileLength, string path)
    {
        if (head.Length < 72 || BinaryPrimitives.ReadUInt32BigEndian(head) != Magic)
        {
            throw new Qcow2Exception(path, "not a qcow2 image (no QFI\\xfb magic)");
        }
        uint version = BinaryPrimitives.ReadUInt32BigEndian(head[4..]);
        if (version is not (2 or 3))
        {
            throw new Qcow2Exception(path, $"qcow2 version {version} is not supported (only 2 and 3)");
        }
        uint clusterBits = BinaryPrimitives.ReadUInt32BigEndian(head[20..]);
        if (clusterBits is < MinClusterBits or > MaxClusterBits)
        {
            throw new Qcow2Exception(path, $"cluster_bits {clusterBits} is outside {MinClusterBits}..{MaxClusterBits}");
        }
        int clusterSize = 1 << (int)clusterBits;
        if (head.Length < Math.Min(clusterSize, fileLength))
        {
            throw new Qcow2Exception(path, "the header's cluster could not be read whole");
        }
        uint cryptMethod = BinaryPrimitives.ReadUInt32BigEndian(head[32..]);
        if (cryptMethod != 0)
        {
            throw new Qcow2Exception(path, $"the image is encrypted (crypt_method {cryptMethod}{(cryptMethod == 2 ? ", LUKS" : cryptMethod == 1 ? ", AES" : "")}): encrypted images are not served");
        }

        ulong incompatible = 0, compatible = 0, autoclear = 0;
        int headerLength = 72;
        var compression = Qcow2Compression.Deflate;
        if (version == 3)
        {
            if (head.Length < 104)
            {
                throw new Qcow2Exception(path, "version 3 header is cut short");
            }
            incompatible = BinaryPrimitives.ReadUInt64BigEndian(head[72..]);
            compatible = BinaryPrimitives.ReadUInt64BigEndian(head[80..]);
            autoclear = BinaryPrimitives.ReadUInt64BigEndian(head[88..]);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(head[100..]);
            if (length < 104 || length % 8 != 0 || length > Math.Min(clusterSize, head.Length))
            {
                throw new Qcow2Exception(path, $"header_length {length} is not a multiple of 8 between 104 and the cluster size");
            }
            headerLength = (int)length;
            if ((incompatible & IncompatibleCompression) != 0)
            {
                if (headerLength < 105)
                {
                    throw new Qcow2Exception(path, "the compression type bit is set but the header has no compression_type field");
                }
                byte type = head[104];
                compression = type switch
                {
                    0 => Qcow2Compression.Deflate,
                    1 => Qcow2Compression.Zstd,
                    _ => throw new Qcow2Exception(path, $"unknown compression type {type}"),
                };
            }
            else if (headerLength > 104 && head[104] != 0)
            {
                throw new Qcow2Exception(path, $"compression type {head[104]} without the compression type feature bit");
            }
        }

        // Extensions come before the feature checks so an unknown bit can be named from the feature table.
        string? backingFormat = null, dataFile = null;
        var featureNames = new Dictionary<(int Type, int Bit), string>();
        bool encryptionExtension = false;
        int at = headerLength;
        while (true)
        {
            if (at + 8 > Math.Min(clusterSize, head.Length))
            {
                throw new Qcow2Exception(path, "header extensions run past the first cluster");
            }
            uint type = BinaryPrimitives.ReadUInt32BigEndian(head[at..]);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(head[(at + 4)..]);
            at += 8;
            if (type == ExtensionEnd)
            {
                break;
            }
            if (length > (uint)(Math.Min(clusterSize, head.Length) - at))
            {
                throw new Qcow2Exception(path, $"header extension 0x{type:x8} of {length} bytes runs past the first cluster");
            }
            ReadOnlySpan<byte> data = head.Slice(at, (int)length);
            switch (type)
            {
                case ExtensionBackingFormat:
                    backingFormat = Name(data, path, "backing format");
                    break;
                case ExtensionDataFile:
                    dataFile = Name(data, path, "external data file name");
                    break;
                case ExtensionEncryption:
                    encryptionExtension = true;
                    break;
                case ExtensionFeatureTable:
                    for (int entry = 0; entry + 48 <= data.Length; entry += 48)
                    {
                        featureNames[(data[entry], data[entry + 1])] = Name(data.Slice(entry + 2, 46), path, "feature name");
                    }
                    break;
            }
            at += (int)((length + 7) & ~7u);
        }
        if (encryptionExtension)
        {
            throw new Qcow2Exception(path, "the image has an encryption header: encrypted images are not served");
        }

        if ((incompatible & IncompatibleDirty) != 0)
        {
            throw new Qcow2Exception(path, "the image is marked dirty (incompatible bit 0: its refcounts were not written back; open it once with qemu-img check -r all)");
        }
        if ((incompatible & IncompatibleCorrupt) != 0)
        {
            throw new Qcow2Exception(path, "the image is marked corrupt (incompatible bit 1); repair it with qemu-img check -r all");
        }
        ulong unknown = incompatible & ~IncompatibleKnown;
        if (unknown != 0)
        {
            int bit = System.Numerics.BitOperations.TrailingZeroCount(unknown);
            string name = featureNames.TryGetValue((0, bit), out string? n) ? $" '{n}'" : "";
            throw new Qcow2Exception(path, $"unknown incompatible feature bit {bit}{name}: the image needs a feature the gateway does not know");
        }
        bool hasDataFile = (incompatible & IncompatibleDataFile) != 0;
        if (hasDataFile && dataFile is null)
        {
            throw new Qcow2Exception(path, "the image uses an external data file but names none");
        }
        if (!hasDataFile)
        {
            dataFile = null;
        }
        bool extendedL2 = (incompatible & IncompatibleExtendedL2) != 0;
        if (extendedL2 && clusterBits < 14)
        {
            throw new Qcow2Exception(path, $"extended L2 entries need clusters of 16 KiB or more, not {clusterSize} bytes");
        }

        ulong size = BinaryPrimitives.ReadUInt64BigEndian(head[24..]);
        if (size > long.MaxValue / 2)
        {
            throw new Qcow2Exception(path, $"virtual size {size} is too large");
        }
        uint l1Size = BinaryPrimitives.ReadUInt32BigEndian(head[36..]);
        ulong l1Offset = BinaryPrimitives.ReadUInt64BigEndian(head[40..]);
        int l2Bits = (int)clusterBits - (extendedL2 ? 4 : 3);
        int spanBits = (int)clusterBits + l2Bits;
        ulong l1Needed = (size + (1UL << spanBits) - 1) >> spanBits;
        if ((ulong)l1Size * 8 > MaxL1Bytes)
        {
            throw new Qcow2Exception(path, $"L1 table of {l1Size} entries is larger than {MaxL1Bytes >> 20} MiB");
        }
        if (l1Size < l1Needed)
        {
            throw new Qcow2Exception(path, $"L1 table of {l1Size} entries is too small for a virtual size of {size} bytes ({l1Needed} needed)");
        }
        // Checked even for an empty table, as qemu does: the offset becomes a file offset (found
        // by ops/fuzz: an empty L1 at 0xfffa000000000600 reached RandomAccess as a negative offset).
        if ((l1Offset & (ulong)(clusterSize - 1)) != 0 || l1Offset > long.MaxValue)
        {
            throw new Qcow2Exception(path, $"L1 table offset 0x{l1Offset:x} is not a cluster boundary within a file");
        }
        if (l1Size > 0)
        {
            if (l1Offset == 0)
            {
                throw new Qcow2Exception(path, "L1 table offset 0 is the header's cluster");
            }
            if (l1Offset > (ulong)fileLength || (ulong)fileLength - l1Offset < (ulong)l1Size * 8)
            {
                throw new Qcow2Exception(path, $"L1 table at 0x{l1Offset:x} ({l1Size} entries) runs past the end of the file ({fileLength} bytes)");
            }
        }

        string? backingFile = null;
        ulong backingOffset = BinaryPrimitives.ReadUInt64BigEndian(head[8..]);
        uint backingSize = BinaryPrimitives.ReadUInt32BigEndian(head[16..]);
        if (backingOffset != 0)
        {
            if (backingSize == 0 || backingSize > 1023 || backingOffset > (ulong)Math.Min(clusterSize, head.Length) || (ulong)Math.Min(clusterSize, head.Length) - backingOffset < backingSize)
            {
                throw new Qcow2Exception(path, $"backing file name at 0x{backingOffset:x} ({backingSize} bytes) is not within the first cluster or longer than 1023 bytes");
            }
            backingFile = Name(head.Slice((int)backingOffset, (int)backingSize), path, "backing file name");
        }
        return new Qcow2Header
        {
            Version = (int)version,
            ClusterBits = (int)clusterBits,
            VirtualSize = (long)size,
            L1Size = (int)l1Size,
            L1Offset = (long)l1Offset,
            BackingFile = backingFile,
            BackingFormat = backingFormat,
            DataFile = dataFile,
            ExtendedL2 = extendedL2,
            Compression = compression,
            IncompatibleFeatures = incompatible,
            CompatibleFeatures = compatible,
            AutoclearFeatures = autoclear,
        };
    }

    private static string Name(ReadOnlySpan<byte> bytes, string path, string what)
    {
        int end = bytes.IndexOf((byte)0);
        ReadOnlySpan<byte> text = end >= 0 ? bytes[..end] : bytes;
        try
        {
            return new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(text);
        }
        catch (DecoderFallbackException e)
        {
            throw new Qcow2Exception(path, $"{what} is not valid UTF-8", e);
        }
    }
}
