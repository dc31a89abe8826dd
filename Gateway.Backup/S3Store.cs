using System.Net;
using System.Runtime.CompilerServices;
using Amazon.S3;
using Amazon.S3.Model;
using Gateway.Backends.S3;

namespace Gateway.Backup;

/// <summary>
/// A backup store in an S3 bucket under a prefix: a key <c>K</c> is the object <c>PREFIX/K</c>.
/// A put is one PUT (an object appears whole or not at all) with <c>If-None-Match: *</c>, so a
/// store that supports conditional writes keeps the first object under a key; one that ignores
/// the header overwrites with the same bytes, which is harmless here: chunk keys are content
/// hashes and manifest keys unique ids. The client is the S3 backend's (path-style, bounded retries).
/// </summary>
public sealed class S3Store : IBackupStore, IDisposable
{
    private readonly AmazonS3Client _client;
    private readonly string _bucket;
    private readonly string _prefix;

    public S3Store(S3BucketLocation location, string prefix)
    {
        _client = S3ObjectStore.NewClient(location);
        _bucket = location.Bucket;
        _prefix = prefix.Trim('/') is { Length: > 0 } p ? p + "/" : "";
    }

    /// <summary><c>s3://BUCKET[/PREFIX]</c> as bucket and prefix; null when <paramref name="repo"/> is not an s3:// address.</summary>
    /// <exception cref="ArgumentException">An s3:// address without a bucket.</exception>
    public static (string Bucket, string Prefix)? ParseAddress(string repo)
    {
        const string Scheme = "s3://";
        if (!repo.StartsWith(Scheme, StringComparison.OrdinalIgnoreCase))
        {
            return null;
        }
        string rest = repo[Scheme.Length..];
        int slash = rest.IndexOf('/', StringComparison.Ordinal);
        string bucket = slash < 0 ? rest : rest[..slash], prefix = slash < 0 ? "" : rest[(slash + 1)..].Trim('/');
        if (bucket.Length == 0)
        {
            throw new ArgumentException($"--repo '{repo}' names no bucket: use s3://BUCKET/PREFIX");
        }
        return (bucket, prefix);
    }

    public async Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        using var body = new MemoryStream(data.ToArray(), writable: false);
        var request = new PutObjectRequest
        {
            BucketName = _bucket,
            Key = _prefix + key,
            InputStream = body,
            IfNoneMatch = "*",
            // No aws-chunked framing: s3rver (and some other stores) would keep it inside the object.
            UseChunkEncoding = false,
        };
        try
        {
            await Call(() => _client.PutObjectAsync(request, cancellationToken), key).ConfigureAwait(false);
            return true;
        }
        catch (IOException e) when (e.InnerException is AmazonS3Exception { StatusCode: HttpStatusCode.PreconditionFailed or HttpStatusCode.Conflict })
        {
            return false;
        }
    }

    public async Task<byte[]?> GetAsync(string key, CancellationToken cancellationToken)
    {
        try
        {
            using GetObjectResponse response = await Call(() => _client.GetObjectAsync(_bucket, _prefix + key, cancellationToken), key).ConfigureAwait(false);
            using var copy = new MemoryStream(response.ContentLength > 0 ? (int)Math.Min(response.ContentLength, int.MaxValue) : 0);
            await response.ResponseStream.CopyToAsync(copy, cancellationToken).ConfigureAwait(false);
            return copy.ToArray();
        }
        catch (IOException e) when (e.InnerException is AmazonS3Exception { StatusCode: HttpStatusCode.NotFound, ErrorCode: "NoSuchKey" })
        {
            return null;
        }
        catch (ArgumentException e)
        {
            // The SDK could not take the answer apart (s3rver, killed mid-PUT, leaves an object
            // without its metadata, and answers it with an empty ETag): the object is damaged.
            throw new BackupCorruptException($"S3 bucket '{_bucket}', {_prefix}{key}: the store's answer for it is malformed ({e.Message})");
        }
    }

    public async Task<long?> LengthAsync(string key, CancellationToken cancellationToken)
    {
        try
        {
            GetObjectMetadataResponse head = await Call(() => _client.GetObjectMetadataAsync(_bucket, _prefix + key, cancellationToken), key).ConfigureAwait(false);
            return head.ContentLength;
        }
        catch (IOException e) when (e.InnerException is AmazonS3Exception { StatusCode: HttpStatusCode.NotFound } s3 && s3.ErrorCode is "NoSuchKey" or "NotFound" or null or "")
        {
            // HEAD has no body, so a 404 carries no error code: with the bucket there (checked on open), the key is absent.
            return null;
        }
    }

    public async IAsyncEnumerable<string> ListAsync(string prefix, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        string folder = prefix.TrimEnd('/') + "/";
        string? token = null;
        do
        {
            var request = new ListObjectsV2Request { BucketName = _bucket, Prefix = _prefix + folder, Delimiter = "/", ContinuationToken = token };
            ListObjectsV2Response response = await Call(() => _client.ListObjectsV2Async(request, cancellationToken), prefix).ConfigureAwait(false);
            foreach (S3Object item in response.S3Objects ?? [])
            {
                yield return item.Key[_prefix.Length..];
            }
            token = response.IsTruncated == true ? response.NextContinuationToken : null;
        }
        while (token is not null);
    }

    /// <summary>A plain PUT (lease markers): S3 replaces the object whole.</summary>
    public async Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        using var body = new MemoryStream(data.ToArray(), writable: false);
        var request = new PutObjectRequest { BucketName = _bucket, Key = _prefix + key, InputStream = body, UseChunkEncoding = false };
        await Call(() => _client.PutObjectAsync(request, cancellationToken), key).ConfigureAwait(false);
    }

    /// <summary>S3's DELETE succeeds whether or not the object was there, so this says true.</summary>
    public async Task<bool> DeleteAsync(string key, CancellationToken cancellationToken)
    {
        await Call(() => _client.DeleteObjectAsync(_bucket, _prefix + key, cancellationToken), key).ConfigureAwait(false);
        return true;
    }

    public async IAsyncEnumerable<StoredObject> ListObjectsAsync(string prefix, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        string? token = null;
        do
        {
            var request = new ListObjectsV2Request { BucketName = _bucket, Prefix = _prefix + prefix, ContinuationToken = token };
            ListObjectsV2Response response = await Call(() => _client.ListObjectsV2Async(request, cancellationToken), prefix).ConfigureAwait(false);
            foreach (S3Object item in response.S3Objects ?? [])
            {
                DateTime modified = item.LastModified ?? DateTime.UnixEpoch;
                yield return new StoredObject(item.Key[_prefix.Length..], item.Size ?? 0,
                    new DateTimeOffset(modified.Kind == DateTimeKind.Unspecified ? DateTime.SpecifyKind(modified, DateTimeKind.Utc) : modified.ToUniversalTime(), TimeSpan.Zero));
            }
            token = response.IsTruncated == true ? response.NextContinuationToken : null;
        }
        while (token is not null);
    }

    /// <summary>None: every object is one PUT, never a multipart upload, so an interrupted write leaves nothing.</summary>
    public async IAsyncEnumerable<StoredObject> ListIncompleteAsync([EnumeratorCancellation] CancellationToken cancellationToken)
    {
        await Task.CompletedTask.ConfigureAwait(false);
        yield break;
    }

    public Task DeleteIncompleteAsync(string key, CancellationToken cancellationToken) =>
        throw new ArgumentException($"'{key}' is not a leftover of an interrupted write (this store leaves none)", nameof(key));

    /// <summary>Fails fast with a clear error when the bucket is missing or unreachable.</summary>
    public async Task CheckBucketAsync(CancellationToken cancellationToken) =>
        await Call(() => _client.ListObjectsV2Async(new ListObjectsV2Request { BucketName = _bucket, MaxKeys = 1 }, cancellationToken), "the bucket").ConfigureAwait(false);

    public void Dispose() => _client.Dispose();

    /// <summary>Every S3 failure as an IOException naming the object (the CLI prints it; a rerun resumes).</summary>
    private async Task<T> Call<T>(Func<Task<T>> call, string key)
    {
        try
        {
            return await call().ConfigureAwait(false);
        }
        catch (AmazonS3Exception e)
        {
            string code = string.IsNullOrEmpty(e.ErrorCode) ? ((int)e.StatusCode).ToString(System.Globalization.CultureInfo.InvariantCulture) : e.ErrorCode;
            throw new IOException($"S3 bucket '{_bucket}', {_prefix}{key}: {code}: {e.Message}", e);
        }
        catch (Amazon.Runtime.AmazonServiceException e)
        {
            throw new IOException($"S3 bucket '{_bucket}', {_prefix}{key}: {e.Message}", e);
        }
        catch (HttpRequestException e)
        {
            throw new IOException($"S3 at bucket '{_bucket}' unreachable: {e.Message}", e);
        }
    }
}
