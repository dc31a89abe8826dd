using System.Buffers;
using System.Collections.Concurrent;
using System.Text.Json.Serialization;

namespace Gateway.Backup;

/// <summary>What <c>gateway backup check</c> found (its <c>--json</c> report).</summary>
public sealed record CheckReport(
    [property: JsonPropertyName("ok")] bool Ok,
    [property: JsonPropertyName("manifests")] int Manifests,
    [property: JsonPropertyName("chunks")] long Chunks,
    [property: JsonPropertyName("chunksReferenced")] long ChunksReferenced,
    [property: JsonPropertyName("chunksUnreferenced")] long ChunksUnreferenced,
    [property: JsonPropertyName("chunksRead")] long ChunksRead,
    [property: JsonPropertyName("tempFilesInFlight")] int TempFilesInFlight,
    [property: JsonPropertyName("problems")] IReadOnlyList<string> Problems,
    [property: JsonPropertyName("repaired")] IReadOnlyList<string> Repaired);

/// <summary>
/// The repository's consistency: <c>repository.json</c> is valid, every manifest parses and
/// keeps the rules, every chunk a manifest names exists (and with <c>readData</c> decompresses
/// and hashes to its name), every object under <c>chunks/</c> is named like a chunk, and no
/// interrupted write left a temp file. A temp file younger than the lease TTL may be a write
/// in flight (a running backup's), so it is counted, not reported. Unreferenced chunks
/// are counted, not an error (garbage collection removes them).
/// </summary>
public sealed class BackupCheck(IBackupStore store)
{
    public int Parallelism { get; init; } = 4;

    public LeaseOptions Leases { get; init; } = LeaseOptions.Default;

    /// <param name="readData">Read every referenced chunk and check its hash.</param>
    /// <param name="repair">Remove stray temp files (the only repair: nothing else can be rebuilt from the repository).</param>
    public async Task<CheckReport> CheckAsync(bool readData, bool repair, CancellationToken cancellationToken)
    {
        var problems = new List<string>();
        var repaired = new List<string>();
        BackupRepository repository;
        try
        {
            repository = await BackupRepository.OpenAsync(store, cancellationToken).ConfigureAwait(false);
        }
        catch (BackupFormatException e)
        {
            return new CheckReport(false, 0, 0, 0, 0, 0, 0, [e.Message], []);
        }

        // Which chunk each data entry names, with the first place that needs it (for the messages) and its length.
        var needed = new Dictionary<string, (string Where, int Length)>(StringComparer.Ordinal);
        List<string> ids = await repository.ListIdsAsync(cancellationToken).ConfigureAwait(false);
        await foreach (string key in store.ListAsync(BackupRepository.BackupsPrefix, cancellationToken).ConfigureAwait(false))
        {
            if (!key.EndsWith(".json", StringComparison.Ordinal))
            {
                problems.Add($"{key}: not a manifest (a manifest is backups/<id>.json)");
            }
        }
        int manifests = 0;
        foreach (string id in ids)
        {
            Manifest manifest;
            try
            {
                manifest = await repository.GetManifestAsync(id, cancellationToken).ConfigureAwait(false);
            }
            catch (BackupFormatException e)
            {
                problems.Add(e.Message.StartsWith("backup ", StringComparison.Ordinal) ? e.Message : $"backup {id}: {e.Message}");
                continue;
            }
            manifests++;
            for (int i = 0; i < manifest.Chunks.Count; i++)
            {
                if (manifest.Chunks[i] is { Kind: ChunkKind.Data, Sha256: { } sha256 } && !needed.ContainsKey(sha256))
                {
                    (long offset, int length) = manifest.Range(i);
                    needed[sha256] = ($"backup {id} disk offset {offset}", length);
                }
            }
        }

        var present = new HashSet<string>(StringComparer.Ordinal);
        await foreach (StoredObject stored in store.ListObjectsAsync(BackupRepository.ChunksPrefix, cancellationToken).ConfigureAwait(false))
        {
            if (BackupRepository.ChunkHashOf(stored.Key) is { } sha256)
            {
                present.Add(sha256);
            }
            else
            {
                problems.Add($"{stored.Key}: not a chunk (a chunk is chunks/<2 hex>/<64 hex of its SHA-256>)");
            }
        }
        foreach ((string sha256, (string where, _)) in needed.Where(n => !present.Contains(n.Key)).OrderBy(n => n.Value.Where, StringComparer.Ordinal))
        {
            problems.Add($"chunk {sha256} is missing ({where} needs it)");
        }

        long read = 0;
        if (readData)
        {
            var corrupt = new ConcurrentBag<string>();
            var options = new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = cancellationToken };
            await Parallel.ForEachAsync(needed.Where(n => present.Contains(n.Key)), options, async (use, ct) =>
            {
                byte[] buffer = ArrayPool<byte>.Shared.Rent(use.Value.Length);
                try
                {
                    await repository.ReadChunkAsync(use.Key, buffer.AsMemory(0, use.Value.Length), ct).ConfigureAwait(false);
                    Interlocked.Increment(ref read);
                }
                catch (BackupCorruptException e)
                {
                    corrupt.Add($"{e.Message} ({use.Value.Where} needs it)");
                }
                finally
                {
                    ArrayPool<byte>.Shared.Return(buffer);
                }
            }).ConfigureAwait(false);
            problems.AddRange(corrupt.Order(StringComparer.Ordinal));
        }

        // A temp file written within the last lease TTL may be a write in flight (of a backup, or
        // of a lease marker before the lease exists); an older one was left by an interrupted write,
        // as a holder that has not written for that long has lost its lease anyway.
        DateTimeOffset inFlightSince = Leases.Time.GetUtcNow() - Leases.Ttl - Leases.ClockSkew;
        int inFlight = 0;
        await foreach (StoredObject temp in store.ListIncompleteAsync(cancellationToken).ConfigureAwait(false))
        {
            if (temp.LastModified >= inFlightSince)
            {
                inFlight++;
            }
            else if (repair)
            {
                await store.DeleteIncompleteAsync(temp.Key, cancellationToken).ConfigureAwait(false);
                repaired.Add($"{temp.Key}: removed a temp file an interrupted write left ({temp.Size} bytes, {temp.LastModified:O})");
            }
            else
            {
                problems.Add($"{temp.Key}: a temp file an interrupted write left ({temp.Size} bytes, {temp.LastModified:O}); --repair removes it");
            }
        }

        return new CheckReport(problems.Count == 0, manifests, present.Count, needed.Keys.Count(present.Contains),
            present.Count(p => !needed.ContainsKey(p)), read, inFlight, problems, repaired);
    }
}
