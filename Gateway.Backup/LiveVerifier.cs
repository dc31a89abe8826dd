using System.Buffers;
using System.Collections.Concurrent;
using System.Net;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Cluster;

namespace Gateway.Backup;

/// <summary>A clean chunk whose live bytes are not what the backup holds: the first differing disk offset and how many bytes differ.</summary>
public sealed record LiveMismatch(long ChunkOffset, int ChunkLength, long FirstDifference, long BytesDiffering, string Expected)
{
    public override string ToString() =>
        $"disk offsets {ChunkOffset}+{ChunkLength}: the bitmap calls them unchanged since the backup, but {BytesDiffering} bytes differ from {Expected}, the first at disk offset {FirstDifference}";
}

/// <summary>What <c>verify --against-export</c> compared.</summary>
public sealed record LiveVerifyResult(string Bitmap, long BytesCompared, long BytesChanged, IReadOnlyList<LiveMismatch> Mismatches);

/// <summary>
/// Checks a backup against the live export: the backup's bitmap (added at its start, kept until
/// the next backup) marks every write since, so every chunk it leaves clean must read exactly as
/// the backup holds it. A difference there is a write the change tracking missed (or a backup
/// that holds the wrong bytes): the check that nothing else makes. Chunks that turn dirty while
/// they are compared are left out, so a running guest causes no false report.
/// </summary>
public sealed class LiveVerifier(BackupRepository repository)
{
    public int Parallelism { get; init; } = 4;

    /// <exception cref="BackupSourceException">The backup has no bitmap, or it is gone or disabled, or the export shrank.</exception>
    public async Task<LiveVerifyResult> VerifyAsync(string id, EndPoint nbd, string export, IBitmapAdmin admin, CancellationToken cancellationToken)
    {
        Manifest manifest = await repository.GetManifestAsync(id, cancellationToken).ConfigureAwait(false);
        if (manifest.Bitmap is not { } bitmap)
        {
            throw new BackupSourceException($"backup {id} was made without a bitmap (--no-bitmap): nothing says what is unchanged since");
        }
        TrackedBitmap? tracked = (await admin.ListAsync(export, cancellationToken).ConfigureAwait(false)).FirstOrDefault(b => b.Name == bitmap);
        if (tracked is null)
        {
            throw new BackupSourceException($"bitmap '{bitmap}' of backup {id} is not on export '{export}': only the newest backup of an export keeps its bitmap (the next one removes it)");
        }
        if (!tracked.Enabled)
        {
            throw new BackupSourceException($"bitmap '{bitmap}' of backup {id} is disabled: it may have missed writes, so it cannot vouch for anything");
        }
        await using PeerNbdClient client = await PeerNbdClient.ConnectAsync(nbd, export, cancellationToken).ConfigureAwait(false);
        if (client.Info.Size < manifest.DiskSize)
        {
            throw new BackupSourceException($"export '{export}' has {client.Info.Size} bytes, fewer than backup {id}'s {manifest.DiskSize}");
        }
        string context = DirtyBitmapContext.Prefix + bitmap;
        if (!client.MetaContexts.Contains(context))
        {
            throw new BackupSourceException($"the NBD server does not offer {context}");
        }

        bool[] dirty = await DirtyAsync(client, context, manifest, cancellationToken).ConfigureAwait(false);
        long compared = 0;
        var mismatches = new ConcurrentBag<LiveMismatch>();
        var options = new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = cancellationToken };
        await Parallel.ForEachAsync(Enumerable.Range(0, dirty.Length).Where(i => !dirty[i]), options, async (index, ct) =>
        {
            (long offset, int length) = manifest.Range(index);
            byte[] live = ArrayPool<byte>.Shared.Rent(length), held = ArrayPool<byte>.Shared.Rent(length);
            try
            {
                await client.ReadAsync(offset, live.AsMemory(0, length), ct).ConfigureAwait(false);
                Interlocked.Add(ref compared, length);
                ChunkEntry entry = manifest.Chunks[index];
                string expected;
                if (entry.Kind == ChunkKind.Data)
                {
                    if (BackupRepository.Hash(live.AsSpan(0, length)) == entry.Sha256)
                    {
                        return;
                    }
                    await repository.ReadChunkAsync(entry.Sha256!, held.AsMemory(0, length), ct).ConfigureAwait(false);
                    expected = $"chunk {entry.Sha256}";
                }
                else
                {
                    if (!live.AsSpan(0, length).ContainsAnyExcept((byte)0))
                    {
                        return;
                    }
                    held.AsSpan(0, length).Clear();
                    expected = "zeros";
                }
                long first = -1, differing = 0;
                for (int i = 0; i < length; i++)
                {
                    if (live[i] != held[i])
                    {
                        first = first < 0 ? offset + i : first;
                        differing++;
                    }
                }
                mismatches.Add(new LiveMismatch(offset, length, first, differing, expected));
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(live);
                ArrayPool<byte>.Shared.Return(held);
            }
        }).ConfigureAwait(false);

        // A guest may have written a chunk after the map was read: ask again, and drop those.
        bool[] now = mismatches.IsEmpty ? dirty : await DirtyAsync(client, context, manifest, cancellationToken).ConfigureAwait(false);
        LiveMismatch[] real = [.. mismatches.Where(m => !now[(int)(m.ChunkOffset / manifest.ChunkSize)]).OrderBy(m => m.ChunkOffset)];
        long changed = dirty.Select((d, i) => d ? (long)manifest.Range(i).Length : 0).Sum();
        return new LiveVerifyResult(bitmap, compared, changed, real);
    }

    private static async Task<bool[]> DirtyAsync(PeerNbdClient client, string context, Manifest manifest, CancellationToken cancellationToken)
    {
        bool[] dirty = new bool[manifest.Chunks.Count];
        await ChunkMap.MarkDirtyAsync(client, context, manifest.DiskSize, manifest.ChunkSize, dirty, cancellationToken).ConfigureAwait(false);
        return dirty;
    }
}
