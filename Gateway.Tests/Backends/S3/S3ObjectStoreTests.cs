using Gateway.Backends.S3;
using Xunit;

namespace Gateway.Tests.Backends.S3;

/// <summary>The SDK store against the loopback s3rver: large objects go up in parts and come back whole.</summary>
public sealed class S3ObjectStoreTests : IAsyncLifetime
{
    public Task InitializeAsync() => S3TestServer.EnsureBucketAsync();

    public Task DisposeAsync() => Task.CompletedTask;

    [Theory]
    [InlineData(S3ObjectStore.MultipartThreshold - 1, false)]
    [InlineData(S3ObjectStore.MultipartThreshold, true)]
    [InlineData(5 * S3ObjectStore.PartSize + 12345, true)]
    public async Task An_object_is_stored_whole_in_one_put_below_the_threshold_and_in_parts_from_it(int length, bool parts)
    {
        string key = S3TestServer.NewPrefix("multipart") + "/object";
        byte[] data = new byte[length + 100]; // longer than the object: only the first length bytes are stored
        new Random(length).NextBytes(data);
        using var store = new S3ObjectStore(S3TestServer.Location());

        await store.PutAsync(key, data, length, CancellationToken.None);

        Assert.Equal(length, await store.GetLengthAsync(key, CancellationToken.None));
        byte[] back = new byte[length];
        Assert.Equal(length, await store.GetAsync(key, 0, back, CancellationToken.None));
        Assert.True(data.AsSpan(0, length).SequenceEqual(back), "the object read back differs from what was stored");
        Assert.Equal(parts ? 1 : 0, store.MultipartUploads);
        await store.DeleteAsync(key, CancellationToken.None);
    }
}
