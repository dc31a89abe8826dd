using System.Globalization;
using System.Text.Json.Serialization;

namespace Gateway.Backup;

/// <summary>
/// How many backups of an export prune keeps (README "Backup"): the <see cref="KeepLast"/>
/// newest; the newest of each of the <see cref="KeepDaily"/> most recent days (UTC) that have
/// backups; the newest of each of the <see cref="KeepWeekly"/> most recent ISO weeks that have
/// backups. A backup that any rule keeps stays. Unlike Proxmox, the rules do not skip the days or
/// weeks another rule already covers: each counts on its own, and they add up.
/// </summary>
public sealed record RetentionPolicy(int KeepLast, int KeepDaily, int KeepWeekly)
{
    public bool HasRule => KeepLast > 0 || KeepDaily > 0 || KeepWeekly > 0;

    /// <summary>The rules that keep each backup; a backup with none is pruned.</summary>
    /// <param name="backups">One export's backups, in any order; ties in time break on the id.</param>
    public IReadOnlyDictionary<string, IReadOnlyList<string>> Decide(IEnumerable<(string Id, DateTimeOffset Created)> backups)
    {
        var newestFirst = backups.OrderByDescending(b => b.Created).ThenByDescending(b => b.Id, StringComparer.Ordinal).ToList();
        var reasons = newestFirst.ToDictionary(b => b.Id, _ => new List<string>(), StringComparer.Ordinal);
        foreach ((string id, _) in newestFirst.Take(KeepLast))
        {
            reasons[id].Add("last");
        }
        KeepNewestPer(newestFirst, KeepDaily, "daily", c => c.UtcDateTime.ToString("yyyy-MM-dd", CultureInfo.InvariantCulture), reasons);
        KeepNewestPer(newestFirst, KeepWeekly, "weekly", c => string.Create(CultureInfo.InvariantCulture, $"{ISOWeek.GetYear(c.UtcDateTime)}-W{ISOWeek.GetWeekOfYear(c.UtcDateTime):D2}"), reasons);
        return reasons.ToDictionary(r => r.Key, r => (IReadOnlyList<string>)r.Value, StringComparer.Ordinal);
    }

    /// <summary>The newest backup of each of the <paramref name="count"/> most recent periods that have one.</summary>
    private static void KeepNewestPer(List<(string Id, DateTimeOffset Created)> newestFirst, int count, string rule,
        Func<DateTimeOffset, string> period, Dictionary<string, List<string>> reasons)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach ((string id, DateTimeOffset created) in newestFirst)
        {
            if (seen.Count >= count)
            {
                return;
            }
            if (seen.Add(period(created)))
            {
                reasons[id].Add(rule);
            }
        }
    }
}

/// <summary>One backup as prune saw it.</summary>
public sealed record PruneDecision(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("export")] string Export,
    [property: JsonPropertyName("created")] DateTimeOffset Created,
    [property: JsonPropertyName("keep")] bool Keep,
    [property: JsonPropertyName("reasons")] IReadOnlyList<string> Reasons);

/// <summary>
/// Prune: applies a <see cref="RetentionPolicy"/> to each export's backups and deletes the
/// manifests of those no rule keeps (chunks go with the garbage collection that follows). A
/// manifest that cannot be read is kept, and reported.
/// </summary>
public sealed class BackupPrune(BackupRepository repository)
{
    /// <param name="export">Only this export's backups; null for every export's.</param>
    /// <param name="dryRun">Decide, delete nothing.</param>
    /// <returns>Every backup considered, oldest first, and the manifests that could not be read.</returns>
    public async Task<(IReadOnlyList<PruneDecision> Decisions, IReadOnlyList<string> Unreadable)> PruneAsync(
        RetentionPolicy policy, string? export, bool dryRun, CancellationToken cancellationToken)
    {
        if (!policy.HasRule)
        {
            throw new ArgumentException("prune needs at least one of keep-last, keep-daily, keep-weekly above 0", nameof(policy));
        }
        var manifests = new List<Manifest>();
        var unreadable = new List<string>();
        foreach (string id in await repository.ListIdsAsync(cancellationToken).ConfigureAwait(false))
        {
            try
            {
                manifests.Add(await repository.GetManifestAsync(id, cancellationToken).ConfigureAwait(false));
            }
            catch (BackupFormatException e)
            {
                unreadable.Add($"{id}: {e.Message}");
            }
        }
        var decisions = new List<PruneDecision>();
        foreach (IGrouping<string, Manifest> group in manifests.Where(m => export is null || m.Export == export).GroupBy(m => m.Export, StringComparer.Ordinal))
        {
            IReadOnlyDictionary<string, IReadOnlyList<string>> reasons = policy.Decide(group.Select(m => (m.Id, m.Created)));
            decisions.AddRange(group.Select(m => new PruneDecision(m.Id, m.Export, m.Created, reasons[m.Id].Count > 0, reasons[m.Id])));
        }
        decisions.Sort((a, b) => a.Created != b.Created ? a.Created.CompareTo(b.Created) : string.CompareOrdinal(a.Id, b.Id));
        if (!dryRun)
        {
            foreach (PruneDecision decision in decisions.Where(d => !d.Keep))
            {
                await repository.DeleteManifestAsync(decision.Id, cancellationToken).ConfigureAwait(false);
            }
        }
        return (decisions, unreadable);
    }
}
