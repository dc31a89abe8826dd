using System.Net;

namespace Gateway.Host;

/// <summary>
/// Settings of <c>gateway serve</c>, from the command line over the config file.
/// <see cref="NbdEndpoint"/> is the first TCP listener; <see cref="NbdEndpoints"/> all of them
/// (TCP and Unix sockets).
/// </summary>
public sealed record GatewayOptions(string DataDirectory, IPEndPoint NbdEndpoint, IPEndPoint AdminEndpoint)
{
    public IReadOnlyList<EndPoint> NbdEndpoints { get; init; } = [NbdEndpoint];

    /// <summary>File mode of NBD Unix sockets (default 0660: owner and group).</summary>
    public UnixFileMode NbdSocketMode { get; init; } = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite;

    /// <summary>TLS credentials and mode; null for plaintext only.</summary>
    public TlsFiles? Tls { get; init; }

    /// <summary>NBD connections this node serves at once; null for no limit.</summary>
    public int? MaxConnections { get; init; } = DefaultMaxConnections;

    /// <summary>qemu's default <c>max-connections</c> of <c>nbd-server-start</c>.</summary>
    public const int DefaultMaxConnections = 100;

    /// <summary>How long a client may take over the NBD handshake; zero for no limit.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = Gateway.Actors.Nbd.NbdServerSettings.DefaultHandshakeTimeout;

    /// <summary>Where liveness and readiness probes are served (no admin token); null for none.</summary>
    public IPEndPoint? HealthEndpoint { get; init; }

    /// <summary>Cluster mode (Akka.Cluster, PostgreSQL); null on a single node (SQLite).</summary>
    public ClusterSettings? Cluster { get; init; }

    /// <summary>When set, every admin request must carry it as a bearer token.</summary>
    public AdminToken? AdminToken { get; init; }

    /// <summary><c>unix:PATH</c> for a Unix domain socket, else HOST:PORT.</summary>
    public static EndPoint ParseNbdEndpoint(string value) =>
        value.StartsWith("unix:", StringComparison.Ordinal) && value.Length > "unix:".Length
            ? new System.Net.Sockets.UnixDomainSocketEndPoint(Path.GetFullPath(value["unix:".Length..]))
            : ParseEndpoint(value, "--nbd");

    public const string DefaultData = "./data";
    public const string DefaultNbd = "127.0.0.1:10809";
    public const string DefaultAdmin = "127.0.0.1:10880";

    /// <summary>The export made on first start, when there are none: 1 GiB, sparse.</summary>
    public const long InitialExportSize = 1L << 30;

    public string DatabasePath => Path.Combine(DataDirectory, "gateway.db");

    public static IPEndPoint ParseEndpoint(string value, string what)
    {
        if (IPEndPoint.TryParse(value, out IPEndPoint? endpoint) && endpoint.Port != 0 || value.EndsWith(":0", StringComparison.Ordinal) && IPEndPoint.TryParse(value, out endpoint))
        {
            return endpoint!;
        }
        if (value.StartsWith("localhost:", StringComparison.OrdinalIgnoreCase) && int.TryParse(value["localhost:".Length..], out int port))
        {
            return new IPEndPoint(IPAddress.Loopback, port);
        }
        throw new ArgumentException($"{what} '{value}' is not HOST:PORT with a numeric IP address (e.g. 127.0.0.1:10809 or [::1]:10809)");
    }
}
