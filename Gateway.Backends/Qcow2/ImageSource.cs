using Microsoft.Win32.SafeHandles;

namespace Gateway.Backends.Qcow2;

/// <summary>The bytes of one file of an image chain, read-only: a local file, or an S3 object read by range.</summary>
public abstract class ImageSource : IDisposable
{
    /// <summary>The file's full name: a path, or <c>s3://BUCKET/KEY</c>.</summary>
    public abstract string Name { get; }

    public abstract long Length { get; }

    /// <summary>Reads from <paramref name="offset"/>; fewer bytes than asked only at the end of the file.</summary>
    public abstract int Read(Span<byte> destination, long offset);

    /// <summary>A read that does not wait (the page cache of a local file), or false: the caller then calls <see cref="Read"/>.</summary>
    public virtual bool TryReadNoWait(Span<byte> destination, long offset) => false;

    /// <summary>Reads at <paramref name="offset"/>; what lies past the file's end reads as zeros (as qemu's file driver does).</summary>
    public void ReadZeroPadded(long offset, Span<byte> destination)
    {
        while (!destination.IsEmpty)
        {
            int read = Read(destination, offset);
            if (read == 0)
            {
                destination.Clear();
                return;
            }
            destination = destination[read..];
            offset += read;
        }
    }

    public abstract void Dispose();
}

/// <summary>Where the files of a chain are, and how a name an image gives (backing file, data file) is found from the image that gives it.</summary>
public abstract class ImageLocation
{
    /// <summary>The local file system: names relative to the folder of the image that gives them, as qemu resolves them.</summary>
    public static ImageLocation Files { get; } = new FileLocation();

    /// <summary>Opens the file <paramref name="name"/> (a full name, as <see cref="Resolve"/> gives).</summary>
    public abstract ImageSource Open(string name);

    /// <summary>The full name of <paramref name="reference"/> as the image <paramref name="referrer"/> names it; a <see cref="Qcow2Exception"/> when it may not be followed.</summary>
    public abstract string Resolve(string referrer, string reference);

    private sealed class FileLocation : ImageLocation
    {
        public override ImageSource Open(string name) => new FileSource(name, File.OpenHandle(name, FileMode.Open, FileAccess.Read, FileShare.Read));

        public override string Resolve(string referrer, string reference) =>
            Path.GetFullPath(reference, Path.GetDirectoryName(Path.GetFullPath(referrer))!);
    }
}

/// <summary>A local file.</summary>
public sealed class FileSource(string name, SafeFileHandle file) : ImageSource
{
    public override string Name { get; } = name;

    public override long Length { get; } = RandomAccess.GetLength(file);

    public override int Read(Span<byte> destination, long offset) => RandomAccess.Read(file, destination, offset);

    public override bool TryReadNoWait(Span<byte> destination, long offset) => FileBackend.TryPreadNoWait(file, destination, offset);

    public override void Dispose() => file.Dispose();
}
