using Gateway.Csi.V1;
using Grpc.Core;

namespace Gateway.Csi;

/// <summary>CSI Node: where this plugin runs. (Attaching, mounting and stats come with the node's attach step.)</summary>
public sealed class NodeService(CsiOptions options) : Node.NodeBase
{
    public override Task<NodeGetInfoResponse> NodeGetInfo(NodeGetInfoRequest request, ServerCallContext context) =>
        Task.FromResult(new NodeGetInfoResponse { NodeId = options.NodeId ?? Environment.MachineName });

    public override Task<NodeGetCapabilitiesResponse> NodeGetCapabilities(NodeGetCapabilitiesRequest request, ServerCallContext context) =>
        Task.FromResult(new NodeGetCapabilitiesResponse());
}
