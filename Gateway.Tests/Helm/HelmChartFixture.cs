using Xunit;

namespace Gateway.Tests.Helm;

/// <summary>The chart variants every check runs against: defaults and the setups the README describes.</summary>
public static class ChartVariants
{
    public const string Defaults = "defaults";
    public const string S3Only = "s3-only";
    public const string FiveReplicas = "replicas-5";
    public const string NodePort = "nodeport";
    public const string SharedClaim = "shared-pvc";
    public const string TlsIpv6 = "tls-ipv6";
    public const string Csi = "csi";

    /// <summary>Variant name → helm-render arguments (values files are the chart's ci/ examples).</summary>
    public static readonly IReadOnlyDictionary<string, string[]> Arguments = new Dictionary<string, string[]>
    {
        [Defaults] = [],
        [S3Only] = ["-f", "ci/s3-values.yaml"],
        [FiveReplicas] = ["--set", "replicaCount=5"],
        [NodePort] = ["-f", "ci/nodeport-values.yaml"],
        [SharedClaim] = ["-f", "ci/shared-pvc-values.yaml"],
        [TlsIpv6] = ["--set", "tls.enabled=true,tls.existingSecret=gateway-tls", "--set", "listenAddress=::",
            "--set", "clusterTls.enabled=true,clusterTls.existingSecret=gateway-cluster-tls"],
        [Csi] = ["-f", "ci/csi-values.yaml"],
    };

    public static TheoryData<string> All => [.. Arguments.Keys];
}

/// <summary>
/// Builds the renderer and renders and checks every variant once for all the Helm tests (a few
/// seconds), in a scratch folder removed at the end.
/// </summary>
public sealed class HelmChartFixture : IDisposable
{
    private readonly Dictionary<string, RenderedChart> _variants = [];

    public HelmChartFixture()
    {
        Tools = HelmToolchain.Prepare();
        WorkDirectory = Directory.CreateTempSubdirectory("gateway-helm-").FullName;
        foreach ((string name, string[] args) in ChartVariants.Arguments)
        {
            _variants[name] = RenderedChart.TryRender(Tools, Tools.ChartDirectory, $"{name} ({string.Join(' ', args)})", Resolve(args), WorkDirectory, out ProcessResult render)
                ?? throw new Xunit.Sdk.XunitException($"the chart does not render ({name}):\n{render.Describe()}");
        }
    }

    public HelmToolchain Tools { get; }

    /// <summary>Scratch space for the renders and for broken copies of the chart.</summary>
    public string WorkDirectory { get; }

    public RenderedChart this[string variant] => _variants[variant];

    /// <summary>A copy of the chart with <paramref name="find"/> replaced in one template (or _helpers.tpl).</summary>
    public string BrokenCopy(string template, string find, string replace)
    {
        string copy = Path.Combine(WorkDirectory, $"broken-{Guid.NewGuid():N}");
        foreach (string file in Directory.GetFiles(Tools.ChartDirectory, "*", SearchOption.AllDirectories))
        {
            string target = Path.Combine(copy, Path.GetRelativePath(Tools.ChartDirectory, file));
            Directory.CreateDirectory(Path.GetDirectoryName(target)!);
            File.Copy(file, target);
        }
        string path = Path.Combine(copy, "templates", template);
        string text = File.ReadAllText(path);
        Assert.True(text.Contains(find, StringComparison.Ordinal), $"templates/{template} no longer contains '{find}': update this test");
        File.WriteAllText(path, text.Replace(find, replace, StringComparison.Ordinal));
        return copy;
    }

    /// <summary>Renders a chart folder with the values files of a variant (its ci/ paths taken from the real chart).</summary>
    public RenderedChart? TryRender(string chartDirectory, string variant, string label, out ProcessResult render, params string[] more) =>
        RenderedChart.TryRender(Tools, chartDirectory, label, [.. Resolve(ChartVariants.Arguments[variant]), .. more], WorkDirectory, out render);

    private string[] Resolve(string[] args) =>
        [.. args.Select(a => a.StartsWith("ci/", StringComparison.Ordinal) ? Path.Combine(Tools.ChartDirectory, a) : a)];

    public void Dispose()
    {
        try
        {
            Directory.Delete(WorkDirectory, recursive: true);
        }
        catch (IOException)
        {
            // Leftovers in the temp folder are harmless.
        }
    }
}

[CollectionDefinition(Name)]
public sealed class HelmChartCollection : ICollectionFixture<HelmChartFixture>
{
    public const string Name = "Helm chart";
}
