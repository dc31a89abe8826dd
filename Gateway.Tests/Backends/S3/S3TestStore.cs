using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using Amazon.Runtime;
using Amazon.S3;
using Amazon.S3.Model;
using Gateway.Backends;
using Gateway.Backends.S3;
using Xunit;

namespace Gateway.Tests.Backends.S3;

/// <summary>
/// The loopback S3 server ops/test starts (s3rver). A missing endpoint FAILS the test: S3 coverage
/// that silently skips is no coverage.
/// </summary>
public static class S3TestServer
{
    public const string AccessKey = "S3RVER";
    public const string SecretKey = "S3RVER";
    public const string Bucket = "gateway-test";

    public static string Endpoint =>
        Environment.GetEnvironmentVariable("GATEWAY_TEST_S3_ENDPOINT") is { Length: > 0 } endpoint
            ? endpoint
            : throw new Xunit.Sdk.XunitException("GATEWAY_TEST_S3_ENDPOINT is not set: run the tests through ./ops/test, which starts s3rver");

    public static S3BucketLocation Location(string? endpoint = null) => new(endpoint ?? Endpoint, Bucket, null, AccessKey, SecretKey);

    /// <summary>A prefix no other test uses.</summary>
    public static string NewPrefix(string test) => $"{test}-{Guid.NewGuid():N}";

    /// <summary>Creates the test bucket if it is not there yet.</summary>
    public static async Task EnsureBucketAsync(string? endpoint = null)
    {
        using AmazonS3Client client = Client(endpoint);
        try
        {
            await client.PutBucketAsync(new PutBucketRequest { BucketName = Bucket });
        }
        catch (AmazonS3Exception e) when (e.ErrorCode is "BucketAlreadyOwnedByYou" or "BucketAlreadyExists")
        {
        }
    }

    public static AmazonS3Client Client(string? endpoint = null) => new(new BasicAWSCredentials(AccessKey, SecretKey), new AmazonS3Config
    {
        ServiceURL = endpoint ?? Endpoint,
        ForcePathStyle = true,
        AuthenticationRegion = "us-east-1",
        RequestChecksumCalculation = RequestChecksumCalculation.WHEN_REQUIRED,
        ResponseChecksumValidation = ResponseChecksumValidation.WHEN_REQUIRED,
    });

    /// <summary>The keys under a prefix, as the server lists them.</summary>
    public static async Task<List<string>> KeysAsync(string prefix, string? endpoint = null)
    {
        using var store = new S3ObjectStore(Location(endpoint));
        var keys = new List<string>();
        await foreach (string key in store.ListAsync(prefix + "/", CancellationToken.None))
        {
            keys.Add(key);
        }
        return keys;
    }
}

/// <summary>
/// An object store in memory for deterministic tests: counts calls per key, can be taken down, can
/// delay PUTs, and records whether two uploads of one object were ever in flight at once.
/// </summary>
public sealed class MemoryObjectStore : IObjectStore
{
    /// <summary>
    /// Returns later, on the pool: never on the caller's synchronization context (Task.Yield posts
    /// there, and tests that open a device synchronously hold xunit's few context threads, so an
    /// open waiting on such a post deadlocked once every one of them was blocked).
    /// </summary>
    private static ConfiguredTaskAwaitable Yield() => Task.CompletedTask.ConfigureAwait(ConfigureAwaitOptions.ForceYielding);

    private readonly ConcurrentDictionary<string, byte[]> _objects = new();
    private readonly ConcurrentDictionary<string, int> _putsInFlight = new();

    public ConcurrentDictionary<string, int> Gets { get; } = new();
    public ConcurrentDictionary<string, int> Puts { get; } = new();
    public ConcurrentDictionary<string, int> Deletes { get; } = new();

    /// <summary>While true every call fails like an unreachable server.</summary>
    public volatile bool Down;

    public TimeSpan PutDelay { get; set; }

    public int OverlappingPuts;

    public IReadOnlyDictionary<string, byte[]> Objects => _objects;

    public async Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken)
    {
        await Yield();
        ThrowIfDown();
        Gets.AddOrUpdate(key, 1, (_, n) => n + 1);
        if (!_objects.TryGetValue(key, out byte[]? data))
        {
            return -1;
        }
        int n = (int)Math.Clamp(data.Length - start, 0, destination.Length);
        data.AsSpan((int)Math.Min(start, data.Length), n).CopyTo(destination.Span);
        return n;
    }

    public async Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken)
    {
        ThrowIfDown();
        if (_putsInFlight.AddOrUpdate(key, 1, (_, n) => n + 1) > 1)
        {
            Interlocked.Increment(ref OverlappingPuts);
        }
        try
        {
            byte[] copy = data.AsSpan(0, length).ToArray(); // taken at the start, like a request body
            await Task.Delay(PutDelay, cancellationToken).ConfigureAwait(false);
            ThrowIfDown();
            _objects[key] = copy;
            Puts.AddOrUpdate(key, 1, (_, n) => n + 1);
        }
        finally
        {
            _putsInFlight.AddOrUpdate(key, 0, (_, n) => n - 1);
        }
    }

    public async Task DeleteAsync(string key, CancellationToken cancellationToken)
    {
        await Yield();
        ThrowIfDown();
        Deletes.AddOrUpdate(key, 1, (_, n) => n + 1);
        _objects.TryRemove(key, out _);
    }

    public async IAsyncEnumerable<string> ListAsync(string prefix, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        await Yield();
        ThrowIfDown();
        foreach (string key in _objects.Keys.Where(k => k.StartsWith(prefix, StringComparison.Ordinal)).Order(StringComparer.Ordinal))
        {
            yield return key;
        }
    }

    public void Put(string key, byte[] data) => _objects[key] = data;

    public int GetCount(string key) => Gets.GetValueOrDefault(key);

    public int PutCount(string key) => Puts.GetValueOrDefault(key);

    private void ThrowIfDown()
    {
        if (Down)
        {
            throw new HttpRequestException("Connection refused (127.0.0.1:1)");
        }
    }

    public void Dispose()
    {
    }
}

/// <summary>What the S3 device tests write and read back.</summary>
internal static class S3TestData
{
    /// <summary>Random bytes, the same for the same seed.</summary>
    public static byte[] Pattern(int length, int seed)
    {
        byte[] data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }

    /// <summary>The whole device, read in one request.</summary>
    public static async Task<byte[]> ReadAllAsync(IBlockDevice device)
    {
        byte[] all = new byte[device.Size];
        await device.ReadAsync(0, all);
        return all;
    }

    /// <summary>The whole device's allocation, in one query.</summary>
    public static async Task<Extent[]> AllocationAsync(IBlockDevice device)
    {
        var extents = new Extent[4096];
        int n = await device.GetAllocationAsync(0, device.Size, extents);
        return extents[..n];
    }
}
