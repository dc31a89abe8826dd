using Gateway.Csi.V1;
using Gateway.Actors.Cluster;
using Gateway.Nbd;
using Grpc.Core;

namespace Gateway.Csi;

/// <summary>
/// CSI SnapshotMetadata: which blocks a snapshot holds (its <c>base:allocation</c>) and which
/// changed between two snapshots of one volume (the source's snapshot bitmaps, read as
/// <c>qemu:dirty-bitmap:</c> contexts). Both are read over NBD, as any client would, so the
/// answer comes from whichever node owns the export.
/// </summary>
public sealed class SnapshotMetadataService(CsiOptions options, GatewayAdmin gateway) : SnapshotMetadata.SnapshotMetadataBase
{
    /// <summary>Tuples per message when the caller names no maximum.</summary>
    public const int DefaultMaxResults = 256;

    public override async Task GetMetadataAllocated(GetMetadataAllocatedRequest request, IServerStreamWriter<GetMetadataAllocatedResponse> responseStream, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        ControllerService.Require(request.SnapshotId, "snapshot_id");
        int max = MaxResults(request.MaxResults);
        CsiSnapshot snapshot = await SnapshotAsync(request.SnapshotId, ct);
        CheckOffset(request.StartingOffset, snapshot.Size);
        await using PeerNbdClient client = await ConnectAsync(snapshot.Id, ct);
        await ExtentReader.StreamUnionAsync(client, ["base:allocation"], request.StartingOffset, snapshot.Size, status => (status & (uint)AllocationState.Hole) == 0, max,
            batch => responseStream.WriteAsync(new GetMetadataAllocatedResponse { BlockMetadataType = BlockMetadataType.VariableLength, VolumeCapacityBytes = snapshot.Size, BlockMetadata = { Tuples(batch) } }, ct), ct);
    }

    public override async Task GetMetadataDelta(GetMetadataDeltaRequest request, IServerStreamWriter<GetMetadataDeltaResponse> responseStream, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        ControllerService.Require(request.BaseSnapshotId, "base_snapshot_id");
        ControllerService.Require(request.TargetSnapshotId, "target_snapshot_id");
        int max = MaxResults(request.MaxResults);
        GatewayExport[] exports = await ControllerService.CallAsync(() => gateway.ListExportsAsync(ct));
        CsiSnapshot from = Find(exports, request.BaseSnapshotId), to = Find(exports, request.TargetSnapshotId);
        if (from.SourceVolumeId != to.SourceVolumeId)
        {
            throw ControllerService.Invalid($"snapshots '{from.Id}' and '{to.Id}' are of different volumes ('{from.SourceVolumeId}', '{to.SourceVolumeId}')");
        }
        if (from.Created > to.Created || (from.Created == to.Created && from.Id != to.Id))
        {
            throw ControllerService.Invalid($"base snapshot '{from.Id}' is not older than target '{to.Id}'");
        }
        CheckOffset(request.StartingOffset, to.Size);
        string volume = from.SourceVolumeId;
        if (!exports.Any(e => e.Name == volume && CsiObjects.VolumeName(e) is not null))
        {
            throw Untracked($"volume '{volume}', whose writes the snapshots' bitmaps recorded, no longer exists");
        }
        // Every snapshot from the base up to (not including) the target: their bitmaps together
        // hold every write between the two. One of them missing means changes went unrecorded,
        // and a short list would silently lose them from an incremental backup.
        string[] chain = [.. exports.Select(CsiObjects.Snapshot).OfType<CsiSnapshot>()
            .Where(s => s.SourceVolumeId == volume && s.Created >= from.Created && s.Created < to.Created && s.Id != to.Id)
            .Select(s => CsiObjects.BitmapOf(s.Id))];
        GatewayBitmap[] bitmaps = await ControllerService.CallAsync(() => gateway.ListBitmapsAsync(volume, ct));
        if (chain.FirstOrDefault(name => !bitmaps.Any(b => b.Name == name)) is { } lost)
        {
            throw Untracked($"the change tracking of volume '{volume}' since snapshot '{from.Id}' was lost (bitmap '{lost}' is missing): take a full backup");
        }
        if (chain.Length == 0)
        {
            return; // The same snapshot twice: nothing changed.
        }
        await using PeerNbdClient client = await ConnectAsync(volume, ct);
        await ExtentReader.StreamUnionAsync(client, [.. chain.Select(b => "qemu:dirty-bitmap:" + b)], request.StartingOffset, Math.Min(to.Size, client.Info.Size),
            status => (status & Gateway.Actors.Bitmaps.DirtyBitmapContext.StateDirty) != 0, max,
            batch => responseStream.WriteAsync(new GetMetadataDeltaResponse { BlockMetadataType = BlockMetadataType.VariableLength, VolumeCapacityBytes = to.Size, BlockMetadata = { Tuples(batch) } }, ct), ct);
    }

    private static IEnumerable<BlockMetadata> Tuples(IReadOnlyList<(long Offset, long Length)> ranges) =>
        ranges.Select(r => new BlockMetadata { ByteOffset = r.Offset, SizeBytes = r.Length });

    private async Task<CsiSnapshot> SnapshotAsync(string id, CancellationToken ct)
    {
        GatewayExport? export = await ControllerService.CallAsync(() => gateway.GetExportAsync(id, ct));
        return export is not null && CsiObjects.Snapshot(export) is { } snapshot
            ? snapshot
            : throw new RpcException(new Status(StatusCode.NotFound, $"snapshot '{id}' not found"));
    }

    private static CsiSnapshot Find(GatewayExport[] exports, string id) =>
        exports.Where(e => e.Name == id).Select(CsiObjects.Snapshot).FirstOrDefault()
        ?? throw new RpcException(new Status(StatusCode.NotFound, $"snapshot '{id}' not found"));

    private async Task<PeerNbdClient> ConnectAsync(string export, CancellationToken ct)
    {
        try
        {
            return await PeerNbdClient.ConnectAsync(options.Nbd, export, ct);
        }
        catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException)
        {
            throw new RpcException(new Status(StatusCode.Unavailable, $"cannot read export '{export}' over NBD at {options.Nbd.Host}:{options.Nbd.Port}: {e.Message}"));
        }
    }

    private static int MaxResults(int requested) => requested switch
    {
        < 0 => throw ControllerService.Invalid("max_results must not be negative"),
        0 => DefaultMaxResults,
        _ => requested,
    };

    private static void CheckOffset(long offset, long size)
    {
        if (offset < 0 || offset > size)
        {
            throw new RpcException(new Status(StatusCode.OutOfRange, $"starting_offset {offset} is outside the volume's {size} bytes"));
        }
    }

    private static RpcException Untracked(string message) => new(new Status(StatusCode.FailedPrecondition, message));
}
