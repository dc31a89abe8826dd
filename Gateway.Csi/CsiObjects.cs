using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;

namespace Gateway.Csi;

/// <summary>
/// How CSI objects live in the gateway. A volume is an export; a snapshot is a read-only overlay
/// export that shares the source volume's frozen layers (the gateway's snapshot), plus a dirty
/// bitmap on the source volume named <see cref="BitmapOf"/> that records every write after it.
/// Which exports are the plugin's, and the CSI facts the gateway has no field for (the CO's name,
/// a snapshot's source and creation time), are kept in the export's description, so the plugin
/// itself holds no state: any replica, restarted or not, reads the same answers back.
/// </summary>
public static partial class CsiObjects
{
    private const string VolumeTag = "csi-volume ";
    private const string SnapshotTag = "csi-snapshot ";

    /// <summary>Longest id that still leaves room for the bitmap prefix within the gateway's 128 characters.</summary>
    private const int MaxIdLength = 120;

    /// <summary>The export name for a CO's volume name: the name itself when the gateway accepts it, else a stable hash of it.</summary>
    public static string VolumeId(string name) => IdFor(name, "vol-");

    public static string SnapshotId(string name) => IdFor(name, "snap-");

    /// <summary>The dirty bitmap on the source volume that starts when this snapshot is taken.</summary>
    public static string BitmapOf(string snapshotId) => "csi." + snapshotId;

    public static string VolumeDescription(string name) => VolumeTag + name;

    public static string SnapshotDescription(string sourceVolumeId, DateTimeOffset created, string name) =>
        $"{SnapshotTag}{sourceVolumeId} {created.UtcTicks} {name}";

    /// <summary>The CO's name of a volume export, or null when the export is not one of the plugin's volumes.</summary>
    public static string? VolumeName(GatewayExport export) =>
        !export.ReadOnly && export.Description is { } d && d.StartsWith(VolumeTag, StringComparison.Ordinal) ? d[VolumeTag.Length..] : null;

    /// <summary>The snapshot an export stands for, or null when it is not one of the plugin's snapshots.</summary>
    public static CsiSnapshot? Snapshot(GatewayExport export)
    {
        if (!export.ReadOnly || export.Description is not { } d || !d.StartsWith(SnapshotTag, StringComparison.Ordinal))
        {
            return null;
        }
        string[] parts = d[SnapshotTag.Length..].Split(' ', 3);
        return parts.Length == 3 && long.TryParse(parts[1], out long ticks) && ticks >= 0 && ticks <= DateTime.MaxValue.Ticks
            ? new CsiSnapshot(export.Name, parts[0], new DateTimeOffset(ticks, TimeSpan.Zero), parts[2], export.Size)
            : null;
    }

    private static string IdFor(string name, string prefix)
    {
        if (name.Length <= MaxIdLength && ExportName().IsMatch(name))
        {
            return name;
        }
        // Names the gateway would refuse (too long, '/' or ':' in them): a hash keeps the id stable,
        // so a repeated CreateVolume with the same name finds the same export.
        return prefix + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(name)))[..40];
    }

    [GeneratedRegex("^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
    private static partial Regex ExportName();
}

/// <summary>A snapshot as the plugin reads it back from its export.</summary>
public sealed record CsiSnapshot(string Id, string SourceVolumeId, DateTimeOffset Created, string Name, long Size)
{
    public V1.Snapshot ToCsi() => new()
    {
        SnapshotId = Id,
        SourceVolumeId = SourceVolumeId,
        SizeBytes = Size,
        CreationTime = Google.Protobuf.WellKnownTypes.Timestamp.FromDateTimeOffset(Created),
        ReadyToUse = true,
    };
}
