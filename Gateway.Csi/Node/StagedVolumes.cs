using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace Gateway.Csi.Node;

/// <summary>What NodeStageVolume attached for one volume: unstage, publish, stats and a restarted plugin read it back.</summary>
/// <param name="Block">volumeMode Block: nothing is mounted at the staging path.</param>
/// <param name="Capability">The volume capability staged, as JSON, so a repeat with another one is told apart.</param>
/// <param name="BootId">The kernel's boot the device was attached in: after a reboot the device is gone (or another volume's).</param>
public sealed record StagedVolume(string VolumeId, string Export, string StagingPath, string Device, bool Block, string? FsType, bool ReadOnly, string Capability, string BootId)
{
    /// <summary>This boot's id (random per boot, proc(5)); the record's device is this volume's only when the boot is the same.</summary>
    public static string CurrentBootId { get; } =
        File.Exists("/proc/sys/kernel/random/boot_id") ? File.ReadAllText("/proc/sys/kernel/random/boot_id").Trim() : "";

    public bool AttachedThisBoot => BootId == CurrentBootId;
}

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, WriteIndented = true)]
[JsonSerializable(typeof(StagedVolume))]
internal sealed partial class NodeJson : JsonSerializerContext;

/// <summary>
/// The node's record of staged volumes: one JSON file per volume in a folder beside the plugin's
/// socket (the kubelet's plugin folder, which outlives the plugin's container), written to a
/// temporary file and renamed so a crash leaves the old record or the new one, never half.
/// </summary>
public sealed class StagedVolumes(string folder)
{
    public string Folder { get; } = folder;

    public static StagedVolumes Beside(string socketPath) =>
        new(Path.Combine(Path.GetDirectoryName(socketPath) ?? "/", "volumes"));

    public StagedVolume? Find(string volumeId)
    {
        string path = PathOf(volumeId);
        return File.Exists(path) ? JsonSerializer.Deserialize(File.ReadAllText(path), NodeJson.Default.StagedVolume) : null;
    }

    public IEnumerable<StagedVolume> All() =>
        Directory.Exists(Folder)
            ? Directory.EnumerateFiles(Folder, "*.json").Select(f => JsonSerializer.Deserialize(File.ReadAllText(f), NodeJson.Default.StagedVolume)!)
            : [];

    public void Save(StagedVolume volume)
    {
        Directory.CreateDirectory(Folder);
        string path = PathOf(volume.VolumeId);
        string temporary = path + ".tmp";
        using (var file = new FileStream(temporary, FileMode.Create, FileAccess.Write))
        {
            JsonSerializer.Serialize(file, volume, NodeJson.Default.StagedVolume);
            file.Flush(flushToDisk: true);
        }
        File.Move(temporary, path, overwrite: true);
    }

    public void Remove(string volumeId) => File.Delete(PathOf(volumeId));

    /// <summary>The volume id itself where it is a plain file name (export names are), else a hash of it.</summary>
    private string PathOf(string volumeId)
    {
        bool plain = volumeId.Length <= 128 && volumeId[0] != '.' && volumeId.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-');
        return Path.Combine(Folder, (plain ? volumeId : "h-" + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(volumeId)))) + ".json");
    }
}
