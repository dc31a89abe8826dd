using Gateway.Actors.Tls;

namespace Gateway.Actors.Nbd;

/// <summary>
/// What every connection of a node shares: the TLS mode and credentials (null when off) and the
/// export connection slots. <see cref="Default"/> is plaintext, with the default
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

    /// <summary>The clock of <see cref="HandshakeTimeout"/>: the system's, or a test's that it moves by hand.</summary>
    public TimeProvider Time { get; init; } = TimeProvider.System;

    /// <summary>How long a client may take over the TLS handshake after STARTTLS.</summary>
    public TimeSpan TlsHandshakeTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// TLS from the first byte, before the NBD greeting, with <see cref="Tls"/> (the cluster's
    /// peer data stream): a client that does not finish the TLS handshake, with a certificate
    /// the credentials accept, never sees an NBD byte. <see cref="TlsMode"/> stays Off: there is
    /// no STARTTLS inside it.
    /// </summary>
    public bool TlsFirst { get; init; }

    /// <summary>
    /// Where an attach takes its export's connection slot (<c>ExportAccess.MaxConnections</c>):
    /// counted on this node alone by default, across the cluster in cluster mode.
    /// </summary>
    public IExportConnectionSlots ExportConnections { get; init; } = new ExportConnectionCounter();
}
