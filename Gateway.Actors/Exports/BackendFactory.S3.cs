using Gateway.Backends;
using Gateway.Backends.S3;

namespace Gateway.Actors.Exports;

/// <summary>S3 exports: the objects live in the bucket; nothing of them is kept in the data folder.</summary>
public sealed partial class BackendFactory
{
    /// <summary>How long a create waits for the bucket to answer. Settable so tests need not wait a minute.</summary>
    internal TimeSpan S3CreateTimeout { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// How long an open waits for the bucket's listing: short, since a store that is down must not
    /// keep the export from opening (it lists again later). Settable so tests need not wait.
    /// </summary>
    internal TimeSpan S3ListTimeout { get; set; } = TimeSpan.FromSeconds(5);

    // Until checkpoints of the index, replay reads every segment above the fold marker (up to LogCompactBytes of them).
    private static readonly TimeSpan S3ReplayTimeout = TimeSpan.FromMinutes(5);

    public static bool IsS3(ExportSpec spec) => spec.Backend.Type == BackendSpec.S3Type;

    /// <summary>
    /// Checks that the bucket answers before the export is recorded, so a wrong endpoint, bucket or
    /// key fails the create instead of every later request. Existing objects under the prefix are
    /// adopted: that is how a disk written by nbdkit's S3 plugin (or another gateway) is served.
    /// </summary>
    private async Task CreateS3Async(ExportSpec spec, CancellationToken cancellationToken)
    {
        S3Spec s3 = spec.Backend.S3 ?? throw new InvalidOperationException($"s3 export '{spec.Name}' has no s3 settings");
        using var store = new S3ObjectStore(s3.ToLocation());
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(S3CreateTimeout);
        try
        {
            await store.CheckBucketAsync(timeout.Token).ConfigureAwait(false);
        }
        // A store that does not answer in time is as unusable as one that refuses; only the
        // caller's own cancellation stays a cancellation.
        catch (Exception e) when (e is not OperationCanceledException || (timeout.IsCancellationRequested && !cancellationToken.IsCancellationRequested))
        {
            throw new InvalidOperationException($"s3 bucket '{s3.Bucket}' at {s3.Endpoint} is not usable: {e.Message}", e);
        }
    }

    private async Task<IBlockDevice> OpenS3Async(ExportSpec spec, CancellationToken cancellationToken)
    {
        S3Spec s3 = spec.Backend.S3 ?? throw new InvalidOperationException($"s3 export '{spec.Name}' has no s3 settings");
        S3DeviceOptions options = s3.ToDeviceOptions();
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (options.WriteLog)
        {
            // The log must be replayed before the first request (a disk without it is stale): the
            // open reads every segment since the base, which takes longer than a listing.
            timeout.CancelAfter(S3ReplayTimeout);
            return await S3LogBackend.OpenAsync(new S3ObjectStore(s3.ToLocation()), s3.Prefix!, spec.Size, spec.ReadOnly, options, ownsStore: true, timeout.Token)
                .ConfigureAwait(false);
        }
        timeout.CancelAfter(S3ListTimeout);
        return await S3Backend.OpenAsync(new S3ObjectStore(s3.ToLocation()), s3.Prefix!, spec.Size, spec.ReadOnly, options, ownsStore: true, timeout.Token)
            .ConfigureAwait(false);
    }
}
