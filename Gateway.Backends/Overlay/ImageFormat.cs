using System.Buffers.Binary;

namespace Gateway.Backends.Overlay;

/// <summary>
/// Recognises disk image formats by their header, so that an image that is not raw is refused
/// rather than served as raw bytes (its header and tables would become the guest's disk). The
/// magics are those qemu's probes use (block/qcow2.c, vmdk.c, vhdx.c, vdi.c, qed.c, crypto/luks).
/// </summary>
public static class ImageFormat
{
    /// <summary>The formats a base image may be served as (an overlay's baseFormat).</summary>
    public const string Raw = "raw";
    public const string Qcow2 = "qcow2";

    /// <summary>The format named by the header of <paramref name="path"/>, or null when none matches (raw).</summary>
    public static string? DetectNonRaw(string path)
    {
        Span<byte> header = stackalloc byte[512];
        int read;
        using (FileStream file = File.OpenRead(path))
        {
            read = file.ReadAtLeast(header, header.Length, throwOnEndOfStream: false);
        }
        return Detect(header[..read]);
    }

    /// <summary>The format named by an image's first bytes, or null when none matches.</summary>
    public static string? Detect(ReadOnlySpan<byte> header)
    {
        if (header.Length >= 4)
        {
            uint magic = BinaryPrimitives.ReadUInt32BigEndian(header);
            switch (magic)
            {
                case 0x514649fb: // "QFI\xfb"
                    return header.Length >= 8 && BinaryPrimitives.ReadUInt32BigEndian(header[4..]) is 2 or 3 ? Qcow2 : "qcow";
                case 0x51454400: // "QED\0"
                    return "qed";
                case 0x4b444d56: // "KDMV"
                    return "vmdk";
            }
        }
        if (header.Length >= 6 && header[..6].SequenceEqual("LUKS\xba\xbe"u8.ToArray()))
        {
            return "luks";
        }
        if (header.Length >= 8 && header[..8].SequenceEqual("vhdxfile"u8))
        {
            return "vhdx";
        }
        if (header.Length >= 8 && header[..8].SequenceEqual("conectix"u8))
        {
            return "vpc";
        }
        if (header.Length >= 0x44 && BinaryPrimitives.ReadUInt32LittleEndian(header[0x40..]) == 0xbeda107f)
        {
            return "vdi";
        }
        if (header.Length >= 21 && header[..21].SequenceEqual("# Disk DescriptorFile"u8))
        {
            return "vmdk";
        }
        return null;
    }
}
