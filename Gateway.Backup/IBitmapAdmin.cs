namespace Gateway.Backup;

/// <summary>A dirty bitmap of an export as the gateway's admin API lists it.</summary>
public sealed record TrackedBitmap(string Name, bool Enabled);

/// <summary>
/// The bitmap side of the gateway's admin API that an incremental backup needs (the Host's
/// implementation speaks HTTP to any node, so it works cluster-wide like the NBD side).
/// </summary>
public interface IBitmapAdmin
{
    /// <summary>The export's bitmaps.</summary>
    /// <exception cref="BackupSourceException">The export does not exist, or the API failed.</exception>
    Task<IReadOnlyList<TrackedBitmap>> ListAsync(string export, CancellationToken cancellationToken);

    /// <summary>Adds an enabled bitmap: from this moment on it marks every write.</summary>
    /// <exception cref="BackupSourceException">The export does not exist, or the API failed.</exception>
    Task AddAsync(string export, string name, CancellationToken cancellationToken);

    /// <summary>Removes a bitmap; one already gone is not an error.</summary>
    /// <exception cref="BackupSourceException">The API failed.</exception>
    Task RemoveAsync(string export, string name, CancellationToken cancellationToken);
}

/// <summary>How <c>backup create</c> tracks changes between backups: the admin API and the prefix of its bitmaps' names.</summary>
/// <param name="Prefix">
/// Backups of an export keep one bitmap, named <c>PREFIX.REPOSITORYID.BACKUPID</c> after the
/// repository and the backup at whose start it was added (<c>PREFIX.BACKUPID</c> in a repository
/// made before repositories had ids); the next backup reads only what it marks and then removes it.
/// </param>
public sealed record BackupTracking(IBitmapAdmin Admin, string Prefix = BackupTracking.DefaultPrefix)
{
    public const string DefaultPrefix = "backup";

    /// <summary>What a prefix must be so that <c>PREFIX.ID</c> is a valid bitmap name (letters, digits, '.', '_', '-'; 1–128; not starting with '.' or '-').</summary>
    public static bool IsValidPrefix(string prefix) =>
        prefix.Length is > 0 and <= 64
        && prefix[0] is not ('.' or '-')
        && prefix.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-');

    /// <summary>The bitmap that backup <paramref name="id"/> into repository <paramref name="repositoryId"/> adds at its start.</summary>
    public string BitmapFor(string? repositoryId, string id) => repositoryId is null ? $"{Prefix}.{id}" : $"{OwnedPrefix(repositoryId)}{id}";

    /// <summary>What every bitmap of this prefix's backups into repository <paramref name="repositoryId"/> starts with.</summary>
    public string OwnedPrefix(string repositoryId) => $"{Prefix}.{repositoryId}.";
}

/// <summary>The gateway (its admin API or its NBD side) refused or failed what the backup needed from it.</summary>
public sealed class BackupSourceException(string message, Exception? inner = null) : Exception(message, inner);
