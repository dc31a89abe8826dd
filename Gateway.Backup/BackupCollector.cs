using System.Diagnostics;
using System.Text.Json.Serialization;

namespace Gateway.Backup;

/// <summary>What <c>gateway backup gc</c> did (its <c>--json</c> summary).</summary>
public sealed record CollectSummary(
    [property: JsonPropertyName("manifests")] int Manifests,
    [property: JsonPropertyName("chunksTotal")] long ChunksTotal,
    [property: JsonPropertyName("chunksReferenced")] long ChunksReferenced,
    [property: JsonPropertyName("chunksDeleted")] long ChunksDeleted,
    [property: JsonPropertyName("bytesDeleted")] long BytesDeleted,
    [property: JsonPropertyName("expiredLeasesRemoved")] int ExpiredLeasesRemoved,
    [property: JsonPropertyName("seconds")] double Seconds);

/// <summary>
/// Garbage collection: deletes the chunks no manifest names, under a lease (the protocol is on
/// <see cref="BackupLease"/>): it gives up with <see cref="BackupBusyException"/> while a backup
/// runs, and reads every manifest before it deletes anything, stopping if one cannot be read
/// (its chunks are unknown, so none is safe to delete). Expired lease markers (killed
/// processes) are removed on the way.
/// </summary>
public sealed class BackupCollector(BackupRepository repository)
{
    /// <exception cref="BackupBusyException">A backup holds a live lease.</exception>
    /// <exception cref="BackupFormatException">A manifest does not parse or breaks the rules; nothing was deleted.</exception>
    /// <exception cref="BackupLeaseLostException">The collection's own lease may have lapsed (refreshes failed); it stopped.</exception>
    public async Task<CollectSummary> CollectAsync(CancellationToken cancellationToken)
    {
        try
        {
            return await CollectUnderLeaseAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new BackupLeaseLostException("garbage collection stopped: its lease could not be refreshed for half its TTL, so a backup may have started");
        }
    }

    private async Task<CollectSummary> CollectUnderLeaseAsync(CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        await using BackupLease lease = await BackupLease.AcquireCollectionAsync(repository, cancellationToken).ConfigureAwait(false);
        CancellationToken ct = lease.Token;

        int expired = 0;
        DateTimeOffset now = repository.Leases.Time.GetUtcNow();
        foreach ((string key, LeaseMarker marker) in await BackupLease.ListMarkersAsync(repository.Store, repository.Leases, ct).ConfigureAwait(false))
        {
            if (key != lease.Key && !marker.IsLive(now, repository.Leases.ClockSkew) && await repository.Store.DeleteAsync(key, ct).ConfigureAwait(false))
            {
                expired++;
            }
        }

        // Every manifest, read after the marker check: any backup that finished before this
        // collection began wrote its manifest before it released its marker.
        var referenced = new HashSet<string>(StringComparer.Ordinal);
        List<string> ids = await repository.ListIdsAsync(ct).ConfigureAwait(false);
        foreach (string id in ids)
        {
            Manifest manifest;
            try
            {
                manifest = await repository.GetManifestAsync(id, ct).ConfigureAwait(false);
            }
            catch (BackupFormatException e)
            {
                throw new BackupFormatException($"garbage collection stops before deleting anything, as it cannot tell which chunks a manifest names: {e.Message}");
            }
            foreach (ChunkEntry entry in manifest.Chunks)
            {
                if (entry is { Kind: ChunkKind.Data, Sha256: { } sha256 })
                {
                    referenced.Add(sha256);
                }
            }
        }

        var unreferenced = new List<StoredObject>();
        long total = 0;
        await foreach (StoredObject stored in repository.Store.ListObjectsAsync(BackupRepository.ChunksPrefix, ct).ConfigureAwait(false))
        {
            // Objects under chunks/ that are not chunks are check's business, never deleted here.
            if (BackupRepository.ChunkHashOf(stored.Key) is { } sha256)
            {
                total++;
                if (!referenced.Contains(sha256))
                {
                    unreferenced.Add(stored);
                }
            }
        }

        // Backups that began since the first look have seen this marker and wait for the deletes.
        // Give way to them instead while nothing is deleted yet; this second look also guards
        // against a store whose listings lag a little behind its writes (a folder on NFS).
        await lease.ThrowIfBackupsRunAsync().ConfigureAwait(false);
        long deleted = 0, bytes = 0;
        foreach (StoredObject chunk in unreferenced)
        {
            ct.ThrowIfCancellationRequested();
            if (await repository.Store.DeleteAsync(chunk.Key, ct).ConfigureAwait(false))
            {
                deleted++;
                bytes += chunk.Size;
            }
        }
        return new CollectSummary(ids.Count, total, total - unreferenced.Count, deleted, bytes, expired, Math.Round(clock.Elapsed.TotalSeconds, 3));
    }
}
