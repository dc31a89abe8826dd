using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// Large reads of a file export whose pages are in the page cache are sent from the file with
/// sendfile (<see cref="FileSender"/>), on every reply form a client can choose: simple replies,
/// structured replies (one OFFSET_DATA chunk), with NBD_CMD_FLAG_DF, and extended headers. The
/// client reads the file's bytes, at page-aligned and unaligned offsets alike. Pages not in the
/// cache are read with pread as before, and a device range's file stays open for a send that
/// comes after the device closed. In the serial collection: <see cref="FileSender.Sends"/> is
/// process-wide.
/// </summary>
[Collection(NbdServerCollection.Name)]
public sealed class SendFileReadTests : IAsyncLifetime
{
    private const int KiB = 1024;
    private const int MiB = 1024 * KiB;
    private const string Export = "file";

    private readonly string _path = Path.Combine(Path.GetTempPath(), $"sendfile-{Guid.NewGuid():N}.img");
    private readonly byte[] _content = new byte[8 * MiB];
    private readonly string _sparsePath = Path.Combine(Path.GetTempPath(), $"sendfile-sparse-{Guid.NewGuid():N}.img");
    private FileBackend _file = null!;
    private FileBackend _sparse = null!;
    private NbdTestServer _server = null!;

    public async Task InitializeAsync()
    {
        new Random(1207).NextBytes(_content);
        await File.WriteAllBytesAsync(_path, _content);
        _file = FileBackend.Open(_path, readOnly: false);
        var exports = new TestExportDirectory();
        exports.AddAsIs(Export, _file);
        _sparse = FileBackend.Create(_sparsePath, 4 * MiB);
        exports.AddAsIs("sparse", _sparse);
        _server = new NbdTestServer(exports);
    }

    public async Task DisposeAsync()
    {
        await _server.DisposeAsync();
        _file.Dispose();
        _sparse.Dispose();
        File.Delete(_path);
        File.Delete(_sparsePath);
    }

    /// <summary>cachestat(2) came with Linux 6.5; on older kernels every read takes the pread path.</summary>
    private static bool KernelHasCachestat => Environment.OSVersion.Version >= new Version(6, 5);

    private async Task<RawClient> OpenAsync(string mode)
    {
        if (mode != "extended")
        {
            return await _server.OpenAsync(Export, structured: mode != "simple");
        }
        return await _server.OpenExtendedAsync(Export);
    }

    [Theory]
    [InlineData("simple")]
    [InlineData("structured")]
    [InlineData("structured-df")]
    [InlineData("extended")]
    public async Task Cached_large_reads_are_sent_from_the_file_and_read_back_the_files_bytes(string mode)
    {
        Assert.True(KernelHasCachestat, $"this kernel ({Environment.OSVersion.Version}) has no cachestat(2): large reads cannot be sent from the file");
        await using RawClient client = await OpenAsync(mode);
        CommandFlags flags = mode == "structured-df" ? CommandFlags.DontFragment : CommandFlags.None;
        (ulong Offset, uint Length)[] reads = [(1 * MiB, 1 * MiB), (3 * MiB + 512, 256 * KiB), (7 * MiB - 64 * KiB, 64 * KiB), (0, 8 * MiB)];
        // Warm the pages the reads touch (the file was just written, so they are cached already).
        using (var stream = new FileStream(_path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite))
        {
            await stream.CopyToAsync(Stream.Null);
        }

        long before = Interlocked.Read(ref FileSender.Sends);
        foreach ((ulong offset, uint length) in reads)
        {
            NbdReply reply = await client.ReadAsync(offset, length, flags);
            Assert.Equal(NbdError.None, reply.Error);
            Assert.Equal(_content.AsSpan((int)offset, (int)length).ToArray(), reply.Data(offset, length));
            if (reply.Structured)
            {
                Assert.Equal([(ReplyType.OffsetData, offset, length)], reply.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
            }
        }
        Assert.Equal(reads.Length, Interlocked.Read(ref FileSender.Sends) - before);

        // A write is read back as written (the page cache is what sendfile sends from).
        byte[] written = RawClient.Pattern(128 * KiB, 9);
        Assert.Equal(NbdError.None, (await client.WriteAsync(2 * MiB + 4096, written)).Error);
        NbdReply after = await client.ReadAsync(2 * MiB, 256 * KiB, flags);
        Assert.Equal([.. _content.AsSpan(2 * MiB, 4096), .. written, .. _content.AsSpan(2 * MiB + 4096 + 128 * KiB, 128 * KiB - 4096)],
            after.Data(2 * MiB, 256 * KiB));
        Assert.Equal(reads.Length + 1, Interlocked.Read(ref FileSender.Sends) - before);
    }

    [Fact]
    public async Task A_hole_not_in_the_page_cache_is_still_an_OFFSET_HOLE_chunk_and_the_data_beside_it_is_sent_from_the_file()
    {
        // Data in the first MiB (written, so cached), a hole in the second (never read, so not cached).
        byte[] data = RawClient.Pattern(1 * MiB, 5);
        await _sparse.WriteAsync(0, data, fua: false);
        await using RawClient client = await _server.OpenAsync("sparse", structured: true);
        long before = Interlocked.Read(ref FileSender.Sends);

        NbdReply both = await client.ReadAsync(0, 2 * MiB);
        Assert.Equal([(ReplyType.OffsetData, 0ul, (uint)MiB), (ReplyType.OffsetHole, (ulong)MiB, (uint)MiB)],
            both.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        Assert.Equal([.. data, .. new byte[MiB]], both.Data(0, 2 * MiB));

        NbdReply cached = await client.ReadAsync(0, 1 * MiB);
        Assert.Equal([(ReplyType.OffsetData, 0ul, (uint)MiB)], cached.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        Assert.Equal(data, cached.Data(0, 1 * MiB));
        Assert.Equal(1, Interlocked.Read(ref FileSender.Sends) - before);
    }

    [Fact]
    public async Task Small_reads_are_copied_not_sent_from_the_file()
    {
        await using RawClient client = await OpenAsync("structured");
        long before = Interlocked.Read(ref FileSender.Sends);
        NbdReply reply = await client.ReadAsync(4 * MiB, 16 * KiB);
        Assert.Equal(_content.AsSpan(4 * MiB, 16 * KiB).ToArray(), reply.Data(4 * MiB, 16 * KiB));
        Assert.Equal(0, Interlocked.Read(ref FileSender.Sends) - before);
    }

    [Fact]
    public async Task A_range_not_in_the_page_cache_is_not_lent_and_a_lent_range_outlives_the_device()
    {
        Assert.True(KernelHasCachestat, $"this kernel ({Environment.OSVersion.Version}) has no cachestat(2)");
        string path = Path.Combine(Path.GetTempPath(), $"sendfile-cold-{Guid.NewGuid():N}.img");
        try
        {
            await File.WriteAllBytesAsync(path, _content);
            FileBackend file = FileBackend.Open(path, readOnly: true);
            try
            {
                file.DropCachedPages();
                Assert.False(file.TryGetFileRegion(1 * MiB, 1 * MiB, out _));

                byte[] read = new byte[1 * MiB];
                await file.ReadAsync(1 * MiB, read);
                Assert.True(file.TryGetFileRegion(1 * MiB, 1 * MiB, out FileRegion region));
                Assert.Equal(1 * MiB, region.Offset);
                // Past the end of the device: never a region.
                Assert.False(file.TryGetFileRegion(8 * MiB - 4096, 8192, out _));

                // The device closes while the region is still to be sent: its file stays open until released.
                file.Dispose();
                Assert.False(file.TryGetFileRegion(1 * MiB, 4096, out _));
                byte[] sent = new byte[4096];
                Assert.Equal(4096, RandomAccess.Read(region.File.SafeFileHandle, sent, region.Offset));
                Assert.Equal(_content.AsSpan(1 * MiB, 4096).ToArray(), sent);
                region.Holder.Release();
                Assert.False(region.File.CanRead);
            }
            finally
            {
                file.Dispose();
            }
        }
        finally
        {
            File.Delete(path);
        }
    }
}
