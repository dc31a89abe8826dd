using System.Security.Cryptography.X509Certificates;

namespace Gateway.Actors.Tls;

/// <summary>
/// Who a TLS client proved to be: its certificate's subject, common name and subject
/// alternative names (DNS names and IP addresses), already validated against the CA bundle.
/// </summary>
public sealed record ClientIdentity(string Subject, string? CommonName, IReadOnlyList<string> AlternativeNames, string Thumbprint)
{
    public static ClientIdentity From(X509Certificate2 certificate)
    {
        var names = new List<string>();
        foreach (X509Extension extension in certificate.Extensions)
        {
            if (extension is X509SubjectAlternativeNameExtension san)
            {
                names.AddRange(san.EnumerateDnsNames());
                names.AddRange(san.EnumerateIPAddresses().Select(ip => ip.ToString()));
            }
        }
        string? cn = certificate.GetNameInfo(X509NameType.SimpleName, forIssuer: false);
        return new ClientIdentity(certificate.Subject, string.IsNullOrEmpty(cn) ? null : cn, names, certificate.Thumbprint);
    }

    /// <summary>
    /// An allow-list entry matches the whole subject (e.g. <c>CN=backup, O=ops</c>, compared
    /// without regard to case or spaces after commas), the common name, or one alternative name.
    /// </summary>
    public bool Matches(string entry)
    {
        entry = entry.Trim();
        if (entry.Contains('=', StringComparison.Ordinal))
        {
            return string.Equals(Normalize(entry), Normalize(Subject), StringComparison.OrdinalIgnoreCase);
        }
        return string.Equals(entry, CommonName, StringComparison.OrdinalIgnoreCase)
            || AlternativeNames.Any(n => string.Equals(n, entry, StringComparison.OrdinalIgnoreCase));
    }

    private static string Normalize(string distinguishedName) =>
        string.Join(",", distinguishedName.Split(',').Select(part => part.Trim()));

    public override string ToString() =>
        AlternativeNames.Count == 0 ? $"'{Subject}'" : $"'{Subject}' (SAN {string.Join(", ", AlternativeNames)})";
}
