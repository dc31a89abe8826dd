using System.Net;

namespace Gateway.Csi;

/// <summary>What <c>gateway csi</c> runs: which CSI services, where it listens, and which gateway it drives.</summary>
/// <param name="Mode">Controller (Identity, Controller, SnapshotMetadata) or Node (Identity, Node).</param>
/// <param name="SocketPath">The Unix socket the CO and the sidecars call (CSI_ENDPOINT; CSI allows only Unix sockets).</param>
/// <param name="Admin">The gateway's admin API (any node of a cluster).</param>
/// <param name="Nbd">The gateway's NBD address: the controller reads extents through it, the node attaches to it.</param>
/// <param name="NodeId">The Kubernetes node this node plugin runs on (NodeGetInfo).</param>
/// <param name="Token">The admin API's bearer token, when it wants one.</param>
/// <param name="NbdTls">The node's TLS files for NBD, when the gateway's exports want TLS.</param>
public sealed record CsiOptions(CsiMode Mode, string SocketPath, Uri Admin, DnsEndPoint Nbd, string? NodeId = null, string? Token = null, Node.NbdTls? NbdTls = null)
{
    /// <summary><c>unix:///csi/csi.sock</c>, <c>unix:/csi/csi.sock</c> or a plain path: the socket's path.</summary>
    public static string ParseEndpoint(string endpoint)
    {
        ArgumentException.ThrowIfNullOrEmpty(endpoint);
        string path = endpoint.StartsWith("unix://", StringComparison.Ordinal) ? endpoint["unix://".Length..]
            : endpoint.StartsWith("unix:", StringComparison.Ordinal) ? endpoint["unix:".Length..]
            : endpoint.Contains("://", StringComparison.Ordinal) ? throw new ArgumentException($"endpoint '{endpoint}' is not a Unix socket: CSI plugins listen on unix:///path only")
            : endpoint;
        if (!path.StartsWith('/'))
        {
            throw new ArgumentException($"endpoint '{endpoint}' must name an absolute socket path (unix:///csi/csi.sock)");
        }
        return path;
    }

    /// <summary>HOST:PORT of the gateway's NBD listener.</summary>
    public static DnsEndPoint ParseNbd(string address)
    {
        int colon = address.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(address.AsSpan(colon + 1), out int port) || port is <= 0 or > 65535)
        {
            throw new ArgumentException($"--nbd '{address}' is not HOST:PORT");
        }
        return new DnsEndPoint(address[..colon].Trim('[', ']'), port);
    }
}

public enum CsiMode
{
    Controller,
    Node,
}

/// <summary>The driver's identity, as the CSIDriver object and every sidecar name it.</summary>
public static class CsiDriver
{
    public const string Name = "csi.nbd-gateway.dev";

    public static string Version { get; } =
        typeof(CsiDriver).Assembly.GetName().Version?.ToString(3) ?? "0.0.0";
}
