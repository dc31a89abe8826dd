using System.Text.Json;
using Gateway.Backup;
using Gateway.Host;
using Xunit;

namespace Gateway.Tests.Backup;

/// <summary>The repository's upkeep without a gateway: prune's retention, garbage collection under the lease protocol, check.</summary>
public sealed class BackupMaintenanceTests : IDisposable
{
    private const int ChunkSize = 64 * 1024;
    private static readonly DateTimeOffset Monday = new(2026, 11, 30, 0, 0, 0, TimeSpan.Zero); // ISO week 49
    private readonly DirectoryInfo _folder = Directory.CreateTempSubdirectory("backup-maint-");

    public void Dispose() => _folder.Delete(recursive: true);

    /// <summary>The system clock moved by a fixed amount: how a lease looks to a host long after it was written.</summary>
    private sealed class ShiftedTime(TimeSpan shift) : TimeProvider
    {
        public override DateTimeOffset GetUtcNow() => base.GetUtcNow() + shift;
    }

    private Task<BackupRepository> NewRepositoryAsync() =>
        BackupRepository.OpenOrCreateAsync(new FolderStore(_folder.FullName), ChunkSize, CancellationToken.None);

    private static byte[] Filled(byte value) => Enumerable.Repeat(value, ChunkSize).ToArray();

    /// <summary>Stores a chunk of <paramref name="value"/> bytes; its hash.</summary>
    private static async Task<string> PutChunkAsync(BackupRepository repository, byte value)
    {
        byte[] data = Filled(value);
        string sha = BackupRepository.Hash(data);
        await repository.PutChunkAsync(sha, data, CancellationToken.None);
        return sha;
    }

    private static async Task<Manifest> PutManifestAsync(BackupRepository repository, string id, string export, DateTimeOffset created, params string[] chunks)
    {
        var manifest = new Manifest(Manifest.CurrentVersion, id, export, (long)chunks.Length * ChunkSize, ChunkSize, created,
            [.. chunks.Select(sha => new ChunkEntry(ChunkKind.Data, sha))]);
        await repository.PutManifestAsync(manifest, CancellationToken.None);
        return manifest;
    }

    private string ChunkFile(string sha) => Path.Combine(_folder.FullName, "chunks", sha[..2], sha);

    private string[] Locks() =>
        Directory.Exists(Path.Combine(_folder.FullName, "locks")) ? [.. Directory.EnumerateFiles(Path.Combine(_folder.FullName, "locks")).Select(Path.GetFileName)!] : [];

    [Fact]
    public void Retention_keeps_the_newest_and_the_newest_of_each_recent_day_and_ISO_week_and_a_backup_any_rule_keeps_stays()
    {
        // Two a day from Monday of week 45 (2026-11-02) to Wednesday of week 49 (2026-12-02), 08:00 and 20:00.
        var backups = new List<(string Id, DateTimeOffset Created)>();
        for (DateTimeOffset day = Monday.AddDays(-28); day <= Monday.AddDays(2); day = day.AddDays(1))
        {
            backups.Add(($"{day:MMdd}-am", day.AddHours(8)));
            backups.Add(($"{day:MMdd}-pm", day.AddHours(20)));
        }
        backups.Reverse(); // any order in

        IReadOnlyDictionary<string, IReadOnlyList<string>> lastOnly = new RetentionPolicy(3, 0, 0).Decide(backups);
        Assert.Equal(["1202-pm", "1202-am", "1201-pm"], Kept(lastOnly));
        Assert.Equal(["last"], lastOnly["1202-am"]);

        IReadOnlyDictionary<string, IReadOnlyList<string>> daily = new RetentionPolicy(0, 4, 0).Decide(backups);
        Assert.Equal(["1202-pm", "1201-pm", "1130-pm", "1129-pm"], Kept(daily));
        Assert.All(Kept(daily), id => Assert.Equal(["daily"], daily[id]));

        // Weeks 49, 48, 47: the newest of each, whatever the weekday (the 49th is unfinished).
        IReadOnlyDictionary<string, IReadOnlyList<string>> weekly = new RetentionPolicy(0, 0, 3).Decide(backups);
        Assert.Equal(["1202-pm", "1129-pm", "1122-pm"], Kept(weekly));

        // The rules add up; a backup two rules keep names both.
        IReadOnlyDictionary<string, IReadOnlyList<string>> all = new RetentionPolicy(1, 2, 2).Decide(backups);
        Assert.Equal(["1202-pm", "1201-pm", "1129-pm"], Kept(all));
        Assert.Equal(["last", "daily", "weekly"], all["1202-pm"]);
        Assert.Equal(["daily"], all["1201-pm"]);
        Assert.Equal(["weekly"], all["1129-pm"]);
        Assert.Equal(backups.Count, all.Count);
        Assert.Empty(all["1128-pm"]);

        // Days without backups do not count: a gap is skipped, not spent.
        var sparse = new[] { ("a", Monday.AddDays(-10)), ("b", Monday.AddDays(-3)), ("c", Monday) };
        Assert.Equal(["c", "b"], Kept(new RetentionPolicy(0, 2, 0).Decide(sparse)));
        Assert.False(new RetentionPolicy(0, 0, 0).HasRule);
    }

    /// <summary>The ids kept, newest first (ids here sort by time within the test data).</summary>
    private static string[] Kept(IReadOnlyDictionary<string, IReadOnlyList<string>> reasons) =>
        [.. reasons.Where(r => r.Value.Count > 0).Select(r => r.Key).OrderByDescending(k => k, StringComparer.Ordinal)];

    [Fact]
    public async Task Prune_deletes_the_manifests_no_rule_keeps_per_export_and_only_manifests()
    {
        BackupRepository repository = await NewRepositoryAsync();
        string a = await PutChunkAsync(repository, 1), b = await PutChunkAsync(repository, 2);
        for (int i = 0; i < 4; i++)
        {
            await PutManifestAsync(repository, $"vm-{i}", "vm", Monday.AddHours(i), a);
            await PutManifestAsync(repository, $"db-{i}", "db", Monday.AddHours(i), b);
        }
        var prune = new BackupPrune(repository);
        await Assert.ThrowsAsync<ArgumentException>(() => prune.PruneAsync(new RetentionPolicy(0, 0, 0), null, false, CancellationToken.None));

        (IReadOnlyList<PruneDecision> dry, _) = await prune.PruneAsync(new RetentionPolicy(2, 0, 0), "vm", dryRun: true, CancellationToken.None);
        Assert.Equal(["vm-0", "vm-1", "vm-2", "vm-3"], dry.Select(d => d.Id));
        Assert.Equal([false, false, true, true], dry.Select(d => d.Keep));
        Assert.Equal(8, (await repository.ListIdsAsync(CancellationToken.None)).Count);

        (IReadOnlyList<PruneDecision> done, IReadOnlyList<string> unreadable) = await prune.PruneAsync(new RetentionPolicy(2, 0, 0), "vm", dryRun: false, CancellationToken.None);
        Assert.Empty(unreadable);
        Assert.Equal(["db-0", "db-1", "db-2", "db-3", "vm-2", "vm-3"], await repository.ListIdsAsync(CancellationToken.None));
        Assert.True(File.Exists(ChunkFile(a)), "prune deleted a chunk");

        // Every export on its own: the newest of db, the newest of vm.
        File.WriteAllText(Path.Combine(_folder.FullName, "backups", "broken.json"), "{");
        (done, unreadable) = await prune.PruneAsync(new RetentionPolicy(1, 0, 0), null, dryRun: false, CancellationToken.None);
        Assert.Equal(["broken", "db-3", "vm-3"], await repository.ListIdsAsync(CancellationToken.None));
        Assert.Contains("broken", Assert.Single(unreadable));
        Assert.Equal(2, done.Count(d => d.Keep));
    }

    [Fact]
    public async Task Gc_deletes_only_the_chunks_no_manifest_names()
    {
        BackupRepository repository = await NewRepositoryAsync();
        string kept1 = await PutChunkAsync(repository, 1), kept2 = await PutChunkAsync(repository, 2);
        string pruned = await PutChunkAsync(repository, 3), orphan = await PutChunkAsync(repository, 4);
        await PutManifestAsync(repository, "old", "vm", Monday, kept1, pruned);
        await PutManifestAsync(repository, "new", "vm", Monday.AddDays(1), kept1, kept2, kept2);
        await new BackupPrune(repository).PruneAsync(new RetentionPolicy(1, 0, 0), null, false, CancellationToken.None);

        CollectSummary summary = await new BackupCollector(repository).CollectAsync(CancellationToken.None);
        Assert.Equal(1, summary.Manifests);
        Assert.Equal(4, summary.ChunksTotal);
        Assert.Equal(2, summary.ChunksReferenced);
        Assert.Equal(2, summary.ChunksDeleted);
        Assert.True(summary.BytesDeleted > 0);
        Assert.True(File.Exists(ChunkFile(kept1)) && File.Exists(ChunkFile(kept2)), "gc deleted a referenced chunk");
        Assert.False(File.Exists(ChunkFile(pruned)) || File.Exists(ChunkFile(orphan)), "gc left an unreferenced chunk");
        Assert.Empty(Locks());

        // The backup restores whole afterwards, and a second gc has nothing to do.
        Assert.Empty(await new BackupVerifier(repository).VerifyAsync("new", CancellationToken.None));
        Assert.Equal(0, (await new BackupCollector(repository).CollectAsync(CancellationToken.None)).ChunksDeleted);

        // A manifest gc cannot read stops it before it deletes anything: its chunks are unknown.
        await PutChunkAsync(repository, 5);
        File.WriteAllText(Path.Combine(_folder.FullName, "backups", "broken.json"), "{\"version\":1");
        BackupFormatException e = await Assert.ThrowsAsync<BackupFormatException>(() => new BackupCollector(repository).CollectAsync(CancellationToken.None));
        Assert.Contains("before deleting anything", e.Message);
        Assert.Equal(3, Directory.EnumerateFiles(Path.Combine(_folder.FullName, "chunks"), "*", SearchOption.AllDirectories).Count());
        Assert.Empty(Locks());
    }

    [Fact]
    public async Task Gc_gives_way_to_a_live_backup_lease_and_proceeds_once_it_expired()
    {
        BackupRepository repository = await NewRepositoryAsync();
        string referenced = await PutChunkAsync(repository, 1);
        await PutManifestAsync(repository, "b1", "vm", Monday, referenced);

        // A backup is running: it has found an unreferenced chunk it will reuse, or stored a new one.
        BackupLease lease = await BackupLease.AcquireAsync(repository, CancellationToken.None);
        string inUse = await PutChunkAsync(repository, 2);
        Assert.Equal([Path.GetFileName(lease.Key)], Locks());
        BackupBusyException busy = await Assert.ThrowsAsync<BackupBusyException>(() => new BackupCollector(repository).CollectAsync(CancellationToken.None));
        Assert.Contains(lease.Marker.Id, busy.Message);
        Assert.True(File.Exists(ChunkFile(inUse)), "gc deleted a chunk a running backup may use");
        Assert.Equal([Path.GetFileName(lease.Key)], Locks()); // gc removed its own marker, not the backup's

        // The backup's process is killed: the marker stays, and blocks gc until it expires.
        await lease.AbandonAsync();
        await Assert.ThrowsAsync<BackupBusyException>(() => new BackupCollector(repository).CollectAsync(CancellationToken.None));
        LeaseOptions later = LeaseOptions.Default with { Time = new ShiftedTime(LeaseOptions.Default.Ttl + LeaseOptions.Default.ClockSkew + TimeSpan.FromSeconds(1)) };
        repository.Leases = later;
        CollectSummary summary = await new BackupCollector(repository).CollectAsync(CancellationToken.None);
        Assert.Equal(1, summary.ChunksDeleted);
        Assert.Equal(1, summary.ExpiredLeasesRemoved);
        Assert.False(File.Exists(ChunkFile(inUse)));
        Assert.True(File.Exists(ChunkFile(referenced)));
        Assert.Empty(Locks());
        await lease.DisposeAsync();
    }

    [Fact]
    public async Task A_backup_lease_waits_while_a_gc_runs_and_a_released_lease_leaves_no_marker()
    {
        BackupRepository repository = await NewRepositoryAsync();
        repository.Leases = LeaseOptions.Default with { PollInterval = TimeSpan.FromMilliseconds(50) };
        BackupLease gc = await BackupLease.AcquireCollectionAsync(repository, CancellationToken.None);
        Task<BackupLease> backup = BackupLease.AcquireAsync(repository, CancellationToken.None);
        // The waiting backup's marker gets written (polled, bounded: a loaded machine may take a while),
        // and the backup keeps waiting: a gc that looks now gives way.
        for (int i = 0; i < 200 && Locks().Length < 2; i++)
        {
            await Task.Delay(50);
        }
        Assert.Equal(2, Locks().Length);
        await Task.Delay(200);
        Assert.False(backup.IsCompleted, "the backup did not wait for the running gc");
        await Assert.ThrowsAsync<BackupBusyException>(gc.ThrowIfBackupsRunAsync);

        await gc.DisposeAsync();
        await using (BackupLease lease = await backup.WaitAsync(TimeSpan.FromSeconds(30)))
        {
            Assert.StartsWith("backup-", Assert.Single(Locks()));
            Assert.False(lease.Token.IsCancellationRequested);
        }
        Assert.Empty(Locks());

        // An expired gc marker (a killed gc) does not hold a backup up.
        BackupLease killed = await BackupLease.AcquireCollectionAsync(repository, CancellationToken.None);
        await killed.AbandonAsync();
        repository.Leases = repository.Leases with { Time = new ShiftedTime(TimeSpan.FromHours(1)) };
        await using (BackupLease lease = await BackupLease.AcquireAsync(repository, CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(30)))
        {
            Assert.Equal(2, Locks().Length);
        }
        await killed.DisposeAsync();
    }

    [Fact]
    public async Task Check_reports_a_missing_chunk_a_corrupt_chunk_and_a_stray_temp_file_and_repair_removes_the_temp_file()
    {
        BackupRepository repository = await NewRepositoryAsync();
        string a = await PutChunkAsync(repository, 1), b = await PutChunkAsync(repository, 2);
        await PutChunkAsync(repository, 3); // unreferenced: counted, not a problem
        await PutManifestAsync(repository, "20261206T120000Z-00000001", "vm", Monday, a, b, a);
        var check = new BackupCheck(repository.Store);

        CheckReport clean = await check.CheckAsync(readData: true, repair: false, CancellationToken.None);
        Assert.True(clean.Ok, string.Join("\n", clean.Problems));
        Assert.Equal((1, 3L, 2L, 1L, 2L), (clean.Manifests, clean.Chunks, clean.ChunksReferenced, clean.ChunksUnreferenced, clean.ChunksRead));

        // A corrupt chunk is found only by reading it.
        byte[] bytes = File.ReadAllBytes(ChunkFile(b));
        bytes[bytes.Length / 2] ^= 0xff;
        File.WriteAllBytes(ChunkFile(b), bytes);
        Assert.True((await check.CheckAsync(readData: false, repair: false, CancellationToken.None)).Ok);
        CheckReport corrupt = await check.CheckAsync(readData: true, repair: false, CancellationToken.None);
        Assert.False(corrupt.Ok);
        Assert.Contains(b, Assert.Single(corrupt.Problems));
        Assert.Contains($"disk offset {ChunkSize}", corrupt.Problems[0]);

        // A missing chunk, without reading.
        File.Delete(ChunkFile(a));
        CheckReport missing = await check.CheckAsync(readData: false, repair: false, CancellationToken.None);
        string problem = Assert.Single(missing.Problems);
        Assert.Contains($"chunk {a} is missing", problem);
        Assert.Contains("disk offset 0", problem);
        await repository.PutChunkAsync(a, Filled(1), CancellationToken.None);
        File.Delete(ChunkFile(b));
        await repository.PutChunkAsync(b, Filled(2), CancellationToken.None);
        Assert.True((await check.CheckAsync(readData: true, repair: false, CancellationToken.None)).Ok);

        // A temp file an interrupted write left: reported, then removed by repair.
        string temp = Path.Combine(_folder.FullName, "chunks", "ab", ".tmp-0123456789abcdef");
        Directory.CreateDirectory(Path.GetDirectoryName(temp)!);
        File.WriteAllBytes(temp, new byte[100]);
        File.SetLastWriteTimeUtc(temp, DateTime.UtcNow.AddHours(-1));
        CheckReport stray = await check.CheckAsync(readData: false, repair: false, CancellationToken.None);
        Assert.Contains("chunks/ab/.tmp-0123456789abcdef", Assert.Single(stray.Problems));

        // A temp file younger than the lease TTL may be a running backup's write in flight: not a problem.
        await using (BackupLease lease = await BackupLease.AcquireAsync(repository, CancellationToken.None))
        {
            string inFlight = Path.Combine(_folder.FullName, "chunks", "cd", ".tmp-fedcba9876543210");
            Directory.CreateDirectory(Path.GetDirectoryName(inFlight)!);
            File.WriteAllBytes(inFlight, new byte[100]);
            CheckReport running = await check.CheckAsync(readData: false, repair: true, CancellationToken.None);
            Assert.True(running.Ok, string.Join("\n", running.Problems));
            Assert.Equal(1, running.TempFilesInFlight);
            Assert.Contains(".tmp-0123456789abcdef", Assert.Single(running.Repaired));
            Assert.True(File.Exists(inFlight), "repair removed a running backup's temp file");
            Assert.False(File.Exists(temp));
            File.Delete(inFlight);
        }

        // A broken repository.json and a broken manifest are problems, not crashes.
        File.WriteAllText(Path.Combine(_folder.FullName, "backups", "20261206T130000Z-00000002.json"), "{\"version\":1");
        CheckReport broken = await check.CheckAsync(readData: false, repair: false, CancellationToken.None);
        Assert.Contains("20261206T130000Z-00000002", Assert.Single(broken.Problems));
        File.WriteAllText(Path.Combine(_folder.FullName, BackupRepository.InfoKey), "{}");
        Assert.False((await check.CheckAsync(readData: false, repair: false, CancellationToken.None)).Ok);
    }

    [Fact]
    public async Task The_upkeep_commands_exit_2_without_a_rule_3_while_a_backup_runs_and_1_on_an_inconsistent_repository()
    {
        BackupRepository repository = await NewRepositoryAsync();
        string a = await PutChunkAsync(repository, 1), b = await PutChunkAsync(repository, 2);
        await PutManifestAsync(repository, "old", "vm", Monday, a, b);
        await PutManifestAsync(repository, "new", "vm", Monday.AddDays(1), a);
        string repo = _folder.FullName;
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        var cli = new BackupCli(stdout, stderr);

        Assert.Equal(2, await cli.PruneAsync(repo, null, new RetentionPolicy(0, 0, 0), false, true, false, CancellationToken.None));
        Assert.Contains("at least one of --keep-last", stderr.ToString());
        Assert.Equal(2, (await repository.ListIdsAsync(CancellationToken.None)).Count);

        // While a backup runs, prune deletes the manifest but its gc gives way: exit 3, the chunk stays.
        await using (BackupLease lease = await BackupLease.AcquireAsync(repository, CancellationToken.None))
        {
            stdout.GetStringBuilder().Clear();
            Assert.Equal(BackupCli.ExitBusy, await cli.PruneAsync(repo, "vm", new RetentionPolicy(1, 0, 0), false, true, true, CancellationToken.None));
            using JsonDocument pruned = JsonDocument.Parse(stdout.ToString());
            Assert.Equal([false, true], pruned.RootElement.GetProperty("backups").EnumerateArray().Select(d => d.GetProperty("keep").GetBoolean()));
            Assert.Contains(lease.Marker.Id, pruned.RootElement.GetProperty("gcPostponed").GetString());
            Assert.Equal(["new"], await repository.ListIdsAsync(CancellationToken.None));
            Assert.True(File.Exists(ChunkFile(b)));
            Assert.Equal(BackupCli.ExitBusy, await cli.CollectAsync(repo, false, CancellationToken.None));
        }

        stdout.GetStringBuilder().Clear();
        Assert.Equal(0, await cli.CollectAsync(repo, true, CancellationToken.None));
        using (JsonDocument collected = JsonDocument.Parse(stdout.ToString()))
        {
            Assert.Equal(1, collected.RootElement.GetProperty("chunksDeleted").GetInt64());
        }
        Assert.False(File.Exists(ChunkFile(b)));

        stdout.GetStringBuilder().Clear();
        Assert.Equal(0, await cli.CheckAsync(repo, true, false, false, CancellationToken.None));
        Assert.StartsWith("consistent", stdout.ToString());
        File.Delete(ChunkFile(a));
        stderr.GetStringBuilder().Clear();
        Assert.Equal(1, await cli.CheckAsync(repo, false, false, false, CancellationToken.None));
        Assert.Contains($"error: chunk {a} is missing (backup new disk offset 0 needs it)", stderr.ToString());
        Assert.Equal(1, await cli.CheckAsync(Path.Combine(repo, "absent"), false, false, false, CancellationToken.None));
    }

    /// <summary>A folder store whose overwrites (lease refreshes) fail on demand: a lost network, a full disk.</summary>
    private sealed class FailingRefreshStore(string root) : IBackupStore
    {
        private readonly FolderStore _inner = new(root);

        public volatile bool FailOverwrites;

        public Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) =>
            FailOverwrites ? Task.FromException(new IOException("the store is unreachable")) : _inner.PutAsync(key, data, cancellationToken);

        public Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) => _inner.PutIfAbsentAsync(key, data, cancellationToken);

        public Task<byte[]?> GetAsync(string key, CancellationToken cancellationToken) => _inner.GetAsync(key, cancellationToken);

        public Task<long?> LengthAsync(string key, CancellationToken cancellationToken) => _inner.LengthAsync(key, cancellationToken);

        public Task<bool> DeleteAsync(string key, CancellationToken cancellationToken) => _inner.DeleteAsync(key, cancellationToken);

        public IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken) => _inner.ListAsync(prefix, cancellationToken);

        public IAsyncEnumerable<StoredObject> ListObjectsAsync(string prefix, CancellationToken cancellationToken) => _inner.ListObjectsAsync(prefix, cancellationToken);

        public IAsyncEnumerable<StoredObject> ListIncompleteAsync(CancellationToken cancellationToken) => _inner.ListIncompleteAsync(cancellationToken);

        public Task DeleteIncompleteAsync(string key, CancellationToken cancellationToken) => _inner.DeleteIncompleteAsync(key, cancellationToken);
    }

    [Fact]
    public async Task A_lease_that_cannot_be_refreshed_stops_its_holder_before_it_writes_a_manifest()
    {
        var store = new FailingRefreshStore(_folder.FullName);
        BackupRepository repository = await BackupRepository.OpenOrCreateAsync(store, ChunkSize, CancellationToken.None);
        // Refreshed every TTL/4, lapsed after TTL/2 of failures: 12 s leaves a loaded CI machine 6 s
        // of slack (3 s was flaky beside two builds).
        repository.Leases = LeaseOptions.Default with { Ttl = TimeSpan.FromSeconds(12) };
        await using BackupLease lease = await BackupLease.AcquireAsync(repository, CancellationToken.None);
        string sha = await PutChunkAsync(repository, 1);

        // Refreshes keep it alive past its first TTL while they succeed.
        await Task.Delay(TimeSpan.FromSeconds(13));
        Assert.False(lease.Token.IsCancellationRequested, "a refreshed lease lapsed");

        store.FailOverwrites = true;
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => Task.Delay(Timeout.InfiniteTimeSpan, lease.Token).WaitAsync(TimeSpan.FromSeconds(30)));
        var manifest = new Manifest(Manifest.CurrentVersion, "late", "vm", ChunkSize, ChunkSize, DateTimeOffset.UtcNow, [new ChunkEntry(ChunkKind.Data, sha)]);
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => repository.PutManifestAsync(manifest, lease.Token));
        Assert.Empty(await repository.ListIdsAsync(CancellationToken.None));
    }
}
