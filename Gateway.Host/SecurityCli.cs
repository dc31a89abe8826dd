using System.CommandLine;
using System.Globalization;
using System.Net;
using System.Security.Cryptography;
using System.Text;
using Gateway.Actors.Nbd;
using Gateway.Actors.Tls;
using Microsoft.Extensions.Logging.Abstractions;

namespace Gateway.Host;

/// <summary>Where the TLS credentials are (PEM files) and how the server uses them.</summary>
public sealed record TlsFiles(TlsMode Mode, string Certificate, string Key, string? Ca, bool RequireClientCertificate);

/// <summary>
/// The admin API's bearer token. Only its SHA-256 is kept, compared in constant time; it never
/// prints (a record holding it, logged by accident, shows "(redacted)").
/// </summary>
public sealed class AdminToken
{
    public const string EnvironmentVariable = "GATEWAY_ADMIN_TOKEN";

    private readonly byte[] _hash;

    public AdminToken(string token)
    {
        if (string.IsNullOrWhiteSpace(token))
        {
            throw new ArgumentException("the admin token is empty");
        }
        _hash = SHA256.HashData(Encoding.UTF8.GetBytes(token.Trim()));
    }

    /// <summary>From a file (first line, trimmed) or, without one, the environment; null when neither.</summary>
    public static string? Read(string? file)
    {
        if (file is not null)
        {
            try
            {
                return File.ReadAllText(file).Trim();
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new ArgumentException($"cannot read the admin token file '{file}': {e.Message}");
            }
        }
        return Environment.GetEnvironmentVariable(EnvironmentVariable) is { Length: > 0 } value ? value.Trim() : null;
    }

    // Hashing first makes the comparison constant-time in the length too.
    public bool Matches(string presented) =>
        CryptographicOperations.FixedTimeEquals(SHA256.HashData(Encoding.UTF8.GetBytes(presented.Trim())), _hash);

    public override string ToString() => "(redacted)";
}

/// <summary>
/// The security and limit options of <c>gateway serve</c>: TLS, the Unix socket mode, connection
/// limits, and the admin token. The command line wins over the config file (Gateway:Tls:*, ...).
/// </summary>
public static class SecurityCli
{
    private static readonly Option<string?> TlsMode = new("--tls") { Description = "TLS mode: off, per-export (exports marked tlsRequired need STARTTLS), required (default off; per-export when certificates are given)" };
    private static readonly Option<string?> TlsCertificates = new("--tls-certificates") { Description = "Folder with server-cert.pem, server-key.pem and ca-cert.pem (the layout of qemu, nbdkit and libnbd)" };
    private static readonly Option<string?> TlsCert = new("--tls-cert") { Description = "Server certificate (PEM; intermediates may follow it)" };
    private static readonly Option<string?> TlsKey = new("--tls-key") { Description = "Server private key (PEM)" };
    private static readonly Option<string?> TlsCa = new("--tls-ca") { Description = "CA bundle (PEM) client certificates must chain to; without it, none are asked for" };
    private static readonly Option<bool> TlsRequireClientCert = new("--tls-require-client-cert") { Description = "Refuse TLS clients without a valid client certificate" };
    private static readonly Option<string?> SocketMode = new("--nbd-socket-mode") { Description = "File mode of NBD Unix sockets, octal (default 0660)" };
    private static readonly Option<int?> MaxConnections = new("--max-connections") { Description = $"NBD connections this node serves at once, those still in the handshake included; a client beyond it is refused with ERR_POLICY (default {GatewayOptions.DefaultMaxConnections}, as qemu's; 0: no limit)" };
    private static readonly Option<double?> HandshakeTimeout = new("--handshake-timeout") { Description = $"Seconds a client may take to finish the NBD handshake (TLS included) before it is disconnected (default {NbdServerSettings.DefaultHandshakeTimeout.TotalSeconds:0}, as qemu's; 0: no limit)" };
    private static readonly Option<string?> AdminTokenFile = new("--admin-token-file") { Description = $"File holding the admin API bearer token (or ${AdminToken.EnvironmentVariable}); required unless the admin API is on loopback" };

    public static void AddTo(Command serve)
    {
        foreach (Option option in new Option[] { TlsMode, TlsCertificates, TlsCert, TlsKey, TlsCa, TlsRequireClientCert, SocketMode, MaxConnections, HandshakeTimeout, AdminTokenFile })
        {
            serve.Options.Add(option);
        }
    }

    /// <summary>Adds the security settings to <paramref name="options"/>; throws <see cref="ArgumentException"/> naming what is wrong.</summary>
    public static GatewayOptions Apply(GatewayOptions options, ParseResult parse, IConfiguration config)
    {
        string? folder = parse.GetValue(TlsCertificates) ?? config["Gateway:Tls:Certificates"];
        string? cert = parse.GetValue(TlsCert) ?? config["Gateway:Tls:Certificate"] ?? InFolder(folder, "server-cert.pem");
        string? key = parse.GetValue(TlsKey) ?? config["Gateway:Tls:Key"] ?? InFolder(folder, "server-key.pem");
        string? ca = parse.GetValue(TlsCa) ?? config["Gateway:Tls:Ca"] ?? InFolder(folder, "ca-cert.pem");
        if (folder is not null && ca is not null && !File.Exists(ca) && parse.GetValue(TlsCa) is null)
        {
            ca = null; // the folder simply has no CA bundle
        }
        string? modeText = parse.GetValue(TlsMode) ?? config["Gateway:Tls:Mode"];
        TlsMode mode = modeText switch
        {
            null => cert is null ? Actors.Tls.TlsMode.Off : Actors.Tls.TlsMode.PerExport,
            "off" => Actors.Tls.TlsMode.Off,
            "per-export" => Actors.Tls.TlsMode.PerExport,
            "required" => Actors.Tls.TlsMode.Required,
            _ => throw new ArgumentException($"--tls '{modeText}' is not one of off, per-export, required"),
        };
        TlsFiles? tls = null;
        if (mode != Actors.Tls.TlsMode.Off)
        {
            if (cert is null || key is null)
            {
                throw new ArgumentException($"--tls {modeText ?? "per-export"} needs a certificate and key (--tls-certificates DIR, or --tls-cert and --tls-key)");
            }
            bool requireClient = parse.GetValue(TlsRequireClientCert) || string.Equals(config["Gateway:Tls:RequireClientCertificate"], "true", StringComparison.OrdinalIgnoreCase);
            if (requireClient && ca is null)
            {
                throw new ArgumentException("--tls-require-client-cert needs a CA bundle (--tls-ca)");
            }
            tls = new TlsFiles(mode, Path.GetFullPath(cert), Path.GetFullPath(key), ca is null ? null : Path.GetFullPath(ca), requireClient);
            try
            {
                _ = new TlsCredentials(tls.Certificate, tls.Key, tls.Ca, tls.RequireClientCertificate, NullLogger.Instance);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Security.Cryptography.CryptographicException or InvalidDataException)
            {
                throw new ArgumentException($"TLS credentials do not load: {e.Message}");
            }
        }

        string socketModeText = parse.GetValue(SocketMode) ?? config["Gateway:NbdSocketMode"] ?? "0660";
        if (!int.TryParse(socketModeText, NumberStyles.None, CultureInfo.InvariantCulture, out _) || socketModeText.Any(c => c > '7'))
        {
            throw new ArgumentException($"--nbd-socket-mode '{socketModeText}' is not an octal file mode such as 0660");
        }
        var socketMode = (UnixFileMode)Convert.ToInt32(socketModeText, 8);

        string? maxConnectionsText = config["Gateway:MaxConnections"];
        int maxConnections = parse.GetValue(MaxConnections)
            ?? (maxConnectionsText is null ? GatewayOptions.DefaultMaxConnections
                : int.TryParse(maxConnectionsText, NumberStyles.None, CultureInfo.InvariantCulture, out int fromConfig) ? fromConfig
                : throw new ArgumentException($"Gateway:MaxConnections '{maxConnectionsText}' is not a number"));
        if (maxConnections < 0)
        {
            throw new ArgumentException($"--max-connections {maxConnections} must be 0 (no limit) or positive");
        }

        string? handshakeText = config["Gateway:NbdHandshakeTimeout"];
        double handshakeSeconds = parse.GetValue(HandshakeTimeout)
            ?? (handshakeText is null ? NbdServerSettings.DefaultHandshakeTimeout.TotalSeconds
                : double.TryParse(handshakeText, NumberStyles.Float, CultureInfo.InvariantCulture, out double fromConfigSeconds) ? fromConfigSeconds
                : throw new ArgumentException($"Gateway:NbdHandshakeTimeout '{handshakeText}' is not a number of seconds"));
        if (!(handshakeSeconds >= 0 && handshakeSeconds <= int.MaxValue / 1000))
        {
            throw new ArgumentException($"--handshake-timeout {handshakeSeconds} must be 0 (no limit) or a positive number of seconds");
        }

        string? token = AdminToken.Read(parse.GetValue(AdminTokenFile) ?? config["Gateway:AdminTokenFile"]);
        if (token is null && !IPAddress.IsLoopback(options.AdminEndpoint.Address))
        {
            throw new ArgumentException($"the admin API on {options.AdminEndpoint} is not on loopback: give a bearer token with --admin-token-file or ${AdminToken.EnvironmentVariable}");
        }
        return options with
        {
            Tls = tls,
            NbdSocketMode = socketMode,
            MaxConnections = maxConnections == 0 ? null : maxConnections,
            HandshakeTimeout = TimeSpan.FromSeconds(handshakeSeconds),
            AdminToken = token is null ? null : new AdminToken(token),
        };
    }

    /// <summary>The NBD settings every connection shares; the TLS files are loaded (and later reloaded) here.</summary>
    public static NbdServerSettings NbdSettings(GatewayOptions options, ILoggerFactory loggers) => options.Tls is not TlsFiles tls
        ? new NbdServerSettings { HandshakeTimeout = options.HandshakeTimeout }
        : new NbdServerSettings(tls.Mode, new TlsCredentials(tls.Certificate, tls.Key, tls.Ca, tls.RequireClientCertificate, loggers.CreateLogger("Gateway.Tls")))
        {
            HandshakeTimeout = options.HandshakeTimeout,
        };

    private static string? InFolder(string? folder, string file) => folder is null ? null : Path.Combine(folder, file);
}
