using System.Buffers.Binary;
using System.Runtime.InteropServices;

namespace Gateway.Backup;

/// <summary>
/// Where <c>restore --to-file</c> may write. A file restore is made beside its target and renamed
/// over it, so the target must be a regular file (or absent): renamed over a device node, the
/// restore would replace the node itself, after writing the whole disk into the node's folder
/// (<c>/dev</c> is a RAM file system). A symbolic link is followed to the file it names, which is
/// what is replaced; the link stays.
/// </summary>
public static partial class RestoreTarget
{
    /// <summary>The path to write: <paramref name="file"/>, or the final target of a link.</summary>
    /// <exception cref="ArgumentException">The target exists and is not a regular file; the message says what it is and what to do instead.</exception>
    public static string Resolve(string file)
    {
        string path = file;
        string? kind = KindOf(file);
        if (kind == "symbolic link")
        {
            path = File.ResolveLinkTarget(file, returnFinalTarget: true)!.FullName;
            kind = KindOf(path);
        }
        if (kind is null or "regular file")
        {
            return path;
        }
        string named = path == file ? $"'{file}'" : $"'{file}' (a link to '{path}')";
        throw new ArgumentException(
            $"{named} is a {kind}, not a regular file: --to-file makes a new image file and renames it over the target. " +
            "Restore into a file and copy it onto the device (qemu-img convert, nbdcopy or dd), or use --to-export");
    }

    /// <summary>What is at <paramref name="path"/> (a link is not followed), or null if nothing is.</summary>
    private static string? KindOf(string path)
    {
        // The BCL says "Normal" for a device, a FIFO and a file alike, so ask statx: its layout is the
        // same on every architecture (unlike struct stat), and stx_mode is a u16 at byte 28.
        Span<byte> buffer = stackalloc byte[256];
        if (Statx(AtCurrentDirectory, path, AtSymlinkNoFollow, StatxType, ref MemoryMarshal.GetReference(buffer)) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            return errno == NoSuchEntry ? null : throw new IOException($"statx({path}) failed: errno {errno}");
        }
        return (BinaryPrimitives.ReadUInt16LittleEndian(buffer[28..]) & 0xF000) switch
        {
            0x8000 => "regular file",
            0x4000 => "directory",
            0x6000 => "block device",
            0x2000 => "character device",
            0x1000 => "FIFO",
            0xC000 => "socket",
            0xA000 => "symbolic link",
            _ => "special file",
        };
    }

    private const int AtCurrentDirectory = -100;
    private const int AtSymlinkNoFollow = 0x100;
    private const uint StatxType = 0x1;
    private const int NoSuchEntry = 2;

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Statx(int directory, string path, int flags, uint mask, ref byte buffer);
}
