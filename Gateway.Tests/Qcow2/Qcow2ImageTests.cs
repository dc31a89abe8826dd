using Gateway.Backends.Qcow2;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>Images made by qemu-img and qemu-io read through <see cref="Qcow2Image"/>: bytes and allocation as qemu sees them.</summary>
public sealed class Qcow2ImageTests : IDisposable
{
    private const long MiB = 1 << 20;
    private readonly QemuImages _images = new();

    public void Dispose() => _images.Dispose();

    [Theory]
    [InlineData("512")]
    [InlineData("4k")]
    [InlineData("64k")]
    [InlineData("2M")]
    public async Task Cluster_sizes_read_as_qemu_reads_them(string clusterSize)
    {
        await _images.Qcow2Async("c.qcow2", 9 * MiB + 512, "-o", $"cluster_size={clusterSize}");
        await _images.Io("c.qcow2",
            "write -P 0x11 0 4k",
            "write -P 0x22 5000 70000",
            "write -P 0x33 3M 2M",
            "write -P 0x44 9M 512");
        await _images.AssertMatchesQemuAsync("c.qcow2");
    }

    [Fact]
    public async Task Zero_clusters_of_both_kinds_read_as_zeros_and_mask_the_backing_file()
    {
        await _images.RawAsync("base.raw", 8 * MiB, 0x5a);
        await _images.Qcow2Async("z.qcow2", 8 * MiB, "-b", "base.raw", "-F", "raw");
        await _images.Io("z.qcow2",
            "write -P 0x66 0 1M",
            "write -z 256k 128k",      // allocated clusters zeroed: preallocated zero clusters
            "write -z 2M 192k",        // never written: unallocated zero clusters over the backing file
            "write -z -u 512k 64k",
            "discard 4M 128k");
        await _images.AssertMatchesQemuAsync("z.qcow2");

        // Without a backing file a discard leaves the clusters unallocated.
        await _images.Qcow2Async("d.qcow2", 4 * MiB);
        await _images.Io("d.qcow2", "write -P 0x77 0 2M", "write -z 64k 64k", "discard 1M 256k");
        await _images.AssertMatchesQemuAsync("d.qcow2");
    }

    [Theory]
    [InlineData("zlib")]
    [InlineData("zstd")]
    public async Task Compressed_clusters_decompress(string compression)
    {
        await _images.Qcow2Async("src.qcow2", 6 * MiB, "-o", "cluster_size=16k");
        await _images.Io("src.qcow2", "write -P 0x21 0 1M", "write -P 0x42 1536k 100k", "write -z 3M 64k");
        await _images.Io("src.qcow2", "write -P 0x99 4M 64k");
        await _images.Img("convert", "-c", "-O", "qcow2", "-o", $"compression_type={compression},cluster_size=16k", "src.qcow2", "c.qcow2");
        using (Qcow2Image image = Qcow2Image.Open(_images.PathOf("c.qcow2")))
        {
            Assert.Equal(compression == "zstd" ? Qcow2Compression.Zstd : Qcow2Compression.Deflate, image.Header.Compression);
        }
        await _images.AssertMatchesQemuAsync("c.qcow2");

        // A compressed image as the backing file of another, written over in part.
        await _images.Qcow2Async("top.qcow2", 6 * MiB, "-b", "c.qcow2", "-F", "qcow2");
        await _images.Io("top.qcow2", "write -P 0x13 8k 4k", "write -z 1M 16k");
        await _images.AssertMatchesQemuAsync("top.qcow2");
    }

    [Fact]
    public async Task Compressed_clusters_with_incompressible_neighbours_and_large_clusters()
    {
        byte[] data = new byte[4 * MiB];
        var random = new Random(3);
        random.NextBytes(data.AsSpan(0, (int)MiB));
        data.AsSpan((int)MiB, (int)MiB).Fill(0x3c);
        await File.WriteAllBytesAsync(_images.PathOf("mixed.raw"), data);
        await _images.Img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=2M", "mixed.raw", "big.qcow2");
        await _images.AssertMatchesQemuAsync("big.qcow2");
        await _images.Img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k,compression_type=zstd", "mixed.raw", "small.qcow2");
        await _images.AssertMatchesQemuAsync("small.qcow2");
    }

    [Theory]
    [InlineData("64k")]
    [InlineData("2M")]
    public async Task Extended_l2_subclusters_read_through_to_the_backing_file(string clusterSize)
    {
        await _images.Qcow2Async("base.qcow2", 8 * MiB, "-o", "cluster_size=64k");
        await _images.Io("base.qcow2", "write -P 0xb0 0 8M");
        await _images.Qcow2Async("e.qcow2", 8 * MiB, "-o", $"extended_l2=on,cluster_size={clusterSize}", "-b", "base.qcow2", "-F", "qcow2");
        using (Qcow2Image image = Qcow2Image.Open(_images.PathOf("e.qcow2")))
        {
            Assert.True(image.Header.ExtendedL2);
        }
        await _images.Io("e.qcow2",
            "write -P 0x01 0 2k",
            "write -P 0x02 6k 2k",
            "write -z 10k 4k",
            "write -P 0x03 1M 130k",
            "write -z 3M 300k",
            "discard 1040k 64k");
        await _images.AssertMatchesQemuAsync("e.qcow2");
    }

    [Fact]
    public async Task External_data_file_holds_the_clusters()
    {
        await _images.Qcow2Async("x.qcow2", 4 * MiB, "-o", "data_file=x.data");
        await _images.Io("x.qcow2", "write -P 0x61 0 64k", "write -P 0x62 1M 200k", "write -z 2M 64k");
        using (Qcow2Image image = Qcow2Image.Open(_images.PathOf("x.qcow2")))
        {
            Assert.Equal("x.data", image.Header.DataFile);
        }
        await _images.AssertMatchesQemuAsync("x.qcow2");

        await _images.Qcow2Async("xr.qcow2", 4 * MiB, "-o", "data_file=xr.data,data_file_raw=on");
        await _images.Io("xr.qcow2", "write -P 0x63 64k 64k", "write -P 0x64 3M 1M");
        await _images.AssertMatchesQemuAsync("xr.qcow2");
    }

    [Fact]
    public async Task Version_2_images_read_as_qemu_reads_them()
    {
        await _images.RawAsync("base.raw", 2 * MiB, 0x10);
        await _images.Qcow2Async("v2.qcow2", 3 * MiB, "-o", "compat=0.10", "-b", "base.raw", "-F", "raw");
        await _images.Io("v2.qcow2", "write -P 0x20 64k 64k", "write -z 512k 64k", "write -P 0x30 2M 100k");
        using (Qcow2Image image = Qcow2Image.Open(_images.PathOf("v2.qcow2")))
        {
            Assert.Equal(2, image.Header.Version);
        }
        await _images.AssertMatchesQemuAsync("v2.qcow2");
    }

    [Fact]
    public async Task Raw_file_under_two_qcow2_layers_with_relative_and_absolute_names()
    {
        Directory.CreateDirectory(_images.PathOf("golden"));
        await _images.RawAsync("golden/base.raw", 3 * MiB, 0xa1);
        // Relative names resolve from the folder of the image that names them, not the current one.
        await _images.Qcow2Async("golden/mid.qcow2", 5 * MiB, "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw");
        await _images.Io("golden/mid.qcow2", "write -P 0xa2 1M 1M", "write -z 2560k 8k", "write -P 0xa3 4M 4k");
        await _images.Qcow2Async("top.qcow2", 6 * MiB, "-b", _images.PathOf("golden/mid.qcow2"), "-F", "qcow2");
        await _images.Io("top.qcow2", "write -P 0xa4 1536k 64k", "discard 4M 64k", "write -P 0xa5 5M 4k");

        using (Qcow2Image image = Qcow2Image.Open(_images.PathOf("top.qcow2")))
        {
            Assert.Equal(
                [("qcow2", _images.PathOf("top.qcow2")), ("qcow2", _images.PathOf("golden/mid.qcow2")), ("raw", _images.PathOf("golden/base.raw"))],
                image.Chain.Select(c => (c.Format, c.Path)));
        }
        await _images.AssertMatchesQemuAsync("top.qcow2");
        await _images.AssertMatchesQemuAsync("golden/mid.qcow2");
    }

    [Fact]
    public async Task A_backing_file_named_without_its_format_is_probed()
    {
        await _images.Qcow2Async("base.qcow2", 2 * MiB);
        await _images.Io("base.qcow2", "write -P 0x71 0 1M");
        await _images.Qcow2Async("top.qcow2", 2 * MiB, "-b", "base.qcow2", "-F", "qcow2");
        // Turn the backing format extension into an unknown one (skipped by readers): no format named.
        string top = _images.PathOf("top.qcow2");
        byte[] bytes = await File.ReadAllBytesAsync(top);
        int at = bytes.AsSpan(0, 4096).IndexOf(new byte[] { 0xe2, 0x79, 0x2a, 0xca });
        Assert.True(at >= 104);
        bytes[at] = 0x12;
        await File.WriteAllBytesAsync(top, bytes);
        using Qcow2Image image = Qcow2Image.Open(_images.PathOf("top.qcow2"));
        Assert.Equal("qcow2", image.Chain[1].Format);
        byte[] read = new byte[4096];
        image.Read(4096, read);
        Assert.All(read, b => Assert.Equal(0x71, b));
    }

    [Fact]
    public async Task One_reader_serves_concurrent_reads()
    {
        await _images.RawAsync("base.raw", 16 * MiB, 0x01);
        await _images.Qcow2Async("top.qcow2", 16 * MiB, "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw");
        var commands = Enumerable.Range(0, 64).Select(i => $"write -P {i + 2} {i * 256}k 8k").ToArray();
        await _images.Io("top.qcow2", commands);
        await _images.Img("convert", "-O", "raw", "top.qcow2", "expected.raw");
        byte[] expected = await File.ReadAllBytesAsync(_images.PathOf("expected.raw"));

        using Qcow2Image image = Qcow2Image.Open(_images.PathOf("top.qcow2"));
        await Parallel.ForAsync(0, 8, async (worker, ct) =>
        {
            var random = new Random(worker);
            byte[] buffer = new byte[128 * 1024];
            for (int i = 0; i < 400; i++)
            {
                int length = random.Next(1, buffer.Length);
                long offset = random.NextInt64(0, expected.Length - length);
                await image.ReadAsync(offset, buffer.AsMemory(0, length), ct);
                Assert.True(expected.AsSpan((int)offset, length).SequenceEqual(buffer.AsSpan(0, length)), $"worker {worker} read {offset}+{length} wrong");
            }
        });
    }

    [Fact]
    public async Task Reads_and_queries_outside_the_image_are_refused()
    {
        await _images.Qcow2Async("s.qcow2", MiB);
        using Qcow2Image image = Qcow2Image.Open(_images.PathOf("s.qcow2"));
        Assert.Throws<ArgumentOutOfRangeException>(() => image.Read(MiB - 10, new byte[11]));
        Assert.Throws<ArgumentOutOfRangeException>(() => image.Read(-1, new byte[1]));
        Assert.Throws<ArgumentOutOfRangeException>(() => image.GetAllocation(0, MiB + 1, new ImageExtent[4]));
        Assert.Equal(1, image.GetAllocation(0, MiB, new ImageExtent[4]));
    }
}
