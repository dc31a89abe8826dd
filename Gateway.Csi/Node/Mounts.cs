using System.Text;

namespace Gateway.Csi.Node;

/// <summary>One line of /proc/self/mountinfo (proc(5)): where something is mounted and how.</summary>
public sealed record MountPoint(string Path, string Source, string FsType, IReadOnlyList<string> Options)
{
    public bool ReadOnly => Options.Contains("ro");
}

/// <summary>The node's mounts, read from the kernel and changed with mount(8) and umount(8).</summary>
public static class Mounts
{
    /// <summary>The mount at <paramref name="path"/> (the last one, which is what the path shows), or null.</summary>
    public static MountPoint? At(string path)
    {
        string full = Path.GetFullPath(path).TrimEnd('/');
        MountPoint? found = null;
        foreach (string line in File.ReadLines("/proc/self/mountinfo"))
        {
            // 36 35 98:0 /root /mnt rw,noatime master:1 - ext4 /dev/sda1 rw,errors=continue
            string[] fields = line.Split(' ');
            int dash = Array.IndexOf(fields, "-");
            if (fields.Length < 10 || dash < 6 || Unescape(fields[4]).TrimEnd('/') != full)
            {
                continue;
            }
            found = new MountPoint(full, Unescape(fields[dash + 2]), fields[dash + 1], fields[5].Split(','));
        }
        return found;
    }

    public static Task MountAsync(string source, string target, string? fsType, IEnumerable<string> options, CancellationToken ct)
    {
        var args = new List<string>();
        if (fsType is not null)
        {
            args.AddRange(["-t", fsType]);
        }
        string joined = string.Join(',', options);
        if (joined.Length > 0)
        {
            args.AddRange(["-o", joined]);
        }
        args.AddRange([source, target]);
        return HostTool.CheckAsync("mount", args, ct);
    }

    /// <summary>A bind mount, read-only when asked (the kernel takes ro only on a remount of the bind).</summary>
    public static async Task BindAsync(string source, string target, bool readOnly, CancellationToken ct)
    {
        await HostTool.CheckAsync("mount", ["--bind", source, target], ct);
        if (readOnly)
        {
            await HostTool.CheckAsync("mount", ["-o", "remount,bind,ro", target], ct);
        }
    }

    /// <summary>Unmounts <paramref name="path"/> while anything is mounted there (mounts may be stacked).</summary>
    public static async Task UnmountAsync(string path, CancellationToken ct)
    {
        for (int i = 0; i < 8 && At(path) is not null; i++)
        {
            await HostTool.CheckAsync("umount", [path], ct);
        }
    }

    /// <summary>mountinfo escapes space, tab, newline and backslash as \ooo.</summary>
    private static string Unescape(string field)
    {
        if (!field.Contains('\\', StringComparison.Ordinal))
        {
            return field;
        }
        var text = new StringBuilder(field.Length);
        for (int i = 0; i < field.Length; i++)
        {
            if (field[i] == '\\' && i + 3 < field.Length && field.AsSpan(i + 1, 3).IndexOfAnyExcept("01234567") < 0)
            {
                text.Append((char)Convert.ToInt32(field.Substring(i + 1, 3), 8));
                i += 3;
            }
            else
            {
                text.Append(field[i]);
            }
        }
        return text.ToString();
    }
}
