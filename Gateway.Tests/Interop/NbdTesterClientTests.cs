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
/// Not run here: <c>unix</c> and <c>inetd</c> (other transports), <c>tls</c>, <c>tlshuge</c> and
/// <c>tlswrongcert</c> (nbd's own certificates), <c>list</c>'s nbd-client half (the kernel client).
/// Every test has an export of its own: the integrity logs check every read against what the log
/// wrote before, so they need a fresh export that reads as zeros, of simple_test's 50 MiB.
/// </remarks>
public sealed class NbdTesterClientTests(GatewayFixture fixture) : IClassFixture<GatewayFixture>
{
    private const long MiB = 1 << 20;

    // simple_test's sizes: a 4 MiB file for the throughput tests, filesize = 52428800 for integrity.
    private const long ThroughputSize = 4 * MiB;
    private const long IntegritySize = 52428800;

    private readonly GatewayProcess _gateway = fixture.Gateway;

    /// <summary>One simple_test case: the client's flags and the export it runs on.</summary>
    private sealed record TesterCase(string[] Flags, long Size, bool ReadOnly = false, TimeSpan? Timeout = null);

    private static readonly TimeSpan IntegrityTimeout = TimeSpan.FromMinutes(5);

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
        (string client, string transactionLogs) = LocateClient();
        string export = "tester-" + test;
        await CreateExportAsync(export, testCase.Size, testCase.ReadOnly);

        // -t names a transaction log by its file name; simple_test passes ${mydir}/NAME.tr.
        string[] flags = [.. testCase.Flags.Select(f => f.EndsWith(".tr", StringComparison.Ordinal) ? Path.Combine(transactionLogs, f) : f)];
        // NBD_TEST_SILENT drops the "Requests: N\r" progress line the throughput tests print per KiB.
        ToolResult result = await _gateway.RunAsync("env",
            ["NBD_TEST_SILENT=1", client, .. flags, "-N", export, "127.0.0.1", _gateway.NbdPort.ToString(System.Globalization.CultureInfo.InvariantCulture)],
            testCase.Timeout ?? TimeSpan.FromMinutes(2), check: false);

        Assert.True(result.ExitCode == 0,
            $"nbd-tester-client test '{test}' failed (export {export}, {testCase.Size} bytes{(testCase.ReadOnly ? ", read-only" : "")})\n" +
            $"{result.Describe()}\n{_gateway.Describe()}");
    }

    private async Task CreateExportAsync(string name, long size, bool readOnly)
    {
        using HttpResponseMessage response = await _gateway.Http.PostAsJsonAsync("v1/exports",
            new { name, size, readOnly, backend = new { type = "file" } });
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.Created,
            $"creating export {name} answered {(int)response.StatusCode}: {body}\n{_gateway.Describe()}");
    }

    private static (string Client, string TransactionLogs) LocateClient()
    {
        const string hint = "run the tests through ./ops/test, or run ops/lib/build-nbd-tester-client and export " +
                            "GATEWAY_TEST_NBD_TESTER=ops/.nbd-tester/nbd-tester-client GATEWAY_TEST_NBD_TESTER_TR=ops/.nbd-tester/tr (absolute paths)";
        string client = Environment.GetEnvironmentVariable("GATEWAY_TEST_NBD_TESTER") is { Length: > 0 } path
            ? path
            : throw new Xunit.Sdk.XunitException($"GATEWAY_TEST_NBD_TESTER is not set: {hint}");
        Assert.True(File.Exists(client), $"GATEWAY_TEST_NBD_TESTER={client} does not exist: {hint}");
        string logs = Environment.GetEnvironmentVariable("GATEWAY_TEST_NBD_TESTER_TR") is { Length: > 0 } folder
            ? folder
            : Path.Combine(Path.GetDirectoryName(client)!, "tr");
        foreach (string log in new[] { "integrity-test.tr", "integrityhuge-test.tr" })
        {
            Assert.True(File.Exists(Path.Combine(logs, log)), $"the transaction log {log} is not in {logs} (GATEWAY_TEST_NBD_TESTER_TR): {hint}");
        }
        return (client, logs);
    }
}
