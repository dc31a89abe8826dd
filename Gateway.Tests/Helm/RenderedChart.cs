using System.Text;
using System.Text.RegularExpressions;
using k8s;
using k8s.Models;
using Microsoft.Extensions.Configuration;
using Xunit;

namespace Gateway.Tests.Helm;

/// <summary>One document of the rendered stream and the template it came from.</summary>
public sealed record RenderedDocument(string Source, string Text);

/// <summary>
/// What the three offline checks said about a rendered stream. Each catches a different class
/// of mistake: KubernetesClient's strict YAML load (misspelled or misplaced fields, wrong types,
/// duplicate keys, unknown kinds), kubernetes-models' <c>.validate()</c> (missing required
/// fields, enum values), yamllint (YAML style: trailing spaces, indentation, duplicates).
/// </summary>
public sealed record ChartValidation(IReadOnlyList<string> StrictYaml, ProcessResult Models, ProcessResult Yamllint)
{
    public bool StrictYamlPassed => StrictYaml.Count == 0;

    public bool ModelsPassed => Models.Succeeded;

    public bool YamllintPassed => Yamllint.Succeeded;

    public bool Passed => StrictYamlPassed && ModelsPassed && YamllintPassed;

    public string Describe() =>
        $"strict YAML: {(StrictYamlPassed ? "passed" : string.Join("\n  ", StrictYaml.Prepend("FAILED")))}\n" +
        $"kubernetes-models: {(ModelsPassed ? "passed" : "FAILED\n" + Models.Describe())}\n" +
        $"yamllint: {(YamllintPassed ? "passed" : "FAILED\n" + Yamllint.Describe())}";
}

/// <summary>A chart rendered with some values, checked, and loaded as KubernetesClient objects.</summary>
public sealed partial class RenderedChart
{
    private RenderedChart(string label, string stream, string notes, IReadOnlyList<RenderedDocument> documents,
        IReadOnlyList<object> objects, ChartValidation validation)
    {
        Label = label;
        Stream = stream;
        Notes = notes;
        Documents = documents;
        Objects = objects;
        Validation = validation;
    }

    public const string ReleaseName = "gw";
    public const string Namespace = "storage";

    /// <summary>What was rendered (variant name and arguments), for messages.</summary>
    public string Label { get; }

    public string Stream { get; }

    public string Notes { get; }

    public IReadOnlyList<RenderedDocument> Documents { get; }

    /// <summary>Every document as its KubernetesClient type (empty when the strict load failed).</summary>
    public IReadOnlyList<object> Objects { get; }

    public ChartValidation Validation { get; }

    public IEnumerable<T> All<T>() => Objects.OfType<T>();

    public V1StatefulSet StatefulSet => Assert.Single(All<V1StatefulSet>());

    /// <summary>
    /// The gateway's Services: all but the CSI driver's (labelled app.kubernetes.io/component
    /// csi-*), which select the CSI pods and are checked by <see cref="CsiContract"/>.
    /// </summary>
    public IEnumerable<V1Service> GatewayServices => All<V1Service>().Where(s => !CsiContract.IsCsiObject(s.Metadata));

    public V1PodSpec PodSpec => StatefulSet.Spec.Template.Spec;

    public V1Container Container => Assert.Single(PodSpec.Containers, c => c.Name == "gateway");

    public IDictionary<string, string> PodLabels => StatefulSet.Spec.Template.Metadata.Labels;

    /// <summary>
    /// Renders <paramref name="chartDirectory"/> with helm-render and checks the result. A render
    /// that fails yields null and the renderer's output in <paramref name="render"/>.
    /// </summary>
    public static RenderedChart? TryRender(HelmToolchain tools, string chartDirectory, string label, IEnumerable<string> args,
        string workDirectory, out ProcessResult render, string releaseName = ReleaseName)
    {
        string slug = Regex.Replace(label, "[^A-Za-z0-9]+", "-").Trim('-');
        string output = Path.Combine(workDirectory, $"{slug}.yaml");
        string notes = Path.Combine(workDirectory, $"{slug}.notes.txt");
        render = HelmToolchain.Run(tools.Renderer,
            [chartDirectory, "--name", releaseName, "--namespace", Namespace, "--output", output, "--notes", notes, .. args]);
        if (!render.Succeeded)
        {
            return null;
        }
        string stream = File.ReadAllText(output);
        IReadOnlyList<RenderedDocument> documents = SplitStream(stream);
        var strict = new List<string>();
        foreach (RenderedDocument document in documents)
        {
            try
            {
                // One document at a time, so a failure names its template.
                KubernetesYaml.LoadAllFromString(document.Text, CustomResources.TypeMap, strict: true);
            }
            catch (Exception e)
            {
                strict.Add($"{document.Source}: {Messages(e)}");
            }
        }
        IReadOnlyList<object> objects = strict.Count == 0 ? KubernetesYaml.LoadAllFromString(stream, CustomResources.TypeMap, strict: true) : [];
        // The two external checks run side by side (each is mostly process start-up).
        Task<ProcessResult> models = Task.Run(() => HelmToolchain.Run(tools.Node, [tools.ModelsScript, "--modules", tools.NodeModules, output]));
        Task<ProcessResult> yamllint = Task.Run(() => HelmToolchain.Run(tools.Yamllint, ["--strict", "-f", "parsable", "-c", tools.YamllintConfig, output]));
        var validation = new ChartValidation(strict, models.GetAwaiter().GetResult(), yamllint.GetAwaiter().GetResult());
        return new RenderedChart(label, stream, File.ReadAllText(notes), documents, objects, validation);
    }

    private static string Messages(Exception e)
    {
        var text = new StringBuilder(e.Message);
        for (Exception? inner = e.InnerException; inner is not null; inner = inner.InnerException)
        {
            text.Append(" → ").Append(inner.Message);
        }
        return text.ToString();
    }

    private static List<RenderedDocument> SplitStream(string stream)
    {
        var documents = new List<RenderedDocument>();
        foreach (string part in Regex.Split(stream, @"^---[ \t]*$", RegexOptions.Multiline))
        {
            if (string.IsNullOrWhiteSpace(part))
            {
                continue;
            }
            Match source = SourceComment().Match(part);
            documents.Add(new RenderedDocument(source.Success ? source.Groups[1].Value : "(no # Source: comment)", part));
        }
        return documents;
    }

    [GeneratedRegex(@"^# Source: (\S+)", RegexOptions.Multiline)]
    private static partial Regex SourceComment();

    /// <summary>
    /// The configuration the gateway would see in this pod, built the way the host builds it:
    /// the JSON file named by <c>--config</c> (resolved through the container's mounts to the
    /// ConfigMap that provides it), then environment variables (<c>A__B</c> is key <c>A:B</c>).
    /// A variable set from a Secret or the downward API has its source as the value,
    /// e.g. <c>secretKeyRef:gw-postgres/connectionString</c> or <c>fieldRef:status.podIP</c>.
    /// </summary>
    /// <param name="resolve">Turns a variable into the value the pod would see; default: <see cref="EnvironmentSource"/>.</param>
    public IConfiguration GatewayConfiguration(Func<V1EnvVar, string?>? resolve = null)
    {
        string json = ConfigFileContent(out string problem) ?? throw new Xunit.Sdk.XunitException(problem);
        var environment = new Dictionary<string, string?>();
        foreach (V1EnvVar variable in Container.Env ?? [])
        {
            environment[variable.Name.Replace("__", ":", StringComparison.Ordinal)] = (resolve ?? EnvironmentSource)(variable);
        }
        return new ConfigurationBuilder()
            .AddJsonStream(new MemoryStream(Encoding.UTF8.GetBytes(json)))
            .AddInMemoryCollection(environment)
            .Build();
    }

    public static string? EnvironmentSource(V1EnvVar variable) => variable switch
    {
        { ValueFrom.SecretKeyRef: { } secret } => $"secretKeyRef:{secret.Name}/{secret.Key}",
        { ValueFrom.FieldRef: { } field } => $"fieldRef:{field.FieldPath}",
        { ValueFrom.ConfigMapKeyRef: { } map } => $"configMapKeyRef:{map.Name}/{map.Key}",
        { ValueFrom: not null } => "valueFrom",
        _ => variable.Value,
    };

    /// <summary>The text of the file the container's <c>--config</c> argument names, or null and why not.</summary>
    public string? ConfigFileContent(out string problem)
    {
        IList<string> command = [.. Container.Command ?? [], .. Container.Args ?? []];
        int at = command.IndexOf("--config");
        if (at < 0 || at + 1 >= command.Count)
        {
            problem = $"the container's command line has no --config FILE: {string.Join(' ', command)}";
            return null;
        }
        string path = command[at + 1];
        foreach (V1VolumeMount mount in Container.VolumeMounts ?? [])
        {
            string? key = mount.MountPath == path ? mount.SubPath
                : path.StartsWith(mount.MountPath.TrimEnd('/') + "/", StringComparison.Ordinal) && string.IsNullOrEmpty(mount.SubPath) ? path[(mount.MountPath.TrimEnd('/').Length + 1)..]
                : null;
            if (key is null)
            {
                continue;
            }
            V1Volume? volume = PodSpec.Volumes?.SingleOrDefault(v => v.Name == mount.Name);
            if (volume?.ConfigMap is not { } source)
            {
                problem = $"{path} is on volume {mount.Name}, which is not a ConfigMap";
                return null;
            }
            V1ConfigMap? map = All<V1ConfigMap>().SingleOrDefault(m => m.Metadata.Name == source.Name);
            if (map?.Data is null || !map.Data.TryGetValue(key, out string? content))
            {
                problem = $"{path} should come from ConfigMap {source.Name} key {key}, which the chart does not render";
                return null;
            }
            problem = "";
            return content;
        }
        problem = $"no volume mount provides {path}";
        return null;
    }

    public override string ToString() => Label;
}
