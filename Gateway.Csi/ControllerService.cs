using System.Net;
using System.Text.Json;
using Gateway.Csi.V1;
using Grpc.Core;
using RpcType = Gateway.Csi.V1.ControllerServiceCapability.Types.RPC.Types.Type;

namespace Gateway.Csi;

/// <summary>
/// CSI Controller: volumes and snapshots as gateway exports (see <see cref="CsiObjects"/> for the
/// mapping). Every call is idempotent as the spec asks: a repeat with the same name gets the same
/// answer, a repeat that conflicts gets ALREADY_EXISTS, a delete of what is gone succeeds.
/// </summary>
public sealed partial class ControllerService(CsiOptions options, GatewayAdmin gateway, VolumeLocks locks) : Controller.ControllerBase
{
    /// <summary>A volume whose request names no size.</summary>
    public const long DefaultSize = 1L << 30;

    /// <summary>The gateway's limit (ExportRules.MaxSize).</summary>
    public const long MaxSize = 1L << 50;

    private const long Alignment = 4096;

    public const string BackendParameter = "backend";

    private static readonly string[] Backends = ["overlay", "file", "s3"];

    private static readonly RpcType[] Offered =
    [
        RpcType.CreateDeleteVolume, RpcType.PublishUnpublishVolume, RpcType.ListVolumes, RpcType.GetCapacity,
        RpcType.CreateDeleteSnapshot, RpcType.ListSnapshots, RpcType.CloneVolume, RpcType.ExpandVolume,
    ];

    public override Task<ControllerGetCapabilitiesResponse> ControllerGetCapabilities(ControllerGetCapabilitiesRequest request, ServerCallContext context) =>
        Task.FromResult(new ControllerGetCapabilitiesResponse
        {
            Capabilities = { Offered.Select(t => new ControllerServiceCapability { Rpc = new ControllerServiceCapability.Types.RPC { Type = t } }) },
        });

    public override async Task<CreateVolumeResponse> CreateVolume(CreateVolumeRequest request, ServerCallContext context)
    {
        CancellationToken ct = context.CancellationToken;
        Require(request.Name, "name");
        if (VolumeCapabilities.Problem(request.VolumeCapabilities) is { } capabilityProblem)
        {
            throw Invalid(capabilityProblem);
        }
        string backend = Backend(request.Parameters);
        long size = SizeFor(request.CapacityRange);
        string id = CsiObjects.VolumeId(request.Name);
        VolumeContentSource? source = request.VolumeContentSource;
        string? baseExport = null;
        long sourceSize = 0;
        if (source is not null && source.TypeCase != VolumeContentSource.TypeOneofCase.None)
        {
            if (backend != "overlay")
            {
                throw Invalid($"a volume made from a snapshot or a volume is an overlay over it: backend '{backend}' cannot be");
            }
            (baseExport, sourceSize) = await SourceAsync(source, ct);
            if (request.CapacityRange is null || request.CapacityRange.RequiredBytes == 0 && request.CapacityRange.LimitBytes == 0)
            {
                size = sourceSize;
            }
            if (size < sourceSize)
            {
                throw new RpcException(new Status(StatusCode.OutOfRange, $"{size} bytes is smaller than the source's {sourceSize}"));
            }
        }

        GatewayExport? existing = await CallAsync(() => gateway.GetExportAsync(id, ct));
        if (existing is null)
        {
            var body = new Dictionary<string, object?>
            {
                ["name"] = id,
                ["size"] = baseExport is null ? size : sourceSize,
                ["backend"] = baseExport is null ? new Dictionary<string, object?> { ["type"] = backend } : new Dictionary<string, object?> { ["type"] = "overlay", ["base"] = baseExport },
                ["description"] = CsiObjects.VolumeDescription(request.Name),
            };
            try
            {
                existing = await gateway.CreateExportAsync(JsonSerializer.SerializeToElement(body), ct);
            }
            catch (GatewayAdminException e) when (e.Status == HttpStatusCode.Conflict)
            {
                // Made meanwhile by a repeat of this call: compare with what is there now.
                existing = await gateway.GetExportAsync(id, ct) ?? throw Map(e);
            }
            catch (GatewayAdminException e)
            {
                throw Map(e);
            }
            if (existing.Size < size)
            {
                // From a snapshot or a volume to a bigger volume: the overlay is made at the source's
                // size, then grown (the grown part reads as zeros).
                existing = await CallAsync(() => gateway.ResizeExportAsync(id, size, ct));
            }
        }
        else if (CsiObjects.VolumeName(existing) != request.Name || !Compatible(existing, request.CapacityRange, backend, baseExport))
        {
            throw new RpcException(new Status(StatusCode.AlreadyExists,
                $"volume '{id}' already exists with another size, backend or source (export {existing.Name}: {existing.Size} bytes, {existing.Backend.Type}{(existing.Backend.Base is { } b ? " over " + b : "")})"));
        }
        return new CreateVolumeResponse { Volume = ToVolume(existing, source) };
    }

    public override async Task<DeleteVolumeResponse> DeleteVolume(DeleteVolumeRequest request, ServerCallContext context)
    {
        Require(request.VolumeId, "volume_id");
        GatewayExport? export = await CallAsync(() => gateway.GetExportAsync(request.VolumeId, context.CancellationToken));
        if (export is null)
        {
            return new DeleteVolumeResponse();
        }
        if (CsiObjects.VolumeName(export) is null)
        {
            throw Invalid($"export '{request.VolumeId}' is not a volume of this driver: it is left alone");
        }
        try
        {
            await gateway.RemoveExportAsync(request.VolumeId, context.CancellationToken);
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.NotFound)
        {
            // Gone meanwhile: what the caller wanted.
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.Conflict)
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition, e.Message));
        }
        catch (GatewayAdminException e)
        {
            throw Map(e);
        }
        return new DeleteVolumeResponse();
    }

    /// <summary>Nothing to attach on the gateway's side: it tells the node where the export is served.</summary>
    public override async Task<ControllerPublishVolumeResponse> ControllerPublishVolume(ControllerPublishVolumeRequest request, ServerCallContext context)
    {
        Require(request.VolumeId, "volume_id");
        Require(request.NodeId, "node_id");
        if (request.VolumeCapability is null)
        {
            throw Invalid("volume_capability is required");
        }
        GatewayExport export = await VolumeAsync(request.VolumeId, context.CancellationToken);
        if (VolumeCapabilities.Problem(request.VolumeCapability) is { } problem)
        {
            throw Invalid(problem);
        }
        return new ControllerPublishVolumeResponse
        {
            PublishContext =
            {
                [PublishContext.NbdHost] = options.Nbd.Host,
                [PublishContext.NbdPort] = options.Nbd.Port.ToString(System.Globalization.CultureInfo.InvariantCulture),
                [PublishContext.Export] = export.Name,
                [PublishContext.ReadOnly] = request.Readonly ? "true" : "false",
            },
        };
    }

    public override Task<ControllerUnpublishVolumeResponse> ControllerUnpublishVolume(ControllerUnpublishVolumeRequest request, ServerCallContext context)
    {
        Require(request.VolumeId, "volume_id");
        return Task.FromResult(new ControllerUnpublishVolumeResponse());
    }

    public override async Task<ValidateVolumeCapabilitiesResponse> ValidateVolumeCapabilities(ValidateVolumeCapabilitiesRequest request, ServerCallContext context)
    {
        Require(request.VolumeId, "volume_id");
        if (request.VolumeCapabilities.Count == 0)
        {
            throw Invalid("volume_capabilities are required");
        }
        await VolumeAsync(request.VolumeId, context.CancellationToken);
        if (VolumeCapabilities.Problem(request.VolumeCapabilities) is { } problem)
        {
            return new ValidateVolumeCapabilitiesResponse { Message = problem };
        }
        if (request.Parameters.Count > 0 && ParameterProblem(request.Parameters) is { } parameterProblem)
        {
            return new ValidateVolumeCapabilitiesResponse { Message = parameterProblem };
        }
        return new ValidateVolumeCapabilitiesResponse
        {
            Confirmed = new ValidateVolumeCapabilitiesResponse.Types.Confirmed
            {
                VolumeCapabilities = { request.VolumeCapabilities },
                VolumeContext = { request.VolumeContext },
                Parameters = { request.Parameters },
            },
        };
    }

    public override async Task<ListVolumesResponse> ListVolumes(ListVolumesRequest request, ServerCallContext context)
    {
        GatewayExport[] volumes = [.. (await CallAsync(() => gateway.ListExportsAsync(context.CancellationToken)))
            .Where(e => CsiObjects.VolumeName(e) is not null).OrderBy(e => e.Name, StringComparer.Ordinal)];
        (int start, int count, string next) = Page(request.StartingToken, request.MaxEntries, volumes.Length);
        var response = new ListVolumesResponse { NextToken = next };
        response.Entries.AddRange(volumes.Skip(start).Take(count).Select(e => new ListVolumesResponse.Types.Entry { Volume = ToVolume(e, null) }));
        return response;
    }

    public override async Task<GetCapacityResponse> GetCapacity(GetCapacityRequest request, ServerCallContext context)
    {
        if (request.VolumeCapabilities.Count > 0 && VolumeCapabilities.Problem(request.VolumeCapabilities) is not null)
        {
            // The spec: capacity for volumes with these capabilities, and none can be made.
            return new GetCapacityResponse { AvailableCapacity = 0 };
        }
        string backend = Backend(request.Parameters);
        if (backend == "s3")
        {
            // An object store has no free-space figure; what bounds a volume is the gateway's limit.
            return new GetCapacityResponse { AvailableCapacity = MaxSize, MaximumVolumeSize = MaxSize };
        }
        GatewayCapacity capacity = await CallAsync(() => gateway.GetCapacityAsync(context.CancellationToken));
        // Files and layers are sparse: a volume may be larger than the free space, but what can be
        // written is bounded by it, and that is what the scheduler should weigh.
        return new GetCapacityResponse { AvailableCapacity = capacity.AvailableBytes, MaximumVolumeSize = MaxSize };
    }

    public override async Task<ControllerExpandVolumeResponse> ControllerExpandVolume(ControllerExpandVolumeRequest request, ServerCallContext context)
    {
        Require(request.VolumeId, "volume_id");
        if (request.CapacityRange is null || request.CapacityRange.RequiredBytes == 0 && request.CapacityRange.LimitBytes == 0)
        {
            throw Invalid("capacity_range is required");
        }
        GatewayExport export = await VolumeAsync(request.VolumeId, context.CancellationToken);
        if (request.VolumeCapability is not null && VolumeCapabilities.Problem(request.VolumeCapability) is { } problem)
        {
            throw Invalid(problem);
        }
        long size = SizeFor(request.CapacityRange);
        if (export.Size < size)
        {
            export = await CallAsync(() => gateway.ResizeExportAsync(export.Name, size, context.CancellationToken));
        }
        // A block volume is used as it is; a file system must be grown on the node that mounts it.
        bool onNode = request.VolumeCapability?.AccessTypeCase != VolumeCapability.AccessTypeOneofCase.Block;
        return new ControllerExpandVolumeResponse { CapacityBytes = export.Size, NodeExpansionRequired = onNode };
    }

    /// <summary>The volume, or NOT_FOUND.</summary>
    private async Task<GatewayExport> VolumeAsync(string id, CancellationToken ct)
    {
        GatewayExport? export = await CallAsync(() => gateway.GetExportAsync(id, ct));
        return export is not null && CsiObjects.VolumeName(export) is not null
            ? export
            : throw new RpcException(new Status(StatusCode.NotFound, $"volume '{id}' not found"));
    }

    /// <summary>The export a new volume is made over, and its size; NOT_FOUND when the source is gone.</summary>
    private async Task<(string Export, long Size)> SourceAsync(VolumeContentSource source, CancellationToken ct)
    {
        if (source.TypeCase == VolumeContentSource.TypeOneofCase.Snapshot)
        {
            string id = source.Snapshot.SnapshotId;
            Require(id, "volume_content_source.snapshot.snapshot_id");
            GatewayExport? export = await CallAsync(() => gateway.GetExportAsync(id, ct));
            return export is not null && CsiObjects.Snapshot(export) is not null
                ? (export.Name, export.Size)
                : throw new RpcException(new Status(StatusCode.NotFound, $"snapshot '{id}' not found"));
        }
        string volumeId = source.Volume.VolumeId;
        Require(volumeId, "volume_content_source.volume.volume_id");
        GatewayExport volume = await VolumeAsync(volumeId, ct);
        if (volume.Backend.Type != "overlay")
        {
            throw Invalid($"volume '{volumeId}' has backend '{volume.Backend.Type}': only overlay volumes can be cloned");
        }
        return (volume.Name, volume.Size);
    }

    private static bool Compatible(GatewayExport existing, CapacityRange? range, string backend, string? baseExport)
    {
        long required = range?.RequiredBytes ?? 0, limit = range?.LimitBytes ?? 0;
        return existing.Size >= required && (limit == 0 || existing.Size <= limit)
            && existing.Backend.Type == (baseExport is null ? backend : "overlay")
            && existing.Backend.Base == baseExport;
    }

    /// <summary>The size a capacity range asks for: the required bytes rounded up to 4 KiB (an exact odd size where the limit leaves no room).</summary>
    internal static long SizeFor(CapacityRange? range)
    {
        long required = range?.RequiredBytes ?? 0, limit = range?.LimitBytes ?? 0;
        if (required < 0 || limit < 0)
        {
            throw Invalid("capacity_range must not be negative");
        }
        if (limit > 0 && required > limit)
        {
            throw new RpcException(new Status(StatusCode.OutOfRange, $"required_bytes {required} is over limit_bytes {limit}"));
        }
        long size = required == 0 ? (limit == 0 ? DefaultSize : Math.Min(DefaultSize, limit / Alignment * Alignment)) : RoundUp(required, Alignment);
        if (limit > 0 && size > limit)
        {
            size = RoundUp(required, 512);
        }
        if (size <= 0 || (limit > 0 && size > limit))
        {
            throw new RpcException(new Status(StatusCode.OutOfRange, $"no size of whole 512-byte sectors lies within {required}..{limit} bytes"));
        }
        if (size > MaxSize)
        {
            throw new RpcException(new Status(StatusCode.OutOfRange, $"{size} bytes is over the gateway's limit of {MaxSize} bytes (1 PiB)"));
        }
        return size;
    }

    private static long RoundUp(long value, long unit) => value > long.MaxValue - unit ? long.MaxValue : (value + unit - 1) / unit * unit;

    private static string Backend(IDictionary<string, string> parameters)
    {
        if (ParameterProblem(parameters) is { } problem)
        {
            throw Invalid(problem);
        }
        return parameters.TryGetValue(BackendParameter, out string? backend) ? backend : "overlay";
    }

    /// <summary>Unknown keys are refused, so a misspelt StorageClass parameter is not silently ignored.</summary>
    private static string? ParameterProblem(IDictionary<string, string> parameters)
    {
        foreach ((string key, string value) in parameters)
        {
            if (key.StartsWith("csi.storage.k8s.io/", StringComparison.Ordinal))
            {
                continue; // What the external-provisioner adds (--extra-create-metadata).
            }
            if (key != BackendParameter)
            {
                return $"parameter '{key}' is not known (known: {BackendParameter})";
            }
            if (!Backends.Contains(value))
            {
                return $"backend '{value}' is not supported (supported: {string.Join(", ", Backends)})";
            }
        }
        return null;
    }

    private static Volume ToVolume(GatewayExport export, VolumeContentSource? source)
    {
        var volume = new Volume { VolumeId = export.Name, CapacityBytes = export.Size, VolumeContext = { [PublishContext.Export] = export.Name } };
        if (source is not null && source.TypeCase != VolumeContentSource.TypeOneofCase.None)
        {
            volume.ContentSource = source;
        }
        return volume;
    }

    /// <summary>Paging by position in the sorted list: the token is the index of the next entry.</summary>
    internal static (int Start, int Count, string Next) Page(string token, int maxEntries, int total)
    {
        if (maxEntries < 0)
        {
            throw Invalid("max_entries must not be negative");
        }
        int start = 0;
        if (token.Length > 0 && (!int.TryParse(token, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out start) || start > total))
        {
            throw new RpcException(new Status(StatusCode.Aborted, $"starting_token '{token}' is not valid: start again without one"));
        }
        int count = maxEntries == 0 ? total - start : Math.Min(maxEntries, total - start);
        string next = start + count < total ? (start + count).ToString(System.Globalization.CultureInfo.InvariantCulture) : "";
        return (start, count, next);
    }

    internal static void Require(string value, string field)
    {
        if (string.IsNullOrEmpty(value))
        {
            throw Invalid($"{field} is required");
        }
    }

    internal static RpcException Invalid(string message) => new(new Status(StatusCode.InvalidArgument, message));

    /// <summary>An admin API error as the CSI code that says the same.</summary>
    internal static RpcException Map(GatewayAdminException e) => new(new Status(e.Status switch
    {
        HttpStatusCode.BadRequest => StatusCode.InvalidArgument,
        HttpStatusCode.NotFound => StatusCode.NotFound,
        HttpStatusCode.Conflict => StatusCode.AlreadyExists,
        HttpStatusCode.Unauthorized or HttpStatusCode.Forbidden => StatusCode.PermissionDenied,
        HttpStatusCode.ServiceUnavailable => StatusCode.Unavailable,
        _ => StatusCode.Internal,
    }, e.Message));

    internal static async Task<T> CallAsync<T>(Func<Task<T>> call)
    {
        try
        {
            return await call();
        }
        catch (GatewayAdminException e)
        {
            throw Map(e);
        }
    }
}

/// <summary>What ControllerPublishVolume tells the node plugin (publish_context keys).</summary>
public static class PublishContext
{
    public const string NbdHost = "nbdHost";
    public const string NbdPort = "nbdPort";
    public const string Export = "export";
    public const string ReadOnly = "readOnly";
}
