namespace Gateway.Backup;

/// <summary>An object in a store, as a listing reports it.</summary>
/// <param name="Key">The object's key (with <c>/</c> between its parts).</param>
/// <param name="Size">Its length in bytes.</param>
/// <param name="LastModified">When it was last written, by the store's clock (S3: LastModified).</param>
public sealed record StoredObject(string Key, long Size, DateTimeOffset LastModified);

/// <summary>
/// Where a backup repository keeps its objects: chunks, manifests, <c>repository.json</c> and the
/// lease markers (<see cref="BackupLease"/>), each under a key with <c>/</c> between its parts.
/// Chunks and manifests are immutable once written, so their only write is put-if-absent; that
/// maps onto a folder (temp file, fsync, rename) and onto S3 (a conditional PUT with
/// <c>If-None-Match: *</c>). Lease markers are overwritten (a plain PUT) and deleted; upkeep
/// deletes manifests and unreferenced chunks. Nothing here needs a lock or a rename on the store:
/// S3's strong read-after-write consistency (a listing after a write shows it) is all it relies on.
/// </summary>
public interface IBackupStore
{
    /// <summary>Stores <paramref name="data"/> under <paramref name="key"/> durably and all at once, unless an object is already there.</summary>
    /// <returns>True if this call stored it; false if the key already held an object (which is left as it was).</returns>
    Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken);

    /// <summary>Stores <paramref name="data"/> under <paramref name="key"/> durably and all at once, replacing what was there (lease markers only).</summary>
    Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken);

    /// <summary>The object's bytes, or null if there is none.</summary>
    Task<byte[]?> GetAsync(string key, CancellationToken cancellationToken);

    /// <summary>The object's length in bytes, or null if there is none.</summary>
    Task<long?> LengthAsync(string key, CancellationToken cancellationToken);

    async Task<bool> ExistsAsync(string key, CancellationToken cancellationToken) =>
        await LengthAsync(key, cancellationToken).ConfigureAwait(false) is not null;

    /// <summary>Deletes the object; true if there was one (S3 cannot tell and says true).</summary>
    Task<bool> DeleteAsync(string key, CancellationToken cancellationToken);

    /// <summary>The keys directly under <paramref name="prefix"/> (a folder such as <c>backups/</c>), in no particular order.</summary>
    IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken);

    /// <summary>Every object under <paramref name="prefix"/> at any depth (S3: ListObjectsV2 without a delimiter), in no particular order.</summary>
    IAsyncEnumerable<StoredObject> ListObjectsAsync(string prefix, CancellationToken cancellationToken);

    /// <summary>
    /// What interrupted writes left behind, never read as objects: a folder's <c>.tmp-*</c> files;
    /// on S3, incomplete multipart uploads. Their keys are for <see cref="DeleteIncompleteAsync"/> only.
    /// </summary>
    IAsyncEnumerable<StoredObject> ListIncompleteAsync(CancellationToken cancellationToken);

    /// <summary>Removes one leftover that <see cref="ListIncompleteAsync"/> reported (S3: AbortMultipartUpload).</summary>
    Task DeleteIncompleteAsync(string key, CancellationToken cancellationToken);
}
