using System.Text.Json;
using System.Text.Json.Serialization;

namespace Gateway.Backup;

/// <summary>Who holds a lease: a running <c>backup create</c>, or a garbage collection.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<LeaseKind>))]
public enum LeaseKind
{
    [JsonStringEnumMemberName("backup")]
    Backup,

    [JsonStringEnumMemberName("gc")]
    Gc,
}

/// <summary>The body of a lease marker <c>locks/&lt;kind&gt;-&lt;id&gt;.json</c>.</summary>
public sealed record LeaseMarker(
    [property: JsonPropertyName("kind")] LeaseKind Kind,
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("host")] string Host,
    [property: JsonPropertyName("pid")] int ProcessId,
    [property: JsonPropertyName("started")] DateTimeOffset Started,
    [property: JsonPropertyName("expires")] DateTimeOffset Expires)
{
    /// <summary>Live until <see cref="Expires"/> plus the clock skew allowed between hosts, by the reader's clock.</summary>
    public bool IsLive(DateTimeOffset now, TimeSpan clockSkew) => now < Expires + clockSkew;

    public override string ToString() =>
        $"{(Kind == LeaseKind.Backup ? "backup" : "gc")} {Id} of {Host} pid {ProcessId}, started {Started:O}, expires {Expires:O}";
}

/// <summary>How long leases last; the defaults suit backups over a WAN to S3.</summary>
public sealed record LeaseOptions
{
    public static readonly LeaseOptions Default = new();

    /// <summary>A marker is live this long after its last refresh; the holder refreshes it every quarter of this.</summary>
    public TimeSpan Ttl { get; init; } = TimeSpan.FromMinutes(5);

    /// <summary>How far apart the clocks of the hosts sharing a repository may be.</summary>
    public TimeSpan ClockSkew { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>How often a backup looks again whether a garbage collection it waits for has ended.</summary>
    public TimeSpan PollInterval { get; init; } = TimeSpan.FromSeconds(2);

    public TimeProvider Time { get; init; } = TimeProvider.System;
}

/// <summary>A garbage collection will not run: a backup holds a live lease (exit 3 of <c>gc</c> and <c>prune</c>).</summary>
public sealed class BackupBusyException(string message) : Exception(message);

/// <summary>A lease's holder stopped because its lease may have lapsed (an I/O failure, so the CLI reports it and exits 1).</summary>
public sealed class BackupLeaseLostException(string message) : IOException(message);

/// <summary>
/// The lease protocol that lets garbage collection delete chunks while backups run against the
/// same repository from other processes or hosts, on a folder or on S3, with no lock and no
/// rename: only put, overwrite, delete and a strongly consistent listing.
/// <para>
/// The hazard: a running backup stores new chunks, or finds an existing chunk that no manifest
/// names and decides to reuse it, long before its manifest exists; a collection that deleted that
/// chunk would leave the manifest pointing at nothing. So each side writes a marker first and
/// then looks for the other's (the marker-and-check-both-ways scheme):
/// </para>
/// <list type="number">
/// <item>A backup writes <c>locks/backup-&lt;id&gt;.json</c> before it looks at any chunk, then
/// lists <c>locks/</c>; while a live <c>gc-*</c> marker is there it waits (its own marker stays).</item>
/// <item>A collection writes <c>locks/gc-&lt;id&gt;.json</c>, then lists <c>locks/</c>; a live
/// <c>backup-*</c> marker makes it give up (<see cref="BackupBusyException"/>). Otherwise it reads
/// every manifest and lists the chunks, looks once more for backup markers (giving up if one
/// appeared), and only then deletes the chunks no manifest names.</item>
/// </list>
/// Of a backup's marker write B and a collection's marker write G, one comes first in the
/// store's order: if B, the collection's listing after G sees B and stops; if G, the backup's
/// listing after B sees G and waits until the collection is over. A collection therefore never
/// deletes while a backup is between its first chunk lookup and its manifest, and every
/// manifest finished before the collection began is visible to it.
/// <para>
/// Markers expire: each holds an <c>expires</c> time that its holder pushes forward every
/// quarter <see cref="LeaseOptions.Ttl"/>; a reader treats it as live until <c>expires</c> plus
/// <see cref="LeaseOptions.ClockSkew"/>, so a killed process blocks collections for one TTL at
/// most, and the next collection deletes its marker. A holder whose refreshes have failed for
/// half the TTL (a paused process, a lost network) stops: <see cref="Token"/> is cancelled, so a
/// backup never writes its manifest, nor a collection deletes, after its marker may have lapsed
/// for the other side. The residual assumption: no pause longer than half the TTL between that
/// check and the write that follows it, and clocks within the skew.
/// </para>
/// </summary>
public sealed class BackupLease : IAsyncDisposable
{
    public const string LocksPrefix = "locks/";

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = false };

    private readonly IBackupStore _store;
    private readonly LeaseOptions _options;
    private readonly LeaseMarker _marker;
    private readonly CancellationTokenSource _stop = new();
    private readonly CancellationTokenSource _lapse;
    private readonly CancellationTokenSource _linked;
    private Task _refresher = Task.CompletedTask;

    private BackupLease(IBackupStore store, LeaseOptions options, LeaseKind kind, CancellationToken cancellationToken)
    {
        _store = store;
        _options = options;
        DateTimeOffset now = options.Time.GetUtcNow();
        _marker = new LeaseMarker(kind, Guid.NewGuid().ToString("N"), Environment.MachineName, Environment.ProcessId, now, now + options.Ttl);
        _lapse = new CancellationTokenSource(Timeout.InfiniteTimeSpan, options.Time);
        _linked = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _lapse.Token);
    }

    /// <summary>The marker's key in the store.</summary>
    public string Key => MarkerKey(_marker.Kind, _marker.Id);

    public LeaseMarker Marker => _marker;

    /// <summary>The caller's token, also cancelled once the lease may have lapsed (see the class comment): use it for every step under the lease.</summary>
    public CancellationToken Token => _linked.Token;

    public static string MarkerKey(LeaseKind kind, string id) => $"{LocksPrefix}{(kind == LeaseKind.Backup ? "backup" : "gc")}-{id}.json";

    /// <summary>
    /// A backup's lease, taken before it looks at any chunk: writes the marker, then waits while a
    /// live garbage collection's marker is there. Dispose it after the manifest is stored.
    /// </summary>
    public static async Task<BackupLease> AcquireAsync(BackupRepository repository, CancellationToken cancellationToken)
    {
        var lease = new BackupLease(repository.Store, repository.Leases, LeaseKind.Backup, cancellationToken);
        try
        {
            await lease.StartAsync().ConfigureAwait(false);
            while ((await ListLiveAsync(repository.Store, repository.Leases, LeaseKind.Gc, lease.Token).ConfigureAwait(false)).Count > 0)
            {
                await Task.Delay(repository.Leases.PollInterval, repository.Leases.Time, lease.Token).ConfigureAwait(false);
            }
            return lease;
        }
        catch
        {
            await lease.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>A garbage collection's lease: writes the marker, then gives up if a live backup's marker is there.</summary>
    /// <exception cref="BackupBusyException">A backup holds a live lease.</exception>
    internal static async Task<BackupLease> AcquireCollectionAsync(BackupRepository repository, CancellationToken cancellationToken)
    {
        var lease = new BackupLease(repository.Store, repository.Leases, LeaseKind.Gc, cancellationToken);
        try
        {
            await lease.StartAsync().ConfigureAwait(false);
            await lease.ThrowIfBackupsRunAsync().ConfigureAwait(false);
            return lease;
        }
        catch
        {
            await lease.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <exception cref="BackupBusyException">A backup holds a live lease.</exception>
    internal async Task ThrowIfBackupsRunAsync()
    {
        IReadOnlyList<LeaseMarker> backups = await ListLiveAsync(_store, _options, LeaseKind.Backup, Token).ConfigureAwait(false);
        if (backups.Count > 0)
        {
            throw new BackupBusyException($"a backup is running, so garbage collection waits for another time: {string.Join("; ", backups)}");
        }
    }

    /// <summary>The live markers of <paramref name="kind"/> in the store.</summary>
    public static async Task<IReadOnlyList<LeaseMarker>> ListLiveAsync(IBackupStore store, LeaseOptions options, LeaseKind kind, CancellationToken cancellationToken)
    {
        DateTimeOffset now = options.Time.GetUtcNow();
        var live = new List<LeaseMarker>();
        foreach ((_, LeaseMarker marker) in await ListMarkersAsync(store, options, cancellationToken).ConfigureAwait(false))
        {
            if (marker.Kind == kind && marker.IsLive(now, options.ClockSkew))
            {
                live.Add(marker);
            }
        }
        return live;
    }

    /// <summary>
    /// Every marker with its key. One that does not parse (someone else's file) counts as a
    /// backup's, live for one TTL after it was last written.
    /// </summary>
    internal static async Task<IReadOnlyList<(string Key, LeaseMarker Marker)>> ListMarkersAsync(IBackupStore store, LeaseOptions options, CancellationToken cancellationToken)
    {
        var markers = new List<(string, LeaseMarker)>();
        await foreach (StoredObject stored in store.ListObjectsAsync(LocksPrefix, cancellationToken).ConfigureAwait(false))
        {
            byte[]? bytes = await store.GetAsync(stored.Key, cancellationToken).ConfigureAwait(false);
            if (bytes is null)
            {
                continue; // released since the listing
            }
            LeaseMarker? marker = null;
            try
            {
                marker = JsonSerializer.Deserialize<LeaseMarker>(bytes, Json);
            }
            catch (JsonException)
            {
            }
            markers.Add((stored.Key, marker ?? new LeaseMarker(LeaseKind.Backup, stored.Key, "?", 0, stored.LastModified, stored.LastModified + options.Ttl)));
        }
        return markers;
    }

    private async Task StartAsync()
    {
        await WriteAsync(_options.Time.GetUtcNow(), Token).ConfigureAwait(false);
        _refresher = RefreshAsync();
    }

    /// <summary>Writes the marker stamped <paramref name="now"/>, then gives the holder half a TTL from then.</summary>
    private async Task WriteAsync(DateTimeOffset now, CancellationToken cancellationToken)
    {
        LeaseMarker marker = _marker with { Expires = now + _options.Ttl };
        await _store.PutAsync(Key, JsonSerializer.SerializeToUtf8Bytes(marker, Json), cancellationToken).ConfigureAwait(false);
        TimeSpan left = now + _options.Ttl / 2 - _options.Time.GetUtcNow();
        if (left <= TimeSpan.Zero)
        {
            _lapse.Cancel();
        }
        else
        {
            _lapse.CancelAfter(left);
        }
    }

    private async Task RefreshAsync()
    {
        while (!_stop.IsCancellationRequested && !_lapse.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(_options.Ttl / 4, _options.Time, _stop.Token).ConfigureAwait(false);
                await WriteAsync(_options.Time.GetUtcNow(), _stop.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (_stop.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // The next refresh tries again; if none succeeds for half a TTL, the lease lapses.
            }
        }
    }

    /// <summary>Stops the refreshes without removing the marker: what a killed holder leaves (tests).</summary>
    internal async Task AbandonAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        await _refresher.ConfigureAwait(false);
    }

    /// <summary>Stops refreshing and deletes the marker; if the delete fails, the marker expires by itself.</summary>
    public async ValueTask DisposeAsync()
    {
        if (!_stop.IsCancellationRequested)
        {
            await AbandonAsync().ConfigureAwait(false);
            try
            {
                await _store.DeleteAsync(Key, CancellationToken.None).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
        }
        _linked.Dispose();
        _lapse.Dispose();
        _stop.Dispose();
    }
}
