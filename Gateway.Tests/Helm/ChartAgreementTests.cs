using Gateway.Host;
using k8s.Models;
using Microsoft.Extensions.Configuration;
using Xunit;

namespace Gateway.Tests.Helm;

/// <summary>
/// The chart agrees with the application: the values it hands the gateway, the labels
/// discovery looks for, port names, probe routes and shutdown timing come from
/// <see cref="Kubernetes"/> and the gateway's own parsers, not from copies in the tests.
/// </summary>
[Collection(HelmChartCollection.Name)]
public sealed class ChartAgreementTests(HelmChartFixture chart)
{
    private static void AssertAgrees(RenderedChart rendered, IEnumerable<string> violations)
    {
        string[] found = [.. violations];
        Assert.True(found.Length == 0, $"{rendered}:\n  {string.Join("\n  ", found)}");
    }

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Pods_carry_the_label_discovery_selects_with_the_configured_service_name(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.DiscoveryLabel(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void StatefulSet_services_and_budget_select_the_gateway_pods(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.Selectors(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Container_ports_carry_the_gateway_port_names_at_its_listen_ports(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.ContainerPorts(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Service_ports_target_named_container_ports(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.ServiceTargetPorts(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Headless_service_publishes_not_ready_pods_with_the_cluster_ports(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.HeadlessService(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Probes_call_the_gateway_health_routes_on_the_health_port(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.Probes(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Grace_period_exceeds_the_shutdown_timeout(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.ShutdownGrace(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Pods_run_restricted_without_privileges_or_host_namespaces(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.RestrictedPod(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Service_account_may_get_watch_and_list_pods(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.DiscoveryRbac(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Gateway_gets_per_pod_values_from_the_downward_api_and_credentials_from_secrets(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.Configuration(chart[variant]));

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Only_the_data_folder_and_tmp_are_writable(string variant) =>
        AssertAgrees(chart[variant], GatewayContract.WritablePaths(chart[variant]));

    /// <summary>What the downward API and the Secrets would give pod 0 of the release.</summary>
    private static string? InPod(V1EnvVar variable) => RenderedChart.EnvironmentSource(variable) switch
    {
        "fieldRef:status.podIP" => "10.244.1.7",
        "fieldRef:metadata.name" => $"{RenderedChart.ReleaseName}-gateway-0",
        "fieldRef:metadata.namespace" => RenderedChart.Namespace,
        var source => source,
    };

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Gateway_reads_the_chart_settings_as_kubernetes_discovery_of_its_own_pods(string variant)
    {
        RenderedChart rendered = chart[variant];
        IConfiguration config = rendered.GatewayConfiguration(InPod);
        var serve = new System.CommandLine.Command("serve");
        ClusterCli.AddTo(serve);
        serve.Options.Add(Health.Option);
        var single = new GatewayOptions(config["Gateway:Data"]!,
            GatewayOptions.ParseEndpoint(config["Gateway:Nbd"]!, "Gateway:Nbd"), GatewayOptions.ParseEndpoint(config["Gateway:Admin"]!, "Gateway:Admin"));

        // The gateway's own reading of its configuration (what `gateway serve` does with it).
        ClusterSettings cluster = ClusterCli.Apply(single, serve.Parse([]), config).Cluster
            ?? throw new Xunit.Sdk.XunitException($"{rendered}: the gateway would start as a single node, not in cluster mode");

        int PortNamed(string name) => rendered.Container.Ports.Single(p => p.Name == name).ContainerPort;
        Assert.Equal(PortNamed(Kubernetes.RemotingPortName), cluster.Remoting.Port);
        Assert.Equal(PortNamed(Kubernetes.PeerPortName), cluster.Peer.Port);
        Assert.Equal("10.244.1.7", cluster.PublicHostname);
        Assert.Equal($"{RenderedChart.ReleaseName}-gateway-0", cluster.NodeName);
        Assert.StartsWith("secretKeyRef:", cluster.Postgres, StringComparison.Ordinal);

        KubernetesDiscovery discovery = cluster.Discovery
            ?? throw new Xunit.Sdk.XunitException($"{rendered}: the gateway would use seed nodes, not Kubernetes discovery");
        Assert.Empty(cluster.Seeds);
        Assert.Equal(rendered.PodLabels["app"], discovery.ServiceName);
        Assert.Equal(RenderedChart.Namespace, discovery.Namespace);
        Assert.Equal(PortNamed(Kubernetes.ManagementPortName), discovery.ManagementPort);
        Assert.Equal(Math.Min(3, rendered.StatefulSet.Spec.Replicas ?? 1), discovery.RequiredContactPoints);
        Assert.Equal(PortNamed(Kubernetes.HealthPortName), Health.Apply(single, serve.Parse([]), config).HealthEndpoint?.Port);
    }

    [Fact]
    public void Defaults_run_three_nodes_each_with_its_own_volume()
    {
        RenderedChart rendered = chart[ChartVariants.Defaults];
        IConfiguration config = rendered.GatewayConfiguration();
        Assert.Equal(3, rendered.StatefulSet.Spec.Replicas);
        Assert.Equal("3", config["Gateway:Cluster:RequiredContactPoints"]);
        V1PersistentVolumeClaim claim = Assert.Single(rendered.StatefulSet.Spec.VolumeClaimTemplates);
        V1VolumeMount data = Assert.Single(rendered.Container.VolumeMounts, m => m.MountPath == config["Gateway:Data"]);
        Assert.Equal(claim.Metadata.Name, data.Name);
        Assert.Equal("10Gi", claim.Spec.Resources.Requests["storage"].ToString());
        Assert.Equal(Kubernetes.NbdPortName, Assert.Single(ServiceFor(rendered, Kubernetes.NbdPortName).Spec.Ports).Name);
        Assert.Equal("ClusterIP", ServiceFor(rendered, Kubernetes.NbdPortName).Spec.Type);
    }

    [Fact]
    public void S3_only_keeps_no_volumes_and_passes_endpoint_and_credentials()
    {
        RenderedChart rendered = chart[ChartVariants.S3Only];
        IConfiguration config = rendered.GatewayConfiguration();
        Assert.Null(rendered.StatefulSet.Spec.VolumeClaimTemplates);
        V1VolumeMount data = Assert.Single(rendered.Container.VolumeMounts, m => m.MountPath == config["Gateway:Data"]);
        Assert.NotNull(Assert.Single(rendered.PodSpec.Volumes, v => v.Name == data.Name).EmptyDir);
        Assert.Equal("https://s3.example.internal", config["Gateway:S3:ServiceUrl"]);
        Assert.Equal("vm-disks", config["Gateway:S3:Bucket"]);
        foreach (string credential in new[] { "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY" })
        {
            V1EnvVar variable = Assert.Single(rendered.Container.Env, e => e.Name == credential);
            V1Secret secret = Assert.Single(rendered.All<V1Secret>(), s => s.Metadata.Name == variable.ValueFrom.SecretKeyRef.Name);
            Assert.True(secret.Data.ContainsKey(variable.ValueFrom.SecretKeyRef.Key));
        }
        // Connection string and admin token given as values: the chart made their Secrets.
        Assert.Equal(3, rendered.All<V1Secret>().Count());
        Assert.DoesNotContain("example-secret-key", rendered.Stream, StringComparison.Ordinal);
    }

    [Fact]
    public void Five_replicas_need_three_contact_points()
    {
        RenderedChart rendered = chart[ChartVariants.FiveReplicas];
        Assert.Equal(5, rendered.StatefulSet.Spec.Replicas);
        Assert.Equal("3", rendered.GatewayConfiguration()["Gateway:Cluster:RequiredContactPoints"]);
        Assert.Equal("1", rendered.All<V1PodDisruptionBudget>().Single().Spec.MaxUnavailable.Value);
    }

    [Fact]
    public void NodePort_exposes_nbd_on_every_node()
    {
        V1Service service = ServiceFor(chart[ChartVariants.NodePort], Kubernetes.NbdPortName);
        Assert.Equal("NodePort", service.Spec.Type);
        Assert.Equal("Local", service.Spec.ExternalTrafficPolicy);
        V1ServicePort port = Assert.Single(service.Spec.Ports);
        Assert.Equal(30809, port.NodePort);
        Assert.Equal(10809, port.Port);
        Assert.Equal(Kubernetes.NbdPortName, port.TargetPort.Value);
    }

    [Fact]
    public void Shared_claim_is_mounted_by_every_pod_for_file_export_failover()
    {
        RenderedChart rendered = chart[ChartVariants.SharedClaim];
        Assert.Null(rendered.StatefulSet.Spec.VolumeClaimTemplates);
        V1VolumeMount data = Assert.Single(rendered.Container.VolumeMounts, m => m.MountPath == rendered.GatewayConfiguration()["Gateway:Data"]);
        Assert.Equal("gateway-exports", Assert.Single(rendered.PodSpec.Volumes, v => v.Name == data.Name).PersistentVolumeClaim.ClaimName);
    }

    [Fact]
    public void Tls_certificates_are_mounted_read_only_where_the_gateway_looks()
    {
        RenderedChart rendered = chart[ChartVariants.TlsIpv6];
        IConfiguration config = rendered.GatewayConfiguration();
        Assert.Equal("[::]:10809", config["Gateway:Nbd"]);
        V1VolumeMount mount = Assert.Single(rendered.Container.VolumeMounts, m => m.MountPath == config["Gateway:Tls:Certificates"]);
        Assert.True(mount.ReadOnlyProperty);
        Assert.Equal("gateway-tls", Assert.Single(rendered.PodSpec.Volumes, v => v.Name == mount.Name).Secret.SecretName);
        Assert.Equal("per-export", config["Gateway:Tls:Mode"]);
    }

    [Fact]
    public void Cluster_tls_files_come_read_only_from_their_secret_where_the_gateway_looks()
    {
        RenderedChart rendered = chart[ChartVariants.TlsIpv6];
        IConfiguration config = rendered.GatewayConfiguration();
        string[] files = [config["Gateway:Cluster:TlsCertificate"]!, config["Gateway:Cluster:TlsKey"]!, config["Gateway:Cluster:TlsCa"]!];
        Assert.Equal(["tls.crt", "tls.key", "ca.crt"], files.Select(Path.GetFileName));
        string folder = Assert.Single(files.Select(Path.GetDirectoryName).Distinct())!;
        V1VolumeMount mount = Assert.Single(rendered.Container.VolumeMounts, m => m.MountPath == folder);
        Assert.True(mount.ReadOnlyProperty);
        Assert.Equal("gateway-cluster-tls", Assert.Single(rendered.PodSpec.Volumes, v => v.Name == mount.Name).Secret.SecretName);

        IConfiguration plain = chart[ChartVariants.Defaults].GatewayConfiguration();
        Assert.Null(plain["Gateway:Cluster:TlsCertificate"]);
    }

    [Fact]
    public void Two_releases_in_one_namespace_do_not_discover_each_other()
    {
        RenderedChart other = RenderedChart.TryRender(chart.Tools, chart.Tools.ChartDirectory, "second release", [], chart.WorkDirectory,
            out ProcessResult render, releaseName: "other") ?? throw new Xunit.Sdk.XunitException(render.Describe());
        RenderedChart first = chart[ChartVariants.Defaults];
        Assert.NotEqual(first.GatewayConfiguration()["Gateway:Cluster:ServiceName"], other.GatewayConfiguration()["Gateway:Cluster:ServiceName"]);
        Assert.NotEqual(first.PodLabels["app"], other.PodLabels["app"]);
        Assert.Empty(GatewayContract.Violations(other));
    }

    private static V1Service ServiceFor(RenderedChart rendered, string portName) =>
        Assert.Single(rendered.All<V1Service>(), s => s.Spec.ClusterIP != "None" && s.Spec.Ports.Any(p => p.TargetPort.Value == portName));
}
