using Gateway.Actors.Tls;

namespace Gateway.Actors.Nbd;

/// <summary>
/// Who may use an export over NBD. <see cref="TlsRequired"/>: invisible and refused until the
/// client has upgraded with STARTTLS (proto.md "Selective TLS"). <see cref="AllowedClients"/>:
/// when not empty, only a client certificate naming one of them (subject, its CN, or a DNS/IP
/// subject alternative name) sees and opens the export. <see cref="MaxConnections"/>: at most
/// this many client connections to the export, on one node or, in a cluster, on all nodes
/// together (<c>Nbd.IExportConnectionSlots</c>).
/// </summary>
public sealed record ExportAccess(bool TlsRequired = false, string[]? AllowedClients = null, int? MaxConnections = null)
{
    public static readonly ExportAccess Open = new();

    /// <summary>Client certificates are only ever seen over TLS: an allow list implies TLS.</summary>
    public bool NeedsTls => TlsRequired || AllowedClients is { Length: > 0 };

    /// <summary>Whether a client with <paramref name="identity"/> (null: no certificate) may use the export.</summary>
    public bool Allows(ClientIdentity? identity) =>
        AllowedClients is not { Length: > 0 } || (identity is not null && AllowedClients.Any(identity.Matches));

    public bool Equals(ExportAccess? other) =>
        other is not null && TlsRequired == other.TlsRequired && MaxConnections == other.MaxConnections &&
        (AllowedClients ?? []).SequenceEqual(other.AllowedClients ?? []);

    public override int GetHashCode() => HashCode.Combine(TlsRequired, MaxConnections, AllowedClients?.Length);

    /// <summary>The problem with an access section from a client, or null.</summary>
    public string? Validate()
    {
        if (MaxConnections is <= 0)
        {
            return $"maxConnections {MaxConnections} is invalid: it must be a positive number";
        }
        if (AllowedClients?.FirstOrDefault(string.IsNullOrWhiteSpace) is not null)
        {
            return "allowedClients must not contain empty names";
        }
        return null;
    }
}
