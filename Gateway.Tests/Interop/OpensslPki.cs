namespace Gateway.Tests.Interop;

/// <summary>
/// Certificates made with the <c>openssl</c> command, laid out as qemu, nbdkit and libnbd expect:
/// a folder per party with <c>ca-cert.pem</c> and <c>server-cert.pem</c>/<c>server-key.pem</c>
/// or <c>client-cert.pem</c>/<c>client-key.pem</c>.
/// </summary>
public sealed class OpensslPki(string root)
{
    public string Root { get; } = root;

    public static async Task<OpensslPki> CreateAsync()
    {
        var pki = new OpensslPki(Directory.CreateTempSubdirectory("gateway-pki-").FullName);
        await pki.CaAsync("ca");
        return pki;
    }

    /// <summary>A self-signed CA named <paramref name="name"/> (files NAME-cert.pem, NAME-key.pem).</summary>
    public async Task CaAsync(string name)
    {
        await OpensslAsync("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", P($"{name}-key.pem"), "-out", P($"{name}-cert.pem"), "-days", "30", "-subj", $"/CN={name} test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
    }

    /// <summary>A folder for a server (SAN 127.0.0.1, localhost) or a client, signed by <paramref name="ca"/>, trusting <paramref name="trust"/>.</summary>
    public async Task<string> IssueAsync(string folder, string subject, bool server, string ca = "ca", string? trust = null, bool expired = false)
    {
        string dir = Directory.CreateDirectory(P(folder)).FullName;
        string role = server ? "server" : "client";
        string ext = P($"{folder}.ext");
        await File.WriteAllTextAsync(ext, server
            ? "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
            : $"subjectAltName=DNS:{subject}.example\nextendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n");
        string key = Path.Combine(dir, $"{role}-key.pem");
        await OpensslAsync("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", P($"{folder}.csr"), "-subj", $"/CN={subject}");
        // openssl 3.0 has no -not_after: a negative lifetime puts notAfter a day in the past.
        string[] validity = ["-days", expired ? "-1" : "10"];
        await OpensslAsync(["x509", "-req", "-in", P($"{folder}.csr"), "-CA", P($"{ca}-cert.pem"), "-CAkey", P($"{ca}-key.pem"),
            "-CAcreateserial", "-out", Path.Combine(dir, $"{role}-cert.pem"), "-extfile", ext, .. validity]);
        File.Copy(P($"{trust ?? ca}-cert.pem"), Path.Combine(dir, "ca-cert.pem"), overwrite: true);
        return dir;
    }

    /// <summary>
    /// A cluster node's folder (node-cert.pem, node-key.pem, ca-cert.pem) signed by <paramref name="ca"/>:
    /// the certificate serves as both TLS server and client, as every node is both.
    /// </summary>
    public async Task<string> IssueNodeAsync(string folder, string subject, string ca = "ca")
    {
        string dir = Directory.CreateDirectory(P(folder)).FullName;
        string ext = P($"{folder}.ext");
        await File.WriteAllTextAsync(ext, $"subjectAltName=DNS:{subject}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n");
        string key = Path.Combine(dir, "node-key.pem");
        await OpensslAsync("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", P($"{folder}.csr"), "-subj", $"/CN={subject}");
        await OpensslAsync("x509", "-req", "-in", P($"{folder}.csr"), "-CA", P($"{ca}-cert.pem"), "-CAkey", P($"{ca}-key.pem"),
            "-CAcreateserial", "-out", Path.Combine(dir, "node-cert.pem"), "-extfile", ext, "-days", "10");
        File.Copy(P($"{ca}-cert.pem"), Path.Combine(dir, "ca-cert.pem"), overwrite: true);
        return dir;
    }

    private string P(string name) => Path.Combine(Root, name);

    private Task OpensslAsync(params string[] args) => Tool.RunAsync("openssl", args, workingDirectory: Root);

    public void Delete()
    {
        try
        {
            Directory.Delete(Root, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
