using System.Security.Cryptography;
using System.Text.Json.Serialization;

namespace Gateway.Backup;

/// <summary>What one chunk of the disk held at the backup's moment.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<ChunkKind>))]
public enum ChunkKind
{
    /// <summary>Not allocated (base:allocation HOLE): reads as zeros, restored as a hole.</summary>
    [JsonStringEnumMemberName("hole")]
    Hole,

    /// <summary>Reads as zeros (allocated zeros, or data that was all zero bytes): nothing stored.</summary>
    [JsonStringEnumMemberName("zero")]
    Zero,

    /// <summary>Data, stored as the chunk object named by its SHA-256.</summary>
    [JsonStringEnumMemberName("data")]
    Data,
}

/// <summary>One chunk index of the disk: its kind, and for data the SHA-256 (lower-case hex) of its uncompressed bytes.</summary>
public sealed record ChunkEntry(
    [property: JsonPropertyName("kind")] ChunkKind Kind,
    [property: JsonPropertyName("sha256"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Sha256 = null)
{
    public static readonly ChunkEntry Hole = new(ChunkKind.Hole);
    public static readonly ChunkEntry Zero = new(ChunkKind.Zero);
}

/// <summary>
/// A backup: the whole disk at one moment, one entry per chunk index, so every backup is
/// logically full and a restore reads one manifest, never a chain. Written last, after every
/// chunk it names is stored. <see cref="Bitmap"/> names the export's dirty bitmap added at this
/// backup's start (before any byte was read): what it marks is everything that may differ from
/// this manifest, so the next backup reads only that.
/// </summary>
public sealed record Manifest(
    [property: JsonPropertyName("version")] int Version,
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("export")] string Export,
    [property: JsonPropertyName("diskSize")] long DiskSize,
    [property: JsonPropertyName("chunkSize")] int ChunkSize,
    [property: JsonPropertyName("created")] DateTimeOffset Created,
    [property: JsonPropertyName("chunks")] IReadOnlyList<ChunkEntry> Chunks,
    [property: JsonPropertyName("bitmap"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Bitmap = null)
{
    public const int CurrentVersion = 1;

    public static long ChunkCount(long diskSize, int chunkSize) => (diskSize + chunkSize - 1) / chunkSize;

    /// <summary>The byte range of chunk <paramref name="index"/> (the last one may be short).</summary>
    public (long Offset, int Length) Range(long index)
    {
        long offset = index * ChunkSize;
        return (offset, (int)Math.Min(ChunkSize, DiskSize - offset));
    }

    /// <summary>The rules a manifest read from a store must keep before anything trusts it.</summary>
    /// <exception cref="BackupFormatException">It breaks one.</exception>
    public void Validate()
    {
        if (Version != CurrentVersion)
        {
            throw new BackupFormatException($"backup {Id} has manifest version {Version}; this gateway reads version {CurrentVersion}");
        }
        if (DiskSize < 0 || ChunkSize <= 0 || Chunks is null || Chunks.Count != ChunkCount(DiskSize, ChunkSize))
        {
            throw new BackupFormatException($"backup {Id}: {Chunks?.Count ?? 0} chunk entries do not cover a disk of {DiskSize} bytes in chunks of {ChunkSize}");
        }
        for (int i = 0; i < Chunks.Count; i++)
        {
            ChunkEntry entry = Chunks[i];
            bool hashed = entry.Sha256 is { Length: 64 } hash && hash.All(char.IsAsciiHexDigitLower);
            if (entry.Kind == ChunkKind.Data != hashed || !Enum.IsDefined(entry.Kind))
            {
                throw new BackupFormatException($"backup {Id}: chunk {i} (offset {(long)i * ChunkSize}) is '{entry.Kind}' with sha256 '{entry.Sha256}'");
            }
        }
    }

    /// <summary>A new id that sorts by time: <c>20261206T122700Z-</c> and 8 random hex digits.</summary>
    public static string NewId(DateTimeOffset now) =>
        now.UtcDateTime.ToString("yyyyMMdd'T'HHmmss'Z'", System.Globalization.CultureInfo.InvariantCulture) + "-" + Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(4));

    /// <summary>Ids are file names in the store: nothing that could leave the backups folder.</summary>
    public static bool IsValidId(string id) =>
        id.Length is > 0 and <= 64 && id.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_');
}

/// <summary>The repository or a manifest is not of a format this gateway reads, or breaks its rules.</summary>
public sealed class BackupFormatException(string message) : Exception(message);

/// <summary>A stored chunk is missing or does not hash to what the manifest says.</summary>
public sealed class BackupCorruptException(string message) : Exception(message);
