using System.Buffers;
using System.Diagnostics;
using System.Net;
using System.Text.Json.Serialization;
using Gateway.Actors.Cluster;
using Gateway.Nbd;

namespace Gateway.Backup;

/// <summary>What <c>gateway backup create</c> did (its <c>--json</c> summary).</summary>
public sealed record BackupSummary(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("export")] string Export,
    [property: JsonPropertyName("bytesTotal")] long BytesTotal,
    [property: JsonPropertyName("bytesRead")] long BytesRead,
    [property: JsonPropertyName("bytesZero")] long BytesZero,
    [property: JsonPropertyName("bytesHole")] long BytesHole,
    [property: JsonPropertyName("bytesDeduplicated")] long BytesDeduplicated,
    [property: JsonPropertyName("bytesUploaded")] long BytesUploaded,
    [property: JsonPropertyName("chunksNew")] long ChunksNew,
    [property: JsonPropertyName("chunksReused")] long ChunksReused,
    [property: JsonPropertyName("chunksZero")] long ChunksZero,
    [property: JsonPropertyName("chunksHole")] long ChunksHole,
    [property: JsonPropertyName("seconds")] double Seconds);

/// <summary>
/// Makes a backup of an export over NBD, like any client: base:allocation says which chunks are
/// holes or zeros (not read), the rest are read a few at a time, hashed, and stored unless the
/// repository has them already; the manifest is stored last. A run that stops half-way leaves
/// chunks and no manifest, and the next run finds those chunks and skips them.
/// </summary>
public sealed class BackupCreator(BackupRepository repository)
{
    private const uint StateHole = (uint)AllocationState.Hole, StateZero = (uint)AllocationState.Zero;

    private const string AllocationContext = "base:allocation";

    /// <summary>Chunks read, hashed and stored at once; memory is about this many chunk buffers.</summary>
    public int Parallelism { get; init; } = 4;

    public async Task<BackupSummary> CreateAsync(EndPoint nbd, string export, CancellationToken cancellationToken)
    {
        // Upkeep hook (BackupLease): the lease before any chunk is looked at; its token stops the run if the lease lapses.
        await using BackupLease lease = await BackupLease.AcquireAsync(repository, cancellationToken).ConfigureAwait(false);
        cancellationToken = lease.Token;
        var clock = Stopwatch.StartNew();
        DateTimeOffset created = DateTimeOffset.UtcNow;
        await using PeerNbdClient client = await PeerNbdClient.ConnectAsync(nbd, export, cancellationToken).ConfigureAwait(false);
        long diskSize = client.Info.Size;
        int chunkSize = repository.ChunkSize;
        long count = Manifest.ChunkCount(diskSize, chunkSize);
        if (count > int.MaxValue)
        {
            throw new BackupFormatException($"export '{export}' has {count} chunks of {chunkSize} bytes, more than a manifest holds");
        }
        ChunkEntry[] entries = await ClassifyAsync(client, diskSize, chunkSize, (int)count, cancellationToken).ConfigureAwait(false);

        long read = 0, deduplicated = 0, uploaded = 0, chunksNew = 0, chunksReused = 0;
        int[] toRead = [.. Enumerable.Range(0, entries.Length).Where(i => entries[i] is null)];
        var options = new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = cancellationToken };
        await Parallel.ForEachAsync(toRead, options, async (index, ct) =>
        {
            long offset = (long)index * chunkSize;
            int length = (int)Math.Min(chunkSize, diskSize - offset);
            byte[] buffer = ArrayPool<byte>.Shared.Rent(length);
            try
            {
                Memory<byte> data = buffer.AsMemory(0, length);
                await client.ReadAsync(offset, data, ct).ConfigureAwait(false);
                Interlocked.Add(ref read, length);
                if (!data.Span.ContainsAnyExcept((byte)0))
                {
                    entries[index] = ChunkEntry.Zero;
                    return;
                }
                string sha256 = BackupRepository.Hash(data.Span);
                entries[index] = new ChunkEntry(ChunkKind.Data, sha256);
                long stored = await repository.HasChunkAsync(sha256, ct).ConfigureAwait(false) ? 0
                    : await repository.PutChunkAsync(sha256, data, ct).ConfigureAwait(false);
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

        var manifest = new Manifest(Manifest.CurrentVersion, Manifest.NewId(created), export, diskSize, chunkSize, created, entries);
        await repository.PutManifestAsync(manifest, cancellationToken).ConfigureAwait(false);

        long zero = 0, hole = 0, chunksZero = 0, chunksHole = 0;
        for (int i = 0; i < entries.Length; i++)
        {
            (_, int length) = manifest.Range(i);
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
        return new BackupSummary(manifest.Id, export, diskSize, read, zero, hole, deduplicated, uploaded,
            chunksNew, chunksReused, chunksZero, chunksHole, Math.Round(clock.Elapsed.TotalSeconds, 3));
    }

    /// <summary>
    /// Hole and zero chunks from base:allocation: a chunk all of whose extents are holes is a
    /// hole, one all of whose extents read as zeros is a zero chunk; the others (null) are read.
    /// A server without base:allocation gets every chunk read.
    /// </summary>
    private static async Task<ChunkEntry[]> ClassifyAsync(PeerNbdClient client, long diskSize, int chunkSize, int count, CancellationToken cancellationToken)
    {
        var entries = new ChunkEntry[count];
        if (!client.MetaContexts.Contains(AllocationContext))
        {
            return entries;
        }
        bool[] notHole = new bool[count], notZero = new bool[count];
        await client.WalkExtentsAsync(AllocationContext, 0, diskSize, (offset, extent, status) =>
        {
            for (long chunk = offset / chunkSize; chunk < count && chunk * chunkSize < offset + extent; chunk++)
            {
                // HOLE alone does not promise zeros (proto.md): a hole chunk is HOLE and ZERO throughout.
                notHole[chunk] |= (status & (StateHole | StateZero)) != (StateHole | StateZero);
                notZero[chunk] |= (status & StateZero) == 0;
            }
        }, cancellationToken).ConfigureAwait(false);
        for (int i = 0; i < count; i++)
        {
            entries[i] = !notHole[i] ? ChunkEntry.Hole : !notZero[i] ? ChunkEntry.Zero : null!;
        }
        return entries;
    }
}
