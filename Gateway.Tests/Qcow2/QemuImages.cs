using System.Text.Json;
using Gateway.Backends.Qcow2;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>
/// A folder of images made with the real qemu-img / qemu-io, and the oracle checks: every byte
/// read through <see cref="Qcow2Image"/> equals <c>qemu-img convert -O raw</c> of the same image;
/// every depth equals what <c>qemu-nbd -A</c> serves as <c>qemu:allocation-depth</c>; every zero
/// flag equals <c>qemu-img map</c>'s.
/// </summary>
public sealed class QemuImages : IDisposable
{
    public QemuImages() => Folder = Directory.CreateTempSubdirectory("gw-qcow2-").FullName;

    public string Folder { get; }

    public string PathOf(string name) => Path.Combine(Folder, name);

    public Task<ToolResult> Img(params string[] args) => Tool.RunAsync("qemu-img", args, workingDirectory: Folder);

    /// <summary>Runs qemu-io commands (e.g. <c>write -P 0x5a 0 64k</c>) against an image.</summary>
    public Task<ToolResult> Io(string image, params string[] commands) =>
        Tool.RunAsync("qemu-io", [.. commands.SelectMany(c => new[] { "-c", c }), image], workingDirectory: Folder);

    /// <summary>A raw file written whole with a pattern (no holes: raw holes are not what these tests are about).</summary>
    public async Task<string> RawAsync(string name, long size, byte pattern)
    {
        await Img("create", "-f", "raw", name, size.ToString());
        await Tool.RunAsync("qemu-io", ["-f", "raw", "-c", $"write -P 0x{pattern:x2} 0 {size}", name], workingDirectory: Folder);
        return PathOf(name);
    }

    public async Task<string> Qcow2Async(string name, long size, params string[] options)
    {
        var args = new List<string> { "create", "-f", "qcow2" };
        args.AddRange(options);
        args.Add(name);
        args.Add(size.ToString());
        await Img([.. args]);
        return PathOf(name);
    }

    /// <summary>Checks bytes and allocation of <paramref name="name"/> (a qcow2 image) against qemu's view of it.</summary>
    public async Task AssertMatchesQemuAsync(string name)
    {
        string image = PathOf(name);
        string raw = PathOf(name + ".expected.raw");
        await Img("convert", "-O", "raw", image, raw);
        byte[] expected = await File.ReadAllBytesAsync(raw);
        File.Delete(raw);

        using Qcow2Image reader = Qcow2Image.Open(image);
        Assert.Equal(expected.Length, reader.VirtualSize);

        // The whole image in one read, then pieces that straddle clusters and subclusters.
        byte[] whole = new byte[expected.Length];
        await reader.ReadAsync(0, whole);
        AssertSameBytes(expected, whole, 0, name);
        var random = new Random(expected.Length);
        for (int i = 0; i < 64; i++)
        {
            int length = random.Next(1, Math.Min(expected.Length, 300_000));
            int offset = random.Next(0, expected.Length - length + 1);
            byte[] piece = new byte[length];
            reader.Read(offset, piece);
            AssertSameBytes(expected.AsSpan(offset, length), piece, offset, name);
        }

        ImageExtent[] extents = new ImageExtent[100_000];
        int count = await reader.GetAllocationAsync(0, reader.VirtualSize, extents);
        var ours = extents[..count];
        Assert.Equal(reader.VirtualSize, ours.Sum(e => e.Length));

        List<(long Start, long Length, long Depth, bool Present, bool Zero)> map = await QemuMapAsync(image);
        Assert.Equal(
            Runs(map.Select(m => (m.Start, m.Length, m.Zero))),
            Runs(Starts(ours).Select(e => (e.Start, e.Extent.Length, e.Extent.Zero))));

        List<(long Start, long Length, uint Depth)> depth = await QemuNbdDepthAsync(image);
        Assert.Equal(
            Runs(depth.Select(d => (d.Start, d.Length, d.Depth))),
            Runs(Starts(ours).Select(e => (e.Start, e.Extent.Length, e.Extent.Depth))));

        // qemu-img map agrees wherever it calls a range present (it reports a short backing file's tail as absent).
        foreach ((long start, long length, long mapDepth, bool present, _) in map.Where(m => m.Present))
        {
            foreach (var e in Starts(ours).Where(e => e.Start < start + length && e.Start + e.Extent.Length > start))
            {
                Assert.True(e.Extent.Depth == mapDepth + 1, $"{name}: at {start}+{length} qemu-img map says depth {mapDepth + 1}, the reader {e.Extent.Depth}");
            }
        }
    }

    private static void AssertSameBytes(ReadOnlySpan<byte> expected, ReadOnlySpan<byte> actual, long offset, string name)
    {
        int mismatch = expected.CommonPrefixLength(actual);
        if (mismatch < expected.Length || expected.Length != actual.Length)
        {
            Assert.Fail($"{name}: byte at guest offset {offset + mismatch} is 0x{actual[mismatch]:x2}, qemu-img convert gives 0x{expected[mismatch]:x2}");
        }
    }

    private static IEnumerable<(long Start, ImageExtent Extent)> Starts(IEnumerable<ImageExtent> extents)
    {
        long at = 0;
        foreach (ImageExtent e in extents)
        {
            yield return (at, e);
            at += e.Length;
        }
    }

    /// <summary>Adjacent runs with the same value merged, so differently split answers compare equal.</summary>
    private static List<(long Start, long Length, T Value)> Runs<T>(IEnumerable<(long Start, long Length, T Value)> runs)
    {
        var merged = new List<(long Start, long Length, T Value)>();
        foreach (var run in runs.OrderBy(r => r.Start))
        {
            if (merged.Count > 0 && EqualityComparer<T>.Default.Equals(merged[^1].Value, run.Value) && merged[^1].Start + merged[^1].Length == run.Start)
            {
                merged[^1] = (merged[^1].Start, merged[^1].Length + run.Length, run.Value);
            }
            else
            {
                merged.Add(run);
            }
        }
        return merged;
    }

    private async Task<List<(long Start, long Length, long Depth, bool Present, bool Zero)>> QemuMapAsync(string image)
    {
        ToolResult result = await Img("map", "--output=json", image);
        using JsonDocument json = JsonDocument.Parse(result.Stdout);
        return [.. json.RootElement.EnumerateArray().Select(e => (
            e.GetProperty("start").GetInt64(),
            e.GetProperty("length").GetInt64(),
            e.GetProperty("depth").GetInt64(),
            e.GetProperty("present").GetBoolean(),
            e.GetProperty("zero").GetBoolean()))];
    }

    /// <summary>qemu:allocation-depth as qemu-nbd serves it, read by nbdinfo (qemu-nbd started by nbdinfo on a private socket).</summary>
    private async Task<List<(long Start, long Length, uint Depth)>> QemuNbdDepthAsync(string image)
    {
        ToolResult result = await Tool.RunAsync("nbdinfo", ["--json", "--map=qemu:allocation-depth", "--", "[", Tool.Locate("qemu-nbd"), "-r", "-A", "-f", "qcow2", image, "]"], workingDirectory: Folder);
        using JsonDocument json = JsonDocument.Parse(result.Stdout);
        return [.. json.RootElement.EnumerateArray().Select(e => (
            e.GetProperty("offset").GetInt64(),
            e.GetProperty("length").GetInt64(),
            e.GetProperty("type").GetUInt32()))];
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Folder, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
