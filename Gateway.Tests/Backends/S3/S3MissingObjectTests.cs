using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Amazon.S3;
using Amazon.S3.Model;
using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;
using static Gateway.Tests.Backends.S3.S3TestData;

namespace Gateway.Tests.Backends.S3;

/// <summary>
/// Issue 30, item 1: a chunk the gateway stored (or listed) whose object has gone must read as EIO,
/// never as zeros; only a chunk it never stored reads as zeros when the store says the key does not
/// exist. In-memory store: the backend's bookkeeping, deterministic.
/// </summary>
public sealed class S3MissingObjectTests
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;
    private const int Chunk = 64 * KiB;
    private const string Key0 = "disk/0000000000000000";
    private const string Key1 = "disk/0000000000000001";

    private static S3Backend Open(MemoryObjectStore store, long size = 4 * MiB, long cacheBytes = 4 * MiB) =>
        S3Backend.OpenAsync(store, "disk", size, readOnly: false, new S3DeviceOptions
        {
            ObjectSize = Chunk,
            CacheBytes = cacheBytes,
            WritebackDelay = TimeSpan.FromMinutes(10), // no idle write-back: the tests decide when uploads happen
        }, ownsStore: false).GetAwaiter().GetResult();

    /// <summary>Writes two whole chunks and stores them, then forgets the device: the objects exist only in the store.</summary>
    private static async Task<byte[]> StoreTwoChunksAsync(MemoryObjectStore store)
    {
        byte[] data = Pattern(2 * Chunk, seed: 301);
        using S3Backend writer = Open(store);
        await writer.WriteAsync(0, data, fua: true);
        return data;
    }

    [Fact]
    public async Task Flushed_chunk_deleted_behind_the_backend_reads_as_EIO_not_zeros_on_a_small_read()
    {
        var store = new MemoryObjectStore();
        await StoreTwoChunksAsync(store);
        using S3Backend device = Open(store); // its listing finds both objects
        await store.DeleteAsync(Key0, CancellationToken.None);

        // 4 KiB is under a quarter chunk: the range GET that bypasses the cache.
        var e = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(100, new byte[4 * KiB]).AsTask());

        Assert.Equal(BlockErrorKind.Io, e.Kind);
        Assert.Contains(Key0, e.Message);
        Assert.Contains("missing", e.Message);
        Assert.True(store.GetCount(Key0) > 0, "the read must have asked the store, not the cache");
    }

    [Fact]
    public async Task Flushed_chunk_deleted_behind_the_backend_reads_as_EIO_not_zeros_on_a_whole_chunk_read()
    {
        var store = new MemoryObjectStore();
        byte[] data = await StoreTwoChunksAsync(store);
        using S3Backend device = Open(store);
        await store.DeleteAsync(Key0, CancellationToken.None);

        // A whole chunk goes through the cache (LoadAsync); a second try must not find zeros cached by the first.
        var first = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[Chunk]).AsTask());
        var again = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[Chunk]).AsTask());

        Assert.Equal(BlockErrorKind.Io, first.Kind);
        Assert.Equal(BlockErrorKind.Io, again.Kind);
        Assert.Contains(Key0, first.Message);
        // The chunk next to it is untouched and still reads back.
        Assert.Equal(data.AsSpan(Chunk, Chunk).ToArray(), await ReadAsync(device, Chunk, Chunk));
    }

    [Fact]
    public async Task Torn_chunk_object_reads_as_EIO_not_zeros_on_both_read_paths()
    {
        // A store that kept the first half of a PUT cut off halfway (stock s3rver does): the object
        // is short, and its missing half is lost data, not zeros.
        var store = new MemoryObjectStore();
        byte[] data = await StoreTwoChunksAsync(store);
        await store.PutAsync(Key0, data, Chunk / 2, CancellationToken.None);
        using S3Backend device = Open(store);

        // A small read inside what the object holds still reads (a range GET); the next chunk is untouched.
        Assert.Equal(data.AsSpan(100, 4 * KiB).ToArray(), await ReadAsync(device, 100, 4 * KiB));
        Assert.Equal(data.AsSpan(Chunk, Chunk).ToArray(), await ReadAsync(device, Chunk, Chunk));
        var small = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(Chunk / 2 - 2 * KiB, new byte[4 * KiB]).AsTask());
        var whole = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[Chunk]).AsTask());

        Assert.Equal(BlockErrorKind.Io, small.Kind);
        Assert.Equal(BlockErrorKind.Io, whole.Kind);
        Assert.Contains($"{Key0} ends at byte {Chunk / 2}", small.Message);
        Assert.Contains("stored in part", whole.Message);
    }

    [Fact]
    public async Task Chunk_uploaded_by_this_backend_then_evicted_and_deleted_behind_its_back_reads_as_EIO_not_zeros()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store, cacheBytes: 4 * Chunk);
        await device.WriteAsync(0, Pattern(Chunk, seed: 302), fua: true);
        // Eight more stored chunks push chunk 0 (the least recently used, clean) out of the 4-chunk cache.
        for (int i = 1; i <= 8; i++)
        {
            await device.WriteAsync((long)i * Chunk, Pattern(Chunk, seed: 302 + i), fua: true);
        }
        await store.DeleteAsync(Key0, CancellationToken.None);

        var small = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[4 * KiB]).AsTask());
        var whole = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[Chunk]).AsTask());

        Assert.Equal(BlockErrorKind.Io, small.Kind);
        Assert.Equal(BlockErrorKind.Io, whole.Kind);
    }

    [Fact]
    public async Task Partial_write_over_a_chunk_deleted_behind_the_backend_fails_the_flush_instead_of_storing_zeros_around_it()
    {
        var store = new MemoryObjectStore();
        await StoreTwoChunksAsync(store);
        using S3Backend device = Open(store);
        await store.DeleteAsync(Key0, CancellationToken.None);

        // Sector aligned: taken by the cache; the merge with the stored object happens at upload.
        await device.WriteAsync(0, Pattern(4 * KiB, seed: 311), fua: false);
        var e = await Assert.ThrowsAsync<BlockDeviceException>(() => device.FlushAsync().AsTask());

        Assert.Equal(BlockErrorKind.Io, e.Kind);
        Assert.False(store.Objects.ContainsKey(Key0), "a chunk of zeros around the write must not replace the lost object");
    }

    [Fact]
    public async Task Trimmed_chunk_reads_as_zeros_on_both_read_paths_and_after_reopening()
    {
        var store = new MemoryObjectStore();
        await StoreTwoChunksAsync(store);
        using S3Backend device = Open(store);

        await device.TrimAsync(0, Chunk, fua: true);

        Assert.False(store.Objects.ContainsKey(Key0));
        AssertZeros(await ReadAsync(device, 100, 4 * KiB));
        AssertZeros(await ReadAsync(device, 0, Chunk));
        using S3Backend reopened = Open(store);
        AssertZeros(await ReadAsync(reopened, 100, 4 * KiB));
        AssertZeros(await ReadAsync(reopened, 0, Chunk));
    }

    [Fact]
    public async Task Chunk_trimmed_after_being_cached_and_evicted_reads_as_zeros()
    {
        var store = new MemoryObjectStore();
        using S3Backend device = Open(store, cacheBytes: 4 * Chunk);
        await device.WriteAsync(0, Pattern(Chunk, seed: 321), fua: true);
        for (int i = 1; i <= 8; i++)
        {
            await device.WriteAsync((long)i * Chunk, Pattern(Chunk, seed: 321 + i), fua: true);
        }

        await device.TrimAsync(0, Chunk, fua: false);

        AssertZeros(await ReadAsync(device, 0, 4 * KiB));
        AssertZeros(await ReadAsync(device, 0, Chunk));
    }

    [Fact]
    public async Task Never_written_chunk_reads_as_zeros_even_before_the_listing_succeeds()
    {
        var store = new MemoryObjectStore();
        byte[] data = await StoreTwoChunksAsync(store);
        store.Down = true;
        using S3Backend device = Open(store); // opens without its map: every chunk may exist
        store.Down = false;

        // Chunk 3 has no object: the store's "no such key" is the proof it is a hole.
        AssertZeros(await ReadAsync(device, 3 * Chunk + 100, 4 * KiB));
        AssertZeros(await ReadAsync(device, 3 * Chunk, Chunk));
        Assert.True(store.GetCount("disk/0000000000000003") > 0, "the reads must have asked the store");
        Assert.Equal(data.AsSpan(Chunk, Chunk).ToArray(), await ReadAsync(device, Chunk, Chunk));
    }

    [Fact]
    public async Task Chunk_written_while_the_listing_has_not_run_reads_back_its_data_and_zeros()
    {
        var store = new MemoryObjectStore();
        store.Down = true;
        using S3Backend device = Open(store);
        store.Down = false;
        byte[] written = Pattern(4 * KiB, seed: 331);

        // The chunk has no object yet: merging the partial write with it legitimately finds none.
        await device.WriteAsync(8 * KiB, written, fua: true);

        byte[] read = await ReadAsync(device, 0, Chunk);
        AssertZeros(read.AsSpan(0, 8 * KiB));
        Assert.Equal(written, read.AsSpan(8 * KiB, 4 * KiB).ToArray());
        AssertZeros(read.AsSpan(12 * KiB));
    }

    [Fact]
    public async Task Each_chunk_found_missing_is_counted_once()
    {
        var store = new MemoryObjectStore();
        await StoreTwoChunksAsync(store);
        using S3Backend device = Open(store);
        await store.DeleteAsync(Key0, CancellationToken.None);
        await store.DeleteAsync(Key1, CancellationToken.None);

        for (int i = 0; i < 3; i++)
        {
            await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[4 * KiB]).AsTask());
            await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(Chunk, new byte[Chunk]).AsTask());
        }

        Assert.Equal(2, device.MissingObjects);
    }

    [Fact]
    public async Task Rewriting_or_trimming_a_missing_chunk_makes_it_readable_again()
    {
        var store = new MemoryObjectStore();
        await StoreTwoChunksAsync(store);
        using S3Backend device = Open(store);
        await store.DeleteAsync(Key0, CancellationToken.None);
        await store.DeleteAsync(Key1, CancellationToken.None);
        byte[] rewritten = Pattern(Chunk, seed: 351);

        // A whole chunk written needs nothing from the lost object; a trim says the chunk is zeros.
        await device.WriteAsync(0, rewritten, fua: true);
        await device.TrimAsync(Chunk, Chunk, fua: true);

        using S3Backend reopened = Open(store);
        Assert.Equal(rewritten, await ReadAsync(reopened, 0, Chunk));
        AssertZeros(await ReadAsync(reopened, Chunk + 100, 4 * KiB));
        AssertZeros(await ReadAsync(reopened, Chunk, Chunk));
    }

    [Fact]
    public async Task Small_read_crossing_the_first_upload_of_a_chunk_is_not_taken_for_a_lost_object()
    {
        var memory = new MemoryObjectStore { Down = true };
        var store = new GatedObjectStore(memory, Key0);
        using S3Backend device = OpenGated(store); // without its map, so a read must ask the store
        memory.Down = false;
        byte[] buffer = new byte[4 * KiB];

        // The read's GET finds no object, and before its answer is back a write of the chunk is stored.
        Task read = device.ReadAsync(0, buffer).AsTask();
        await store.GetArrived.Task.WaitAsync(TimeSpan.FromSeconds(10));
        store.Release.SetResult();
        Assert.Equal(-1, await store.InnerAnswer.Task.WaitAsync(TimeSpan.FromSeconds(10)));
        await device.WriteAsync(0, Pattern(Chunk, seed: 361), fua: true);
        store.Return.SetResult();
        await read.WaitAsync(TimeSpan.FromSeconds(10));

        AssertZeros(buffer); // what the chunk held before the write: allowed for a read racing it
        Assert.Equal(0, device.MissingObjects);
    }

    [Fact]
    public async Task Small_read_crossing_a_trim_and_a_rewrite_of_its_chunk_is_not_taken_for_a_lost_object()
    {
        var memory = new MemoryObjectStore();
        await StoreTwoChunksAsync(memory);
        var store = new GatedObjectStore(memory, Key0);
        using S3Backend device = OpenGated(store);
        byte[] buffer = new byte[4 * KiB];
        byte[] rewritten = Pattern(Chunk, seed: 362);

        // The GET leaves while the chunk is stored, finds no object because a trim deleted it, and is
        // back after a new write stored the chunk again: stored at both ends, yet nothing was lost.
        Task read = device.ReadAsync(0, buffer).AsTask();
        await store.GetArrived.Task.WaitAsync(TimeSpan.FromSeconds(10));
        await device.TrimAsync(0, Chunk, fua: true);
        store.Release.SetResult();
        Assert.Equal(-1, await store.InnerAnswer.Task.WaitAsync(TimeSpan.FromSeconds(10)));
        await device.WriteAsync(0, rewritten, fua: true);
        store.Return.SetResult();
        await read.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Equal(rewritten.AsSpan(0, 4 * KiB).ToArray(), buffer); // it looked again, and found the rewrite
        Assert.Equal(0, device.MissingObjects);
    }

    private static S3Backend OpenGated(GatedObjectStore store) =>
        S3Backend.OpenAsync(store, "disk", 4 * MiB, readOnly: false,
            new S3DeviceOptions { ObjectSize = Chunk, CacheBytes = 4 * MiB, WritebackDelay = TimeSpan.FromMinutes(10) }, ownsStore: false)
            .GetAwaiter().GetResult();

    internal static async Task<byte[]> ReadAsync(IBlockDevice device, long offset, int length)
    {
        byte[] buffer = new byte[length];
        await device.ReadAsync(offset, buffer);
        return buffer;
    }

    internal static void AssertZeros(ReadOnlySpan<byte> data)
    {
        int at = data.IndexOfAnyExcept((byte)0);
        Assert.True(at < 0, $"byte {at} is not zero");
    }
}

/// <summary>
/// The real <see cref="S3ObjectStore"/> against a loopback HTTP server that answers like a broken
/// store or proxy: only S3's own "NoSuchKey" proves an object absent.
/// </summary>
public sealed class S3ObjectStoreNotFoundTests
{
    private const int Chunk = 64 * 1024;

    private const string NoSuchKeyBody =
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message>" +
        "<Key>disk/0000000000000000</Key><RequestId>fake</RequestId></Error>";

    private const string NoSuchBucketBody =
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message>" +
        "<BucketName>gone</BucketName><RequestId>fake</RequestId></Error>";

    private static S3ObjectStore Store(FakeS3Server server) => new(new S3BucketLocation(server.Endpoint, "bucket", null, "key", "secret"));

    private static S3Backend OpenBackend(FakeS3Server server) =>
        S3Backend.OpenAsync(Store(server), "disk", 4 * Chunk, readOnly: false,
            new S3DeviceOptions { ObjectSize = Chunk, CacheBytes = 1024 * 1024 }).GetAwaiter().GetResult();

    [Theory]
    [InlineData("text/html", "<html>not found</html>")]
    [InlineData("text/plain", "")]
    public async Task Get_answered_404_without_an_S3_error_code_throws_instead_of_reporting_a_hole(string contentType, string body)
    {
        using var server = new FakeS3Server((_, _) => new FakeResponse(404, contentType, body));
        using S3ObjectStore store = Store(server);

        var e = await Assert.ThrowsAnyAsync<Exception>(() => store.GetAsync("disk/0000000000000000", 0, new byte[512], CancellationToken.None));

        // The SDK makes up "NotFound" when it cannot parse the body: the message names whatever it has.
        Assert.Matches("404 with error code '[^']+'", e.Message);
        Assert.Contains("disk/0000000000000000", e.Message);
        Assert.Contains("absence is not proven", e.Message);
    }

    [Fact]
    public async Task Get_answered_404_NoSuchBucket_throws_instead_of_reporting_a_hole()
    {
        using var server = new FakeS3Server((_, _) => new FakeResponse(404, "application/xml", NoSuchBucketBody));
        using S3ObjectStore store = Store(server);

        var e = await Assert.ThrowsAnyAsync<Exception>(() => store.GetAsync("disk/0000000000000000", 0, new byte[512], CancellationToken.None));

        Assert.Contains("NoSuchBucket", e.Message);
    }

    [Fact]
    public async Task Get_answered_404_NoSuchKey_is_a_hole()
    {
        using var server = new FakeS3Server((_, _) => new FakeResponse(404, "application/xml", NoSuchKeyBody));
        using S3ObjectStore store = Store(server);

        Assert.Equal(-1, await store.GetAsync("disk/0000000000000000", 0, new byte[512], CancellationToken.None));
    }

    [Fact]
    public async Task Backend_over_a_store_answering_404_without_an_error_code_reads_as_EIO_not_zeros()
    {
        // The listing gets the same answer, so the backend opens without its map and must ask for every chunk.
        using var server = new FakeS3Server((_, _) => new FakeResponse(404, "text/html", "<html>not found</html>"));
        using S3Backend device = OpenBackend(server);

        var small = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(100, new byte[4096]).AsTask());
        var whole = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(Chunk, new byte[Chunk]).AsTask());

        Assert.Equal(BlockErrorKind.Io, small.Kind);
        Assert.Equal(BlockErrorKind.Io, whole.Kind);
        Assert.Contains("404", small.Message);
        Assert.Contains("404", whole.Message);
    }

    [Fact]
    public async Task Backend_over_a_store_answering_NoSuchKey_reads_a_never_listed_chunk_as_zeros()
    {
        // Listing fails (no map), objects are NoSuchKey: the store's own word that they do not exist.
        using var server = new FakeS3Server((_, target) => target.Contains("list-type=2", StringComparison.Ordinal)
            ? new FakeResponse(404, "text/html", "<html>not found</html>")
            : new FakeResponse(404, "application/xml", NoSuchKeyBody));
        using S3Backend device = OpenBackend(server);

        S3MissingObjectTests.AssertZeros(await S3MissingObjectTests.ReadAsync(device, 100, 4096));
        S3MissingObjectTests.AssertZeros(await S3MissingObjectTests.ReadAsync(device, Chunk, Chunk));
        Assert.Contains(server.Requests, r => r.StartsWith("GET /bucket/disk/0000000000000001", StringComparison.Ordinal));
    }
}

/// <summary>
/// The same against the loopback s3rver (GATEWAY_TEST_S3_ENDPOINT): the object is deleted on the
/// server with the SDK, behind the gateway's back.
/// </summary>
public sealed class S3MissingObjectServerTests : IAsyncLifetime
{
    private const int Chunk = 64 * 1024;

    public Task InitializeAsync() => S3TestServer.EnsureBucketAsync();

    public Task DisposeAsync() => Task.CompletedTask;

    private static S3Backend Open(S3BucketLocation location, string prefix) =>
        S3Backend.OpenAsync(new S3ObjectStore(location), prefix, 4 * Chunk, readOnly: false,
            new S3DeviceOptions { ObjectSize = Chunk, CacheBytes = 1024 * 1024 }).GetAwaiter().GetResult();

    [Fact]
    public async Task Flushed_chunk_deleted_on_the_server_behind_the_backend_reads_as_EIO_not_zeros()
    {
        string prefix = S3TestServer.NewPrefix("missing");
        S3BucketLocation location = S3TestServer.Location();
        byte[] data = Pattern(2 * Chunk, seed: 341);
        using (S3Backend writer = Open(location, prefix))
        {
            await writer.WriteAsync(0, data, fua: false);
            await writer.FlushAsync();
        }
        using S3Backend device = Open(location, prefix); // lists both objects
        using (AmazonS3Client client = S3TestServer.Client())
        {
            await client.DeleteObjectAsync(new DeleteObjectRequest { BucketName = S3TestServer.Bucket, Key = $"{prefix}/0000000000000000" });
        }

        var small = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(100, new byte[4096]).AsTask());
        var whole = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[Chunk]).AsTask());

        Assert.Equal(BlockErrorKind.Io, small.Kind);
        Assert.Equal(BlockErrorKind.Io, whole.Kind);
        Assert.Equal(data.AsSpan(Chunk, Chunk).ToArray(), await S3MissingObjectTests.ReadAsync(device, Chunk, Chunk));
    }

    [Fact]
    public async Task Flushed_chunk_of_a_deleted_bucket_reads_as_EIO_not_zeros()
    {
        // A bucket of its own: deleting the shared one would break the other S3 tests.
        string bucket = $"gateway-gone-{Guid.NewGuid():N}"[..40];
        var location = new S3BucketLocation(S3TestServer.Endpoint, bucket, null, S3TestServer.AccessKey, S3TestServer.SecretKey);
        using AmazonS3Client client = S3TestServer.Client();
        await client.PutBucketAsync(new PutBucketRequest { BucketName = bucket });
        using (S3Backend writer = Open(location, "disk"))
        {
            await writer.WriteAsync(0, Pattern(Chunk, seed: 342), fua: false);
            await writer.FlushAsync();
        }
        using S3Backend device = Open(location, "disk");
        await client.DeleteObjectAsync(new DeleteObjectRequest { BucketName = bucket, Key = "disk/0000000000000000" });
        await client.DeleteBucketAsync(new DeleteBucketRequest { BucketName = bucket });

        var small = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(100, new byte[4096]).AsTask());
        var whole = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(0, new byte[Chunk]).AsTask());

        Assert.Equal(BlockErrorKind.Io, small.Kind);
        Assert.Equal(BlockErrorKind.Io, whole.Kind);
        Assert.Contains("NoSuchBucket", small.Message);
    }
}

/// <summary>
/// Holds the first GET of one key twice: before it reads the store (until <see cref="Release"/>) and
/// before it answers (until <see cref="Return"/>), so a test can change the chunk while a read's GET
/// is in flight, on either side of the moment the store is looked at.
/// </summary>
public sealed class GatedObjectStore(MemoryObjectStore inner, string gatedKey) : IObjectStore
{
    public TaskCompletionSource GetArrived { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public TaskCompletionSource Release { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>What the held GET found in the store (-1: no object).</summary>
    public TaskCompletionSource<int> InnerAnswer { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public TaskCompletionSource Return { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public async Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken)
    {
        if (key != gatedKey || !GetArrived.TrySetResult())
        {
            return await inner.GetAsync(key, start, destination, cancellationToken);
        }
        await Release.Task.WaitAsync(cancellationToken);
        int n = await inner.GetAsync(key, start, destination, cancellationToken);
        InnerAnswer.SetResult(n);
        await Return.Task.WaitAsync(cancellationToken);
        return n;
    }

    public Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken) => inner.PutAsync(key, data, length, cancellationToken);

    public Task DeleteAsync(string key, CancellationToken cancellationToken) => inner.DeleteAsync(key, cancellationToken);

    public IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken) => inner.ListAsync(prefix, cancellationToken);

    public void Dispose()
    {
    }
}

public readonly record struct FakeResponse(int Status, string ContentType, string Body);

/// <summary>
/// A loopback HTTP server (HttpListener, on a free port) that answers every request from a function
/// of its method and target: enough to play a store or proxy the SDK cannot parse.
/// </summary>
public sealed class FakeS3Server : IDisposable
{
    private readonly HttpListener _listener = new();
    private readonly Func<string, string, FakeResponse> _respond;

    public FakeS3Server(Func<string, string, FakeResponse> respond)
    {
        _respond = respond;
        int port;
        using (var probe = new TcpListener(IPAddress.Loopback, 0))
        {
            probe.Start();
            port = ((IPEndPoint)probe.LocalEndpoint).Port;
        }
        Endpoint = $"http://127.0.0.1:{port}";
        _listener.Prefixes.Add(Endpoint + "/");
        _listener.Start();
        _ = ServeAsync();
    }

    public string Endpoint { get; }

    /// <summary>"METHOD target" of every request served.</summary>
    public ConcurrentQueue<string> Requests { get; } = new();

    private async Task ServeAsync()
    {
        while (true)
        {
            HttpListenerContext context;
            try
            {
                context = await _listener.GetContextAsync();
            }
            catch (Exception e) when (e is HttpListenerException or ObjectDisposedException or InvalidOperationException)
            {
                return;
            }
            string method = context.Request.HttpMethod;
            string target = context.Request.RawUrl ?? "/";
            Requests.Enqueue($"{method} {target}");
            FakeResponse answer = _respond(method, target);
            byte[] body = Encoding.UTF8.GetBytes(answer.Body);
            HttpListenerResponse response = context.Response;
            response.StatusCode = answer.Status;
            response.ContentType = answer.ContentType;
            response.ContentLength64 = body.Length;
            response.Headers["x-amz-request-id"] = "fake";
            try
            {
                await response.OutputStream.WriteAsync(body);
                response.Close();
            }
            catch (Exception e) when (e is HttpListenerException or IOException or ObjectDisposedException)
            {
            }
        }
    }

    public void Dispose() => _listener.Close();
}
