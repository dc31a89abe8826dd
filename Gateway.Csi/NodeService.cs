using System.Globalization;
using System.Net;
using Gateway.Actors.Cluster;
using Gateway.Csi.Node;
using Gateway.Csi.V1;
using Gateway.Nbd;
using Google.Protobuf;
using Grpc.Core;
using RpcType = Gateway.Csi.V1.NodeServiceCapability.Types.RPC.Types.Type;

namespace Gateway.Csi;

/// <summary>
/// CSI Node: attaches a volume's export to a block device on this node (<see cref="IBlockAttacher"/>),
/// makes its file system once and mounts it at the staging path, and bind-mounts it for each pod.
/// What was attached is recorded in <see cref="StagedVolumes"/>, so unstage, publish, stats and a
/// restarted plugin find the device. Every call is idempotent as the spec asks (CSI "Node Service RPC").
/// </summary>
public sealed class NodeService(CsiOptions options, IBlockAttacher attacher, StagedVolumes staged) : V1.Node.NodeBase
{
    private static readonly RpcType[] Offered = [RpcType.StageUnstageVolume, RpcType.GetVolumeStats, RpcType.ExpandVolume];

    /// <summary>Stage, unstage and expand run one at a time: the CO may repeat a call that timed out while the first still runs, and two stages must not both attach.</summary>
    private static readonly SemaphoreSlim Serial = new(1, 1);

    private string NodeId => options.NodeId ?? Environment.MachineName;

    public override Task<NodeGetInfoResponse> NodeGetInfo(NodeGetInfoRequest request, ServerCallContext context) =>
        Task.FromResult(new NodeGetInfoResponse { NodeId = NodeId, MaxVolumesPerNode = NbdClientAttacher.DeviceCount() });

    public override Task<NodeGetCapabilitiesResponse> NodeGetCapabilities(NodeGetCapabilitiesRequest request, ServerCallContext context) =>
        Task.FromResult(new NodeGetCapabilitiesResponse
        {
            Capabilities = { Offered.Select(t => new NodeServiceCapability { Rpc = new NodeServiceCapability.Types.RPC { Type = t } }) },
        });

    public override async Task<NodeStageVolumeResponse> NodeStageVolume(NodeStageVolumeRequest request, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        ControllerService.Require(request.VolumeId, "volume_id");
        ControllerService.Require(request.StagingTargetPath, "staging_target_path");
        VolumeCapability capability = request.VolumeCapability ?? throw ControllerService.Invalid("volume_capability is required");
        if (VolumeCapabilities.Problem(capability) is { } problem)
        {
            throw ControllerService.Invalid(problem);
        }
        NbdTarget target = Target(request.PublishContext);
        bool block = capability.AccessTypeCase == VolumeCapability.AccessTypeOneofCase.Block;
        string? fsType = block ? null : capability.Mount.FsType is { Length: > 0 } fs ? fs : "ext4";
        string staging = Path.GetFullPath(request.StagingTargetPath);

        await Serial.WaitAsync(ct);
        try
        {
            StagedVolume? volume = staged.Find(request.VolumeId);
            if (volume is { AttachedThisBoot: true } && (volume.StagingPath != staging || volume.Capability != Json(capability) || volume.ReadOnly != target.ReadOnly))
            {
                throw new RpcException(new Status(StatusCode.AlreadyExists,
                    $"volume '{request.VolumeId}' is already staged at {volume.StagingPath} with another capability or access"));
            }
            // A record from before a reboot names a device that is gone, or is another volume's now.
            if (volume is null || !volume.AttachedThisBoot)
            {
                target = target with { Connections = await ConnectionsAsync(target, ct), Tls = options.NbdTls };
                string device = await attacher.AttachAsync(target, ct);
                volume = new StagedVolume(request.VolumeId, target.Export, staging, device, block, fsType, target.ReadOnly, Json(capability), StagedVolume.CurrentBootId);
                // Recorded before anything else can fail: a stage repeated after a failure finds
                // the device, and an unstage detaches it.
                staged.Save(volume);
            }
            if (!block)
            {
                await MountStagedAsync(volume, capability.Mount.MountFlags, ct);
            }
            return new NodeStageVolumeResponse();
        }
        finally
        {
            Serial.Release();
        }
    }

    public override async Task<NodeUnstageVolumeResponse> NodeUnstageVolume(NodeUnstageVolumeRequest request, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        ControllerService.Require(request.VolumeId, "volume_id");
        ControllerService.Require(request.StagingTargetPath, "staging_target_path");
        string staging = Path.GetFullPath(request.StagingTargetPath);
        await Serial.WaitAsync(ct);
        try
        {
            StagedVolume? volume = staged.Find(request.VolumeId);
            if (volume is not null && volume.StagingPath != staging)
            {
                return new NodeUnstageVolumeResponse(); // Not staged at this path: the spec's OK.
            }
            if (volume is null || !volume.Block)
            {
                await Mounts.UnmountAsync(staging, ct);
            }
            if (volume is not null)
            {
                if (volume.AttachedThisBoot)
                {
                    await attacher.DetachAsync(volume.Device, ct);
                }
                staged.Remove(volume.VolumeId);
            }
            return new NodeUnstageVolumeResponse();
        }
        finally
        {
            Serial.Release();
        }
    }

    public override async Task<NodePublishVolumeResponse> NodePublishVolume(NodePublishVolumeRequest request, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        ControllerService.Require(request.VolumeId, "volume_id");
        ControllerService.Require(request.StagingTargetPath, "staging_target_path");
        ControllerService.Require(request.TargetPath, "target_path");
        VolumeCapability capability = request.VolumeCapability ?? throw ControllerService.Invalid("volume_capability is required");
        if (VolumeCapabilities.Problem(capability) is { } problem)
        {
            throw ControllerService.Invalid(problem);
        }
        StagedVolume volume = staged.Find(request.VolumeId) is { AttachedThisBoot: true } found && found.StagingPath == Path.GetFullPath(request.StagingTargetPath)
            ? found
            : throw new RpcException(new Status(StatusCode.FailedPrecondition, $"volume '{request.VolumeId}' is not staged at {request.StagingTargetPath}: NodeStageVolume first"));
        bool block = capability.AccessTypeCase == VolumeCapability.AccessTypeOneofCase.Block;
        if (block != volume.Block)
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition,
                $"volume '{request.VolumeId}' is staged as {(volume.Block ? "a block device" : "a file system")}: it cannot be published as {(block ? "one" : "a file system")}"));
        }
        string target = Path.GetFullPath(request.TargetPath);
        bool readOnly = request.Readonly || volume.ReadOnly;
        if (Mounts.At(target) is { } mounted)
        {
            return mounted.ReadOnly == readOnly
                ? new NodePublishVolumeResponse()
                : throw new RpcException(new Status(StatusCode.AlreadyExists, $"{target} is already published {(mounted.ReadOnly ? "read-only" : "read-write")}"));
        }
        if (block)
        {
            // The pod's device is a file the device is bind-mounted onto.
            Directory.CreateDirectory(Path.GetDirectoryName(target)!);
            if (!File.Exists(target))
            {
                await File.WriteAllBytesAsync(target, [], ct);
            }
            await Mounts.BindAsync(volume.Device, target, readOnly, ct);
        }
        else
        {
            Directory.CreateDirectory(target);
            await Mounts.BindAsync(volume.StagingPath, target, readOnly, ct);
        }
        return new NodePublishVolumeResponse();
    }

    public override async Task<NodeUnpublishVolumeResponse> NodeUnpublishVolume(NodeUnpublishVolumeRequest request, ServerCallContext context)
    {
        ControllerService.Require(request.VolumeId, "volume_id");
        ControllerService.Require(request.TargetPath, "target_path");
        string target = Path.GetFullPath(request.TargetPath);
        await Mounts.UnmountAsync(target, context.CancellationToken);
        if (Directory.Exists(target))
        {
            Directory.Delete(target);
        }
        else if (File.Exists(target))
        {
            File.Delete(target);
        }
        return new NodeUnpublishVolumeResponse();
    }

    public override Task<NodeGetVolumeStatsResponse> NodeGetVolumeStats(NodeGetVolumeStatsRequest request, ServerCallContext context)
    {
        ControllerService.Require(request.VolumeId, "volume_id");
        ControllerService.Require(request.VolumePath, "volume_path");
        string path = Path.GetFullPath(request.VolumePath);
        if (!Path.Exists(path))
        {
            throw new RpcException(new Status(StatusCode.NotFound, $"{path} does not exist"));
        }
        StagedVolume volume = Staged(request.VolumeId);
        var response = new NodeGetVolumeStatsResponse();
        if (volume.Block)
        {
            // A raw device has a size and no usage the node can know.
            response.Usage.Add(new VolumeUsage { Unit = VolumeUsage.Types.Unit.Bytes, Total = BlockDevices.Size(volume.Device) });
            return Task.FromResult(response);
        }
        if (Mounts.At(path) is null)
        {
            throw new RpcException(new Status(StatusCode.NotFound, $"volume '{request.VolumeId}' is not mounted at {path}"));
        }
        (long total, long free, long available, long inodes, long freeInodes) = BlockDevices.Usage(path);
        response.Usage.Add(new VolumeUsage { Unit = VolumeUsage.Types.Unit.Bytes, Total = total, Available = available, Used = total - free });
        response.Usage.Add(new VolumeUsage { Unit = VolumeUsage.Types.Unit.Inodes, Total = inodes, Available = freeInodes, Used = inodes - freeInodes });
        response.VolumeCondition = new VolumeCondition { Abnormal = false, Message = $"{volume.Device} mounted at {volume.StagingPath}" };
        return Task.FromResult(response);
    }

    /// <summary>
    /// Grows the file system to the device. The kernel's nbd device keeps the size it had when
    /// nbd-client connected (NBD has no way to announce a new size to a connected client), so a
    /// device smaller than asked is a FAILED_PRECONDITION that says to stage the volume again,
    /// never a pretended success.
    /// </summary>
    public override async Task<NodeExpandVolumeResponse> NodeExpandVolume(NodeExpandVolumeRequest request, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        ControllerService.Require(request.VolumeId, "volume_id");
        ControllerService.Require(request.VolumePath, "volume_path");
        if (request.VolumeCapability is not null && VolumeCapabilities.Problem(request.VolumeCapability) is { } problem)
        {
            throw ControllerService.Invalid(problem);
        }
        long required = request.CapacityRange?.RequiredBytes ?? 0, limit = request.CapacityRange?.LimitBytes ?? 0;
        if (required < 0 || limit < 0 || (limit > 0 && required > limit))
        {
            throw new RpcException(new Status(StatusCode.OutOfRange, $"capacity range {required}..{limit} is not valid"));
        }
        if (!Path.Exists(request.VolumePath))
        {
            throw new RpcException(new Status(StatusCode.NotFound, $"{request.VolumePath} does not exist"));
        }
        await Serial.WaitAsync(ct);
        try
        {
            StagedVolume volume = Staged(request.VolumeId);
            long size = BlockDevices.Size(volume.Device);
            if (size < required)
            {
                throw new RpcException(new Status(StatusCode.FailedPrecondition,
                    $"{volume.Device} of volume '{volume.VolumeId}' is {size} bytes, less than the {required} asked: the kernel's nbd device keeps the size it had when it was attached; unstage and stage the volume again to see the new size"));
            }
            if (!volume.Block)
            {
                await BlockDevices.GrowAsync(volume.Device, volume.FsType!, volume.StagingPath, ct);
            }
            return new NodeExpandVolumeResponse { CapacityBytes = size };
        }
        finally
        {
            Serial.Release();
        }
    }

    private StagedVolume Staged(string volumeId) =>
        staged.Find(volumeId) is { AttachedThisBoot: true } volume ? volume : throw new RpcException(new Status(StatusCode.NotFound, $"volume '{volumeId}' is not staged on node {NodeId}"));

    /// <summary>Makes the file system if the device holds none (never over data), then mounts it at the staging path.</summary>
    private static async Task MountStagedAsync(StagedVolume volume, IEnumerable<string> flags, CancellationToken ct)
    {
        if (Mounts.At(volume.StagingPath) is { } mounted)
        {
            if (mounted.Source != volume.Device)
            {
                throw new RpcException(new Status(StatusCode.AlreadyExists, $"{volume.StagingPath} already has {mounted.Source} mounted"));
            }
            return;
        }
        string fsType = volume.FsType!;
        string? found = await BlockDevices.FileSystemAsync(volume.Device, ct);
        if (found is null)
        {
            if (volume.ReadOnly)
            {
                throw new RpcException(new Status(StatusCode.FailedPrecondition, $"volume '{volume.VolumeId}' is read-only and has no file system to mount"));
            }
            await BlockDevices.MakeAsync(volume.Device, fsType, ct);
        }
        else if (found != fsType)
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition,
                $"volume '{volume.VolumeId}' holds {found}, not {fsType}: it is mounted only as what it holds and never formatted over"));
        }
        Directory.CreateDirectory(volume.StagingPath);
        string[] options = volume.ReadOnly ? [.. flags, "ro"] : [.. flags];
        await Mounts.MountAsync(volume.Device, volume.StagingPath, fsType, options, ct);
    }

    /// <summary>Where the export is, from the controller's publish_context (PublishContext's keys).</summary>
    private static NbdTarget Target(IDictionary<string, string> context)
    {
        string Key(string key) =>
            context.TryGetValue(key, out string? value) && value.Length > 0 ? value : throw ControllerService.Invalid($"publish_context has no '{key}': ControllerPublishVolume gives it");
        string port = Key(PublishContext.NbdPort);
        return new NbdTarget(
            Key(PublishContext.NbdHost),
            int.TryParse(port, NumberStyles.None, CultureInfo.InvariantCulture, out int p) && p is > 0 and <= 65535 ? p : throw ControllerService.Invalid($"publish_context nbdPort '{port}' is not a port"),
            Key(PublishContext.Export),
            bool.TryParse(Key(PublishContext.ReadOnly), out bool readOnly) ? readOnly : throw ControllerService.Invalid("publish_context readOnly is not true or false"));
    }

    /// <summary>
    /// As many connections as the export allows: several only when it advertises
    /// NBD_FLAG_CAN_MULTI_CONN (proto.md: then a flush on one covers writes on all), else one.
    /// </summary>
    private async Task<int> ConnectionsAsync(NbdTarget target, CancellationToken ct)
    {
        if (options.NbdTls is not null)
        {
            return 1; // The probe speaks plain NBD; with TLS, nbd-client's one connection is the safe choice.
        }
        try
        {
            await using PeerNbdClient probe = await PeerNbdClient.ConnectAsync(new DnsEndPoint(target.Host, target.Port), target.Export, ct);
            return probe.TransmissionFlags.HasFlag(TransmissionFlags.CanMultiConn) ? NbdClientAttacher.MultiConnConnections : 1;
        }
        catch (PeerExportUnavailableException)
        {
            throw new RpcException(new Status(StatusCode.NotFound, $"export '{target.Export}' is not served at {target.Host}:{target.Port}"));
        }
        catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException)
        {
            throw new RpcException(new Status(StatusCode.Unavailable, $"cannot reach export '{target.Export}' over NBD at {target.Host}:{target.Port}: {e.Message}"));
        }
    }

    private static string Json(VolumeCapability capability) => JsonFormatter.Default.Format(capability);
}
