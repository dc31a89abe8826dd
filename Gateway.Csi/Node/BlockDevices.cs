using System.Globalization;
using System.Runtime.InteropServices;
using Grpc.Core;

namespace Gateway.Csi.Node;

/// <summary>File systems on the node's block devices: found, made once, grown; and sizes.</summary>
public static partial class BlockDevices
{
    /// <summary>The file system on <paramref name="device"/> as blkid probes it (no cache), or null when it holds none.</summary>
    public static async Task<string?> FileSystemAsync(string device, CancellationToken ct)
    {
        HostToolResult probe = await HostTool.RunAsync("blkid", ["-p", "-o", "value", "-s", "TYPE", device], ct);
        // blkid: 2 when nothing was found; anything else but 0 is a failure to read, which must
        // not be taken for an empty device (it would be formatted).
        return probe.ExitCode switch
        {
            0 => probe.Stdout.Trim() is { Length: > 0 } type ? type : await PartitionTableAsync(device, ct),
            2 => null,
            _ => throw new RpcException(new Status(StatusCode.Internal, $"{probe.CommandLine} failed ({probe.ExitCode}): {probe.Stderr.Trim()}")),
        };
    }

    /// <summary>A partition table is data too: "PTTYPE" rather than TYPE.</summary>
    private static async Task<string?> PartitionTableAsync(string device, CancellationToken ct)
    {
        HostToolResult probe = await HostTool.RunAsync("blkid", ["-p", "-o", "value", "-s", "PTTYPE", device], ct);
        return probe.Succeeded && probe.Stdout.Trim() is { Length: > 0 } table ? "partition table " + table : "unknown";
    }

    public static Task MakeAsync(string device, string fsType, CancellationToken ct) => fsType switch
    {
        "ext4" => HostTool.CheckAsync("mkfs.ext4", ["-q", "-F", device], ct),
        "xfs" => HostTool.CheckAsync("mkfs.xfs", ["-q", device], ct),
        _ => throw new RpcException(new Status(StatusCode.InvalidArgument, $"file system '{fsType}' is not supported")),
    };

    /// <summary>Grows a mounted file system to its device's size (both grow online).</summary>
    public static Task GrowAsync(string device, string fsType, string mountPoint, CancellationToken ct) => fsType switch
    {
        "ext4" => HostTool.CheckAsync("resize2fs", [device], ct),
        "xfs" => HostTool.CheckAsync("xfs_growfs", [mountPoint], ct),
        _ => throw new RpcException(new Status(StatusCode.InvalidArgument, $"file system '{fsType}' cannot be grown")),
    };

    /// <summary>A block device's size in bytes, from sysfs (512-byte sectors whatever the device's block size).</summary>
    public static long Size(string device)
    {
        string name = Path.GetFileName(ResolveLinks(device));
        string size = Path.Combine("/sys/class/block", name, "size");
        return File.Exists(size)
            ? long.Parse(File.ReadAllText(size).Trim(), CultureInfo.InvariantCulture) * 512
            : throw new RpcException(new Status(StatusCode.NotFound, $"block device {device} is gone (no {size})"));
    }

    /// <summary>statvfs(3) of a mounted file system: bytes and inodes.</summary>
    public static (long TotalBytes, long FreeBytes, long AvailableBytes, long TotalInodes, long FreeInodes) Usage(string path)
    {
        if (StatVfs(path, out VfsStats s) != 0)
        {
            throw new RpcException(new Status(StatusCode.Internal, $"statvfs {path}: errno {Marshal.GetLastPInvokeError()}"));
        }
        long unit = (long)s.FragmentSize;
        return ((long)s.Blocks * unit, (long)s.FreeBlocks * unit, (long)s.AvailableBlocks * unit, (long)s.Files, (long)s.FreeFiles);
    }

    private static string ResolveLinks(string path) =>
        new FileInfo(path).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? path;

    /// <summary>glibc's struct statvfs on 64-bit Linux: eleven unsigned longs, then spare ints.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct VfsStats
    {
        public ulong BlockSize;
        public ulong FragmentSize;
        public ulong Blocks;
        public ulong FreeBlocks;
        public ulong AvailableBlocks;
        public ulong Files;
        public ulong FreeFiles;
        public ulong AvailableFiles;
        public ulong FsId;
        public ulong Flags;
        public ulong NameMax;
        public int Spare0;
        public int Spare1;
        public int Spare2;
        public int Spare3;
        public int Spare4;
        public int Spare5;
    }

    [LibraryImport("libc", EntryPoint = "statvfs", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int StatVfs(string path, out VfsStats stats);
}
