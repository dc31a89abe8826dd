using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Gateway.Tests.Interop;

/// <summary>
/// The truth about a sparse file's allocation, straight from the kernel (lseek SEEK_DATA /
/// SEEK_HOLE), to hold NBD block-status answers against.
/// </summary>
public static partial class FileExtents
{
    private const int SeekData = 3;
    private const int SeekHole = 4;
    private const int ENXIO = 6;

    /// <summary>The data (allocated) extents of the file as (offset, length), in order, adjacent ones merged.</summary>
    public static List<(long Offset, long Length)> Data(string path)
    {
        var extents = new List<(long, long)>();
        using SafeFileHandle handle = File.OpenHandle(path);
        int fd = (int)handle.DangerousGetHandle();
        long size = RandomAccess.GetLength(handle);
        long offset = 0;
        while (offset < size)
        {
            long data = LSeek(fd, offset, SeekData);
            if (data < 0)
            {
                int errno = Marshal.GetLastPInvokeError();
                if (errno == ENXIO)
                {
                    break; // no data after offset
                }
                throw new IOException($"lseek(SEEK_DATA, {offset}) on {path} failed: errno {errno}");
            }
            long hole = LSeek(fd, data, SeekHole);
            if (hole < 0)
            {
                throw new IOException($"lseek(SEEK_HOLE, {data}) on {path} failed: errno {Marshal.GetLastPInvokeError()}");
            }
            extents.Add((data, hole - data));
            offset = hole;
        }
        return Merge(extents);
    }

    public static List<(long Offset, long Length)> Merge(IEnumerable<(long Offset, long Length)> extents)
    {
        var merged = new List<(long Offset, long Length)>();
        foreach ((long offset, long length) in extents.Where(e => e.Length > 0).OrderBy(e => e.Offset))
        {
            if (merged.Count > 0 && merged[^1].Offset + merged[^1].Length == offset)
            {
                merged[^1] = (merged[^1].Offset, merged[^1].Length + length);
            }
            else
            {
                merged.Add((offset, length));
            }
        }
        return merged;
    }

    public static string Format(IEnumerable<(long Offset, long Length)> extents) =>
        string.Join(", ", extents.Select(e => $"[{e.Offset}, +{e.Length})"));

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static partial long LSeek(int fd, long offset, int whence);
}
