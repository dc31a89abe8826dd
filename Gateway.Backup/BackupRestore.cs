using System.Buffers;
using Microsoft.Win32.SafeHandles;

namespace Gateway.Backup;

/// <summary>What a restore wrote.</summary>
public sealed record RestoreSummary(string Id, long DiskSize, long BytesWritten, long ChunksData, double Seconds);

/// <summary>
/// Restores a backup from its manifest alone (every backup is full, so never a chain) into a
/// raw file: the file is emptied and set to the disk's size, so holes and zero chunks are holes
/// without a write; data chunks are checked against their hash as they are written.
/// </summary>
public sealed class BackupRestore(BackupRepository repository)
{
    /// <summary>The unit in which zeros inside a data chunk are left as holes (the file systems' block, and more).</summary>
    private const int SparseBlock = 64 * 1024;

    public int Parallelism { get; init; } = 4;

    /// <exception cref="BackupCorruptException">A chunk is missing or corrupt: the message names the disk offset; a file this call created is removed.</exception>
    public async Task<RestoreSummary> ToFileAsync(string id, string file, CancellationToken cancellationToken)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Manifest manifest = await repository.GetManifestAsync(id, cancellationToken).ConfigureAwait(false);
        bool existed = File.Exists(file);
        long written = 0, chunks = 0;
        try
        {
            using (SafeFileHandle handle = File.OpenHandle(file, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None, FileOptions.Asynchronous))
            {
                // Truncating to nothing first drops whatever the file held: what the backup calls
                // a hole or zeros reads as zeros without writing them, and stays unallocated.
                RandomAccess.SetLength(handle, 0);
                RandomAccess.SetLength(handle, manifest.DiskSize);
                IEnumerable<int> data = Enumerable.Range(0, manifest.Chunks.Count).Where(i => manifest.Chunks[i].Kind == ChunkKind.Data);
                var options = new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = cancellationToken };
                await Parallel.ForEachAsync(data, options, async (index, ct) =>
                {
                    (long offset, int length) = manifest.Range(index);
                    byte[] buffer = ArrayPool<byte>.Shared.Rent(length);
                    try
                    {
                        Memory<byte> bytes = buffer.AsMemory(0, length);
                        try
                        {
                            await repository.ReadChunkAsync(manifest.Chunks[index].Sha256!, bytes, ct).ConfigureAwait(false);
                        }
                        catch (BackupCorruptException e)
                        {
                            throw new BackupCorruptException($"backup {id}: disk offset {offset} (length {length}): {e.Message}");
                        }
                        Interlocked.Add(ref written, await WriteAllocatedAsync(handle, bytes, offset, ct).ConfigureAwait(false));
                        Interlocked.Increment(ref chunks);
                    }
                    finally
                    {
                        ArrayPool<byte>.Shared.Return(buffer);
                    }
                }).ConfigureAwait(false);
                RandomAccess.FlushToDisk(handle);
            }
        }
        catch when (!existed)
        {
            File.Delete(file);
            throw;
        }
        return new RestoreSummary(id, manifest.DiskSize, written, chunks, Math.Round(clock.Elapsed.TotalSeconds, 3));
    }

    /// <summary>The file was emptied first, so zero blocks inside a data chunk are left unwritten: they stay holes.</summary>
    private static async Task<long> WriteAllocatedAsync(SafeFileHandle handle, ReadOnlyMemory<byte> chunk, long offset, CancellationToken ct)
    {
        long written = 0;
        int start = -1;
        for (int at = 0; at <= chunk.Length; at += SparseBlock)
        {
            bool data = at < chunk.Length && chunk.Span.Slice(at, Math.Min(SparseBlock, chunk.Length - at)).ContainsAnyExcept((byte)0);
            if (data && start < 0)
            {
                start = at;
            }
            else if (!data && start >= 0)
            {
                int end = Math.Min(at, chunk.Length);
                await RandomAccess.WriteAsync(handle, chunk[start..end], offset + start, ct).ConfigureAwait(false);
                written += end - start;
                start = -1;
            }
        }
        return written;
    }
}
