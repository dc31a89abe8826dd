using System.Buffers;
using System.Net;
using System.Net.Sockets;
using Gateway.Actors.Cluster;
using Gateway.Backends;
using Microsoft.Win32.SafeHandles;

namespace Gateway.Backup;

/// <summary>The image format of <c>restore --to-file</c>.</summary>
public enum RestoreFormat
{
    Raw,
    Qcow2,
}

/// <summary>What a restore wrote.</summary>
public sealed record RestoreSummary(string Id, long DiskSize, long BytesWritten, long ChunksData, double Seconds);

/// <summary>
/// Restores a backup from its manifest alone (every backup is full, so never a chain) into a
/// raw or qcow2 file or a new export: a new file is made at the disk's size (a new export reads
/// as zeros already), so holes and zero chunks are holes without a write; data chunks are checked
/// against their hash as they are written, and their all-zero 64 KiB blocks are not written.
/// </summary>
public sealed class BackupRestore(BackupRepository repository)
{
    /// <summary>The unit in which zeros inside a data chunk are left as holes (the file systems' block, and more).</summary>
    private const int SparseBlock = 64 * 1024;

    public int Parallelism { get; init; } = 4;

    /// <summary>
    /// Into <paramref name="file"/>, a raw or qcow2 image, made beside it under a temporary name and
    /// renamed over it only when whole: a restore that fails leaves the file as it was (or absent).
    /// A link is followed (<see cref="RestoreTarget"/>).
    /// </summary>
    /// <exception cref="ArgumentException">The target is a device, a folder or another non-regular file.</exception>
    /// <exception cref="BackupCorruptException">A chunk is missing or corrupt: the message names the disk offset.</exception>
    /// <exception cref="IOException">The file system (full, say), or qemu-img / qemu-nbd for qcow2.</exception>
    public async Task<RestoreSummary> ToFileAsync(string id, string file, RestoreFormat format, CancellationToken cancellationToken)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        file = RestoreTarget.Resolve(file);
        Manifest manifest = await repository.GetManifestAsync(id, cancellationToken).ConfigureAwait(false);
        string temp = Path.Combine(Path.GetDirectoryName(file)!, $".restore-{Guid.NewGuid():N}-{Path.GetFileName(file)}");
        try
        {
            (long written, long chunks) = format == RestoreFormat.Qcow2
                ? await ToQcow2Async(manifest, temp, cancellationToken).ConfigureAwait(false)
                : await ToRawAsync(manifest, temp, cancellationToken).ConfigureAwait(false);
            File.Move(temp, file, overwrite: true);
            return new RestoreSummary(id, manifest.DiskSize, written, chunks, Math.Round(clock.Elapsed.TotalSeconds, 3));
        }
        finally
        {
            File.Delete(temp);
        }
    }

    /// <summary>A new sparse file of the disk's size: what the backup calls a hole or zeros reads as zeros without a write, and stays unallocated.</summary>
    private async Task<(long Written, long Chunks)> ToRawAsync(Manifest manifest, string file, CancellationToken cancellationToken)
    {
        long written = 0, chunks = 0;
        using (SafeFileHandle handle = File.OpenHandle(file, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, FileOptions.Asynchronous))
        {
            RandomAccess.SetLength(handle, manifest.DiskSize);
            await ForEachDataChunkAsync(manifest, async (bytes, offset, ct) =>
            {
                Interlocked.Add(ref written, await WriteAllocatedAsync((block, at, c) => RandomAccess.WriteAsync(handle, block, at, c), bytes, offset, ct).ConfigureAwait(false));
                Interlocked.Increment(ref chunks);
            }, cancellationToken).ConfigureAwait(false);
            RandomAccess.FlushToDisk(handle);
        }
        return (written, chunks);
    }

    /// <summary>
    /// A new qcow2 image (<c>qemu-img create</c>), written over NBD through <c>qemu-nbd</c> on a
    /// private unix socket like an export: one pass, no raw copy on the way, and the clusters the
    /// backup calls holes or zeros are never allocated. qemu-nbd exits when the restore disconnects.
    /// </summary>
    private async Task<(long Written, long Chunks)> ToQcow2Async(Manifest manifest, string image, CancellationToken cancellationToken)
    {
        await QemuTools.RunAsync("qemu-img", ["create", "-q", "-f", "qcow2", image, manifest.DiskSize.ToString(System.Globalization.CultureInfo.InvariantCulture)], cancellationToken).ConfigureAwait(false);
        string socket = Path.Combine(Path.GetTempPath(), $"gateway-restore-{Guid.NewGuid():N}.sock");
        using QemuTools.Server server = QemuTools.Serve("qemu-nbd", ["--format=qcow2", "--cache=writeback", $"--socket={socket}", "--export-name=restore", image]);
        try
        {
            await server.WaitForSocketAsync(socket, cancellationToken).ConfigureAwait(false);
            (long written, long chunks) = await WriteOverNbdAsync(manifest, new UnixDomainSocketEndPoint(socket), "restore", zeroFirst: false, cancellationToken).ConfigureAwait(false);
            await server.WaitForExitAsync(cancellationToken).ConfigureAwait(false);
            return (written, chunks);
        }
        finally
        {
            File.Delete(socket);
        }
    }

    /// <summary>
    /// Into <paramref name="export"/>, a new export of at least the backup's size that reads as
    /// zeros (<c>gateway backup restore --to-export</c> makes it), over NBD; flushed at the end.
    /// </summary>
    /// <exception cref="BackupCorruptException">A chunk is missing or corrupt: the message names the disk offset.</exception>
    /// <param name="zeroFirst">
    /// The export may not read as zeros (a new export on a backend whose storage could hold older
    /// bytes, such as an S3 prefix): the whole disk is zeroed first (WRITE_ZEROES, which may punch
    /// holes), so what the backup calls a hole or zeros reads as zeros.
    /// </param>
    public async Task<RestoreSummary> ToExportAsync(string id, EndPoint nbd, string export, bool zeroFirst, CancellationToken cancellationToken)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Manifest manifest = await repository.GetManifestAsync(id, cancellationToken).ConfigureAwait(false);
        (long written, long chunks) = await WriteOverNbdAsync(manifest, nbd, export, zeroFirst, cancellationToken).ConfigureAwait(false);
        return new RestoreSummary(id, manifest.DiskSize, written, chunks, Math.Round(clock.Elapsed.TotalSeconds, 3));
    }

    private async Task<(long Written, long Chunks)> WriteOverNbdAsync(Manifest manifest, EndPoint nbd, string export, bool zeroFirst, CancellationToken cancellationToken)
    {
        await using PeerNbdClient client = await PeerNbdClient.ConnectAsync(nbd, export, cancellationToken).ConfigureAwait(false);
        if (client.Info.Size < manifest.DiskSize)
        {
            throw new BackupFormatException($"export '{export}' has {client.Info.Size} bytes, fewer than backup {manifest.Id}'s {manifest.DiskSize}");
        }
        for (long at = 0; zeroFirst && at < manifest.DiskSize; at += 1L << 30)
        {
            await client.ZeroAsync(at, Math.Min(1L << 30, manifest.DiskSize - at), ZeroFlags.None, cancellationToken).ConfigureAwait(false);
        }
        long written = 0, chunks = 0;
        await ForEachDataChunkAsync(manifest, async (bytes, offset, ct) =>
        {
            Interlocked.Add(ref written, await WriteAllocatedAsync((block, at, c) => client.WriteAsync(at, block, fua: false, c), bytes, offset, ct).ConfigureAwait(false));
            Interlocked.Increment(ref chunks);
        }, cancellationToken).ConfigureAwait(false);
        await client.FlushAsync(cancellationToken).ConfigureAwait(false);
        return (written, chunks);
    }

    /// <summary>Every data chunk of <paramref name="manifest"/>, read and checked, <see cref="Parallelism"/> at a time.</summary>
    private async Task ForEachDataChunkAsync(Manifest manifest, Func<ReadOnlyMemory<byte>, long, CancellationToken, Task> write, CancellationToken cancellationToken)
    {
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
                    throw new BackupCorruptException($"backup {manifest.Id}: disk offset {offset} (length {length}): {e.Message}");
                }
                await write(bytes, offset, ct).ConfigureAwait(false);
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }).ConfigureAwait(false);
    }

    /// <summary>The target reads as zeros already, so zero blocks inside a data chunk are left unwritten: they stay holes.</summary>
    private static async Task<long> WriteAllocatedAsync(Func<ReadOnlyMemory<byte>, long, CancellationToken, ValueTask> write, ReadOnlyMemory<byte> chunk, long offset, CancellationToken ct)
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
                await write(chunk[start..end], offset + start, ct).ConfigureAwait(false);
                written += end - start;
                start = -1;
            }
        }
        return written;
    }
}
