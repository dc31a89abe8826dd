using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using Gateway.Tests.Cluster;
using Gateway.Tests.Helm;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Image;

/// <summary>
/// The image <c>ops/image</c> built (issue 21), as the chart names it: <c>image.repository</c> of
/// helm/gateway/values.yaml tagged with Chart.yaml's <c>appVersion</c>. ops/test passes the OCI
/// archive as <c>GATEWAY_TEST_IMAGE_ARCHIVE</c>; the image is loaded from it into podman's store
/// when the store lacks it. Missing image or podman FAILS the test: nothing here is skipped.
/// </summary>
public sealed partial class GatewayImage
{
    public const string InstallHint = "build it with ops/image (ops/test does, then sets GATEWAY_TEST_IMAGE_ARCHIVE)";

    private static readonly Lazy<Task<GatewayImage>> Shared = new(LoadAsync);

    private GatewayImage(string name, string archive, int terminationGracePeriodSeconds)
    {
        Name = name;
        Archive = archive;
        TerminationGracePeriod = TimeSpan.FromSeconds(terminationGracePeriodSeconds);
    }

    /// <summary>repository:tag, the chart's default image.</summary>
    public string Name { get; }

    public string Archive { get; }

    /// <summary>The chart's <c>terminationGracePeriodSeconds</c>: the kubelet's SIGKILL comes after it.</summary>
    public TimeSpan TerminationGracePeriod { get; }

    public static Task<GatewayImage> GetAsync() => Shared.Value;

    private static async Task<GatewayImage> LoadAsync()
    {
        string root = HelmToolchain.FindRepoRoot();
        string values = File.ReadAllText(Path.Combine(root, "helm", "gateway", "values.yaml"));
        string chart = File.ReadAllText(Path.Combine(root, "helm", "gateway", "Chart.yaml"));
        string repository = ImageRepository().Match(values) is { Success: true } r ? r.Groups[1].Value.Trim() : throw new InvalidOperationException("no image.repository in values.yaml");
        string version = AppVersion().Match(chart) is { Success: true } v ? v.Groups[1].Value : throw new InvalidOperationException("no appVersion in Chart.yaml");
        int grace = GracePeriod().Match(values) is { Success: true } g ? int.Parse(g.Groups[1].Value, CultureInfo.InvariantCulture) : throw new InvalidOperationException("no terminationGracePeriodSeconds in values.yaml");

        string archive = Environment.GetEnvironmentVariable("GATEWAY_TEST_IMAGE_ARCHIVE") ?? "";
        if (archive.Length == 0 || !File.Exists(archive))
        {
            Assert.Fail($"the gateway's OCI archive is missing (GATEWAY_TEST_IMAGE_ARCHIVE='{archive}'); {InstallHint}");
        }
        string name = $"{repository}:{version}";
        if (!(await Podman.RunAsync(["image", "exists", name], check: false)).Succeeded)
        {
            await Podman.RunAsync(["load", "-i", archive], TimeSpan.FromMinutes(3));
        }
        return new GatewayImage(name, archive, grace);
    }

    [GeneratedRegex(@"^image:\s*\n(?:[ ].*\n)*?[ ]+repository:[ ]*(\S+)", RegexOptions.Multiline)]
    private static partial Regex ImageRepository();

    [GeneratedRegex(@"^appVersion:[ ]*""?([^""\s]+)""?", RegexOptions.Multiline)]
    private static partial Regex AppVersion();

    [GeneratedRegex(@"^terminationGracePeriodSeconds:[ ]*(\d+)", RegexOptions.Multiline)]
    private static partial Regex GracePeriod();
}

/// <summary>
/// podman as this machine can run it. Measured here (Debian 12, podman 4.3.1, cgroups v1, the
/// sandbox withholds CAP_SYS_RESOURCE):
/// <list type="bullet">
/// <item>crun (podman's default) fails "cgroups in hybrid mode not supported, drop all controllers
/// from cgroupv2", with or without <c>--cgroups disabled</c> once the rlimits pass;</item>
/// <item>runc starts containers, but not with podman's default rlimits (RLIMIT_NOFILE 1048576,
/// RLIMIT_NPROC): "error setting rlimit type 7: operation not permitted", nor with
/// <c>--ulimit host</c>; explicit limits at or under what runc may set do pass (NPROC 32768 and
/// below here; 65536 fails "rlimit type 6");</item>
/// <item>runc with <c>--cgroups disabled</c>: "requested OCI runtime runc is not compatible with NoCgroups".</item>
/// </list>
/// So: <c>--runtime runc</c> with <see cref="Limits"/>. Networking (bridge, published ports) works as root.
/// </summary>
public static class Podman
{
    /// <summary>16384 open files and processes (threads count): far above what one gateway uses.</summary>
    public static readonly string[] Limits = ["--runtime", "runc", "--ulimit", "nofile=16384:16384", "--ulimit", "nproc=16384:16384"];

    public static Task<ToolResult> RunAsync(IEnumerable<string> args, TimeSpan? timeout = null, bool check = true, Func<string>? context = null) =>
        Tool.RunAsync("podman", args, timeout, check, context: context);
}

/// <summary>
/// One container of the image, run as a pod of the chart runs: the image's user (UID 10001),
/// read-only root with a tmpfs at /tmp only (the chart's emptyDir), no capabilities, no privilege
/// escalation, the data folder a host directory owned by that user (the chart's volume), ports
/// published on loopback. Removed (forcibly) on dispose.
/// </summary>
public sealed class GatewayContainer : IAsyncDisposable
{
    public const int ImageUid = 10001;
    private const int NbdPort = 10809;
    private const int HealthPort = 8080;

    private readonly Stopwatch _sinceRun = Stopwatch.StartNew();

    private readonly bool _ownsDataDirectory;

    private GatewayContainer(string name, string dataDirectory, int nbdPort, int healthPort, bool ownsDataDirectory = true)
    {
        _ownsDataDirectory = ownsDataDirectory;
        Name = name;
        DataDirectory = dataDirectory;
        HostNbdPort = nbdPort;
        HostHealthPort = healthPort;
    }

    public string Name { get; }
    public string DataDirectory { get; }
    public int HostNbdPort { get; }
    public int HostHealthPort { get; }
    public HttpClient Http { get; } = new() { Timeout = TimeSpan.FromSeconds(3) };

    public string NbdUri(string export) => $"nbd://127.0.0.1:{HostNbdPort}/{export}";

    public Uri HealthUri(string path) => new($"http://127.0.0.1:{HostHealthPort}{path}");

    /// <summary>Starts the image with its own entrypoint and settings (the chart's, /etc/gateway/gateway.json).</summary>
    public static async Task<GatewayContainer> StartAsync(GatewayImage image)
    {
        string data = await CreateDataDirectoryAsync();
        var container = new GatewayContainer($"gateway-image-test-{Guid.NewGuid():N}"[..32], data, ClusterFixture.FreePort(), ClusterFixture.FreePort());
        await Podman.RunAsync([
            "run", "--detach", "--name", container.Name, .. Podman.Limits,
            "--user", $"{ImageUid}:{ImageUid}",
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,nosuid,nodev,size=256m",
            "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--volume", $"{data}:/var/lib/gateway",
            "--publish", $"127.0.0.1:{container.HostNbdPort}:{NbdPort}",
            "--publish", $"127.0.0.1:{container.HostHealthPort}:{HealthPort}",
            image.Name]);
        return container;
    }

    /// <summary>A data folder the image's user owns (the chart's volume with its fsGroup).</summary>
    public static async Task<string> CreateDataDirectoryAsync()
    {
        string data = Directory.CreateTempSubdirectory("gateway-image-").FullName;
        await Tool.RunAsync("chown", [$"{ImageUid}:{ImageUid}", data]);
        return data;
    }

    /// <summary>
    /// Starts the image on the host's network with <paramref name="serveArgs"/> after <c>serve</c>
    /// (its entrypoint stays): for a cluster whose PostgreSQL listens on the host's loopback. The
    /// data folder is shared and not removed on dispose.
    /// </summary>
    public static async Task<GatewayContainer> StartOnHostNetworkAsync(GatewayImage image, string dataDirectory, int nbdPort, int healthPort, IEnumerable<string> serveArgs)
    {
        var container = new GatewayContainer($"gateway-image-test-{Guid.NewGuid():N}"[..32], dataDirectory, nbdPort, healthPort, ownsDataDirectory: false);
        await Podman.RunAsync([
            "run", "--detach", "--name", container.Name, .. Podman.Limits,
            "--user", $"{ImageUid}:{ImageUid}",
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,nosuid,nodev,size=256m",
            "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--network", "host",
            "--volume", $"{dataDirectory}:/var/lib/gateway",
            image.Name,
            "serve", "--data", "/var/lib/gateway", "--nbd", $"127.0.0.1:{nbdPort}", "--health", $"127.0.0.1:{healthPort}", .. serveArgs]);
        return container;
    }

    /// <summary>
    /// Polls the liveness and readiness probes until both answer 200; returns the time since
    /// <c>podman run</c> was called (the container's creation and the runtime's start included).
    /// </summary>
    public async Task<TimeSpan> WaitHealthyAsync(TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < timeout)
        {
            if (await OkAsync("/healthz") && await OkAsync("/readyz"))
            {
                return _sinceRun.Elapsed;
            }
            await Task.Delay(100);
        }
        Assert.Fail($"the container did not answer /healthz and /readyz within {timeout.TotalSeconds} s\n{await LogsAsync()}");
        return default;
    }

    private async Task<bool> OkAsync(string path)
    {
        try
        {
            using HttpResponseMessage response = await Http.GetAsync(HealthUri(path));
            return response.IsSuccessStatusCode;
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
        {
            return false;
        }
    }

    public async Task<string> LogsAsync()
    {
        ToolResult logs = await Podman.RunAsync(["logs", Name], check: false);
        return $"--- podman logs {Name} ---\n{ToolResult.Tail(logs.Stdout + logs.Stderr)}";
    }

    /// <summary>A <c>podman inspect</c> field (Go template) of the running container.</summary>
    public async Task<string> InspectAsync(string format) =>
        (await Podman.RunAsync(["inspect", "--format", format, Name])).Stdout.Trim();

    /// <summary>SIGTERM, as the kubelet sends it, then waits for the exit; returns the exit code and the time it took.</summary>
    public async Task<(int ExitCode, TimeSpan Elapsed)> TerminateAsync(TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        await Podman.RunAsync(["kill", "--signal", "SIGTERM", Name], context: () => LogsAsync().GetAwaiter().GetResult());
        ToolResult wait = await Podman.RunAsync(["wait", Name], timeout, context: () => LogsAsync().GetAwaiter().GetResult());
        return (int.Parse(wait.Stdout.Trim(), CultureInfo.InvariantCulture), clock.Elapsed);
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        await Podman.RunAsync(["rm", "--force", "--time", "0", Name], check: false);
        if (_ownsDataDirectory)
        {
            Directory.Delete(DataDirectory, recursive: true);
        }
    }
}
