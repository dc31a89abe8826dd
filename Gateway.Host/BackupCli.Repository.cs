using Gateway.Backup;

namespace Gateway.Host;

public sealed partial class BackupCli
{
    /// <summary>The repository <c>--repo</c> names: a folder.</summary>
    private static Task<BackupRepository> OpenRepositoryAsync(string repo, bool create, CancellationToken ct) =>
        BackupRepository.OpenFolderAsync(repo, create, ct);
}
