using Xunit;

namespace Gateway.Tests.Helm;

/// <summary>
/// Every variant of the chart renders (values checked against values.schema.json), and every
/// document passes the three offline checks: KubernetesClient's strict YAML load,
/// kubernetes-models' validate() and yamllint.
/// </summary>
[Collection(HelmChartCollection.Name)]
public sealed class ChartValidationTests(HelmChartFixture chart)
{
    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Every_document_passes_strict_loading_kubernetes_models_and_yamllint(string variant)
    {
        RenderedChart rendered = chart[variant];
        Assert.True(rendered.Validation.Passed, $"{rendered}:\n{rendered.Validation.Describe()}");
        Assert.Equal(rendered.Documents.Count, rendered.Objects.Count);
        Assert.Contains($"{rendered.Documents.Count} objects, 0 invalid", rendered.Validation.Models.Stdout, StringComparison.Ordinal);
    }

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Every_document_names_its_template(string variant)
    {
        RenderedChart rendered = chart[variant];
        Assert.All(rendered.Documents, d => Assert.StartsWith("gateway/templates/", d.Source, StringComparison.Ordinal));
        Assert.All(rendered.Documents, d => Assert.DoesNotContain("<no value>", d.Text, StringComparison.Ordinal));
    }

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Notes_tell_how_to_reach_the_nbd_service(string variant)
    {
        RenderedChart rendered = chart[variant];
        Assert.Contains($"{RenderedChart.ReleaseName}-gateway", rendered.Notes, StringComparison.Ordinal);
        Assert.Contains("nbd://", rendered.Notes, StringComparison.Ordinal);
    }

    [Fact]
    public void Defaults_render_every_kind_the_cluster_needs()
    {
        string[] kinds = [.. chart[ChartVariants.Defaults].Objects.Select(o => o.GetType().Name).Distinct().Order(StringComparer.Ordinal)];
        Assert.Equal(
            ["V1ConfigMap", "V1PodDisruptionBudget", "V1Role", "V1RoleBinding", "V1Service", "V1ServiceAccount", "V1StatefulSet"],
            kinds);
    }
}
