using System.Text.Json;
using Gateway.Tests.Interop;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Image;

[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ContainerImageCollection
{
    /// <summary>Containers share the two cores with the rest of the suite: one at a time.</summary>
    public const string Name = "Container image";
}

/// <summary>
/// Issue 21: the image the chart deploys (Containerfile, built by ops/image), run with podman as
/// a pod of the chart runs it (<see cref="GatewayContainer"/>), driven by real NBD clients.
/// </summary>
[Collection(ContainerImageCollection.Name)]
public sealed class ContainerImageTests(ITestOutputHelper log)
{
    private const int MiB = 1024 * 1024;

    /// <summary>Cold start on a loaded 2-core machine is a few seconds; the chart's startup probe allows 120.</summary>
    private static readonly TimeSpan HealthyTimeout = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task Image_is_what_the_chart_runs()
    {
        GatewayImage image = await GatewayImage.GetAsync();
        ToolResult inspect = await Podman.RunAsync(["image", "inspect", image.Name]);
        using JsonDocument doc = JsonDocument.Parse(inspect.Stdout);
        JsonElement config = doc.RootElement[0].GetProperty("Config");

        // Numeric, as runAsNonRoot needs and as the chart's podSecurityContext says.
        Assert.Equal($"{GatewayContainer.ImageUid}:{GatewayContainer.ImageUid}", config.GetProperty("User").GetString());
        Assert.Equal("SIGTERM", config.GetProperty("StopSignal").GetString());
        // The chart's command and args: `gateway serve --config /etc/gateway/gateway.json`, exec form (no shell).
        Assert.Equal(["gateway"], config.GetProperty("Entrypoint").EnumerateArray().Select(e => e.GetString()));
        Assert.Equal(["serve", "--config", "/etc/gateway/gateway.json"], config.GetProperty("Cmd").EnumerateArray().Select(e => e.GetString()));
        JsonElement labels = config.GetProperty("Labels");
        Assert.Equal(image.Name[(image.Name.LastIndexOf(':') + 1)..], labels.GetProperty("org.opencontainers.image.version").GetString());
        Assert.False(string.IsNullOrEmpty(labels.GetProperty("org.opencontainers.image.source").GetString()));
        Assert.False(string.IsNullOrEmpty(labels.GetProperty("org.opencontainers.image.licenses").GetString()));
        string[] ports = [.. config.GetProperty("ExposedPorts").EnumerateObject().Select(p => p.Name)];
        foreach (int port in new[] { 10809, 10880, 8080, 4053, 4054, 8558 })
        {
            Assert.Contains($"{port}/tcp", ports);
        }
        log.WriteLine($"{image.Name}: {doc.RootElement[0].GetProperty("Size").GetInt64() / MiB} MiB unpacked, archive {new FileInfo(image.Archive).Length / MiB} MiB");
    }

    [Fact]
    public async Task Serves_disk0_read_only_root_and_stops_clean_on_SIGTERM()
    {
        GatewayImage image = await GatewayImage.GetAsync();
        await using GatewayContainer container = await GatewayContainer.StartAsync(image);
        TimeSpan healthy = await container.WaitHealthyAsync(HealthyTimeout);
        log.WriteLine($"podman run to /healthz and /readyz 200: {healthy.TotalSeconds:F2} s");

        // As the chart runs it: the image's user, a read-only root.
        Assert.Equal("true", await container.InspectAsync("{{.HostConfig.ReadonlyRootfs}}"));
        int pid = int.Parse(await container.InspectAsync("{{.State.Pid}}"), System.Globalization.CultureInfo.InvariantCulture);
        string uids = File.ReadLines($"/proc/{pid}/status").Single(l => l.StartsWith("Uid:", StringComparison.Ordinal));
        Assert.Equal(["10001", "10001", "10001", "10001"], uids.Split((char[])['\t', ' '], StringSplitOptions.RemoveEmptyEntries)[1..]);

        ToolResult info = await Tool.RunAsync("nbdinfo", ["--json", container.NbdUri("disk0")], context: Logs(container));
        using (JsonDocument doc = JsonDocument.Parse(info.Stdout))
        {
            JsonElement export = doc.RootElement.GetProperty("exports")[0];
            Assert.Equal("disk0", export.GetProperty("export-name").GetString());
            Assert.Equal(1024L * MiB, export.GetProperty("export-size").GetInt64());
        }

        await Tool.RunAsync("qemu-io", ["-f", "raw", container.NbdUri("disk0"), "-c", "write -P 0x5a 1M 2M", "-c", "read -P 0x5a 1M 2M"], context: Logs(container));

        (int exitCode, TimeSpan stopped) = await container.TerminateAsync(image.TerminationGracePeriod);
        string logs = await container.LogsAsync();
        log.WriteLine($"SIGTERM to exit: {stopped.TotalSeconds:F2} s, exit code {exitCode}");
        Assert.True(exitCode == 0, $"exit code {exitCode} after SIGTERM\n{logs}");
        Assert.Contains("exports flushed", logs);

        // Flushed to the volume: the bytes are in the export's file on the host, read without the gateway.
        byte[] data = new byte[2 * MiB];
        await using (FileStream file = File.OpenRead(Path.Combine(container.DataDirectory, "exports", "disk0.img")))
        {
            file.Seek(1 * MiB, SeekOrigin.Begin);
            await file.ReadExactlyAsync(data);
        }
        Assert.True(data.All(b => b == 0x5a), "disk0.img on the volume does not hold what qemu-io wrote");
    }

    [Fact]
    public async Task Build_writes_an_sbom_of_debian_and_nuget_packages_beside_the_archive()
    {
        GatewayImage image = await GatewayImage.GetAsync();
        string sbom = image.Archive[..^".oci.tar".Length] + ".sbom.cdx.json";
        Assert.True(File.Exists(sbom), $"no SBOM beside the archive: {sbom} (ops/image writes it)");
        using JsonDocument doc = JsonDocument.Parse(await File.ReadAllTextAsync(sbom));
        Assert.Equal("CycloneDX", doc.RootElement.GetProperty("bomFormat").GetString());
        string[] purls = [.. doc.RootElement.GetProperty("components").EnumerateArray().Select(c => c.GetProperty("purl").GetString()!)];
        // What the runtime loads natively, the runtime itself, and packages the gateway ships.
        Assert.Contains(purls, p => p.StartsWith("pkg:deb/debian/libssl3@", StringComparison.Ordinal));
        Assert.Contains(purls, p => p.StartsWith("pkg:deb/debian/libc6@", StringComparison.Ordinal));
        Assert.Contains(purls, p => p.StartsWith("pkg:nuget/Microsoft.AspNetCore.App.Runtime.linux-x64@", StringComparison.Ordinal));
        Assert.Contains(purls, p => p.StartsWith("pkg:nuget/Npgsql@", StringComparison.Ordinal));
        Assert.Contains(purls, p => p.StartsWith("pkg:nuget/Akka@", StringComparison.Ordinal));
        log.WriteLine($"{purls.Count(p => p.StartsWith("pkg:deb", StringComparison.Ordinal))} Debian packages, {purls.Count(p => p.StartsWith("pkg:nuget", StringComparison.Ordinal))} NuGet packages and runtimes");
    }

    private static Func<string> Logs(GatewayContainer container) => () => container.LogsAsync().GetAwaiter().GetResult();
}
