using System.Net;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Tls;

/// <summary>
/// The server's X.509 credentials from PEM files: certificate (optionally followed by its
/// intermediates), private key, and the CA bundle that client certificates must chain to.
/// Every TLS handshake asks for <see cref="ServerOptions"/>, which first looks whether the files
/// changed (cert-manager rewrites them in place or swaps a symlink) and, if so, loads them again:
/// new handshakes get the new certificate, established sessions are untouched. Files caught
/// half-written keep the previous credentials in service until they are whole again.
/// </summary>
public sealed class TlsCredentials
{
    // clientAuth (RFC 5280 4.2.1.12): a client certificate must be meant for clients.
    private static readonly Oid ClientAuthentication = new("1.3.6.1.5.5.7.3.2");

    // serverAuth: a server certificate must be meant for servers.
    private static readonly Oid ServerAuthentication = new("1.3.6.1.5.5.7.3.1");

    private readonly string _certificatePath;
    private readonly string _keyPath;
    private readonly string? _caPath;
    private readonly ILogger _logger;
    private readonly Lock _reloadLock = new();
    private volatile Snapshot _current;
    private byte[] _failedFingerprint = [];

    public TlsCredentials(string certificatePath, string keyPath, string? caPath, bool requireClientCertificate, ILogger logger)
    {
        _certificatePath = Path.GetFullPath(certificatePath);
        _keyPath = Path.GetFullPath(keyPath);
        _caPath = caPath is null ? null : Path.GetFullPath(caPath);
        RequireClientCertificate = requireClientCertificate;
        _logger = logger;
        // A bad file at startup is a configuration error: fail loudly now, not at the first client.
        _current = Load(Fingerprint());
        _logger.LogInformation("TLS certificate {Subject} (expires {NotAfter:u}, SHA-1 {Thumbprint}); client CA bundle {Ca}",
            _current.Certificate.Subject, _current.Certificate.NotAfter.ToUniversalTime(), _current.Certificate.Thumbprint, _caPath ?? "(none: client certificates are not asked for)");
    }

    /// <summary>Clients without a valid certificate are refused at the TLS handshake.</summary>
    public bool RequireClientCertificate { get; }

    /// <summary>The certificate new handshakes present.</summary>
    public X509Certificate2 Certificate => _current.Certificate;

    /// <summary>TLS 1.2 or newer, the current certificate, and client certificates checked against the CA bundle.</summary>
    public SslServerAuthenticationOptions ServerOptions(EndPoint? client)
    {
        Snapshot snapshot = ReloadIfChanged();
        return new SslServerAuthenticationOptions
        {
            ServerCertificateContext = snapshot.Context,
            EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
            ClientCertificateRequired = snapshot.Authorities is not null,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            AllowRenegotiation = false,
            RemoteCertificateValidationCallback = (_, certificate, chain, _) => ValidateClient(snapshot, certificate, chain, client),
        };
    }

    /// <summary>
    /// The client side, for a node connecting to another node of the cluster: presents the current
    /// certificate and accepts only a server certificate that chains to the CA bundle. The host
    /// name is not checked: pods' names and addresses change, and the cluster CA issues only
    /// cluster members' certificates (README "Cluster TLS").
    /// </summary>
    public SslClientAuthenticationOptions ClientOptions(string targetHost)
    {
        Snapshot snapshot = ReloadIfChanged();
        X509Certificate2Collection authorities = snapshot.Authorities ?? throw new InvalidOperationException("client TLS needs a CA bundle to check the server against");
        return new SslClientAuthenticationOptions
        {
            TargetHost = targetHost,
            ClientCertificateContext = snapshot.Context,
            EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            AllowRenegotiation = false,
            RemoteCertificateValidationCallback = (_, certificate, chain, _) => ValidateServer(authorities, certificate, chain, targetHost),
        };
    }

    /// <summary>
    /// For a transport that does its own handshake (Akka remoting): whether a peer's certificate,
    /// either way round, chains to the CA bundle. Node certificates serve as client and server, so
    /// no key usage is asked for here.
    /// </summary>
    public bool IsClusterPeer(X509Certificate? presented, X509Chain? presentedChain, string? peer)
    {
        Snapshot snapshot = ReloadIfChanged();
        if (presented is null || snapshot.Authorities is null)
        {
            _logger.LogWarning("TLS peer {Peer} refused: {Reason}", peer, presented is null ? "no certificate" : "no CA bundle to check it against");
            return false;
        }
        return ChainsToAuthorities(snapshot.Authorities, presented, presentedChain, usage: null, "peer", peer);
    }

    private bool ValidateServer(X509Certificate2Collection authorities, X509Certificate? presented, X509Chain? presentedChain, string server)
    {
        if (presented is null)
        {
            _logger.LogWarning("TLS server {Server} refused: no certificate", server);
            return false;
        }
        return ChainsToAuthorities(authorities, presented, presentedChain, ServerAuthentication, "server", server);
    }

    /// <summary>The CA bundle is the only trust anchor (the system store plays no part); the leaf must be meant for <paramref name="usage"/>.</summary>
    private bool ChainsToAuthorities(X509Certificate2Collection authorities, X509Certificate presented, X509Chain? presentedChain, Oid? usage, string role, object? peer)
    {
        using X509Certificate2 leaf = X509CertificateLoader.LoadCertificate(presented.GetRawCertData());
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(authorities);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        if (usage is not null)
        {
            chain.ChainPolicy.ApplicationPolicy.Add(usage);
        }
        if (presentedChain is not null)
        {
            foreach (X509ChainElement element in presentedChain.ChainElements)
            {
                chain.ChainPolicy.ExtraStore.Add(element.Certificate);
            }
        }
        if (chain.Build(leaf))
        {
            return true;
        }
        string problems = string.Join("; ", chain.ChainStatus.Select(s => $"{s.Status}: {s.StatusInformation.Trim()}"));
        _logger.LogWarning("TLS {Role} {Peer} refused: certificate '{Subject}' (expires {NotAfter:u}) is not valid: {Problems}",
            role, peer, leaf.Subject, leaf.NotAfter.ToUniversalTime(), problems);
        return false;
    }

    private bool ValidateClient(Snapshot snapshot, X509Certificate? presented, X509Chain? presentedChain, EndPoint? client)
    {
        if (presented is null)
        {
            if (RequireClientCertificate)
            {
                _logger.LogWarning("TLS client {Client} refused: no client certificate", client);
                return false;
            }
            return true;
        }
        if (snapshot.Authorities is null)
        {
            // Nothing to check it against: treat the client as anonymous rather than trust it.
            return !RequireClientCertificate;
        }
        return ChainsToAuthorities(snapshot.Authorities, presented, presentedChain, ClientAuthentication, "client", client);
    }

    private Snapshot ReloadIfChanged()
    {
        byte[] fingerprint;
        try
        {
            fingerprint = Fingerprint();
        }
        catch (IOException e)
        {
            // Mid-rotation (a file briefly missing): the credentials in hand are still good.
            _logger.LogDebug("TLS files unreadable, keeping the current certificate: {Reason}", e.Message);
            return _current;
        }
        Snapshot current = _current;
        if (fingerprint.AsSpan().SequenceEqual(current.Fingerprint))
        {
            return current;
        }
        lock (_reloadLock)
        {
            if (fingerprint.AsSpan().SequenceEqual(_current.Fingerprint) || fingerprint.AsSpan().SequenceEqual(_failedFingerprint))
            {
                return _current;
            }
            try
            {
                Snapshot next = Load(fingerprint);
                _current = next;
                _logger.LogInformation("TLS certificate reloaded: {Subject} (expires {NotAfter:u}, SHA-1 {Thumbprint}); connected clients keep their sessions",
                    next.Certificate.Subject, next.Certificate.NotAfter.ToUniversalTime(), next.Certificate.Thumbprint);
            }
            catch (Exception e) when (e is CryptographicException or IOException or ArgumentException or InvalidDataException)
            {
                _failedFingerprint = fingerprint;
                _logger.LogWarning("TLS files changed but do not load ({Reason}); still serving certificate {Thumbprint}",
                    e.Message, _current.Certificate.Thumbprint);
            }
            return _current;
        }
    }

    /// <summary>A hash of the three files' contents: a few KiB read per handshake, immune to mtime and symlink tricks.</summary>
    private byte[] Fingerprint()
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (string? path in new[] { _certificatePath, _keyPath, _caPath })
        {
            if (path is not null)
            {
                hash.AppendData(File.ReadAllBytes(path));
                hash.AppendData([0]);
            }
        }
        return hash.GetHashAndReset();
    }

    private Snapshot Load(byte[] fingerprint)
    {
        var chain = new X509Certificate2Collection();
        chain.ImportFromPemFile(_certificatePath);
        if (chain.Count == 0)
        {
            throw new InvalidDataException($"{_certificatePath} holds no certificate");
        }
        X509Certificate2 leaf = X509Certificate2.CreateFromPemFile(_certificatePath, _keyPath);
        X509Certificate2Collection? authorities = null;
        if (_caPath is not null)
        {
            authorities = [];
            authorities.ImportFromPemFile(_caPath);
            if (authorities.Count == 0)
            {
                throw new InvalidDataException($"{_caPath} holds no certificate");
            }
        }
        var intermediates = new X509Certificate2Collection();
        for (int i = 1; i < chain.Count; i++)
        {
            intermediates.Add(chain[i]);
        }
        // The CA names go out in the CertificateRequest so clients pick the right certificate.
        SslCertificateTrust? trust = authorities is null ? null : SslCertificateTrust.CreateForX509Collection(authorities, sendTrustInHandshake: true);
        var context = SslStreamCertificateContext.Create(leaf, intermediates, offline: true, trust);
        return new Snapshot(fingerprint, leaf, context, authorities);
    }

    private sealed record Snapshot(byte[] Fingerprint, X509Certificate2 Certificate, SslStreamCertificateContext Context, X509Certificate2Collection? Authorities);
}
