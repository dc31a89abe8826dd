using Gateway.Backends.Qcow2;
using Gateway.Backends.S3;

namespace Gateway.Actors.Exports;

/// <summary>
/// Where an <c>s3</c> export's objects live (<c>PREFIX/%016x</c>, nbdkit's S3 layout) and how they are
/// cached. Credentials are optional (the default AWS chain otherwise); <see cref="SecretKey"/> is
/// stored with the export but never shown by the API or logged. <see cref="WriteLog"/> (default off)
/// writes through a log of segment objects (<see cref="S3LogBackend"/>) instead of the chunk cache;
/// <see cref="LogCompactBytes"/> is its compaction threshold (<see cref="S3DeviceOptions.LogCompactBytes"/>),
/// <see cref="ReadCacheBytes"/> and <see cref="ReadAheadBytes"/> its read cache and sequential read-ahead
/// (<see cref="S3DeviceOptions.ReadCacheBytes"/>, <see cref="S3DeviceOptions.ReadAheadBytes"/>; 0 turns either off),
/// <see cref="ReadDiskCachePath"/> and <see cref="ReadDiskCacheBytes"/> the read cache's optional disk tier, a
/// local folder on the gateway's host (<see cref="S3DeviceOptions.ReadDiskCachePath"/>).
/// </summary>
public sealed record S3Spec(
    string? Endpoint,
    string? Bucket,
    string? Prefix,
    string? Region = null,
    int? ObjectSize = null,
    string? AccessKey = null,
    string? SecretKey = null,
    long? CacheBytes = null,
    int? Parallelism = null,
    bool? WriteLog = null,
    long? LogCompactBytes = null,
    long? ReadCacheBytes = null,
    long? ReadAheadBytes = null,
    string? ReadDiskCachePath = null,
    long? ReadDiskCacheBytes = null)
{
    public const int MinObjectSize = 4096;
    public const int MaxObjectSize = 256 << 20;

    public S3BucketLocation ToLocation() => new(Endpoint!, Bucket!, Region, AccessKey, SecretKey);

    public S3DeviceOptions ToDeviceOptions() => new()
    {
        ObjectSize = ObjectSize ?? S3DeviceOptions.DefaultObjectSize,
        CacheBytes = CacheBytes ?? Math.Max(S3DeviceOptions.DefaultCacheBytes, 8L * (ObjectSize ?? S3DeviceOptions.DefaultObjectSize)),
        Parallelism = Parallelism ?? S3DeviceOptions.DefaultParallelism,
        WriteLog = WriteLog ?? false,
        LogCompactBytes = LogCompactBytes ?? new S3DeviceOptions().LogCompactBytes,
        ReadCacheBytes = ReadCacheBytes ?? new S3DeviceOptions().ReadCacheBytes,
        ReadAheadBytes = ReadAheadBytes ?? new S3DeviceOptions().ReadAheadBytes,
        ReadDiskCachePath = ReadDiskCachePath,
        ReadDiskCacheBytes = ReadDiskCacheBytes ?? S3DeviceOptions.DefaultReadDiskCacheBytes,
    };

    /// <summary>The same spec without the secret, for API answers.</summary>
    public S3Spec Redacted() => this with { SecretKey = null };

    // Never print the secret, whatever formats the record.
    public override string ToString() => $"s3 {Endpoint} bucket {Bucket} prefix {Prefix}";
}

public static class S3Rules
{
    /// <summary>The problem with an s3 backend spec, or null.</summary>
    public static string? Validate(ExportSpec spec)
    {
        S3Spec? s3 = spec.Backend.S3;
        if (spec.Backend.Type != BackendSpec.S3Type)
        {
            if (s3 is null)
            {
                return null;
            }
            return spec.Backend.Type == BackendSpec.Overlay && spec.Backend.BaseImage is { } image && S3ImageLocation.IsS3Name(image)
                ? ValidateBaseImage(s3)
                : $"s3 settings are only for backend type 's3' (or an overlay whose baseImage is s3://BUCKET/KEY), not '{spec.Backend.Type}'";
        }
        if (s3 is null)
        {
            return "backend type 's3' needs s3 settings: endpoint, bucket and prefix";
        }
        if (spec.Backend.Path is not null || spec.Backend.Base is not null || spec.Backend.BaseImage is not null)
        {
            return "backend type 's3' takes no path, base or baseImage";
        }
        if (ValidateEndpoint(s3) is string endpointProblem)
        {
            return endpointProblem;
        }
        if (string.IsNullOrWhiteSpace(s3.Bucket) || s3.Bucket.Length is < 3 or > 63 || s3.Bucket.Any(c => !(char.IsAsciiLetterLower(c) || char.IsAsciiDigit(c) || c is '-' or '.')))
        {
            return $"s3 bucket '{s3.Bucket}' is invalid: use 3-63 lower-case letters, digits, '-' or '.'";
        }
        if (string.IsNullOrEmpty(s3.Prefix?.Trim('/')))
        {
            return "s3 prefix is required: objects are named PREFIX/<chunk index in 16 hex digits>";
        }
        if (s3.Prefix.Length > 900)
        {
            return "s3 prefix is over 900 characters";
        }
        if (s3.ObjectSize is int size && (size < S3Spec.MinObjectSize || size > S3Spec.MaxObjectSize || !int.IsPow2(size)))
        {
            return $"s3 objectSize {size} is invalid: it must be a power of two from {S3Spec.MinObjectSize} to {S3Spec.MaxObjectSize} bytes";
        }
        S3DeviceOptions options = s3.ToDeviceOptions();
        if (s3.CacheBytes is long cache && cache < 2L * options.ObjectSize)
        {
            return $"s3 cacheBytes {cache} is invalid: it must hold at least two objects ({2L * options.ObjectSize} bytes)";
        }
        if (s3.Parallelism is int parallelism && parallelism is < 1 or > 256)
        {
            return $"s3 parallelism {parallelism} is invalid: give 1 to 256";
        }
        if (s3.LogCompactBytes is long compact && (compact < 1 || s3.WriteLog != true))
        {
            return $"s3 logCompactBytes {compact} is invalid: it is for writeLog exports and must be at least 1";
        }
        if ((s3.ReadCacheBytes is not null || s3.ReadAheadBytes is not null) && s3.WriteLog != true)
        {
            return "s3 readCacheBytes and readAheadBytes are for writeLog exports (the chunk path caches whole objects in cacheBytes)";
        }
        if (s3.ReadCacheBytes is long readCache && readCache != 0 && readCache < options.ReadCacheBlockBytes)
        {
            return $"s3 readCacheBytes {readCache} is invalid: give 0 (no read cache) or at least one {options.ReadCacheBlockBytes}-byte block";
        }
        if (s3.ReadAheadBytes is long readAhead && (readAhead < 0 || readAhead > options.ReadCacheBytes))
        {
            return $"s3 readAheadBytes {readAhead} is invalid: give 0 (no read-ahead) up to readCacheBytes ({options.ReadCacheBytes}), which it fills";
        }
        if (ValidateDiskCache(s3, options) is string diskProblem)
        {
            return diskProblem;
        }
        if (string.IsNullOrEmpty(s3.AccessKey) != string.IsNullOrEmpty(s3.SecretKey))
        {
            return "s3 accessKey and secretKey go together: give both, or neither to use the default AWS credentials";
        }
        if ((spec.Size + options.ObjectSize - 1) / options.ObjectSize > 1L << 32)
        {
            return $"size {spec.Size} is over 2^32 objects of {options.ObjectSize} bytes: use a larger objectSize";
        }
        return null;
    }

    /// <summary>The disk tier's settings; whether the folder can be used is found at open, on the gateway that opens it.</summary>
    private static string? ValidateDiskCache(S3Spec s3, S3DeviceOptions options)
    {
        if (s3.ReadDiskCacheBytes is not null && s3.ReadDiskCachePath is null)
        {
            return "s3 readDiskCacheBytes needs readDiskCachePath: the folder the disk cache is kept in";
        }
        if (s3.ReadDiskCachePath is not { } path)
        {
            return null;
        }
        if (s3.WriteLog != true)
        {
            return "s3 readDiskCachePath is for writeLog exports (it is the read cache's disk tier)";
        }
        if (options.ReadCacheBytes == 0)
        {
            return "s3 readDiskCachePath needs the read cache: readCacheBytes 0 turns both off";
        }
        if (path.Length == 0 || path.IndexOf('\0') >= 0 || !Path.IsPathFullyQualified(path))
        {
            return $"s3 readDiskCachePath '{path}' is invalid: give an absolute path to a folder on the gateway's host";
        }
        if (s3.ReadDiskCacheBytes is long bytes && bytes < options.ReadCacheBlockBytes)
        {
            return $"s3 readDiskCacheBytes {bytes} is invalid: give at least one {options.ReadCacheBlockBytes}-byte block";
        }
        return null;
    }

    /// <summary>The s3 settings of an overlay whose base image is an S3 object: where the store is and who signs; the bucket and key are the baseImage's.</summary>
    private static string? ValidateBaseImage(S3Spec s3)
    {
        if (s3.Bucket is not null || s3.Prefix is not null || s3.ObjectSize is not null || s3.CacheBytes is not null || s3.Parallelism is not null || s3.WriteLog is not null || s3.LogCompactBytes is not null || s3.ReadCacheBytes is not null || s3.ReadAheadBytes is not null || s3.ReadDiskCachePath is not null || s3.ReadDiskCacheBytes is not null)
        {
            return "an s3:// baseImage takes s3 endpoint, region and credentials only: its bucket and key are in the baseImage";
        }
        if (ValidateEndpoint(s3) is string problem)
        {
            return problem;
        }
        return string.IsNullOrEmpty(s3.AccessKey) != string.IsNullOrEmpty(s3.SecretKey)
            ? "s3 accessKey and secretKey go together: give both, or neither to use the default AWS credentials"
            : null;
    }

    private static string? ValidateEndpoint(S3Spec s3)
    {
        if (string.IsNullOrWhiteSpace(s3.Endpoint))
        {
            return "s3 endpoint is required (e.g. http://127.0.0.1:4568 or https://s3.eu-west-1.amazonaws.com)";
        }
        if (!Uri.TryCreate(s3.Endpoint, UriKind.Absolute, out Uri? endpoint) || endpoint.Scheme is not ("http" or "https"))
        {
            return $"s3 endpoint '{s3.Endpoint}' is invalid: give an http:// or https:// URL";
        }
        return null;
    }
}
