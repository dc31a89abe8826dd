using Gateway.Csi.V1;
using Mode = Gateway.Csi.V1.VolumeCapability.Types.AccessMode.Types.Mode;

namespace Gateway.Csi;

/// <summary>Which volume capabilities an export can meet.</summary>
public static class VolumeCapabilities
{
    /// <summary>File systems the node plugin makes and mounts.</summary>
    public static readonly IReadOnlySet<string> FileSystems = new HashSet<string>(StringComparer.Ordinal) { "ext4", "xfs" };

    /// <summary>The problem with one capability, or null when an export can meet it.</summary>
    /// <remarks>
    /// Any number of nodes may write a raw block volume (one export, many NBD connections: KubeVirt's
    /// live migration needs it); a file system has one writer, because ext4 and xfs are not cluster
    /// file systems and two nodes mounting one would corrupt it.
    /// </remarks>
    public static string? Problem(VolumeCapability? capability)
    {
        if (capability is null)
        {
            return "a volume capability is required";
        }
        Mode mode = capability.AccessMode?.Mode ?? Mode.Unknown;
        if (mode == Mode.Unknown || !Enum.IsDefined(mode))
        {
            return $"access mode {mode} is not supported";
        }
        switch (capability.AccessTypeCase)
        {
            case VolumeCapability.AccessTypeOneofCase.Block:
                return null;
            case VolumeCapability.AccessTypeOneofCase.Mount:
                string fs = capability.Mount.FsType;
                if (fs.Length > 0 && !FileSystems.Contains(fs))
                {
                    return $"file system '{fs}' is not supported (supported: {string.Join(", ", FileSystems)})";
                }
                return mode is Mode.MultiNodeMultiWriter or Mode.MultiNodeSingleWriter
                    ? $"access mode {mode} needs volumeMode Block: a {(fs.Length > 0 ? fs : "ext4")} file system mounted on several nodes would be corrupted"
                    : null;
            default:
                return "a volume capability must say block or mount";
        }
    }

    /// <summary>The first problem among <paramref name="capabilities"/>, or null when every one can be met.</summary>
    public static string? Problem(IReadOnlyCollection<VolumeCapability> capabilities) =>
        capabilities.Count == 0 ? "volume capabilities are required" : capabilities.Select(Problem).FirstOrDefault(p => p is not null);
}
