using System.CommandLine;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Actors.Exports;

namespace Gateway.Host;

/// <summary><c>gateway export add NAME --size 10G --s3-endpoint URL --s3-bucket B --s3-prefix P ...</c>.</summary>
public sealed partial class ExportCli
{
    public async Task<int> AddS3Async(string name, string size, bool readOnly, string? description, S3Spec s3, CancellationToken ct)
    {
        if (!Sizes.TryParse(size, out long bytes))
        {
            await Stderr.WriteLineAsync($"error: size '{size}' is invalid: give bytes, or a number with K, M, G or T");
            return 2;
        }
        var body = new CreateExportRequest(name, JsonSerializer.SerializeToElement(bytes), new BackendDto("s3", null, S3: s3), readOnly, description);
        using var content = JsonContent.Create(body, AdminJson.Default.CreateExportRequest);
        using HttpResponseMessage response = await SendAsync(HttpMethod.Post, "v1/exports", content, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }
}

/// <summary>The S3 options of <c>export add</c>; any of them makes the export an s3 one.</summary>
public static class S3Cli
{
    private static readonly Option<string?> EndpointOption = new("--s3-endpoint") { Description = "S3 endpoint URL (e.g. http://127.0.0.1:4568); makes an s3 export" };
    private static readonly Option<string?> BucketOption = new("--s3-bucket") { Description = "S3 bucket (must exist)" };
    private static readonly Option<string?> PrefixOption = new("--s3-prefix") { Description = "Object prefix: objects are PREFIX/<chunk index in 16 hex digits> (nbdkit S3 layout)" };
    private static readonly Option<string?> RegionOption = new("--s3-region") { Description = "Signing region (default us-east-1)" };
    private static readonly Option<string?> ObjectSizeOption = new("--s3-object-size") { Description = "Object size, a power of two (default 4M; 64K to share a disk with Debian's nbdkit S3 plugin)" };
    private static readonly Option<string?> CacheOption = new("--s3-cache") { Description = "Write-back cache memory for this export (default 256M)" };
    private static readonly Option<int?> ParallelismOption = new("--s3-parallelism") { Description = "Most S3 requests in flight for this export (default 16)" };
    private static readonly Option<bool> WriteLogOption = new("--s3-write-log") { Description = "Write through a log of segment objects (small random writes at local speed; compacted into the chunk objects in the background)" };
    private static readonly Option<string?> ReadCacheOption = new("--s3-read-cache") { Description = "With --s3-write-log: read cache memory for blocks of segment and chunk objects (default 256M, 0 turns it off)" };
    private static readonly Option<string?> ReadAheadOption = new("--s3-read-ahead") { Description = "With --s3-write-log: how far a sequential reader is fetched ahead into the read cache (default 8M, 0 turns it off)" };
    private static readonly Option<string?> DiskCacheOption = new("--s3-disk-cache") { Description = "With --s3-write-log: a local folder (its own, on the gateway's host) for the read cache's disk tier; emptied when the export opens" };
    private static readonly Option<string?> DiskCacheSizeOption = new("--s3-disk-cache-size") { Description = "With --s3-disk-cache: most bytes the disk tier keeps (default 1G)" };
    private static readonly Option<string?> AccessKeyOption = new("--s3-access-key") { Description = "Access key (default: the usual AWS credential sources)" };
    private static readonly Option<string?> SecretKeyOption = new("--s3-secret-key") { Description = "Secret key; prefer AWS_SECRET_ACCESS_KEY or a profile (it is stored with the export)" };

    public static void AddOptions(Command add)
    {
        foreach (Option option in new Option[] { EndpointOption, BucketOption, PrefixOption, RegionOption, ObjectSizeOption, CacheOption, ParallelismOption, WriteLogOption, ReadCacheOption, ReadAheadOption, DiskCacheOption, DiskCacheSizeOption, AccessKeyOption, SecretKeyOption })
        {
            add.Options.Add(option);
        }
    }

    public static bool IsS3(ParseResult parse) =>
        parse.GetValue(EndpointOption) is not null || parse.GetValue(BucketOption) is not null || parse.GetValue(PrefixOption) is not null;

    /// <summary>The settings from the command line; sizes take K, M, G suffixes.</summary>
    public static S3Spec Spec(ParseResult parse) => new(
        parse.GetValue(EndpointOption),
        parse.GetValue(BucketOption),
        parse.GetValue(PrefixOption),
        parse.GetValue(RegionOption),
        parse.GetValue(ObjectSizeOption) is { } objectSize ? (int)Math.Min(int.MaxValue, ParseSize(objectSize, "--s3-object-size")) : null,
        parse.GetValue(AccessKeyOption),
        parse.GetValue(SecretKeyOption),
        parse.GetValue(CacheOption) is { } cache ? ParseSize(cache, "--s3-cache") : null,
        parse.GetValue(ParallelismOption),
        parse.GetValue(WriteLogOption) ? true : null,
        ReadCacheBytes: parse.GetValue(ReadCacheOption) is { } readCache ? ParseSize(readCache, "--s3-read-cache") : null,
        ReadAheadBytes: parse.GetValue(ReadAheadOption) is { } readAhead ? ParseSize(readAhead, "--s3-read-ahead") : null,
        // Relative to where the command runs, as a user means it; the gateway may run elsewhere.
        ReadDiskCachePath: parse.GetValue(DiskCacheOption) is { } folder ? Path.GetFullPath(folder) : null,
        ReadDiskCacheBytes: parse.GetValue(DiskCacheSizeOption) is { } diskSize ? ParseSize(diskSize, "--s3-disk-cache-size") : null);

    private static long ParseSize(string text, string option) =>
        Sizes.TryParse(text, out long bytes) ? bytes : throw new CliException($"{option} '{text}' is invalid: give bytes, or a number with K, M or G");
}
