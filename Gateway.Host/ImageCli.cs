using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using Gateway.Backends.Overlay;
using Gateway.Backends.Qcow2;
using Gateway.Backends.S3;

namespace Gateway.Host;

/// <summary>
/// <c>gateway image inspect FILE</c>: what the gateway sees in an image it could take as an overlay
/// base (README "Overlay exports"): the format from the header, and for qcow2 the version, cluster
/// size, features, the backing chain as it resolves it, and the allocation through the chain (as
/// <c>qemu:allocation-depth</c> would serve it). Exit 0 for an image the gateway would serve, 1 for
/// one it refuses (the reason printed) or cannot read, 2 for bad arguments.
/// </summary>
public sealed class ImageCli(TextWriter stdout, TextWriter stderr)
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static Command Build()
    {
        var file = new Argument<string>("file") { Description = "The image file, or s3://BUCKET/KEY (the store from --s3-endpoint or AWS_ENDPOINT_URL_S3, credentials from the AWS environment)" };
        var json = new Option<bool>("--json") { Description = "Print the result as JSON" };
        var endpoint = new Option<string?>("--s3-endpoint") { Description = "S3 endpoint URL for an s3:// image (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS)" };
        var inspect = new Command("inspect", "Print what the gateway sees in an image: format, virtual size, qcow2 features, backing chain, allocated bytes");
        inspect.Arguments.Add(file);
        inspect.Options.Add(json);
        inspect.Options.Add(endpoint);
        inspect.SetAction(p => new ImageCli(Console.Out, Console.Error).Inspect(p.GetValue(file)!, p.GetValue(json), p.GetValue(endpoint)));
        var image = new Command("image", "Disk images the gateway can take as overlay bases");
        image.Subcommands.Add(inspect);
        return image;
    }

    public int Inspect(string path, bool json, string? s3Endpoint = null)
    {
        if (S3ImageLocation.IsS3Name(path))
        {
            return InspectS3(path, json, s3Endpoint);
        }
        if (!File.Exists(path))
        {
            stderr.WriteLine($"error: {path}: no such file");
            return 1;
        }
        path = Path.GetFullPath(path);
        string? format;
        try
        {
            format = ImageFormat.DetectNonRaw(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            stderr.WriteLine($"error: {path}: {e.Message}");
            return 1;
        }
        switch (format)
        {
            case null:
                Print(json, new { file = path, format = "raw", virtualSize = new FileInfo(path).Length, served = true },
                    string.Create(CultureInfo.InvariantCulture, $"file:         {path}\nformat:       raw\nvirtual size: {new FileInfo(path).Length}"));
                return 0;
            case "qcow2":
                return InspectQcow2(path, json, () => Qcow2Image.Open(path));
            default:
                Print(json, new { file = path, format, served = false, reason = $"{format} is not served: an overlay base must be raw or qcow2" },
                    $"file:         {path}\nformat:       {format}\nrefused:      {format} is not served: an overlay base must be raw or qcow2 (convert it with qemu-img convert -O qcow2)");
                return 1;
        }
    }

    /// <summary>An S3 object, read by range as an overlay on it would read it.</summary>
    private int InspectS3(string name, bool json, string? endpoint)
    {
        if (S3ImageLocation.Split(name) is not (string bucket, _))
        {
            stderr.WriteLine($"error: {name}: give s3://BUCKET/KEY");
            return 2;
        }
        endpoint ??= Environment.GetEnvironmentVariable("AWS_ENDPOINT_URL_S3") ?? Environment.GetEnvironmentVariable("AWS_ENDPOINT_URL")
            ?? $"https://s3.{Environment.GetEnvironmentVariable("AWS_REGION") ?? Environment.GetEnvironmentVariable("AWS_DEFAULT_REGION") ?? "us-east-1"}.amazonaws.com";
        string? region = Environment.GetEnvironmentVariable("AWS_REGION") ?? Environment.GetEnvironmentVariable("AWS_DEFAULT_REGION");
        using var location = new S3ImageLocation(new S3ObjectStore(new S3BucketLocation(endpoint, bucket, region)), endpoint, bucket);
        string? format;
        long length;
        try
        {
            using ImageSource head = location.Open(name);
            byte[] bytes = new byte[512];
            format = ImageFormat.Detect(bytes.AsSpan(0, head.Read(bytes, 0)));
            length = head.Length;
        }
        catch (Exception e) when (e is IOException or NotSupportedException)
        {
            stderr.WriteLine($"error: {name}: {e.Message}");
            return 1;
        }
        switch (format)
        {
            case null:
                Print(json, new { file = name, format = "raw", virtualSize = length, served = true },
                    string.Create(CultureInfo.InvariantCulture, $"file:         {name}\nformat:       raw\nvirtual size: {length}"));
                return 0;
            case "qcow2":
                return InspectQcow2(name, json, () => Qcow2Image.Open(name, location));
            default:
                Print(json, new { file = name, format, served = false, reason = $"{format} is not served: an overlay base must be raw or qcow2" },
                    $"file:         {name}\nformat:       {format}\nrefused:      {format} is not served: an overlay base must be raw or qcow2 (convert it with qemu-img convert -O qcow2)");
                return 1;
        }
    }

    private int InspectQcow2(string path, bool json, Func<Qcow2Image> open)
    {
        Qcow2Image image;
        try
        {
            image = open();
        }
        catch (Qcow2Exception e)
        {
            Print(json, new { file = path, format = "qcow2", served = false, reason = e.Message },
                $"file:         {path}\nformat:       qcow2\nrefused:      {e.Message}");
            return 1;
        }
        using (image)
        {
            Qcow2Header header = image.Header;
            // Allocation through the whole chain: data bytes per depth (1 = this file), and bytes that read as zeros.
            var byDepth = new SortedDictionary<uint, long>();
            long zero = 0, unallocated = 0, offset = 0;
            var extents = new ImageExtent[1024];
            try
            {
                while (offset < image.VirtualSize)
                {
                    int count = image.GetAllocation(offset, image.VirtualSize - offset, extents);
                    for (int i = 0; i < count; i++)
                    {
                        ImageExtent extent = extents[i];
                        if (extent.Depth == 0)
                        {
                            unallocated += extent.Length;
                        }
                        else if (extent.Zero)
                        {
                            zero += extent.Length;
                        }
                        else
                        {
                            byDepth[extent.Depth] = byDepth.GetValueOrDefault(extent.Depth) + extent.Length;
                        }
                        offset += extent.Length;
                    }
                }
            }
            catch (Qcow2Exception e)
            {
                stderr.WriteLine($"error: {e.Message}");
                return 1;
            }
            IReadOnlyList<ChainFile> chain = image.Chain;
            long data = byDepth.Values.Sum();
            var report = new
            {
                file = path,
                format = "qcow2",
                served = true,
                version = header.Version,
                virtualSize = image.VirtualSize,
                clusterSize = header.ClusterSize,
                compression = header.Compression.ToString().ToLowerInvariant(),
                extendedL2 = header.ExtendedL2,
                dataFile = header.DataFile,
                incompatibleFeatures = $"0x{header.IncompatibleFeatures:x}",
                compatibleFeatures = $"0x{header.CompatibleFeatures:x}",
                autoclearFeatures = $"0x{header.AutoclearFeatures:x}",
                chain = chain.Select((f, i) => new { depth = i + 1, path = f.Path, format = f.Format, virtualSize = f.VirtualSize }),
                allocated = new { data, byDepth = byDepth.ToDictionary(p => p.Key.ToString(CultureInfo.InvariantCulture), p => p.Value), zero, unallocated },
            };
            var text = new System.Text.StringBuilder();
            text.AppendLine(CultureInfo.InvariantCulture, $"file:         {path}");
            text.AppendLine(CultureInfo.InvariantCulture, $"format:       qcow2 (version {header.Version})");
            text.AppendLine(CultureInfo.InvariantCulture, $"virtual size: {image.VirtualSize}");
            text.AppendLine(CultureInfo.InvariantCulture, $"cluster size: {header.ClusterSize}{(header.ExtendedL2 ? " (extended L2: subclusters)" : "")}");
            text.AppendLine(CultureInfo.InvariantCulture, $"compression:  {report.compression}");
            text.AppendLine(CultureInfo.InvariantCulture, $"data file:    {header.DataFile ?? "-"}");
            text.AppendLine(CultureInfo.InvariantCulture, $"features:     incompatible {report.incompatibleFeatures}, compatible {report.compatibleFeatures}, autoclear {report.autoclearFeatures}");
            for (int i = 0; i < chain.Count; i++)
            {
                text.AppendLine(CultureInfo.InvariantCulture, $"{(i == 0 ? "chain:" : ""),-14}{i + 1} {chain[i].Path} ({chain[i].Format}, {chain[i].VirtualSize} bytes)");
            }
            text.Append(CultureInfo.InvariantCulture,
                $"allocated:    {data} bytes of data ({string.Join(", ", byDepth.Select(p => $"depth {p.Key}: {p.Value}"))}), {zero} read as zeros, {unallocated} unallocated");
            Print(json, report, text.ToString());
            return 0;
        }
    }

    private void Print(bool json, object report, string text) =>
        stdout.WriteLine(json ? JsonSerializer.Serialize(report, Indented) : text);
}
