using System.Net;
using System.Text.Json;
using Gateway.Csi.V1;
using Grpc.Core;

namespace Gateway.Csi;

/// <summary>
/// Snapshots. Each is a read-only overlay export over the source volume's frozen layers, and each
/// starts a dirty bitmap on the source (<see cref="CsiObjects.BitmapOf"/>) that records the writes
/// from it to the next snapshot, when it is disabled. The bitmaps of the snapshots from A up to
/// (not including) B are then exactly what changed between A and B (SnapshotMetadata).
/// </summary>
public sealed partial class ControllerService
{
    public override async Task<CreateSnapshotResponse> CreateSnapshot(CreateSnapshotRequest request, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        Require(request.Name, "name");
        Require(request.SourceVolumeId, "source_volume_id");
        string id = CsiObjects.SnapshotId(request.Name);
        // Under the volume's lock, so a repeat of this call that is still running is seen finished.
        using IDisposable held = await locks.TakeAsync(request.SourceVolumeId, ct);
        if (await CallAsync(() => gateway.GetExportAsync(id, ct)) is { } existing)
        {
            return CsiObjects.Snapshot(existing) is { } snapshot && snapshot.Name == request.Name && snapshot.SourceVolumeId == request.SourceVolumeId
                ? new CreateSnapshotResponse { Snapshot = snapshot.ToCsi() }
                : throw new RpcException(new Status(StatusCode.AlreadyExists, $"snapshot '{id}' already exists for another source or name"));
        }
        GatewayExport volume = await VolumeAsync(request.SourceVolumeId, ct);
        if (volume.Backend.Type != "overlay")
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition,
                $"volume '{volume.Name}' has backend '{volume.Backend.Type}': snapshots need an overlay volume (StorageClass parameter backend: overlay)"));
        }

        // The new bitmap first: every write after the freeze below is in it, so no change between
        // this snapshot and the next can be missed. (Writes between here and the freeze land in it
        // too, and in this snapshot: reported as changed, never lost.)
        string bitmap = CsiObjects.BitmapOf(id);
        try
        {
            await gateway.AddBitmapAsync(volume.Name, bitmap, ct);
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.Conflict)
        {
            // Left by an earlier attempt of this same call: it has tracked since then, which is more, not less.
            await CallAsync(async () => { await gateway.SetBitmapEnabledAsync(volume.Name, bitmap, true, ct); return 0; });
        }
        catch (GatewayAdminException e)
        {
            throw Map(e);
        }

        DateTimeOffset created = DateTimeOffset.UtcNow;
        var body = new Dictionary<string, object?>
        {
            ["name"] = id,
            ["size"] = volume.Size,
            ["backend"] = new Dictionary<string, object?> { ["type"] = "overlay", ["base"] = volume.Name },
            ["readOnly"] = true,
            ["description"] = CsiObjects.SnapshotDescription(volume.Name, created, request.Name),
        };
        GatewayExport made;
        try
        {
            made = await gateway.CreateExportAsync(JsonSerializer.SerializeToElement(body), ct);
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.Conflict)
        {
            // Made meanwhile by a repeat of this call.
            made = await gateway.GetExportAsync(id, ct) ?? throw Map(e);
        }
        catch (GatewayAdminException e)
        {
            throw Map(e);
        }

        // The earlier snapshots' bitmaps stop here: what they hold is what changed up to this one.
        foreach (GatewayBitmap other in await CallAsync(() => gateway.ListBitmapsAsync(volume.Name, ct)))
        {
            if (other.Enabled && other.Name != bitmap && other.Name.StartsWith(CsiObjects.BitmapOf(""), StringComparison.Ordinal))
            {
                await CallAsync(async () => { await gateway.SetBitmapEnabledAsync(volume.Name, other.Name, false, ct); return 0; });
            }
        }
        CsiSnapshot taken = CsiObjects.Snapshot(made) ?? throw new RpcException(new Status(StatusCode.Internal, $"export '{id}' does not read back as a snapshot"));
        return new CreateSnapshotResponse { Snapshot = taken.ToCsi() };
    }

    public override async Task<DeleteSnapshotResponse> DeleteSnapshot(DeleteSnapshotRequest request, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        Require(request.SnapshotId, "snapshot_id");
        GatewayExport[] exports = await CallAsync(() => gateway.ListExportsAsync(ct));
        GatewayExport? export = exports.FirstOrDefault(e => e.Name == request.SnapshotId);
        if (export is null)
        {
            return new DeleteSnapshotResponse();
        }
        if (CsiObjects.Snapshot(export) is not { } snapshot)
        {
            throw Invalid($"export '{request.SnapshotId}' is not a snapshot of this driver: it is left alone");
        }
        using IDisposable held = await locks.TakeAsync(snapshot.SourceVolumeId, ct);
        if (exports.Any(e => e.Name == snapshot.SourceVolumeId))
        {
            // Read again under the lock: a snapshot taken meanwhile changes which one is "before".
            await KeepChangesAsync(snapshot, await CallAsync(() => gateway.ListExportsAsync(ct)), ct);
        }
        try
        {
            await gateway.RemoveExportAsync(snapshot.Id, ct);
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.NotFound)
        {
            // Gone meanwhile.
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.Conflict)
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition, e.Message));
        }
        catch (GatewayAdminException e)
        {
            throw Map(e);
        }
        return new DeleteSnapshotResponse();
    }

    /// <summary>
    /// The deleted snapshot's changes move to the snapshot before it, so a delta from that one
    /// still covers them. If the deleted one was the newest, the one before takes over tracking
    /// (enabled before the merge, so no write falls between the two).
    /// </summary>
    private async Task KeepChangesAsync(CsiSnapshot snapshot, GatewayExport[] exports, CancellationToken ct)
    {
        string volume = snapshot.SourceVolumeId;
        GatewayBitmap[] bitmaps = await CallAsync(() => gateway.ListBitmapsAsync(volume, ct));
        string bitmap = CsiObjects.BitmapOf(snapshot.Id);
        if (bitmaps.FirstOrDefault(b => b.Name == bitmap) is not { } own)
        {
            return;
        }
        CsiSnapshot? before = exports.Select(CsiObjects.Snapshot)
            .Where(s => s is not null && s.SourceVolumeId == volume && s.Id != snapshot.Id && s.Created <= snapshot.Created)
            .MaxBy(s => s!.Created);
        if (before is not null && bitmaps.Any(b => b.Name == CsiObjects.BitmapOf(before.Id)))
        {
            string target = CsiObjects.BitmapOf(before.Id);
            if (own.Enabled)
            {
                await CallAsync(async () => { await gateway.SetBitmapEnabledAsync(volume, target, true, ct); return 0; });
            }
            await CallAsync(async () => { await gateway.MergeBitmapsAsync(volume, target, [bitmap], ct); return 0; });
        }
        try
        {
            await gateway.RemoveBitmapAsync(volume, bitmap, ct);
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.NotFound)
        {
            // Gone already.
        }
    }

    public override async Task<ListSnapshotsResponse> ListSnapshots(ListSnapshotsRequest request, ServerCallContext context)
    {
        CsiSnapshot[] snapshots = [.. (await CallAsync(() => gateway.ListExportsAsync(context.CancellationToken)))
            .Select(CsiObjects.Snapshot).OfType<CsiSnapshot>()
            .Where(s => (request.SnapshotId.Length == 0 || s.Id == request.SnapshotId) && (request.SourceVolumeId.Length == 0 || s.SourceVolumeId == request.SourceVolumeId))
            .OrderBy(s => s.Id, StringComparer.Ordinal)];
        (int start, int count, string next) = Page(request.StartingToken, request.MaxEntries, snapshots.Length);
        var response = new ListSnapshotsResponse { NextToken = next };
        response.Entries.AddRange(snapshots.Skip(start).Take(count).Select(s => new ListSnapshotsResponse.Types.Entry { Snapshot = s.ToCsi() }));
        return response;
    }
}
