using Gateway.Backup;

namespace Gateway.Host;

public sealed partial class BackupCli
{
    /// <summary>The repository <c>--repo</c> names: a folder.</summary>
    private static Task<BackupRepository> OpenRepositoryAsync(string repo, bool create, CancellationToken ct) =>
        BackupRepository.OpenFolderAsync(repo, create, ct);

    /// <summary>The store under the repository <c>--repo</c> names, not yet opened as a repository (check looks at a broken repository.json too).</summary>
    private static IBackupStore OpenStore(string repo) =>
        Directory.Exists(repo) ? new FolderStore(repo) : throw new BackupFormatException($"repository {repo} does not exist");
}
