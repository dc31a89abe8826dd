namespace Gateway.Backup;

/// <summary>
/// Where a backup repository keeps its objects: chunks, manifests and <c>repository.json</c>,
/// each under a key with <c>/</c> between its parts. Objects are immutable once written, so the
/// only write is put-if-absent; that maps onto a folder (temp file, fsync, rename) and later onto
/// S3 (a conditional PUT with <c>If-None-Match: *</c>).
/// </summary>
public interface IBackupStore
{
    /// <summary>Stores <paramref name="data"/> under <paramref name="key"/> durably and all at once, unless an object is already there.</summary>
    /// <returns>True if this call stored it; false if the key already held an object (which is left as it was).</returns>
    Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken);

    /// <summary>The object's bytes, or null if there is none.</summary>
    Task<byte[]?> GetAsync(string key, CancellationToken cancellationToken);

    Task<bool> ExistsAsync(string key, CancellationToken cancellationToken);

    /// <summary>The keys directly under <paramref name="prefix"/> (a folder such as <c>backups/</c>), in no particular order.</summary>
    IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken);
}
