using Gateway.Actors.Bitmaps;
using Gateway.Actors.Cluster;

namespace Gateway.Backup;

/// <summary>Dirty bitmaps seen per chunk of a manifest.</summary>
internal static class ChunkMap
{
    /// <summary>
    /// Sets <paramref name="dirty"/>[i] for every chunk with a dirty byte in <paramref name="context"/>
    /// (a <c>qemu:dirty-bitmap:</c> context) over [0, <paramref name="end"/>); with
    /// <paramref name="parts"/>, also the dirty ranges inside each chunk (offsets within the chunk).
    /// </summary>
    public static Task MarkDirtyAsync(PeerNbdClient client, string context, long end, int chunkSize, bool[] dirty, CancellationToken cancellationToken,
        Dictionary<int, List<(int Start, int Length)>>? parts = null) =>
        client.WalkExtentsAsync(context, 0, end, (offset, length, status) =>
        {
            if ((status & DirtyBitmapContext.StateDirty) == 0)
            {
                return;
            }
            for (long chunk = offset / chunkSize; chunk < dirty.Length && chunk * chunkSize < offset + length; chunk++)
            {
                dirty[chunk] = true;
                if (parts is not null)
                {
                    long first = chunk * chunkSize;
                    long from = Math.Max(offset, first), to = Math.Min(offset + length, first + chunkSize);
                    (parts.TryGetValue((int)chunk, out List<(int, int)>? list) ? list : parts[(int)chunk] = []).Add(((int)(from - first), (int)(to - from)));
                }
            }
        }, cancellationToken);
}
