using Gateway.Backends.S3;
using Gateway.Backup;

namespace Gateway.Host;

public sealed partial class BackupCli
{
    /// <summary>
    /// The repository <c>--repo</c> names: a folder, or <c>s3://BUCKET/PREFIX</c>. S3 is reached with
    /// the S3 backend's client settings; where it is and who signs come from the standard AWS
    /// environment, as for the AWS CLI: <c>AWS_ENDPOINT_URL_S3</c> or <c>AWS_ENDPOINT_URL</c> (an
    /// S3-compatible store; default AWS in <c>AWS_REGION</c>), <c>AWS_REGION</c> or
    /// <c>AWS_DEFAULT_REGION</c>, and credentials from <c>AWS_ACCESS_KEY_ID</c> /
    /// <c>AWS_SECRET_ACCESS_KEY</c>, a profile or an instance role; never from the command line.
    /// </summary>
    private static async Task<BackupRepository> OpenRepositoryAsync(string repo, bool create, CancellationToken ct)
    {
        (string Bucket, string Prefix)? s3;
        try
        {
            s3 = S3Store.ParseAddress(repo);
        }
        catch (ArgumentException bad)
        {
            throw new BackupFormatException(bad.Message);
        }
        if (s3 is not { } address)
        {
            return await BackupRepository.OpenFolderAsync(repo, create, ct);
        }
        string? region = Environment.GetEnvironmentVariable("AWS_REGION") is { Length: > 0 } r ? r
            : Environment.GetEnvironmentVariable("AWS_DEFAULT_REGION") is { Length: > 0 } d ? d : null;
        string endpoint = Environment.GetEnvironmentVariable("AWS_ENDPOINT_URL_S3") is { Length: > 0 } e3 ? e3
            : Environment.GetEnvironmentVariable("AWS_ENDPOINT_URL") is { Length: > 0 } e ? e
            : $"https://s3.{region ?? "us-east-1"}.amazonaws.com";
        var store = new S3Store(new S3BucketLocation(endpoint, address.Bucket, region), address.Prefix);
        await store.CheckBucketAsync(ct);
        return create
            ? await BackupRepository.OpenOrCreateAsync(store, RepositoryInfo.DefaultChunkSize, ct)
            : await BackupRepository.OpenAsync(store, ct);
    }

    /// <summary>
    /// The store under the repository <c>--repo</c> names, not yet opened as a repository, so that
    /// check can report a broken repository.json of a folder. An S3 repository is opened whole
    /// (a broken repository.json is then an error, exit 1, all the same).
    /// </summary>
    private static async Task<IBackupStore> OpenStoreAsync(string repo, CancellationToken ct)
    {
        if (!repo.StartsWith("s3://", StringComparison.OrdinalIgnoreCase))
        {
            return Directory.Exists(repo) ? new FolderStore(repo) : throw new BackupFormatException($"repository {repo} does not exist");
        }
        return (await OpenRepositoryAsync(repo, create: false, ct)).Store;
    }
}
