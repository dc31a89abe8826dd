using System.Globalization;
using System.Net;
using System.Net.Http.Json;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// The reference NBD project's own test client, <c>nbd-tester-client</c> (NetworkBlockDevice/nbd,
/// tests/run), against the real gateway over TCP, invoked as its <c>simple_test</c> driver does for
/// each test that applies to a newstyle TCP server with named exports. The client is built by
/// <c>ops/lib/build-nbd-tester-client</c> from Debian's nbd source package; <c>ops/test</c> exports
/// <c>GATEWAY_TEST_NBD_TESTER</c> (the client) and <c>GATEWAY_TEST_NBD_TESTER_TR</c> (its .tr
/// transaction logs). Without them the tests fail.
/// </summary>
/// <remarks>
/// Not run: <c>unix</c> and <c>inetd</c> (other transports) and <c>list</c>'s nbd-client half (the
/// kernel client). The TLS tests are <see cref="NbdTesterClientTlsTests"/>.
/// Every test has an export of its own: the integrity logs check every read against what the log
/// wrote before, so they need a fresh export that reads as zeros, of simple_test's 50 MiB.
/// </remarks>
public sealed class NbdTesterClientTests(GatewayFixture fixture) : IClassFixture<GatewayFixture>
{
    private const long MiB = 1 << 20;

    // simple_test's sizes: a 4 MiB file for the throughput tests, filesize = 52428800 for integrity.
    private const long ThroughputSize = 4 * MiB;
    internal const long IntegritySize = 52428800;

    private readonly GatewayProcess _gateway = fixture.Gateway;

    /// <summary>One simple_test case: the client's flags and the export it runs on.</summary>
    private sealed record TesterCase(string[] Flags, long Size, bool ReadOnly = false, TimeSpan? Timeout = null);

    internal static readonly TimeSpan IntegrityTimeout = TimeSpan.FromMinutes(5);

    private static readonly Dictionary<string, TesterCase> Cases = new()
    {
        // cfg1, cfgnew, dirconfig, list: a 1 KiB READ per KiB of the export, pipelined.
        ["read"] = new([], ThroughputSize),
        // cfgmulti's export2 (readonly = true): the same reads on a read-only export.
        ["read-only-read"] = new([], ThroughputSize, ReadOnly: true),
        // cfgsize: READs of 1 MiB, 1 MiB + 14 and 2 MiB + 28 bytes; the last two must agree.
        ["oversize"] = new(["-o"], ThroughputSize),
        // write, tree: a 1 KiB WRITE per KiB of the export.
        ["write"] = new(["-w"], ThroughputSize),
        // flush: the same WRITEs, every 16th with FUA and a FLUSH after every 16th; needs both flags.
        ["flush"] = new(["-w", "-f"], ThroughputSize),
        // rowrite, rotree: WRITEs to a read-only export must get an error reply (-F: error expected).
        ["read-only-write"] = new(["-w", "-F"], ThroughputSize, ReadOnly: true),
        // handshake: an unknown option answered NBD_REP_ERR_UNSUP, then NBD_OPT_ABORT.
        ["handshake"] = new(["-h"], ThroughputSize),
        // integrity: 68,990 READs, WRITEs and FLUSHes of up to 124 KiB replayed, every read checked.
        ["integrity"] = new(["-i", "-t", "integrity-test.tr"], IntegritySize, Timeout: IntegrityTimeout),
        // integrityhuge: 250 requests of up to 47.6 MiB, 66 of them above 32 MiB (issue 15).
        ["integrityhuge"] = new(["-i", "-t", "integrityhuge-test.tr"], IntegritySize, Timeout: IntegrityTimeout),
    };

    public static TheoryData<string> TestNames => [.. Cases.Keys];

    [Theory]
    [MemberData(nameof(TestNames))]
    public async Task Reference_nbd_tester_client_test_passes(string test)
    {
        TesterCase testCase = Cases[test];
        string export = "tester-" + test;
        await NbdTesterClient.CreateExportAsync(_gateway, export, testCase.Size, testCase.ReadOnly);

        await NbdTesterClient.RunAndAssertAsync(_gateway, test, export, testCase.Flags, testCase.Timeout ?? TimeSpan.FromMinutes(2),
            $"{testCase.Size} bytes{(testCase.ReadOnly ? ", read-only" : "")}");
    }
}

/// <summary>
/// simple_test's TLS cases against a gateway that requires TLS and a client certificate from its CA
/// (nbd-server's <c>cacertfile</c>), with certificates made by openssl instead of nbd's own: the
/// client checks the server's against the CA and the host name (127.0.0.1 or localhost).
/// </summary>
public sealed class NbdTesterClientTlsTests : IAsyncLifetime
{
    private static readonly TimeSpan IntegrityTimeout = NbdTesterClientTests.IntegrityTimeout;

    private OpensslPki _pki = null!;
    private GatewayProcess _gateway = null!;
    private string _client = null!;
    private string _stranger = null!;

    public async Task InitializeAsync()
    {
        _pki = await OpensslPki.CreateAsync();
        string server = await _pki.IssueAsync("server", "127.0.0.1", server: true);
        _client = await _pki.IssueAsync("client", "tester", server: false);
        // tlswrongcert: a client certificate from a CA the gateway does not trust.
        await _pki.CaAsync("stranger-ca");
        _stranger = await _pki.IssueAsync("stranger", "stranger", server: false, ca: "stranger-ca", trust: "ca");
        _gateway = await GatewayProcess.StartAsync(extraArgs:
            ["--tls", "required", "--tls-certificates", server, "--tls-require-client-cert"]);
    }

    public async Task DisposeAsync()
    {
        if (_gateway is not null)
        {
            await _gateway.StopAsync();
            await _gateway.DisposeAsync();
        }
        _pki?.Delete();
    }

    private static string[] Credentials(string folder) =>
        ["-C", Path.Combine(folder, "client-cert.pem"), "-K", Path.Combine(folder, "client-key.pem"), "-A", Path.Combine(folder, "ca-cert.pem")];

    [Fact]
    public async Task Tls_integrity_log_passes()
    {
        await NbdTesterClient.CreateExportAsync(_gateway, "tester-tls", NbdTesterClientTests.IntegritySize, readOnly: false);
        await NbdTesterClient.RunAndAssertAsync(_gateway, "tls", "tester-tls",
            ["-i", "-t", "integrity-test.tr", .. Credentials(_client)], IntegrityTimeout, "TLS");
    }

    [Fact]
    public async Task Tls_integrityhuge_log_passes()
    {
        await NbdTesterClient.CreateExportAsync(_gateway, "tester-tlshuge", NbdTesterClientTests.IntegritySize, readOnly: false);
        await NbdTesterClient.RunAndAssertAsync(_gateway, "tlshuge", "tester-tlshuge",
            ["-i", "-t", "integrityhuge-test.tr", .. Credentials(_client), "-H", "localhost"], IntegrityTimeout, "TLS");
    }

    [Fact]
    public async Task Tls_client_certificate_from_an_unknown_CA_is_refused()
    {
        // simple_test's tlswrongcert: -F, the connection must fail (a read test that succeeds fails).
        await NbdTesterClient.CreateExportAsync(_gateway, "tester-tlswrongcert", NbdTesterClientTests.IntegritySize, readOnly: false);
        await NbdTesterClient.RunAndAssertAsync(_gateway, "tlswrongcert", "tester-tlswrongcert",
            ["-t", "integrity-test.tr", .. Credentials(_stranger), "-F"], TimeSpan.FromMinutes(2), "TLS, client certificate from another CA");
    }
}

/// <summary>Finds the client that ops/test built and runs one of its tests as simple_test does.</summary>
internal static class NbdTesterClient
{
    private const string Hint = "run the tests through ./ops/test, or run ops/lib/build-nbd-tester-client and export " +
                                "GATEWAY_TEST_NBD_TESTER=$PWD/ops/.nbd-tester/nbd-tester-client GATEWAY_TEST_NBD_TESTER_TR=$PWD/ops/.nbd-tester/tr";

    public static async Task CreateExportAsync(GatewayProcess gateway, string name, long size, bool readOnly)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports",
            new { name, size, readOnly, backend = new { type = "file" } });
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.Created,
            $"creating export {name} answered {(int)response.StatusCode}: {body}\n{gateway.Describe()}");
    }

    /// <summary>
    /// <c>nbd-tester-client FLAGS -N EXPORT 127.0.0.1 PORT</c>; asserts exit code 0 and puts the
    /// client's output and the gateway's log in the failure. A flag ending in .tr names a
    /// transaction log (simple_test passes ${mydir}/NAME.tr).
    /// </summary>
    public static async Task RunAndAssertAsync(GatewayProcess gateway, string test, string export, string[] flags, TimeSpan timeout, string what)
    {
        (string client, string transactionLogs) = Locate();
        string[] args = [.. flags.Select(f => f.EndsWith(".tr", StringComparison.Ordinal) ? Path.Combine(transactionLogs, f) : f)];
        // NBD_TEST_SILENT drops the "Requests: N\r" progress line the throughput tests print per KiB.
        ToolResult result = await gateway.RunAsync("env",
            ["NBD_TEST_SILENT=1", client, .. args, "-N", export, "127.0.0.1", gateway.NbdPort.ToString(CultureInfo.InvariantCulture)],
            timeout, check: false);

        Assert.True(result.ExitCode == 0,
            $"nbd-tester-client test '{test}' failed (export {export}, {what})\n{result.Describe()}\n{gateway.Describe()}");
    }

    private static (string Client, string TransactionLogs) Locate()
    {
        string client = Environment.GetEnvironmentVariable("GATEWAY_TEST_NBD_TESTER") is { Length: > 0 } path
            ? path
            : throw new Xunit.Sdk.XunitException($"GATEWAY_TEST_NBD_TESTER is not set: {Hint}");
        Assert.True(File.Exists(client), $"GATEWAY_TEST_NBD_TESTER={client} does not exist: {Hint}");
        string logs = Environment.GetEnvironmentVariable("GATEWAY_TEST_NBD_TESTER_TR") is { Length: > 0 } folder
            ? folder
            : Path.Combine(Path.GetDirectoryName(client)!, "tr");
        foreach (string log in new[] { "integrity-test.tr", "integrityhuge-test.tr" })
        {
            Assert.True(File.Exists(Path.Combine(logs, log)), $"the transaction log {log} is not in {logs} (GATEWAY_TEST_NBD_TESTER_TR): {Hint}");
        }
        return (client, logs);
    }
}
