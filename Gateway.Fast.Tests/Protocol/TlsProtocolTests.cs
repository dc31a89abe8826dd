using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Actors.Tls;
using Gateway.Backends;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>Test PKI made in process: a CA, a server certificate, and client certificates it signs.</summary>
public sealed class TestCertificates : IDisposable
{
    private readonly X509Certificate2 _ca;

    public TestCertificates()
    {
        Folder = Directory.CreateTempSubdirectory("gateway-tls-").FullName;
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var caRequest = new CertificateRequest("CN=Protocol Test CA", caKey, HashAlgorithmName.SHA256);
        caRequest.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        caRequest.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign, true));
        _ca = caRequest.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(30));
        File.WriteAllText(CaPath, _ca.ExportCertificatePem());
        using X509Certificate2 server = Issue("CN=localhost", serverAuth: true, out string serverKey);
        File.WriteAllText(CertPath, server.ExportCertificatePem());
        File.WriteAllText(KeyPath, serverKey);
    }

    public string Folder { get; }
    public string CaPath => Path.Combine(Folder, "ca-cert.pem");
    public string CertPath => Path.Combine(Folder, "server-cert.pem");
    public string KeyPath => Path.Combine(Folder, "server-key.pem");

    /// <summary>A client certificate with its private key, signed by the test CA.</summary>
    public X509Certificate2 Client(string subject)
    {
        using X509Certificate2 cert = Issue(subject, serverAuth: false, out string key);
        return X509Certificate2.CreateFromPem(cert.ExportCertificatePem(), key);
    }

    public NbdServerSettings Settings(TlsMode mode) =>
        new(mode, new TlsCredentials(CertPath, KeyPath, CaPath, requireClientCertificate: false, NullLogger.Instance));

    private X509Certificate2 Issue(string subject, bool serverAuth, out string keyPem)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest(subject, key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid(serverAuth ? "1.3.6.1.5.5.7.3.1" : "1.3.6.1.5.5.7.3.2")], false));
        var san = new SubjectAlternativeNameBuilder();
        san.AddDnsName(serverAuth ? "localhost" : subject.Replace("CN=", "", StringComparison.Ordinal) + ".example");
        request.CertificateExtensions.Add(san.Build());
        keyPem = key.ExportPkcs8PrivateKeyPem();
        using X509Certificate2 signed = request.Create(_ca, DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(10), RandomNumberGenerator.GetBytes(8));
        return X509CertificateLoader.LoadCertificate(signed.RawData);
    }

    public void Dispose()
    {
        _ca.Dispose();
        Directory.Delete(Folder, recursive: true);
    }
}

/// <summary>The TLS mode rules of proto.md "TLS support", over a raw client.</summary>
public sealed class TlsProtocolTests : IDisposable
{
    private const string Plain = "plain";
    private const string Secure = "secure";
    private const string Restricted = "restricted";
    private const string Limited = "limited";
    private readonly TestCertificates _pki = new();

    public void Dispose() => _pki.Dispose();

    private NbdTestServer Server(TlsMode mode)
    {
        var exports = new TestExportDirectory();
        exports.Add(Plain, new MemoryBackend(1 << 20));
        exports.Add(Secure, new MemoryBackend(1 << 20), access: new ExportAccess(TlsRequired: true));
        exports.Add(Restricted, new MemoryBackend(1 << 20), access: new ExportAccess(TlsRequired: true, AllowedClients: ["backup", "CN=other, O=x"]));
        exports.Add(Limited, new MemoryBackend(1 << 20), access: new ExportAccess(MaxConnections: 1));
        return new NbdTestServer(exports, mode == TlsMode.Off ? null : _pki.Settings(mode));
    }

    private static async Task<string[]> ListAsync(RawClient client)
    {
        IReadOnlyList<OptionReply> replies = await client.OptionAsync(NbdOption.List, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.Ack, replies[^1].Type);
        return [.. replies.Where(r => r.Type == OptionReplyType.Server).Select(r => Encoding.UTF8.GetString(r.Data, 4, (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(r.Data)))];
    }

    private static async Task GoAsync(RawClient client, string export)
    {
        IReadOnlyList<OptionReply> go = await client.InfoOrGoAsync(NbdOption.Go, export);
        Assert.True(go[^1].Type == OptionReplyType.Ack, $"GO {export}: {go[^1]}");
    }

    [Fact]
    public async Task Tls_off_answers_STARTTLS_with_ERR_POLICY_and_hides_TLS_exports()
    {
        await using NbdTestServer server = Server(TlsMode.Off);
        await using RawClient client = await server.ConnectAsync();
        await client.StartAsync();
        Assert.Equal(OptionReplyType.ErrPolicy, (await client.StartTlsAsync())!.Type);
        Assert.Equal([Plain, Limited], await ListAsync(client));
        Assert.Equal(OptionReplyType.ErrPolicy, (await client.InfoOrGoAsync(NbdOption.Info, Secure))[^1].Type);
        await GoAsync(client, Plain);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Required_mode_refuses_every_option_but_STARTTLS_and_ABORT_until_upgraded()
    {
        await using NbdTestServer server = Server(TlsMode.Required);
        await using RawClient client = await server.ConnectAsync();
        await client.StartAsync();
        Assert.Equal(OptionReplyType.ErrTlsReqd, (await client.OptionAsync(NbdOption.List, ReadOnlyMemory<byte>.Empty))[^1].Type);
        Assert.Equal(OptionReplyType.ErrTlsReqd, (await client.InfoOrGoAsync(NbdOption.Info, Plain))[^1].Type);
        Assert.Equal(OptionReplyType.ErrTlsReqd, (await client.OptionAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty))[^1].Type);
        Assert.Null(await client.StartTlsAsync());
        Assert.Equal(OptionReplyType.ErrInvalid, (await client.StartTlsAsync())!.Type);
        Assert.Equal([Plain, Secure, Limited], await ListAsync(client));
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        await GoAsync(client, Secure);
        await client.AssertWorksAsync();
        await client.AssertWorksAsync(offset: 0, length: 1 << 19, seed: 3); // a large read: the direct path under TLS
    }

    [Fact]
    public async Task Required_mode_closes_on_EXPORT_NAME_before_TLS()
    {
        await using NbdTestServer server = Server(TlsMode.Required);
        await using RawClient client = await server.ConnectAsync();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes(Plain));
        Assert.True(await client.ServerClosedAsync());
    }

    [Fact]
    public async Task Per_export_mode_hides_TLS_exports_until_upgraded_and_STARTTLS_resets_negotiated_state()
    {
        await using NbdTestServer server = Server(TlsMode.PerExport);
        await using RawClient client = await server.ConnectAsync();
        await client.StartAsync();
        Assert.Equal([Plain, Limited], await ListAsync(client));
        Assert.Equal(OptionReplyType.ErrTlsReqd, (await client.InfoOrGoAsync(NbdOption.Go, Secure))[^1].Type);
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        Assert.Equal(OptionReplyType.Ack, (await client.MetaContextAsync(NbdOption.SetMetaContext, Plain, "base:allocation"))[^1].Type);
        Assert.Null(await client.StartTlsAsync());
        // proto.md: after STARTTLS the client must negotiate again; structured replies were forgotten.
        Assert.Equal(OptionReplyType.ErrInvalid, (await client.MetaContextAsync(NbdOption.ListMetaContext, Secure))[^1].Type);
        await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        Assert.Equal([Plain, Secure, Limited], await ListAsync(client));
        await GoAsync(client, Secure);
        await client.AssertWorksAsync();
    }

    [Fact]
    public async Task Plaintext_sent_after_STARTTLS_before_the_handshake_closes_the_connection()
    {
        await using NbdTestServer server = Server(TlsMode.Required);
        await using RawClient client = await server.ConnectAsync();
        await client.StartAsync();
        byte[] both = new byte[32];
        // STARTTLS and, without waiting for the ACK, another option.
        new[] { NbdOption.StartTls, NbdOption.List }.Select((o, i) => (o, i)).ToList().ForEach(x =>
        {
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(both.AsSpan(16 * x.i), NbdMagic.IHaveOpt);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(both.AsSpan(16 * x.i + 8), (uint)x.o);
        });
        await client.SendAsync(both);
        Assert.True(await client.ServerClosedAsync());
        await using RawClient other = await server.ConnectAsync();
        await other.StartAsync();
        Assert.Null(await other.StartTlsAsync());
        await GoAsync(other, Plain);
        await other.AssertWorksAsync();
    }

    [Fact]
    public async Task Allowed_clients_see_and_open_the_export_others_get_ERR_POLICY()
    {
        await using NbdTestServer server = Server(TlsMode.PerExport);
        using X509Certificate2 backup = _pki.Client("CN=backup");
        using X509Certificate2 intruder = _pki.Client("CN=intruder");

        await using RawClient denied = await server.ConnectAsync();
        await denied.StartAsync();
        Assert.Null(await denied.StartTlsAsync(intruder));
        Assert.DoesNotContain(Restricted, await ListAsync(denied));
        Assert.Equal(OptionReplyType.ErrPolicy, (await denied.InfoOrGoAsync(NbdOption.Go, Restricted))[^1].Type);
        await GoAsync(denied, Secure);

        await using RawClient anonymous = await server.ConnectAsync();
        await anonymous.StartAsync();
        Assert.Null(await anonymous.StartTlsAsync());
        Assert.Equal(OptionReplyType.ErrPolicy, (await anonymous.InfoOrGoAsync(NbdOption.Info, Restricted))[^1].Type);

        await using RawClient allowed = await server.ConnectAsync();
        await allowed.StartAsync();
        Assert.Null(await allowed.StartTlsAsync(backup));
        Assert.Contains(Restricted, await ListAsync(allowed));
        await GoAsync(allowed, Restricted);
        await allowed.AssertWorksAsync();
    }

    [Fact]
    public async Task Export_connection_limit_refuses_with_ERR_POLICY_and_frees_the_slot_on_close()
    {
        await using NbdTestServer server = Server(TlsMode.Off);
        RawClient first = await server.OpenAsync(Limited);
        await using (RawClient second = await server.ConnectAsync())
        {
            await second.StartAsync();
            Assert.Equal(OptionReplyType.ErrPolicy, (await second.InfoOrGoAsync(NbdOption.Go, Limited))[^1].Type);
            await GoAsync(second, Plain);
        }
        await first.AssertWorksAsync();
        await first.DisposeAsync();
        RawClient? third = null;
        Assert.True(await NbdTestServer.EventuallyAsync(() =>
        {
            try
            {
                third = server.OpenAsync(Limited).GetAwaiter().GetResult();
                return true;
            }
            catch (InvalidDataException)
            {
                return false;
            }
        }));
        await third!.AssertWorksAsync();
        await third.DisposeAsync();
    }
}
