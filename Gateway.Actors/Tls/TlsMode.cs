namespace Gateway.Actors.Tls;

/// <summary>The server's TLS modes, as proto.md "TLS support" names them.</summary>
public enum TlsMode
{
    /// <summary>No TLS: STARTTLS is answered ERR_POLICY.</summary>
    Off,

    /// <summary>"Selective TLS": exports marked tlsRequired (or with allowed clients) need STARTTLS first.</summary>
    PerExport,

    /// <summary>"Forced TLS": every option but STARTTLS and ABORT is answered ERR_TLS_REQD until the upgrade.</summary>
    Required,
}
