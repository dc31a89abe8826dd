using System.Globalization;
using System.Text.RegularExpressions;
using Grpc.Core;

namespace Gateway.Csi.Node;

/// <summary>
/// Attaches an export with the Linux <c>nbd-client</c> (newstyle, by export name) to a free
/// /dev/nbdN: the kernel's nbd driver then serves the device, and the plugin only starts and
/// stops it.
/// </summary>
/// <param name="nodeId">Named in the error when the kernel cannot attach.</param>
/// <param name="root">Where /dev and /sys are ("/" but in tests).</param>
public sealed partial class NbdClientAttacher(string nodeId, string root = "/") : IBlockAttacher
{
    /// <summary>Seconds a request may wait for the gateway before the kernel fails it: long enough for a gateway node to restart.</summary>
    public const int TimeoutSeconds = 120;

    /// <summary>Connections per device when the export advertises NBD_FLAG_CAN_MULTI_CONN.</summary>
    public const int MultiConnConnections = 4;

    private static readonly SemaphoreSlim Attaching = new(1, 1);

    /// <summary>The /dev/nbdN devices a node has (max_volumes_per_node), or 0 when it has none.</summary>
    public static int DeviceCount(string root = "/") => new NbdClientAttacher("", root).Devices().Count();

    public async Task<string> AttachAsync(NbdTarget target, CancellationToken ct)
    {
        if (!ModuleLoaded)
        {
            throw ModuleMissing(nodeId);
        }
        // Two stages at once must not pick the same free device.
        await Attaching.WaitAsync(ct);
        try
        {
            string device = FreeDevice() ?? throw new RpcException(new Status(StatusCode.ResourceExhausted,
                $"every /dev/nbd device on node {nodeId} is in use: load the module with more (modprobe nbd nbds_max=N)"));
            await HostTool.CheckAsync("nbd-client", Arguments(target, device), ct);
            return device;
        }
        finally
        {
            Attaching.Release();
        }
    }

    public async Task DetachAsync(string device, CancellationToken ct)
    {
        if (!File.Exists(Path.Combine(SysBlock(device), "pid")))
        {
            return; // Not connected: nothing to detach.
        }
        await HostTool.CheckAsync("nbd-client", ["-d", device], ct);
    }

    /// <summary>
    /// nbd-client's arguments: newstyle by name (<c>-N</c>), the connection count, <c>-persist</c> so
    /// a gateway restart is a pause rather than an I/O error in the pod, and TLS when the node has
    /// its files.
    /// </summary>
    public static IReadOnlyList<string> Arguments(NbdTarget target, string device)
    {
        var args = new List<string>
        {
            target.Host, target.Port.ToString(CultureInfo.InvariantCulture), device,
            "-N", target.Export,
            "-C", Math.Max(1, target.Connections).ToString(CultureInfo.InvariantCulture),
            "-timeout", TimeoutSeconds.ToString(CultureInfo.InvariantCulture),
            "-persist",
        };
        if (target.ReadOnly)
        {
            args.Add("-readonly");
        }
        if (target.Tls is { } tls)
        {
            args.AddRange(["-enable-tls", "-cacertfile", tls.CaCertFile]);
            if (tls.CertFile is not null)
            {
                args.AddRange(["-certfile", tls.CertFile]);
            }
            if (tls.KeyFile is not null)
            {
                args.AddRange(["-keyfile", tls.KeyFile]);
            }
            if (tls.HostName is not null)
            {
                args.AddRange(["-tlshostname", tls.HostName]);
            }
        }
        return args;
    }

    public static RpcException ModuleMissing(string nodeId) => new(new Status(StatusCode.FailedPrecondition,
        $"the kernel's nbd module is not loaded on node {nodeId}: modprobe nbd (and list it in /etc/modules-load.d so it loads at boot)"));

    private bool ModuleLoaded => Directory.Exists(Path.Combine(root, "sys/module/nbd")) || File.Exists(Path.Combine(root, "dev/nbd0"));

    /// <summary>The first device with no nbd-client behind it (the kernel shows the client's pid while one is).</summary>
    private string? FreeDevice() =>
        Devices().OrderBy(d => int.Parse(d.AsSpan(Path.Combine(root, "dev/nbd").Length), CultureInfo.InvariantCulture))
            .FirstOrDefault(d => !File.Exists(Path.Combine(SysBlock(d), "pid")));

    private IEnumerable<string> Devices()
    {
        string dev = Path.Combine(root, "dev");
        return Directory.Exists(dev) ? Directory.EnumerateFileSystemEntries(dev, "nbd*").Where(d => NbdDevice().IsMatch(Path.GetFileName(d))) : [];
    }

    private string SysBlock(string device) => Path.Combine(root, "sys/block", Path.GetFileName(device));

    [GeneratedRegex("^nbd[0-9]+$")]
    private static partial Regex NbdDevice();
}
