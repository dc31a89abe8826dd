using Gateway.Backends.Qcow2;
using Gateway.Fuzz;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>
/// The qcow2 fuzz harness (Gateway.Fuzz/Qcow2Harness.cs, linked here) and its seeds: every seed
/// in Gateway.Fuzz/corpus/qcow2 decodes to a chain the reader opens (not a refusal: a refused
/// seed would leave the fuzzer at the header checks) and reads as qemu-img convert does; findings
/// of ops/fuzz replay here through the same harness code.
/// </summary>
public sealed class Qcow2FuzzTests : IDisposable
{
    private readonly QemuImages _images = new();

    public void Dispose() => _images.Dispose();

    public static TheoryData<string> Seeds()
    {
        var seeds = new TheoryData<string>();
        foreach (string file in Directory.EnumerateFiles(Corpus()).Order(StringComparer.Ordinal))
        {
            seeds.Add(Path.GetFileName(file));
        }
        return seeds;
    }

    [Theory]
    [MemberData(nameof(Seeds))]
    public async Task Every_seed_opens_and_reads_as_qemu_reads_it(string seed)
    {
        byte[] input = await File.ReadAllBytesAsync(Path.Combine(Corpus(), seed));
        Assert.True(Qcow2Harness.WriteFiles(input, _images.Folder) >= 1, $"seed {seed} holds no file");
        // Bytes only: the decoded files are sparse where qemu wrote zeros, which qemu-img map
        // reports as zero clusters, so the allocation oracle does not apply to them.
        await _images.Img("convert", "-O", "raw", "0", "expected.raw");
        byte[] expected = await File.ReadAllBytesAsync(_images.PathOf("expected.raw"));
        using (Qcow2Image image = Qcow2Image.Open(_images.PathOf("0")))
        {
            Assert.Equal(expected.Length, image.VirtualSize);
            byte[] actual = new byte[expected.Length];
            image.Read(0, actual);
            int same = expected.AsSpan().CommonPrefixLength(actual);
            Assert.True(same == expected.Length, $"seed {seed}: byte {same} differs from qemu-img convert");
            Qcow2Harness.Exercise(image);
        }
        await Qcow2Harness.Run(input);
    }

    public static TheoryData<string> Findings()
    {
        var findings = new TheoryData<string>();
        foreach (string file in Directory.EnumerateFiles(FindingsFolder()).Order(StringComparer.Ordinal))
        {
            findings.Add(Path.GetFileName(file));
        }
        return findings;
    }

    /// <summary>Inputs ops/fuzz found crashing the reader (Gateway.Tests/Qcow2/findings), replayed through the harness: each is now refused.</summary>
    [Theory]
    [MemberData(nameof(Findings))]
    public async Task A_fuzz_finding_is_refused_not_a_crash(string finding)
    {
        byte[] input = await File.ReadAllBytesAsync(Path.Combine(FindingsFolder(), finding));
        await Qcow2Harness.Run(input);
        Assert.True(Qcow2Harness.WriteFiles(input, _images.Folder) >= 1);
        Assert.Throws<Qcow2Exception>(() => Qcow2Image.Open(_images.PathOf("0")).Dispose());
    }

    /// <summary>
    /// Finding empty-l1-negative-offset: an empty L1 table (l1_size 0, virtual size 0) at offset
    /// 0xfffa000000000600 was not checked, being empty, and reached RandomAccess.Read as a negative
    /// offset (ArgumentOutOfRangeException). The offset is checked whatever the size, as qemu does.
    /// </summary>
    [Fact]
    public async Task An_empty_l1_table_at_an_offset_beyond_any_file_is_refused()
    {
        string path = await _images.Qcow2Async("empty.qcow2", 0, "-o", "cluster_size=512");
        await using (FileStream file = File.Open(path, FileMode.Open, FileAccess.ReadWrite))
        {
            byte[] offset = new byte[8];
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(offset, 0xfffa_0000_0000_0600);
            file.Position = 40;
            file.Write(offset);
        }
        Qcow2Exception e = Assert.Throws<Qcow2Exception>(() => Qcow2Image.Open(path).Dispose());
        Assert.Contains("L1 table offset 0xfffa000000000600", e.Message);
    }

    [Fact]
    public void The_corpus_covers_the_formats_the_issue_names()
    {
        string[] names = [.. Directory.EnumerateFiles(Corpus()).Select(Path.GetFileName)!];
        foreach (string expected in new[] { "v2-64k", "v3-512", "v3-2m", "v3-4k-zero", "v3-ext-l2-64k", "deflate-64k", "zstd-64k", "chain-raw-qcow2-extl2", "data-file" })
        {
            Assert.Contains(expected, names);
        }
    }

    private static string FindingsFolder() => Path.Combine(Path.GetDirectoryName(Corpus())!, "..", "..", "Gateway.Tests", "Qcow2", "findings");

    private static string Corpus()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            string corpus = Path.Combine(directory.FullName, "Gateway.Fuzz", "corpus", "qcow2");
            if (File.Exists(Path.Combine(directory.FullName, "Gateway.sln")))
            {
                return Directory.Exists(corpus) ? corpus : throw new DirectoryNotFoundException(corpus);
            }
        }
        throw new DirectoryNotFoundException("no Gateway.sln above " + AppContext.BaseDirectory);
    }
}
