using System.Globalization;
using System.Net;
using System.Net.Http.Json;
using System.Text.RegularExpressions;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>The Prometheus text at /metrics, scraped from the real gateway after real client traffic.</summary>
public sealed partial class MetricsInteropTests(GatewayFixture fixture) : IClassFixture<GatewayFixture>
{
    private readonly GatewayProcess _gateway = fixture.Gateway;

    [Fact]
    public async Task Request_byte_and_error_counters_move_by_exactly_the_traffic_sent()
    {
        await CreateAsync("metrics-rw", readOnly: false);
        await CreateAsync("metrics-ro", readOnly: true);
        Dictionary<string, double> before = await ScrapeAsync();

        // 3 writes of 64 KiB and 2 reads of 4 KiB; qemu-io adds one FLUSH when it closes.
        await _gateway.RunAsync("qemu-io", ["-f", "raw",
            "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 64k", "-c", "write -P 0x33 1M 64k",
            "-c", "read -P 0x11 0 4k", "-c", "read -P 0x33 1M 4k", _gateway.NbdUri("metrics-rw")]);
        // Two writes to a read-only export, sent anyway (libnbd's strict mode off): EPERM each.
        string script = Path.Combine(_gateway.DataDirectory, "ro-writes.py");
        await File.WriteAllTextAsync(script, """
            import sys, nbd
            h = nbd.NBD()
            h.set_strict_mode(0)
            h.connect_uri(sys.argv[1])
            failures = 0
            for offset in (0, 4096):
                try:
                    h.pwrite(b"x" * 4096, offset)
                except nbd.Error:
                    failures += 1
            h.shutdown()
            sys.exit(0 if failures == 2 else f"expected 2 refused writes, got {failures}")
            """);
        await _gateway.RunAsync("/usr/bin/python3", [script, _gateway.NbdUri("metrics-ro")]);

        Dictionary<string, double> after = await ScrapeAsync();
        double Delta(string series) => after.GetValueOrDefault(series) - before.GetValueOrDefault(series);
        string context = $"\nscrape after:\n{string.Join('\n', after.Where(kv => kv.Key.Contains("metrics-")).Select(kv => $"{kv.Key} {kv.Value}"))}";

        Assert.True(Delta("nbd_requests_total{command=\"write\",export=\"metrics-rw\"}") == 3, context);
        Assert.True(Delta("nbd_bytes_total{command=\"write\",export=\"metrics-rw\"}") == 3 * 65536, context);
        Assert.True(Delta("nbd_requests_total{command=\"read\",export=\"metrics-rw\"}") == 2, context);
        Assert.True(Delta("nbd_bytes_total{command=\"read\",export=\"metrics-rw\"}") == 2 * 4096, context);
        Assert.True(Delta("nbd_request_duration_seconds_count{command=\"write\",export=\"metrics-rw\"}") == 3, context);
        Assert.True(Delta("nbd_errors_total{command=\"write\",error=\"EPERM\",export=\"metrics-ro\"}") == 2, context);
        Assert.True(Delta("nbd_bytes_total{command=\"write\",export=\"metrics-ro\"}") == 0, context);
        Assert.True(Delta("nbd_errors_total{command=\"write\",error=\"EPERM\",export=\"metrics-rw\"}") == 0, context);
        Assert.True(after.GetValueOrDefault("nbd_connections{export=\"metrics-rw\"}") == 0, context);
        Assert.True(after.GetValueOrDefault("nbd_requests_in_flight{export=\"metrics-rw\"}") == 0, context);
    }

    private async Task CreateAsync(string name, bool readOnly)
    {
        using HttpResponseMessage response = await _gateway.Http.PostAsJsonAsync("v1/exports",
            new { name, size = 16 << 20, readOnly, backend = new { type = "file" } });
        Assert.True(response.StatusCode == HttpStatusCode.Created, await response.Content.ReadAsStringAsync());
    }

    /// <summary>Series name with its labels (scope labels dropped, rest sorted) → value.</summary>
    private async Task<Dictionary<string, double>> ScrapeAsync()
    {
        string text = await _gateway.Http.GetStringAsync("metrics");
        var series = new Dictionary<string, double>(StringComparer.Ordinal);
        foreach (string line in text.Split('\n'))
        {
            Match m = SeriesLine().Match(line);
            if (!m.Success)
            {
                continue;
            }
            string labels = string.Join(",", LabelPair().Matches(m.Groups["labels"].Value)
                .Select(l => l.Value)
                .Where(l => !l.StartsWith("otel_scope", StringComparison.Ordinal))
                .Order(StringComparer.Ordinal));
            series[$"{m.Groups["name"].Value}{{{labels}}}"] = double.Parse(m.Groups["value"].Value, CultureInfo.InvariantCulture);
        }
        Assert.True(series.Count > 0, $"no series in /metrics:\n{text}");
        return series;
    }

    [GeneratedRegex("""^(?<name>[a-z_]+)\{(?<labels>[^}]*)\} (?<value>\S+)""")]
    private static partial Regex SeriesLine();

    [GeneratedRegex("[a-z_]+=\"[^\"]*\"")]
    private static partial Regex LabelPair();
}
