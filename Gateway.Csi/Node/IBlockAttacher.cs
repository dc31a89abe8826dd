namespace Gateway.Csi.Node;

/// <summary>
/// The one step of the node plugin that needs the kernel: an export in, a block device out. Kept
/// apart so everything around it (file systems, mounts, state, stats) runs the same over any
/// device, and tests reach the same export through another real data path where the kernel's
/// nbd module is missing.
/// </summary>
public interface IBlockAttacher
{
    /// <summary>Attaches <paramref name="target"/> and returns the block device's path (/dev/nbdN).</summary>
    Task<string> AttachAsync(NbdTarget target, CancellationToken ct);

    /// <summary>Detaches a device <see cref="AttachAsync"/> returned; a device already gone is fine.</summary>
    Task DetachAsync(string device, CancellationToken ct);
}

/// <summary>An export as the node attaches it.</summary>
/// <param name="Connections">NBD connections to open: more than one only when the export advertises NBD_FLAG_CAN_MULTI_CONN.</param>
/// <param name="Tls">TLS files when the node talks TLS to the gateway.</param>
public sealed record NbdTarget(string Host, int Port, string Export, bool ReadOnly, int Connections = 1, NbdTls? Tls = null);

/// <summary>The node's TLS files for NBD (PEM), as <c>nbd-client</c> takes them.</summary>
/// <param name="CaCertFile">The CA the gateway's certificate chains to.</param>
/// <param name="CertFile">The node's client certificate, for exports that allow only some clients.</param>
/// <param name="KeyFile">The key of <paramref name="CertFile"/>.</param>
/// <param name="HostName">The name the gateway's certificate must carry, when it is not the host the node dials.</param>
public sealed record NbdTls(string CaCertFile, string? CertFile = null, string? KeyFile = null, string? HostName = null);
