using Gateway.Csi.V1;
using Grpc.Core;

namespace Gateway.Csi;

/// <summary>CSI Identity: who the plugin is, what it offers, and whether it can work (the gateway answers).</summary>
public sealed class IdentityService(CsiOptions options, GatewayAdmin gateway) : Identity.IdentityBase
{
    public override Task<GetPluginInfoResponse> GetPluginInfo(GetPluginInfoRequest request, ServerCallContext context) =>
        Task.FromResult(new GetPluginInfoResponse { Name = CsiDriver.Name, VendorVersion = CsiDriver.Version, Manifest = { ["mode"] = options.Mode.ToString().ToLowerInvariant() } });

    public override Task<GetPluginCapabilitiesResponse> GetPluginCapabilities(GetPluginCapabilitiesRequest request, ServerCallContext context)
    {
        var response = new GetPluginCapabilitiesResponse();
        if (options.Mode == CsiMode.Controller)
        {
            response.Capabilities.Add(new PluginCapability { Service = new PluginCapability.Types.Service { Type = PluginCapability.Types.Service.Types.Type.ControllerService } });
            response.Capabilities.Add(new PluginCapability { Service = new PluginCapability.Types.Service { Type = PluginCapability.Types.Service.Types.Type.SnapshotMetadataService } });
        }
        // Exports grow while clients are connected (they see the new size when they reconnect).
        response.Capabilities.Add(new PluginCapability { VolumeExpansion = new PluginCapability.Types.VolumeExpansion { Type = PluginCapability.Types.VolumeExpansion.Types.Type.Online } });
        return Task.FromResult(response);
    }

    /// <summary>Ready only when the gateway's admin API answers: without it the plugin can do nothing.</summary>
    public override async Task<ProbeResponse> Probe(ProbeRequest request, ServerCallContext context) =>
        new() { Ready = await gateway.IsHealthyAsync(context.CancellationToken) };
}
