using System.Buffers.Binary;
using Gateway.Backends.Qcow2;

namespace Gateway.Fuzz;

/// <summary>
/// The qcow2 reader on crafted images: open a chain (header, extensions, L1, backing files,
/// external data file), then read ranges and ask allocation, as an overlay export would. A
/// <see cref="Qcow2Exception"/> (the image refused) is handled; any other exception, a run over
/// the time limit, or more than <see cref="AllocationBudget"/> allocated by one run is a finding.
/// <para>
/// The input is a set of sparse files, so that an image with 2 MiB clusters (megabytes, mostly
/// holes) fits in a few KiB (AFL keeps inputs under 1 MiB):
/// <code>
/// input := file*                       file i is written as DIR/i; DIR/0 is opened
/// file  := "QFZF" length:u32 count:u16 chunk*count     (big-endian)
/// chunk := offset:u32 size:u16 bytes[size]              a hole elsewhere
/// </code>
/// Backing and data file names in the seeds are "1", "2", ... (relative to DIR). A truncated
/// chunk is cut to what the input holds; lengths are capped (<see cref="MaxFileLength"/>).
/// </para>
/// </summary>
public static class Qcow2Harness
{
    public const int MaxFiles = 8;
    public const uint MaxFileLength = 64 << 20;

    /// <summary>What one run may allocate: well above what any valid image needs for the reads below, far below what a table taken on trust would.</summary>
    public const long AllocationBudget = 192L << 20;

    private static readonly byte[] FileMagic = "QFZF"u8.ToArray();
    private static readonly string Folder = CreateFolder();

    public static Task Run(byte[] input)
    {
        long allocatedBefore = GC.GetAllocatedBytesForCurrentThread();
        foreach (string stale in Directory.EnumerateFiles(Folder))
        {
            File.Delete(stale);
        }
        int files = WriteFiles(input, Folder);
        if (files == 0)
        {
            return Task.CompletedTask;
        }
        try
        {
            using Qcow2Image image = Qcow2Image.Open(Path.Combine(Folder, "0"));
            Exercise(image);
        }
        catch (Qcow2Exception)
        {
            // Refused, with the reason: what a crafted image must get.
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
        if (allocated > AllocationBudget)
        {
            throw new InvalidOperationException($"one run allocated {allocated >> 20} MiB, over the budget of {AllocationBudget >> 20} MiB: a table or buffer sized from the image");
        }
        return Task.CompletedTask;
    }

    /// <summary>Reads the start, the end and spots between, and the allocation of the first 256 MiB, in pieces that cross clusters.</summary>
    public static void Exercise(Qcow2Image image)
    {
        long size = image.VirtualSize;
        byte[] buffer = new byte[192 * 1024];
        Span<ImageExtent> extents = stackalloc ImageExtent[64];
        for (int i = 0; i <= 8; i++)
        {
            long at = size / 8 * i;
            int length = (int)Math.Min(buffer.Length, size - at);
            if (length <= 0)
            {
                continue;
            }
            // Unaligned starts: a read that begins inside a cluster or a compressed one.
            at = Math.Max(0, Math.Min(at + 4097, size - length));
            image.Read(at, buffer.AsSpan(0, length));
            image.GetAllocation(at, length, extents);
        }
        image.GetAllocation(0, Math.Min(size, 256L << 20), extents);
        _ = image.Chain;
    }

    private static string CreateFolder()
    {
        string folder = Directory.CreateTempSubdirectory("gw-fuzz-qcow2-").FullName;
        AppDomain.CurrentDomain.ProcessExit += (_, _) => Directory.Delete(folder, recursive: true);
        return folder;
    }

    /// <summary>Writes the input's files into <paramref name="folder"/> as 0, 1, ...; returns how many.</summary>
    public static int WriteFiles(ReadOnlySpan<byte> input, string folder)
    {
        int files = 0;
        while (files < MaxFiles && input.Length >= 10 && input[..4].SequenceEqual(FileMagic))
        {
            uint length = Math.Min(BinaryPrimitives.ReadUInt32BigEndian(input[4..]), MaxFileLength);
            int count = BinaryPrimitives.ReadUInt16BigEndian(input[8..]);
            input = input[10..];
            using (var file = new FileStream(Path.Combine(folder, files.ToString(System.Globalization.CultureInfo.InvariantCulture)), FileMode.CreateNew, FileAccess.Write))
            {
                file.SetLength(length);
                for (int i = 0; i < count && input.Length >= 6; i++)
                {
                    uint offset = BinaryPrimitives.ReadUInt32BigEndian(input);
                    int size = Math.Min(BinaryPrimitives.ReadUInt16BigEndian(input[4..]), input.Length - 6);
                    ReadOnlySpan<byte> bytes = input.Slice(6, size);
                    input = input[(6 + size)..];
                    if (offset < length)
                    {
                        file.Position = offset;
                        file.Write(bytes[..(int)Math.Min(bytes.Length, length - offset)]);
                    }
                }
            }
            files++;
        }
        return files;
    }
}
