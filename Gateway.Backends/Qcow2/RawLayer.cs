using Microsoft.Win32.SafeHandles;

namespace Gateway.Backends.Qcow2;

/// <summary>A raw backing file: every byte up to its length is data.</summary>
internal sealed class RawLayer : ImageLayer
{
    private readonly SafeFileHandle _file;

    public RawLayer(SafeFileHandle file) => (_file, VirtualSize) = (file, RandomAccess.GetLength(file));

    public override string Format => "raw";

    public override long VirtualSize { get; }

    public override LayerRun Map(long offset, long length) => new(length, RunKind.Data, offset);

    public override void Read(LayerRun run, long guestOffset, Span<byte> destination) =>
        HostFile.ReadZeroPadded(_file, guestOffset, destination);

    public override void Dispose() => _file.Dispose();
}

internal static class HostFile
{
    /// <summary>Reads at <paramref name="offset"/>; what lies past the file's end reads as zeros (as qemu's file driver does).</summary>
    public static void ReadZeroPadded(SafeFileHandle file, long offset, Span<byte> destination)
    {
        while (!destination.IsEmpty)
        {
            int read = RandomAccess.Read(file, destination, offset);
            if (read == 0)
            {
                destination.Clear();
                return;
            }
            destination = destination[read..];
            offset += read;
        }
    }
}
