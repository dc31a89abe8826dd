using Gateway.Actors.Bitmaps;
using Gateway.Actors.Cluster;

namespace Gateway.Backup;

/// <summary>Dirty bitmaps seen per chunk of a manifest.</summary>
internal static class ChunkMap
{
    /// <summary>Sets <paramref name="dirty"/>[i] for every chunk with a dirty byte in <paramref name="context"/> (a <c>qemu:dirty-bitmap:</c> context) over [0, <paramref name="end"/>).</summary>
    public static Task MarkDirtyAsync(PeerNbdClient client, string context, long end, int chunkSize, bool[] dirty, CancellationToken cancellationToken) =>
        client.WalkExtentsAsync(context, 0, end, (offset, length, status) =>
        {
            if ((status & DirtyBitmapContext.StateDirty) != 0)
            {
                for (long chunk = offset / chunkSize; chunk < dirty.Length && chunk * chunkSize < offset + length; chunk++)
                {
                    dirty[chunk] = true;
                }
            }
        }, cancellationToken);
}
