using Xunit;

namespace Gateway.Tests.Helm;

/// <summary>
/// The checks can fail: a copy of the chart with one deliberate mistake is rejected by the
/// check meant to catch it (the renderer, the schema, a validator, or the gateway contract).
/// </summary>
[Collection(HelmChartCollection.Name)]
public sealed class BrokenChartTests(HelmChartFixture chart)
{
    private RenderedChart RenderBroken(string template, string find, string replace)
    {
        string copy = chart.BrokenCopy(template, find, replace);
        return RenderedChart.TryRender(chart.Tools, copy, $"broken {template}", [], chart.WorkDirectory, out ProcessResult render)
            ?? throw new Xunit.Sdk.XunitException($"the broken chart was meant to render:\n{render.Describe()}");
    }

    [Fact]
    public void Misspelled_field_fails_strict_loading_and_kubernetes_models()
    {
        RenderedChart broken = RenderBroken("statefulset.yaml", "      containers:", "      contianers:");
        Assert.False(broken.Validation.StrictYamlPassed, broken.Validation.Describe());
        Assert.Contains(broken.Validation.StrictYaml, p => p.Contains("contianers", StringComparison.Ordinal));
        Assert.False(broken.Validation.ModelsPassed, broken.Validation.Describe());
        Assert.Contains("must have required property containers", broken.Validation.Models.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void Bad_indentation_moves_labels_and_fails_strict_loading()
    {
        // nindent 6 instead of 8: the pod labels land beside "labels:" in the pod's metadata.
        RenderedChart broken = RenderBroken("statefulset.yaml", "{{- include \"gateway.podLabels\" . | nindent 8 }}", "{{- include \"gateway.podLabels\" . | nindent 6 }}");
        Assert.False(broken.Validation.StrictYamlPassed, broken.Validation.Describe());
        Assert.Contains(broken.Validation.StrictYaml, p => p.StartsWith("gateway/templates/statefulset.yaml", StringComparison.Ordinal));
    }

    [Fact]
    public void Indentation_that_breaks_the_yaml_fails_the_render()
    {
        string copy = chart.BrokenCopy("services.yaml", "  publishNotReadyAddresses: true", "   publishNotReadyAddresses: true");
        Assert.Null(RenderedChart.TryRender(chart.Tools, copy, "broken yaml", [], chart.WorkDirectory, out ProcessResult render));
        Assert.Contains("YAML parse error on gateway/templates/services.yaml", render.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void Missing_required_field_fails_kubernetes_models()
    {
        RenderedChart broken = RenderBroken("statefulset.yaml",
            "  selector:\n    matchLabels:\n      {{- include \"gateway.selectorLabels\" . | nindent 6 }}\n", "");
        Assert.True(broken.Validation.StrictYamlPassed, "a missing field is no unknown field: strict loading should pass");
        Assert.False(broken.Validation.ModelsPassed, broken.Validation.Describe());
        Assert.Contains("must have required property selector", broken.Validation.Models.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void Unknown_kind_fails_strict_loading_and_kubernetes_models()
    {
        RenderedChart broken = RenderBroken("pdb.yaml", "kind: PodDisruptionBudget", "kind: PodDisruptionBudgets");
        Assert.False(broken.Validation.StrictYamlPassed, broken.Validation.Describe());
        Assert.Contains("no model for policy/v1 PodDisruptionBudgets", broken.Validation.Models.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void Wrong_enum_value_fails_kubernetes_models()
    {
        RenderedChart broken = RenderBroken("statefulset.yaml", "podManagementPolicy: Parallel", "podManagementPolicy: Paralel");
        Assert.False(broken.Validation.ModelsPassed, broken.Validation.Describe());
    }

    [Fact]
    public void Duplicate_key_fails_strict_loading_and_yamllint()
    {
        RenderedChart broken = RenderBroken("statefulset.yaml", "      hostNetwork: false\n", "      hostNetwork: false\n      hostNetwork: true\n");
        Assert.False(broken.Validation.StrictYamlPassed, broken.Validation.Describe());
        Assert.False(broken.Validation.YamllintPassed, broken.Validation.Describe());
        Assert.Contains("key-duplicates", broken.Validation.Yamllint.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void Trailing_whitespace_fails_yamllint()
    {
        RenderedChart broken = RenderBroken("statefulset.yaml", "podManagementPolicy: Parallel", "podManagementPolicy: Parallel  ");
        Assert.False(broken.Validation.YamllintPassed, broken.Validation.Describe());
        Assert.Contains("trailing-spaces", broken.Validation.Yamllint.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void Template_error_fails_the_render_with_its_location()
    {
        string copy = chart.BrokenCopy("configmap.yaml", "{{ include \"gateway.fullname\" . }}", "{{ include \"gateway.fulname\" . }}");
        Assert.Null(RenderedChart.TryRender(chart.Tools, copy, "template error", [], chart.WorkDirectory, out ProcessResult render));
        Assert.Equal(1, render.ExitCode);
        Assert.Contains("gateway/templates/configmap.yaml", render.Stderr, StringComparison.Ordinal);
        Assert.Contains("no template \"gateway.fulname\"", render.Stderr, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("service.type=Nodeport", "service.type")]
    [InlineData("terminationGracePeriodSeconds=60", "terminationGracePeriodSeconds")]
    [InlineData("replicaCount=0", "replicaCount")]
    [InlineData("persistence.enabeld=false", "enabeld")]
    [InlineData("ports.nbd=70000", "ports.nbd")]
    public void Values_outside_the_schema_are_rejected(string set, string named)
    {
        Assert.Null(RenderedChart.TryRender(chart.Tools, chart.Tools.ChartDirectory, $"--set {set}", ["--set", set], chart.WorkDirectory, out ProcessResult render));
        Assert.Contains("values don't meet the specifications of the schema", render.Stderr, StringComparison.Ordinal);
        Assert.Contains(named, render.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void Missing_postgres_secret_fails_the_render()
    {
        Assert.Null(RenderedChart.TryRender(chart.Tools, chart.Tools.ChartDirectory, "no postgres", ["--set", "postgres.existingSecret="], chart.WorkDirectory, out ProcessResult render));
        Assert.Contains("postgres.existingSecret or postgres.connectionString is required", render.Stderr, StringComparison.Ordinal);
    }

    /// <summary>Valid Kubernetes that the gateway would not work with: only the contract checks see it.</summary>
    [Theory]
    [InlineData("statefulset.yaml", "path: /readyz", "path: /ready", "the readiness probe calls /ready")]
    [InlineData("statefulset.yaml", "- name: management\n", "- name: akka-mgmt\n", "container ports are named")]
    [InlineData("statefulset.yaml", "terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}", "terminationGracePeriodSeconds: 30", "does not exceed the gateway's shutdown timeout")]
    [InlineData("statefulset.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "writable root filesystem")]
    [InlineData("statefulset.yaml", "hostNetwork: false", "hostNetwork: true", "host's network")]
    [InlineData("statefulset.yaml", "drop: [\"ALL\"]", "drop: [\"NET_RAW\"]", "does not drop ALL capabilities")]
    [InlineData("statefulset.yaml", "podManagementPolicy: Parallel", "podManagementPolicy: OrderedReady", "not Parallel")]
    [InlineData("_helpers.tpl", "app: {{ include \"gateway.clusterServiceName\" . }}", "app: {{ include \"gateway.name\" . }}", "discovery selects pods with app=gw-gateway")]
    [InlineData("_helpers.tpl", "\"Discovery\" \"kubernetes\"", "\"Discovery\" \"seeds\"", "not kubernetes")]
    [InlineData("_helpers.tpl", "\"Health\" (include \"gateway.endpoint\" (dict \"root\" . \"port\" $ports.health))", "\"Health\" \"127.0.0.1:8080\"", "listens on loopback")]
    [InlineData("rbac.yaml", "verbs: [\"get\", \"watch\", \"list\"]", "verbs: [\"get\", \"list\"]", "no Role grants get, watch and list on pods")]
    [InlineData("services.yaml", "  publishNotReadyAddresses: true\n", "", "does not publish not-ready addresses")]
    [InlineData("services.yaml", "targetPort: nbd", "targetPort: 10809", "not a named container port")]
    [InlineData("statefulset.yaml", "fieldPath: status.podIP", "fieldPath: status.hostIP", "Gateway:Cluster:PublicHostname")]
    [InlineData("statefulset.yaml", "mountPath: /etc/gateway/gateway.json", "mountPath: /etc/gateway/config.json", "no volume mount provides /etc/gateway/gateway.json")]
    public void Chart_that_disagrees_with_the_gateway_fails_the_contract(string template, string find, string replace, string violation)
    {
        RenderedChart broken = RenderBroken(template, find, replace);
        Assert.True(broken.Validation.Passed, $"the mistake should be valid Kubernetes, seen only by the contract:\n{broken.Validation.Describe()}");
        string[] violations;
        try
        {
            violations = [.. GatewayContract.Violations(broken)];
        }
        catch (Xunit.Sdk.XunitException e)
        {
            violations = [e.Message]; // e.g. the configuration file cannot be found at all
        }
        Assert.True(violations.Any(v => v.Contains(violation, StringComparison.Ordinal)),
            $"expected a violation containing '{violation}', got:\n  {string.Join("\n  ", violations)}");
    }
}
