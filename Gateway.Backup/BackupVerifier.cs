using System.Buffers;
using System.Collections.Concurrent;

namespace Gateway.Backup;

/// <summary>One chunk of a backup that cannot be restored, with the disk ranges that need it.</summary>
public sealed record ChunkProblem(string Sha256, string Problem, IReadOnlyList<(long Offset, long Length)> Ranges)
{
    public override string ToString() =>
        $"chunk {Sha256}: {Problem}; disk offsets {string.Join(", ", Ranges.Select(r => $"{r.Offset}+{r.Length}"))}";
}

/// <summary>
/// Checks a backup against its repository: every data chunk it names is present, decompresses
/// to the chunk's length and hashes to its name. Each distinct chunk is read once.
/// </summary>
public sealed class BackupVerifier(BackupRepository repository)
{
    public int Parallelism { get; init; } = 4;

    /// <returns>The chunks that are missing or corrupt; empty if the backup is whole.</returns>
    public async Task<IReadOnlyList<ChunkProblem>> VerifyAsync(string id, CancellationToken cancellationToken)
    {
        Manifest manifest = await repository.GetManifestAsync(id, cancellationToken).ConfigureAwait(false);
        var uses = new Dictionary<string, List<(long Offset, long Length)>>(StringComparer.Ordinal);
        for (int i = 0; i < manifest.Chunks.Count; i++)
        {
            if (manifest.Chunks[i] is { Kind: ChunkKind.Data, Sha256: { } sha256 })
            {
                (long offset, int length) = manifest.Range(i);
                if (!uses.TryGetValue(sha256, out List<(long, long)>? ranges))
                {
                    uses[sha256] = ranges = [];
                }
                ranges.Add((offset, length));
            }
        }
        var problems = new ConcurrentBag<ChunkProblem>();
        var options = new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = cancellationToken };
        await Parallel.ForEachAsync(uses, options, async (use, ct) =>
        {
            int length = (int)use.Value[0].Length;
            byte[] buffer = ArrayPool<byte>.Shared.Rent(length);
            try
            {
                await repository.ReadChunkAsync(use.Key, buffer.AsMemory(0, length), ct).ConfigureAwait(false);
            }
            catch (BackupCorruptException e)
            {
                problems.Add(new ChunkProblem(use.Key, e.Message, use.Value));
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }).ConfigureAwait(false);
        return [.. problems.OrderBy(p => p.Ranges[0].Offset)];
    }
}
