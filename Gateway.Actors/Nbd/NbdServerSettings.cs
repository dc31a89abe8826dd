using System.Collections.Concurrent;
using Gateway.Actors.Tls;

namespace Gateway.Actors.Nbd;

/// <summary>
/// What every connection of a node shares: the TLS mode and credentials (null when off) and the
/// per-export connection counts. <see cref="Default"/> is plaintext, with the default
/// handshake timeout and no per-export limits.
/// </summary>
public sealed record NbdServerSettings(TlsMode TlsMode = TlsMode.Off, TlsCredentials? Tls = null)
{
    public static readonly NbdServerSettings Default = new();

    /// <summary>qemu 10's default (its <c>handshake-max-seconds</c>, and qemu-nbd's <c>--handshake-limit</c>).</summary>
    public static readonly TimeSpan DefaultHandshakeTimeout = TimeSpan.FromSeconds(10);

    /// <summary>
    /// How long a client may take from connecting to a successful GO or EXPORT_NAME, TLS included;
    /// a client still negotiating then is disconnected. <see cref="TimeSpan.Zero"/>: no limit.
    /// </summary>
    public TimeSpan HandshakeTimeout { get; init; } = DefaultHandshakeTimeout;

    /// <summary>How long a client may take over the TLS handshake after STARTTLS.</summary>
    public TimeSpan TlsHandshakeTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// TLS from the first byte, before the NBD greeting, with <see cref="Tls"/> (the cluster's
    /// peer data stream): a client that does not finish the TLS handshake, with a certificate
    /// the credentials accept, never sees an NBD byte. <see cref="TlsMode"/> stays Off: there is
    /// no STARTTLS inside it.
    /// </summary>
    public bool TlsFirst { get; init; }

    public ExportConnectionCounter ExportConnections { get; } = new();
}

/// <summary>Connections per export on this node, for <c>ExportAccess.MaxConnections</c>.</summary>
public sealed class ExportConnectionCounter
{
    private readonly ConcurrentDictionary<string, int> _counts = new(StringComparer.Ordinal);

    public int this[string export] => _counts.TryGetValue(export, out int n) ? n : 0;

    /// <summary>Takes a place on <paramref name="export"/>, or null when <paramref name="limit"/> are taken.</summary>
    public IDisposable? TryAcquire(string export, int? limit)
    {
        while (true)
        {
            int n = this[export];
            if (limit is int max && n >= max)
            {
                return null;
            }
            if (n == 0 ? _counts.TryAdd(export, 1) : _counts.TryUpdate(export, n + 1, n))
            {
                return new Lease(this, export);
            }
        }
    }

    private void Release(string export)
    {
        while (true)
        {
            int n = this[export];
            if (n == 0)
            {
                return;
            }
            if (n == 1 ? ((ICollection<KeyValuePair<string, int>>)_counts).Remove(new(export, n)) : _counts.TryUpdate(export, n - 1, n))
            {
                return;
            }
        }
    }

    private sealed class Lease(ExportConnectionCounter owner, string export) : IDisposable
    {
        private int _released;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) == 0)
            {
                owner.Release(export);
            }
        }
    }
}
