using System.CommandLine;
using System.Net;
using Gateway.Actors.Tls;
using Microsoft.Extensions.Logging.Abstractions;

namespace Gateway.Host;

/// <summary>
/// Cluster mode of <c>gateway serve</c> (README "Cluster"). <see cref="Remoting"/> is where Akka
/// remoting binds; <see cref="PublicHostname"/> is how other nodes reach this one (remoting and
/// the peer data stream); <see cref="Peer"/> is where the peer data stream listens.
/// </summary>
public sealed record ClusterSettings(IPEndPoint Remoting, string PublicHostname, IReadOnlyList<string> Seeds, string Postgres, string NodeName, IPEndPoint Peer)
{
    /// <summary>Kubernetes API discovery (Akka.Management cluster bootstrap) instead of seed nodes; null: seeds.</summary>
    public KubernetesDiscovery? Discovery { get; init; }

    /// <summary>Mutual TLS on the peer data stream and Akka remoting (README "Cluster TLS"); null: plaintext.</summary>
    public ClusterTlsFiles? Tls { get; init; }

    /// <summary>Akka address of a seed given as HOST:PORT; with cluster TLS the transport's scheme is <c>akka.ssl.tcp</c>.</summary>
    public static string SeedAddress(string hostPort, bool tls = false) => $"{(tls ? "akka.ssl.tcp" : "akka.tcp")}://{Kubernetes.ActorSystemName}@{hostPort}";
}

/// <summary>
/// Cluster bootstrap through the Kubernetes API: pods labelled <c>app=ServiceName</c> in
/// <see cref="Namespace"/> find each other on the container port named
/// <see cref="Kubernetes.ManagementPortName"/>; the first <see cref="RequiredContactPoints"/> form the cluster.
/// </summary>
public sealed record KubernetesDiscovery(string ServiceName, string? Namespace, int ManagementPort, int RequiredContactPoints)
{
    public const int DefaultManagementPort = 8558;
}

/// <summary>
/// The node's certificate and key (PEM; one certificate for the whole cluster, or one per node)
/// and the cluster CA bundle every peer's certificate must chain to. Each node presents its
/// certificate both as a server and as a client.
/// </summary>
public sealed record ClusterTlsFiles(string Certificate, string Key, string Ca);

public static class ClusterCli
{
    private static readonly Option<string?> Remoting = new("--remoting") { Description = "Cluster mode: Akka remoting listen address HOST:PORT (e.g. 127.0.0.1:7401)" };
    private static readonly Option<string?> PublicHostname = new("--public-hostname") { Description = "Cluster mode: the host other nodes use to reach this one (default: the --remoting host)" };
    private static readonly Option<string[]> Seeds = new("--seed") { Description = "Cluster mode: a seed node's remoting address HOST:PORT, repeatable (default: this node alone)" };
    private static readonly Option<string?> Postgres = new("--postgres") { Description = "Cluster mode: PostgreSQL connection string (Npgsql) for the journal and snapshots (or Gateway__Cluster__Postgres)" };
    private static readonly Option<string?> NodeName = new("--node-name") { Description = "Cluster mode: this node's name in status output (default HOST:PORT of --remoting)" };
    private static readonly Option<string?> Peer = new("--peer") { Description = "Cluster mode: listen address of the node-to-node data stream HOST:PORT (default: remoting host, port + 1)" };
    private static readonly Option<string?> TlsCert = new("--cluster-tls-cert") { Description = "Cluster mode: this node's certificate (PEM) for mutual TLS on the peer data stream and remoting; with --cluster-tls-key and --cluster-tls-ca" };
    private static readonly Option<string?> TlsKey = new("--cluster-tls-key") { Description = "Cluster mode: the private key (PEM) of --cluster-tls-cert" };
    private static readonly Option<string?> TlsCa = new("--cluster-tls-ca") { Description = "Cluster mode: the cluster CA bundle (PEM) every node's certificate must chain to" };

    public static void AddTo(Command serve)
    {
        serve.Options.Add(Remoting);
        serve.Options.Add(PublicHostname);
        serve.Options.Add(Seeds);
        serve.Options.Add(Postgres);
        serve.Options.Add(NodeName);
        serve.Options.Add(Peer);
        serve.Options.Add(TlsCert);
        serve.Options.Add(TlsKey);
        serve.Options.Add(TlsCa);
    }

    public static GatewayOptions Apply(GatewayOptions options, ParseResult parse, IConfiguration config)
    {
        string? remotingText = parse.GetValue(Remoting) ?? config["Gateway:Cluster:Remoting"];
        string[] seeds = parse.GetValue(Seeds) is { Length: > 0 } given
            ? given
            : config.GetSection("Gateway:Cluster:Seeds").GetChildren().Select(c => c.Value).OfType<string>().ToArray();
        if (remotingText is null)
        {
            if (seeds.Length > 0 || parse.GetValue(Postgres) is not null || parse.GetValue(TlsCert) is not null || parse.GetValue(TlsKey) is not null || parse.GetValue(TlsCa) is not null)
            {
                throw new ArgumentException("--seed, --postgres and --cluster-tls-* need cluster mode: give --remoting HOST:PORT too");
            }
            return options;
        }
        IPEndPoint remoting = GatewayOptions.ParseEndpoint(remotingText, "--remoting");
        string publicHost = parse.GetValue(PublicHostname) ?? config["Gateway:Cluster:PublicHostname"]
            ?? (remoting.Address.Equals(IPAddress.Any) || remoting.Address.Equals(IPAddress.IPv6Any)
                ? throw new ArgumentException("--remoting on a wildcard address needs --public-hostname (the address other nodes use)")
                : remoting.Address.ToString());
        string postgres = parse.GetValue(Postgres) ?? config["Gateway:Cluster:Postgres"]
            ?? throw new ArgumentException("cluster mode needs PostgreSQL for the journal: --postgres \"Host=...;Username=...;Password=...;Database=...\"");
        foreach (string seed in seeds)
        {
            _ = GatewayOptions.ParseEndpoint(seed, "--seed");
        }
        string? peerText = parse.GetValue(Peer) ?? config["Gateway:Cluster:Peer"];
        IPEndPoint peer = peerText is null ? new IPEndPoint(remoting.Address, remoting.Port + 1) : GatewayOptions.ParseEndpoint(peerText, "--peer");
        string name = parse.GetValue(NodeName) ?? config["Gateway:Cluster:NodeName"] ?? $"{publicHost}:{remoting.Port}";
        KubernetesDiscovery? discovery = (config["Gateway:Cluster:Discovery"] ?? "seeds") switch
        {
            "seeds" => null,
            "kubernetes" when seeds.Length > 0 => throw new ArgumentException("Gateway:Cluster:Discovery kubernetes and --seed exclude each other"),
            "kubernetes" => new KubernetesDiscovery(
                config["Gateway:Cluster:ServiceName"] ?? Kubernetes.ActorSystemName,
                config["Gateway:Cluster:Namespace"],
                int.TryParse(config["Gateway:Cluster:ManagementPort"], out int port) ? port : KubernetesDiscovery.DefaultManagementPort,
                int.TryParse(config["Gateway:Cluster:RequiredContactPoints"], out int points) ? points : 2),
            string other => throw new ArgumentException($"Gateway:Cluster:Discovery '{other}' is not one of seeds, kubernetes"),
        };
        return options with
        {
            Cluster = new ClusterSettings(remoting, publicHost, discovery is not null ? [] : seeds.Length > 0 ? seeds : [$"{publicHost}:{remoting.Port}"], postgres, name, peer)
            {
                Discovery = discovery,
                Tls = ReadTls(parse, config),
            },
        };
    }

    /// <summary>All three files or none.</summary>
    private static ClusterTlsFiles? ReadTls(ParseResult parse, IConfiguration config)
    {
        string? cert = parse.GetValue(TlsCert) ?? config["Gateway:Cluster:TlsCertificate"];
        string? key = parse.GetValue(TlsKey) ?? config["Gateway:Cluster:TlsKey"];
        string? ca = parse.GetValue(TlsCa) ?? config["Gateway:Cluster:TlsCa"];
        if (cert is null && key is null && ca is null)
        {
            return null;
        }
        if (cert is null || key is null || ca is null)
        {
            string missing = string.Join(", ", new[] { (cert, "--cluster-tls-cert"), (key, "--cluster-tls-key"), (ca, "--cluster-tls-ca") }.Where(f => f.Item1 is null).Select(f => f.Item2));
            throw new ArgumentException($"cluster TLS needs all of --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca: {missing} missing");
        }
        return new ClusterTlsFiles(Path.GetFullPath(cert), Path.GetFullPath(key), Path.GetFullPath(ca));
    }

    /// <summary>
    /// Loads the cluster TLS files once at startup, apart from <see cref="Apply"/> (which only
    /// reads settings): a file that is missing or not PEM is a configuration error, said at once,
    /// not a refused peer later.
    /// </summary>
    public static void LoadTls(GatewayOptions options)
    {
        if (options.Cluster?.Tls is not { } files)
        {
            return;
        }
        try
        {
            _ = new TlsCredentials(files.Certificate, files.Key, files.Ca, requireClientCertificate: true, NullLogger.Instance);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Security.Cryptography.CryptographicException or InvalidDataException)
        {
            throw new ArgumentException($"cluster TLS credentials do not load: {e.Message}");
        }
    }
}
