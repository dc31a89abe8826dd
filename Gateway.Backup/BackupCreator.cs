using System.Buffers;
using System.Diagnostics;
using System.Net;
using System.Text.Json.Serialization;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Cluster;
using Gateway.Nbd;

namespace Gateway.Backup;

/// <summary>What <c>gateway backup create</c> did (its <c>--json</c> summary).</summary>
public sealed record BackupSummary(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("export")] string Export,
    [property: JsonPropertyName("incremental")] bool Incremental,
    [property: JsonPropertyName("basedOn"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? BasedOn,
    [property: JsonPropertyName("fullBecause"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? FullBecause,
    [property: JsonPropertyName("bitmap"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Bitmap,
    [property: JsonPropertyName("bytesTotal")] long BytesTotal,
    [property: JsonPropertyName("bytesDirty")] long BytesDirty,
    [property: JsonPropertyName("bytesRead")] long BytesRead,
    [property: JsonPropertyName("bytesFromPrevious")] long BytesFromPrevious,
    [property: JsonPropertyName("bytesZero")] long BytesZero,
    [property: JsonPropertyName("bytesHole")] long BytesHole,
    [property: JsonPropertyName("bytesDeduplicated")] long BytesDeduplicated,
    [property: JsonPropertyName("bytesUploaded")] long BytesUploaded,
    [property: JsonPropertyName("chunksUnchanged")] long ChunksUnchanged,
    [property: JsonPropertyName("chunksNew")] long ChunksNew,
    [property: JsonPropertyName("chunksReused")] long ChunksReused,
    [property: JsonPropertyName("chunksZero")] long ChunksZero,
    [property: JsonPropertyName("chunksHole")] long ChunksHole,
    [property: JsonPropertyName("seconds")] double Seconds,
    [property: JsonPropertyName("warnings")] IReadOnlyList<string> Warnings);

/// <summary>How far a backup is: bytes of the chunks it has to read, and of those it has read.</summary>
public readonly record struct BackupProgress(long BytesToRead, long BytesRead);

/// <summary>
/// Makes a backup of an export over NBD, like any client. With <see cref="BackupTracking"/>, it first
/// adds a dirty bitmap (<c>PREFIX.ID</c>) to the export, before reading a byte: every write from
/// then on, including those that land while this backup reads, is marked, and the next backup
/// reads only what that bitmap marks (its <c>qemu:dirty-bitmap:</c> context) and takes every
/// other chunk's entry from this manifest; then it removes this backup's bitmap and keeps its own.
/// A chunk written while it is read may hold either bytes in this backup; the next one reads
/// it again, so nothing a write changed is ever missed. The first backup, or one whose
/// predecessor's bitmap is gone or disabled, reads everything (and says why).
/// Inside what it reads, base:allocation says which chunks are holes or zeros (not read); the
/// rest are read a few at a time, hashed, and stored unless the repository has them already;
/// the manifest is stored last. A run that stops half-way leaves chunks and no manifest (and
/// removes its bitmap), and the next run finds those chunks and skips them.
/// </summary>
public sealed class BackupCreator(BackupRepository repository)
{
    private const uint StateHole = (uint)AllocationState.Hole, StateZero = (uint)AllocationState.Zero;

    private const string AllocationContext = "base:allocation";

    /// <summary>Chunks read, hashed and stored at once; memory is about this many chunk buffers.</summary>
    public int Parallelism { get; init; } = 4;

    /// <summary>Told after every chunk read (from any thread).</summary>
    public IProgress<BackupProgress>? Progress { get; init; }

    /// <summary>A full backup of what <paramref name="export"/> holds, with no change tracking (any NBD server).</summary>
    public Task<BackupSummary> CreateAsync(EndPoint nbd, string export, CancellationToken cancellationToken) =>
        CreateAsync(nbd, export, tracking: null, cancellationToken);

    /// <exception cref="BackupSourceException">The admin API refused or failed a bitmap step.</exception>
    /// <exception cref="PeerExportUnavailableException">The NBD server has no such export.</exception>
    /// <exception cref="BackupLeaseLostException">The run's lease on the repository could not be refreshed; it stopped before its manifest.</exception>
    public async Task<BackupSummary> CreateAsync(EndPoint nbd, string export, BackupTracking? tracking, CancellationToken cancellationToken)
    {
        // The lease before any chunk is looked at (BackupLease: a garbage collection never deletes a
        // chunk a running backup may name); its token stops the run if the lease lapses.
        await using BackupLease lease = await BackupLease.AcquireAsync(repository, cancellationToken).ConfigureAwait(false);
        try
        {
            return await CreateLeasedAsync(nbd, export, tracking, lease, lease.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new BackupLeaseLostException("the backup stopped before its manifest: its lease on the repository could not be refreshed, so a garbage collection may have started; run it again (stored chunks are kept)");
        }
    }

    private async Task<BackupSummary> CreateLeasedAsync(EndPoint nbd, string export, BackupTracking? tracking, BackupLease lease, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        DateTimeOffset created = DateTimeOffset.UtcNow;
        string id = Manifest.NewId(created);
        Manifest? previous = tracking is null ? null : await LatestTrackedAsync(export, cancellationToken).ConfigureAwait(false);
        string? bitmap = tracking?.BitmapFor(repository.Info.Id, id);
        if (tracking is not null)
        {
            // Before any byte is read: a write after this point is in the next backup.
            await tracking.Admin.AddAsync(export, bitmap!, cancellationToken).ConfigureAwait(false);
        }
        var warnings = new List<string>();
        BackupSummary summary;
        try
        {
            summary = await BackUpAsync(nbd, export, id, created, tracking, previous, bitmap, clock, warnings, cancellationToken).ConfigureAwait(false);
        }
        catch when (tracking is not null)
        {
            // No manifest names this bitmap, so nothing would ever read or remove it.
            try
            {
                using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                await tracking.Admin.RemoveAsync(export, bitmap!, timeout.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is BackupSourceException or OperationCanceledException)
            {
                // The backup's own error is what the user needs; the bitmap is listed by `gateway bitmap list`.
            }
            throw;
        }
        if (tracking is not null && previous?.Bitmap is { } old)
        {
            // The new manifest and bitmap replace the old pair; the old bitmap would only cost writes.
            try
            {
                await tracking.Admin.RemoveAsync(export, old, cancellationToken).ConfigureAwait(false);
            }
            catch (BackupSourceException e)
            {
                warnings.Add($"could not remove the previous backup's bitmap '{old}' (remove it with gateway bitmap remove): {e.Message}");
            }
        }
        if (tracking is not null && repository.Info.Id is { } repositoryId)
        {
            await RemoveOrphanedBitmapsAsync(export, tracking, tracking.OwnedPrefix(repositoryId), bitmap!, lease, warnings, cancellationToken).ConfigureAwait(false);
        }
        return summary;
    }

    /// <summary>
    /// A create killed before its manifest (kill -9, a lost node) leaves its bitmap on the export,
    /// where it would mark every write forever. Once this backup's manifest names its own bitmap,
    /// every other bitmap of this prefix and repository on the export is such a leftover, unless
    /// another create into this repository is running now (a live lease besides this one): then
    /// they are left for the next create. Another repository's bitmaps have another id in their names.
    /// </summary>
    private async Task RemoveOrphanedBitmapsAsync(string export, BackupTracking tracking, string owned, string current, BackupLease lease,
        List<string> warnings, CancellationToken cancellationToken)
    {
        try
        {
            IReadOnlyList<LeaseMarker> running = await BackupLease.ListLiveAsync(repository.Store, repository.Leases, LeaseKind.Backup, cancellationToken).ConfigureAwait(false);
            if (running.Any(m => m.Id != lease.Marker.Id))
            {
                return;
            }
            foreach (TrackedBitmap orphan in (await tracking.Admin.ListAsync(export, cancellationToken).ConfigureAwait(false))
                .Where(b => b.Name.StartsWith(owned, StringComparison.Ordinal) && b.Name != current))
            {
                await tracking.Admin.RemoveAsync(export, orphan.Name, cancellationToken).ConfigureAwait(false);
                warnings.Add($"removed bitmap '{orphan.Name}', left on the export by a backup into this repository that did not finish");
            }
        }
        catch (BackupSourceException e)
        {
            warnings.Add($"could not look for bitmaps left by unfinished backups (list them with gateway bitmap list): {e.Message}");
        }
    }

    /// <summary>The newest backup of <paramref name="export"/> in this repository that names a bitmap, or null.</summary>
    private async Task<Manifest?> LatestTrackedAsync(string export, CancellationToken cancellationToken)
    {
        IReadOnlyList<string> ids = await repository.ListIdsAsync(cancellationToken).ConfigureAwait(false);
        // Ids sort by time: the newest first, and stop at this export's newest.
        foreach (string candidate in ids.OrderDescending(StringComparer.Ordinal))
        {
            Manifest manifest = await repository.GetManifestAsync(candidate, cancellationToken).ConfigureAwait(false);
            // A backup made without tracking (--no-bitmap) leaves the newest tracked one's bitmap
            // running, and that still marks everything since then.
            if (manifest.Export == export && manifest.Bitmap is not null)
            {
                return manifest;
            }
        }
        return null;
    }

    private async Task<BackupSummary> BackUpAsync(EndPoint nbd, string export, string id, DateTimeOffset created, BackupTracking? tracking,
        Manifest? previous, string? bitmap, Stopwatch clock, List<string> warnings, CancellationToken cancellationToken)
    {
        await using PeerNbdClient client = await PeerNbdClient.ConnectAsync(nbd, export, cancellationToken).ConfigureAwait(false);
        long diskSize = client.Info.Size;
        int chunkSize = repository.ChunkSize;
        long count = Manifest.ChunkCount(diskSize, chunkSize);
        if (count > int.MaxValue)
        {
            throw new BackupFormatException($"export '{export}' has {count} chunks of {chunkSize} bytes, more than a manifest holds");
        }
        var entries = new ChunkEntry[count];
        var shape = new Manifest(Manifest.CurrentVersion, id, export, diskSize, chunkSize, created, entries, bitmap);

        string? fullBecause = tracking is null ? null
            : await WhyFullAsync(client, tracking, export, previous, diskSize, cancellationToken).ConfigureAwait(false);
        bool incremental = tracking is not null && fullBecause is null;
        // Inside a chunk that is only partly dirty, only the dirty ranges are read from the export;
        // the rest comes from the previous backup's chunk (the bitmap vouches that it is unchanged).
        var parts = new Dictionary<int, List<(int Start, int Length)>>();
        bool[] dirty = incremental
            ? await DirtyChunksAsync(client, previous!, shape, parts, cancellationToken).ConfigureAwait(false)
            : [.. Enumerable.Repeat(true, entries.Length)];
        if (incremental)
        {
            await RereadMissingAsync(previous!, dirty, warnings, cancellationToken).ConfigureAwait(false);
        }
        long bytesDirty = 0, unchanged = 0;
        for (int i = 0; i < entries.Length; i++)
        {
            if (dirty[i])
            {
                bytesDirty += shape.Range(i).Length;
            }
            else
            {
                entries[i] = previous!.Chunks[i];
                unchanged++;
            }
        }
        await ClassifyAsync(client, shape, dirty, cancellationToken).ConfigureAwait(false);

        long read = 0, fromPrevious = 0, deduplicated = 0, uploaded = 0, chunksNew = 0, chunksReused = 0;
        int[] toRead = [.. Enumerable.Range(0, entries.Length).Where(i => entries[i] is null)];
        long bytesToRead = toRead.Sum(i => (long)(parts.TryGetValue(i, out List<(int, int Length)>? p) ? p.Sum(r => r.Length) : shape.Range(i).Length));
        Progress?.Report(new BackupProgress(bytesToRead, 0));
        var options = new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = cancellationToken };
        await Parallel.ForEachAsync(toRead, options, async (index, ct) =>
        {
            (long offset, int length) = shape.Range(index);
            byte[] buffer = ArrayPool<byte>.Shared.Rent(length);
            try
            {
                Memory<byte> data = buffer.AsMemory(0, length);
                long bytes = parts.TryGetValue(index, out List<(int Start, int Length)>? dirtyParts)
                    && await ReadPreviousAsync(previous!.Chunks[index], data, ct).ConfigureAwait(false)
                    ? await ReadPartsAsync(client, offset, data, dirtyParts, ct).ConfigureAwait(false)
                    : 0;
                if (bytes > 0)
                {
                    Interlocked.Add(ref fromPrevious, length - bytes);
                }
                else
                {
                    await client.ReadAsync(offset, data, ct).ConfigureAwait(false);
                    bytes = length;
                }
                long done = Interlocked.Add(ref read, bytes);
                Progress?.Report(new BackupProgress(bytesToRead, done));
                if (!data.Span.ContainsAnyExcept((byte)0))
                {
                    entries[index] = ChunkEntry.Zero;
                    return;
                }
                string sha256 = BackupRepository.Hash(data.Span);
                entries[index] = new ChunkEntry(ChunkKind.Data, sha256);
                (long stored, bool replaced) = await repository.StoreChunkAsync(sha256, data, ct).ConfigureAwait(false);
                if (replaced)
                {
                    lock (warnings)
                    {
                        warnings.Add($"chunk {sha256} (disk offset {offset}) was in the repository damaged, as an interrupted upload to a store without atomic writes leaves it; stored again");
                    }
                }
                if (stored > 0)
                {
                    Interlocked.Increment(ref chunksNew);
                    Interlocked.Add(ref uploaded, stored);
                }
                else
                {
                    Interlocked.Increment(ref chunksReused);
                    Interlocked.Add(ref deduplicated, length);
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }).ConfigureAwait(false);

        await repository.PutManifestAsync(shape, cancellationToken).ConfigureAwait(false);

        long zero = 0, hole = 0, chunksZero = 0, chunksHole = 0;
        for (int i = 0; i < entries.Length; i++)
        {
            int length = shape.Range(i).Length;
            switch (entries[i].Kind)
            {
                case ChunkKind.Zero:
                    zero += length;
                    chunksZero++;
                    break;
                case ChunkKind.Hole:
                    hole += length;
                    chunksHole++;
                    break;
            }
        }
        return new BackupSummary(id, export, incremental, incremental ? previous!.Id : null, fullBecause, bitmap,
            diskSize, bytesDirty, read, fromPrevious, zero, hole, deduplicated, uploaded, unchanged, chunksNew, chunksReused, chunksZero, chunksHole,
            Math.Round(clock.Elapsed.TotalSeconds, 3), warnings);
    }

    /// <summary>
    /// A clean chunk is taken from the previous manifest, so its stored chunk must still be there:
    /// one that is not (deleted, or lost with a disk) is read again rather than named by a second
    /// manifest that could not be restored.
    /// </summary>
    private async Task RereadMissingAsync(Manifest previous, bool[] dirty, List<string> warnings, CancellationToken cancellationToken)
    {
        var kept = new Dictionary<string, List<int>>(StringComparer.Ordinal);
        for (int i = 0; i < dirty.Length; i++)
        {
            if (!dirty[i] && previous.Chunks[i] is { Kind: ChunkKind.Data, Sha256: { } sha })
            {
                (kept.TryGetValue(sha, out List<int>? indexes) ? indexes : kept[sha] = []).Add(i);
            }
        }
        var options = new ParallelOptions { MaxDegreeOfParallelism = Math.Max(Parallelism, 8), CancellationToken = cancellationToken };
        var missing = new System.Collections.Concurrent.ConcurrentBag<string>();
        await Parallel.ForEachAsync(kept.Keys, options, async (sha, ct) =>
        {
            if (!await repository.HasChunkAsync(sha, ct).ConfigureAwait(false))
            {
                missing.Add(sha);
            }
        }).ConfigureAwait(false);
        foreach (string sha in missing.Order(StringComparer.Ordinal))
        {
            foreach (int i in kept[sha])
            {
                dirty[i] = true;
            }
            warnings.Add($"chunk {sha} of backup {previous.Id} (disk offset {(long)kept[sha][0] * previous.ChunkSize}) is missing from the repository; read again");
        }
    }

    /// <summary>Null when the previous backup's bitmap can say what changed since it; otherwise why everything is read.</summary>
    private static async Task<string?> WhyFullAsync(PeerNbdClient client, BackupTracking tracking, string export, Manifest? previous, long diskSize, CancellationToken cancellationToken)
    {
        if (previous?.Bitmap is not { } name)
        {
            return "no earlier backup of this export in this repository";
        }
        if (diskSize < previous.DiskSize)
        {
            return $"the export shrank from {previous.DiskSize} to {diskSize} bytes since backup {previous.Id}";
        }
        IReadOnlyList<TrackedBitmap> bitmaps = await tracking.Admin.ListAsync(export, cancellationToken).ConfigureAwait(false);
        TrackedBitmap? tracked = bitmaps.FirstOrDefault(b => b.Name == name);
        if (tracked is null)
        {
            return $"bitmap '{name}' of backup {previous.Id} is gone";
        }
        if (!tracked.Enabled)
        {
            return $"bitmap '{name}' of backup {previous.Id} was disabled, so it may have missed writes";
        }
        if (!client.MetaContexts.Contains(DirtyBitmapContext.Prefix + name))
        {
            return $"the NBD server does not offer {DirtyBitmapContext.Prefix}{name}";
        }
        return null;
    }

    /// <summary>
    /// The chunks the previous backup's bitmap marks (any dirty byte), and every chunk past the
    /// previous disk's end or longer than it was (the export grew).
    /// </summary>
    private static async Task<bool[]> DirtyChunksAsync(PeerNbdClient client, Manifest previous, Manifest shape,
        Dictionary<int, List<(int Start, int Length)>> parts, CancellationToken cancellationToken)
    {
        int count = shape.Chunks.Count, chunkSize = shape.ChunkSize;
        bool[] dirty = new bool[count];
        for (int i = 0; i < count; i++)
        {
            dirty[i] = i >= previous.Chunks.Count || previous.Range(i).Length != shape.Range(i).Length;
        }
        await ChunkMap.MarkDirtyAsync(client, DirtyBitmapContext.Prefix + previous.Bitmap, previous.DiskSize, chunkSize, dirty, cancellationToken, parts).ConfigureAwait(false);
        // A chunk that grew has bytes no previous chunk holds: it is read whole.
        foreach (int grown in parts.Keys.Where(i => i >= previous.Chunks.Count || previous.Range(i).Length != shape.Range(i).Length).ToArray())
        {
            parts.Remove(grown);
        }
        return dirty;
    }

    /// <summary>
    /// The previous backup's bytes of a chunk into <paramref name="data"/>: zeros for a hole or zero
    /// chunk, the stored chunk for data. False when that chunk cannot be read (missing or corrupt):
    /// the caller then reads the whole chunk from the export.
    /// </summary>
    private async Task<bool> ReadPreviousAsync(ChunkEntry previous, Memory<byte> data, CancellationToken cancellationToken)
    {
        if (previous.Kind != ChunkKind.Data)
        {
            data.Span.Clear();
            return true;
        }
        try
        {
            await repository.ReadChunkAsync(previous.Sha256!, data, cancellationToken).ConfigureAwait(false);
            return true;
        }
        catch (BackupCorruptException)
        {
            return false;
        }
    }

    /// <summary>The dirty ranges of a chunk from the export over the previous bytes; returns the bytes read.</summary>
    private static async Task<long> ReadPartsAsync(PeerNbdClient client, long offset, Memory<byte> data, List<(int Start, int Length)> parts, CancellationToken cancellationToken)
    {
        long bytes = 0;
        foreach ((int start, int length) in parts)
        {
            await client.ReadAsync(offset + start, data.Slice(start, length), cancellationToken).ConfigureAwait(false);
            bytes += length;
        }
        return bytes;
    }

    /// <summary>
    /// Hole and zero chunks among the <paramref name="dirty"/> ones, from base:allocation asked only
    /// over runs of dirty chunks: a chunk all of whose extents are holes is a hole, one all of whose
    /// extents read as zeros is a zero chunk; the others stay null and are read. A server without
    /// base:allocation gets every dirty chunk read.
    /// </summary>
    private static async Task ClassifyAsync(PeerNbdClient client, Manifest shape, bool[] dirty, CancellationToken cancellationToken)
    {
        if (!client.MetaContexts.Contains(AllocationContext))
        {
            return;
        }
        int count = dirty.Length, chunkSize = shape.ChunkSize;
        var entries = (ChunkEntry[])shape.Chunks;
        bool[] notHole = new bool[count], notZero = new bool[count];
        for (int first = 0; first < count; first++)
        {
            if (!dirty[first])
            {
                continue;
            }
            int end = first;
            while (end < count && dirty[end])
            {
                end++;
            }
            long start = (long)first * chunkSize, stop = Math.Min((long)end * chunkSize, shape.DiskSize);
            await client.WalkExtentsAsync(AllocationContext, start, stop, (offset, extent, status) =>
            {
                for (long chunk = offset / chunkSize; chunk < count && chunk * chunkSize < offset + extent; chunk++)
                {
                    // HOLE alone does not promise zeros (proto.md): a hole chunk is HOLE and ZERO throughout.
                    notHole[chunk] |= (status & (StateHole | StateZero)) != (StateHole | StateZero);
                    notZero[chunk] |= (status & StateZero) == 0;
                }
            }, cancellationToken).ConfigureAwait(false);
            for (int i = first; i < end; i++)
            {
                entries[i] = !notHole[i] ? ChunkEntry.Hole : !notZero[i] ? ChunkEntry.Zero : null!;
            }
            first = end;
        }
    }
}
