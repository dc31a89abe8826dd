using Gateway.Actors.Nbd;
using Gateway.Actors.Tls;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// Over TLS a large read cannot be sent from the file (sendfile), but a range all in the page
/// cache is still served as sendfile would serve it: on the reader's thread, as one data chunk,
/// without asking the device for holes (the holes a check would find are not in the cache). A
/// range not cached still goes to the pool and is checked, so a hole never read stays a hole.
/// </summary>
public sealed class CachedReadsOverTlsTests : IAsyncLifetime
{
    private const int MiB = 1024 * 1024;

    private readonly string _path = Path.Combine(Path.GetTempPath(), $"tls-cached-{Guid.NewGuid():N}.img");
    private readonly TestCertificates _pki = new();
    private FileBackend _file = null!;
    private AllocationCounter _device = null!;
    private NbdTestServer _server = null!;

    public async Task InitializeAsync()
    {
        _file = FileBackend.Create(_path, 4 * MiB);
        // Data in the first 2 MiB (written, so cached); the rest a hole never read.
        await _file.WriteAsync(0, RawClient.Pattern(2 * MiB, 3), fua: false);
        _device = new AllocationCounter(_file);
        var exports = new TestExportDirectory();
        exports.AddAsIs("file", _device);
        _server = new NbdTestServer(exports, _pki.Settings(TlsMode.Required));
    }

    public async Task DisposeAsync()
    {
        await _server.DisposeAsync();
        _file.Dispose();
        File.Delete(_path);
        _pki.Dispose();
    }

    [Fact]
    public async Task A_cached_range_is_one_data_chunk_without_a_hole_check_and_a_hole_never_read_is_still_a_hole()
    {
        await using RawClient client = await _server.ConnectAsync();
        await client.StartAsync();
        Assert.Null(await client.StartTlsAsync());
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.Ack, (await client.InfoOrGoAsync(NbdOption.Go, "file"))[^1].Type);

        NbdReply cached = await client.ReadAsync(MiB / 2, MiB);
        Assert.Equal(NbdError.None, cached.Error);
        Assert.Equal([(ReplyType.OffsetData, (ulong)MiB / 2, (uint)MiB)], cached.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        Assert.Equal(RawClient.Pattern(2 * MiB, 3).AsSpan(MiB / 2, MiB).ToArray(), cached.Data(MiB / 2, MiB));
        Assert.Equal(0, _device.AllocationQueries);

        NbdReply hole = await client.ReadAsync(3 * MiB, MiB);
        Assert.Equal([(ReplyType.OffsetHole, 3ul * MiB, (uint)MiB)], hole.Chunks.Select(c => (c.Type, c.Offset, c.Length)));
        Assert.Equal(1, _device.AllocationQueries);
    }

    /// <summary>The file device, counting how often it is asked for its allocation.</summary>
    private sealed class AllocationCounter(FileBackend inner) : IBlockDevice, INonBlockingIo, IFileRegions
    {
        private int _queries;

        public int AllocationQueries => Volatile.Read(ref _queries);

        public long Size => inner.Size;
        public bool IsReadOnly => inner.IsReadOnly;
        public BlockCapabilities Capabilities => inner.Capabilities;
        public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) => inner.ReadAsync(offset, destination, cancellationToken);
        public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) => inner.WriteAsync(offset, source, fua, cancellationToken);
        public ValueTask FlushAsync(CancellationToken cancellationToken = default) => inner.FlushAsync(cancellationToken);
        public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) => inner.TrimAsync(offset, length, fua, cancellationToken);
        public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) => inner.ZeroAsync(offset, length, flags, cancellationToken);
        public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) => inner.CacheAsync(offset, length, cancellationToken);

        public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
        {
            Interlocked.Increment(ref _queries);
            return inner.GetAllocationAsync(offset, length, extents, cancellationToken);
        }

        public bool TryReadNoWait(long offset, Span<byte> destination) => inner.TryReadNoWait(offset, destination);
        public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source) => inner.TryWriteNoWait(offset, source);
        public bool TryGetFileRegion(long offset, int length, out FileRegion region) => inner.TryGetFileRegion(offset, length, out region);
        public void Dispose() { }
    }
}
