using System.Net;
using System.Runtime.CompilerServices;
using Amazon.Runtime;
using Amazon.S3;
using Amazon.S3.Model;

namespace Gateway.Backends.S3;

/// <summary>Where a bucket is and how to sign requests to it. Credentials are never logged or shown.</summary>
public sealed record S3BucketLocation(string Endpoint, string Bucket, string? Region = null, string? AccessKey = null, string? SecretKey = null)
{
    // Keep the secret out of logs and exception messages that format the record.
    public override string ToString() => $"s3 {Endpoint} bucket {Bucket}";
}

/// <summary>
/// <see cref="IObjectStore"/> over AWSSDK.S3, set up for S3-compatible stores as measured in docs/s3.md
/// (#s3rver-the-loopback-server-of-the-tests, #the-sdk-with-s3-compatible-stores):
/// path-style addressing, a custom endpoint, no aws-chunked uploads (s3rver stores the framing inside
/// the object), explicit byte ranges only, and the SDK's own bounded retries.
/// </summary>
public sealed class S3ObjectStore : IObjectStore
{
    private readonly AmazonS3Client _client;
    private readonly string _bucket;

    public S3ObjectStore(S3BucketLocation location)
    {
        _bucket = location.Bucket;
        _client = NewClient(location);
    }

    /// <summary>A client with the settings above (also for other stores in the bucket, such as backup repositories).</summary>
    public static AmazonS3Client NewClient(S3BucketLocation location)
    {
        var config = new AmazonS3Config
        {
            ServiceURL = location.Endpoint,
            ForcePathStyle = true,
            AuthenticationRegion = location.Region ?? "us-east-1",
            RequestChecksumCalculation = RequestChecksumCalculation.WHEN_REQUIRED,
            ResponseChecksumValidation = ResponseChecksumValidation.WHEN_REQUIRED,
            // Bounded: a dead store must turn into EIO in seconds, not hang the client.
            MaxErrorRetry = 3,
            Timeout = TimeSpan.FromSeconds(30),
        };
        return location.AccessKey is { Length: > 0 } accessKey
            ? new AmazonS3Client(new BasicAWSCredentials(accessKey, location.SecretKey ?? ""), config)
            : new AmazonS3Client(config); // the default AWS chain: environment, profile, instance role
    }

    public async Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken)
    {
        if (destination.IsEmpty)
        {
            return 0;
        }
        // Explicit start-end ranges only: s3rver answers suffix ranges with the wrong bytes.
        var request = new GetObjectRequest { BucketName = _bucket, Key = key, ByteRange = new ByteRange(start, start + destination.Length - 1) };
        try
        {
            using GetObjectResponse response = await _client.GetObjectAsync(request, cancellationToken).ConfigureAwait(false);
            int total = 0;
            while (total < destination.Length)
            {
                int n = await response.ResponseStream.ReadAsync(destination[total..], cancellationToken).ConfigureAwait(false);
                if (n == 0)
                {
                    break;
                }
                total += n;
            }
            return total;
        }
        catch (AmazonS3Exception e) when (e.StatusCode == HttpStatusCode.NotFound && e.ErrorCode == "NoSuchKey")
        {
            return -1; // the store's own word that the key does not exist
        }
        catch (AmazonS3Exception e) when (e.StatusCode == HttpStatusCode.NotFound)
        {
            // NoSuchBucket, or a 404 from a proxy or store whose body the SDK could not parse: the
            // object may well exist, and reading it as a hole would turn stored data into zeros.
            string code = string.IsNullOrEmpty(e.ErrorCode) ? "none" : e.ErrorCode;
            throw new IOException($"S3 answered {(int)e.StatusCode} with error code '{code}' for {key}: the object's absence is not proven", e);
        }
        catch (AmazonS3Exception e) when (e.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
        {
            return 0; // the object ends before the range starts
        }
    }

    public async Task<long> GetLengthAsync(string key, CancellationToken cancellationToken)
    {
        try
        {
            GetObjectMetadataResponse head = await _client.GetObjectMetadataAsync(_bucket, key, cancellationToken).ConfigureAwait(false);
            return head.ContentLength;
        }
        catch (AmazonS3Exception e) when (e.StatusCode == HttpStatusCode.NotFound)
        {
            // A HEAD answer has no body, so NoSuchKey and NoSuchBucket look alike: both are "not there" to whoever opens the object.
            throw new FileNotFoundException($"S3 has no object '{key}' in bucket '{_bucket}' (404)", key, e);
        }
    }

    /// <summary>
    /// Objects from this size on are uploaded in parts (<see cref="PartSize"/>, S3's minimum is 5 MiB),
    /// <see cref="PartParallelism"/> at a time: each request stays small enough for the client's
    /// 30 s timeout and its retries resend one part, not a whole 256 MiB chunk. Below it one PUT is
    /// one request, which is cheaper than the three a multipart upload needs at least.
    /// </summary>
    public const int MultipartThreshold = 16 << 20;

    public const int PartSize = 8 << 20;

    public const int PartParallelism = 4;

    private long _multipartUploads;

    /// <summary>Multipart uploads this store completed (a store shows no trace of them once complete).</summary>
    public long MultipartUploads => Interlocked.Read(ref _multipartUploads);

    public async Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken)
    {
        if (length >= MultipartThreshold)
        {
            await PutInPartsAsync(key, data, length, cancellationToken).ConfigureAwait(false);
            return;
        }
        using var body = new MemoryStream(data, 0, length, writable: false);
        var request = new PutObjectRequest
        {
            BucketName = _bucket,
            Key = key,
            InputStream = body,
            AutoCloseStream = false,
            UseChunkEncoding = false,
        };
        await _client.PutObjectAsync(request, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// A multipart upload: the object appears whole at the completion, or not at all (a failed upload
    /// is aborted, so its parts are not left to be billed).
    /// </summary>
    private async Task PutInPartsAsync(string key, byte[] data, int length, CancellationToken cancellationToken)
    {
        InitiateMultipartUploadResponse upload = await _client.InitiateMultipartUploadAsync(
            new InitiateMultipartUploadRequest { BucketName = _bucket, Key = key }, cancellationToken).ConfigureAwait(false);
        try
        {
            var tags = new PartETag[(length + PartSize - 1) / PartSize];
            await Parallel.ForEachAsync(Enumerable.Range(0, tags.Length),
                new ParallelOptions { MaxDegreeOfParallelism = PartParallelism, CancellationToken = cancellationToken },
                async (part, token) =>
                {
                    int offset = part * PartSize;
                    int size = Math.Min(PartSize, length - offset);
                    using var body = new MemoryStream(data, offset, size, writable: false);
                    UploadPartResponse response = await _client.UploadPartAsync(new UploadPartRequest
                    {
                        BucketName = _bucket,
                        Key = key,
                        UploadId = upload.UploadId,
                        PartNumber = part + 1,
                        InputStream = body,
                        PartSize = size,
                        UseChunkEncoding = false,
                    }, token).ConfigureAwait(false);
                    tags[part] = new PartETag(part + 1, response.ETag);
                }).ConfigureAwait(false);
            await _client.CompleteMultipartUploadAsync(new CompleteMultipartUploadRequest
            {
                BucketName = _bucket,
                Key = key,
                UploadId = upload.UploadId,
                PartETags = [.. tags],
            }, cancellationToken).ConfigureAwait(false);
            Interlocked.Increment(ref _multipartUploads);
        }
        catch
        {
            try
            {
                await _client.AbortMultipartUploadAsync(new AbortMultipartUploadRequest { BucketName = _bucket, Key = key, UploadId = upload.UploadId },
                    CancellationToken.None).ConfigureAwait(false);
            }
            catch (Exception e) when (e is AmazonServiceException or IOException or HttpRequestException or TaskCanceledException)
            {
                // The upload's own failure is the one to report; a store's lifecycle rule clears what is left.
            }
            throw;
        }
    }

    public async Task DeleteAsync(string key, CancellationToken cancellationToken) =>
        await _client.DeleteObjectAsync(new DeleteObjectRequest { BucketName = _bucket, Key = key }, cancellationToken).ConfigureAwait(false);

    public async IAsyncEnumerable<string> ListAsync(string prefix, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        string? token = null;
        do
        {
            var request = new ListObjectsV2Request { BucketName = _bucket, Prefix = prefix, ContinuationToken = token };
            ListObjectsV2Response response = await _client.ListObjectsV2Async(request, cancellationToken).ConfigureAwait(false);
            // SDK v4 answers null, not empty, for an empty page.
            foreach (S3Object o in response.S3Objects ?? [])
            {
                yield return o.Key;
            }
            token = response.IsTruncated == true ? response.NextContinuationToken : null;
        }
        while (token is not null);
    }

    /// <summary>Fails unless the bucket exists and answers (export creation checks the location first).</summary>
    public async Task CheckBucketAsync(CancellationToken cancellationToken) =>
        await _client.ListObjectsV2Async(new ListObjectsV2Request { BucketName = _bucket, MaxKeys = 1 }, cancellationToken).ConfigureAwait(false);

    public void Dispose() => _client.Dispose();
}
