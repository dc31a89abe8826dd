using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using Gateway.Backup;

namespace Gateway.Host;

public sealed partial class BackupCli
{
    /// <summary>Exit code of gc (and of prune's gc) when a backup holds a live lease: nothing was deleted, try later.</summary>
    public const int ExitBusy = 3;

    /// <summary>The repository's upkeep: prune, garbage collection and the consistency check (README "Backup").</summary>
    private static void AddMaintenanceCommands(Command backup, Option<string> repo, Option<bool> json)
    {
        var export = new Option<string?>("--export") { Description = "Prune only this export's backups (default: every export's, each on its own)" };
        var keepLast = new Option<int>("--keep-last") { Description = "Keep the N newest backups" };
        var keepDaily = new Option<int>("--keep-daily") { Description = "Keep the newest backup of each of the N most recent days (UTC) that have backups" };
        var keepWeekly = new Option<int>("--keep-weekly") { Description = "Keep the newest backup of each of the N most recent ISO weeks that have backups" };
        var dryRun = new Option<bool>("--dry-run") { Description = "Say what would be deleted; delete nothing" };
        var noGc = new Option<bool>("--no-gc") { Description = "Delete the manifests only; leave their chunks to a later gc" };
        var prune = new Command("prune", "Delete the manifests no retention rule keeps (per export), then garbage-collect their chunks");
        prune.Options.Add(repo);
        prune.Options.Add(export);
        prune.Options.Add(keepLast);
        prune.Options.Add(keepDaily);
        prune.Options.Add(keepWeekly);
        prune.Options.Add(dryRun);
        prune.Options.Add(noGc);
        prune.Options.Add(json);
        prune.SetAction((p, ct) => Console().PruneAsync(p.GetValue(repo)!, p.GetValue(export),
            new RetentionPolicy(p.GetValue(keepLast), p.GetValue(keepDaily), p.GetValue(keepWeekly)),
            p.GetValue(dryRun), !p.GetValue(noGc), p.GetValue(json), ct));
        backup.Subcommands.Add(prune);

        var gc = new Command("gc", "Delete the chunks no manifest names; gives up (exit 3) while a backup runs");
        gc.Options.Add(repo);
        gc.Options.Add(json);
        gc.SetAction((p, ct) => Console().CollectAsync(p.GetValue(repo)!, p.GetValue(json), ct));
        backup.Subcommands.Add(gc);

        var readData = new Option<bool>("--read-data") { Description = "Also read every chunk a manifest names and check its hash" };
        var repair = new Option<bool>("--repair") { Description = "Remove the temp files interrupted writes left" };
        var check = new Command("check", "Check the repository's consistency; exit 1 naming each problem");
        check.Options.Add(repo);
        check.Options.Add(readData);
        check.Options.Add(repair);
        check.Options.Add(json);
        check.SetAction((p, ct) => Console().CheckAsync(p.GetValue(repo)!, p.GetValue(readData), p.GetValue(repair), p.GetValue(json), ct));
        backup.Subcommands.Add(check);
    }

    public Task<int> PruneAsync(string repo, string? export, RetentionPolicy policy, bool dryRun, bool gc, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        if (policy.KeepLast < 0 || policy.KeepDaily < 0 || policy.KeepWeekly < 0 || !policy.HasRule)
        {
            await stderr.WriteLineAsync("error: prune needs at least one of --keep-last, --keep-daily, --keep-weekly, each a count above 0");
            return 2;
        }
        BackupRepository repository = await OpenRepositoryAsync(repo, create: false, ct);
        (IReadOnlyList<PruneDecision> decisions, IReadOnlyList<string> unreadable) = await new BackupPrune(repository).PruneAsync(policy, export, dryRun, ct);
        CollectSummary? collected = null;
        string? busy = null;
        if (gc && !dryRun)
        {
            try
            {
                collected = await new BackupCollector(repository).CollectAsync(ct);
            }
            catch (BackupBusyException e)
            {
                busy = e.Message;
            }
        }
        if (json)
        {
            await stdout.WriteLineAsync(JsonSerializer.Serialize(new { dryRun, backups = decisions, unreadable, gc = collected, gcPostponed = busy }, Indented));
        }
        else
        {
            foreach (PruneDecision d in decisions)
            {
                string verb = d.Keep ? "keep" : dryRun ? "would remove" : "removed";
                await stdout.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                    $"{verb}\t{d.Id}\t{d.Export}\t{d.Created:O}{(d.Keep ? "\t" + string.Join(",", d.Reasons) : "")}"));
            }
            if (collected is not null)
            {
                await stdout.WriteLineAsync(Describe(collected));
            }
        }
        foreach (string problem in unreadable)
        {
            await stderr.WriteLineAsync($"warning: kept, as it cannot be read: {problem}");
        }
        if (busy is not null)
        {
            await stderr.WriteLineAsync($"error: the manifests are pruned, but their chunks stay until a later gc: {busy}");
            return ExitBusy;
        }
        return 0;
    });

    public Task<int> CollectAsync(string repo, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        BackupRepository repository = await OpenRepositoryAsync(repo, create: false, ct);
        CollectSummary summary;
        try
        {
            summary = await new BackupCollector(repository).CollectAsync(ct);
        }
        catch (BackupBusyException e)
        {
            await stderr.WriteLineAsync($"error: {e.Message}");
            return ExitBusy;
        }
        await stdout.WriteLineAsync(json ? JsonSerializer.Serialize(summary, Indented) : Describe(summary));
        return 0;
    });

    public Task<int> CheckAsync(string repo, bool readData, bool repair, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        CheckReport report = await new BackupCheck(await OpenStoreAsync(repo, ct)).CheckAsync(readData, repair, ct);
        if (json)
        {
            await stdout.WriteLineAsync(JsonSerializer.Serialize(report, Indented));
        }
        else
        {
            foreach (string line in report.Repaired)
            {
                await stdout.WriteLineAsync($"repaired: {line}");
            }
            await stdout.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"{(report.Ok ? "consistent" : "NOT consistent")}: {report.Manifests} backups, {report.Chunks} chunks ({report.ChunksReferenced} referenced, {report.ChunksUnreferenced} unreferenced){(readData ? $", {report.ChunksRead} read and hashed" : "")}{(report.TempFilesInFlight > 0 ? $", {report.TempFilesInFlight} temp files of running backups" : "")}"));
        }
        foreach (string problem in report.Problems)
        {
            await stderr.WriteLineAsync($"error: {problem}");
        }
        return report.Ok ? 0 : 1;
    });

    private static string Describe(CollectSummary s) => string.Create(CultureInfo.InvariantCulture,
        $"gc: {s.Manifests} backups name {s.ChunksReferenced} of {s.ChunksTotal} chunks; deleted {s.ChunksDeleted} chunks ({s.BytesDeleted} bytes) and {s.ExpiredLeasesRemoved} expired leases, {s.Seconds:F1} s");
}
