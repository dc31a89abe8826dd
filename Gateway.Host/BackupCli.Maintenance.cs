using System.CommandLine;

namespace Gateway.Host;

public sealed partial class BackupCli
{
    /// <summary>The repository's upkeep: prune, garbage collection and the consistency check (none yet).</summary>
    private static void AddMaintenanceCommands(Command backup, Option<string> repo, Option<bool> json)
    {
        _ = (backup, repo, json);
    }
}
