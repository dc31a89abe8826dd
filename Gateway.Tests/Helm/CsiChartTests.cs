using k8s.Models;
using Xunit;

namespace Gateway.Tests.Helm;

/// <summary>
/// The CSI driver the chart deploys with csi.enabled (ci/csi-values.yaml) agrees with the plugin
/// (`gateway csi`), the kubelet and the gateway (<see cref="CsiContract"/>); a chart that breaks
/// one of those agreements fails its check; csi.enabled=false renders none of it.
/// </summary>
[Collection(HelmChartCollection.Name)]
public sealed class CsiChartTests(HelmChartFixture chart)
{
    private RenderedChart Csi => chart[ChartVariants.Csi];

    private static void AssertAgrees(RenderedChart rendered, IEnumerable<string> violations)
    {
        string[] found = [.. violations];
        Assert.True(found.Length == 0, $"{rendered}:\n  {string.Join("\n  ", found)}");
    }

    [Fact]
    public void Driver_objects_carry_the_name_the_plugin_reports() => AssertAgrees(Csi, CsiContract.Driver(Csi));

    [Fact]
    public void Only_the_node_plugin_container_is_privileged() => AssertAgrees(Csi, CsiContract.Privileges(Csi));

    [Fact]
    public void Every_sidecar_dials_the_socket_the_plugin_listens_on() => AssertAgrees(Csi, CsiContract.Sockets(Csi));

    [Fact]
    public void Registrar_registers_the_socket_where_the_kubelet_finds_it() => AssertAgrees(Csi, CsiContract.Registration(Csi));

    [Fact]
    public void Plugins_reach_the_gateway_through_the_chart_services_with_its_admin_token() => AssertAgrees(Csi, CsiContract.GatewayEndpoints(Csi));

    [Fact]
    public void Gateway_services_and_budget_select_no_csi_pod() => AssertAgrees(Csi, CsiContract.Selection(Csi));

    [Fact]
    public void Controller_account_holds_what_each_sidecar_needs() => AssertAgrees(Csi, CsiContract.ControllerRbac(Csi));

    [Fact]
    public void Custom_resources_have_their_required_fields() => AssertAgrees(Csi, CsiContract.CustomResourceFields(Csi));

    [Fact]
    public void Csi_render_passes_every_gateway_check_too() => AssertAgrees(Csi, GatewayContract.Violations(Csi));

    [Fact]
    public void Node_plugin_reads_each_nbd_tls_file_it_is_given_from_the_secret_mounted_there()
    {
        CsiContract.Workload node = CsiContract.Node(Csi) ?? throw new Xunit.Sdk.XunitException("no node DaemonSet");
        V1Container plugin = node.Container(CsiContract.PluginContainer)!;
        foreach ((string flag, string key) in new[] { ("--nbd-tls-ca", "ca.crt"), ("--nbd-tls-cert", "tls.crt"), ("--nbd-tls-key", "tls.key") })
        {
            string path = CsiContract.Flag(plugin, flag) ?? throw new Xunit.Sdk.XunitException($"the node plugin has no {flag}");
            V1VolumeMount mount = Assert.Single(plugin.VolumeMounts!, m => path.StartsWith(m.MountPath + "/", StringComparison.Ordinal));
            Assert.True(mount.ReadOnlyProperty);
            V1Volume volume = Assert.Single(node.Pod.Volumes!, v => v.Name == mount.Name);
            Assert.Equal("gateway-csi-nbd-tls", volume.Secret?.SecretName);
            Assert.Contains(volume.Secret!.Items!, i => i.Key == key && i.Path == path[(mount.MountPath.Length + 1)..]);
        }
        // Without the values the node speaks plain NBD and mounts no such Secret.
        RenderedChart plainRender = chart.TryRender(chart.Tools.ChartDirectory, ChartVariants.Csi, "csi, plain NBD", out ProcessResult render, "--set", "csi.node.nbdTls.existingSecret=")
            ?? throw new Xunit.Sdk.XunitException(render.Describe());
        CsiContract.Workload plain = CsiContract.Node(plainRender)!;
        Assert.Null(CsiContract.Flag(plain.Container(CsiContract.PluginContainer)!, "--nbd-tls-ca"));
        Assert.DoesNotContain(plain.Pod.Volumes!, v => v.Secret?.SecretName == "gateway-csi-nbd-tls");
    }

    [Fact]
    public void Csi_render_holds_the_driver_its_classes_and_the_metadata_service()
    {
        V1CSIDriver driver = Assert.Single(Csi.All<V1CSIDriver>());
        Assert.Equal(CsiContract.DriverName, driver.Metadata.Name);
        V1StorageClass storageClass = Assert.Single(Csi.All<V1StorageClass>());
        Assert.Equal("overlay", storageClass.Parameters["backend"]);
        Assert.True(storageClass.AllowVolumeExpansion);
        Assert.Equal("true", storageClass.Metadata.Annotations["storageclass.kubernetes.io/is-default-class"]);
        V1VolumeSnapshotClass snapshotClass = Assert.Single(Csi.All<V1VolumeSnapshotClass>());
        Assert.Equal(CsiContract.DriverName, snapshotClass.Driver);
        Assert.Equal("Delete", snapshotClass.DeletionPolicy);
        V1Beta1SnapshotMetadataService metadata = Assert.Single(Csi.All<V1Beta1SnapshotMetadataService>());
        Assert.Equal($"{RenderedChart.ReleaseName}-gateway-csi-snapshot-metadata.{RenderedChart.Namespace}.svc:6443", metadata.Spec?.Address);
        Assert.Equal(CsiContract.DriverName, metadata.Spec?.Audience);
        // The custom resources were checked against their CRD schemas, not skipped.
        Assert.Contains("VolumeSnapshotClass/nbd-gateway (CRD schema)", Csi.Validation.Models.Stdout, StringComparison.Ordinal);
        Assert.Contains($"SnapshotMetadataService/{CsiContract.DriverName} (CRD schema)", Csi.Validation.Models.Stdout, StringComparison.Ordinal);

        CsiContract.Workload controller = CsiContract.Controller(Csi) ?? throw new Xunit.Sdk.XunitException("no controller");
        Assert.Equal(2, Assert.Single(Csi.All<V1Deployment>()).Spec.Replicas);
        string[] containers = [CsiContract.PluginContainer, .. CsiContract.ControllerSidecars];
        Assert.Equal(containers, controller.Containers.Select(c => c.Name));
        V1Container plugin = controller.Container(CsiContract.PluginContainer)!;
        Assert.Equal(["gateway"], plugin.Command);
        Assert.Equal($"http://{RenderedChart.ReleaseName}-gateway-admin.{RenderedChart.Namespace}.svc:10880/", CsiContract.Flag(plugin, "--admin"));
        Assert.Equal($"{RenderedChart.ReleaseName}-gateway.{RenderedChart.Namespace}.svc:10809", CsiContract.Flag(plugin, "--nbd"));
        Assert.All(new[] { "csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter" },
            name => Assert.Contains("--leader-election", controller.Container(name)!.Args));
        Assert.Contains("--extra-create-metadata", controller.Container("csi-provisioner")!.Args);
        Assert.All(controller.Containers.Where(c => c.Name != CsiContract.PluginContainer),
            c => Assert.StartsWith("registry.k8s.io/sig-storage/", c.Image, StringComparison.Ordinal));
    }

    [Fact]
    public void Node_plugin_mounts_the_kubelet_folder_bidirectionally_and_names_its_node()
    {
        CsiContract.Workload node = CsiContract.Node(Csi) ?? throw new Xunit.Sdk.XunitException("no node DaemonSet");
        V1Container plugin = node.Container(CsiContract.PluginContainer)!;
        V1VolumeMount kubelet = Assert.Single(plugin.VolumeMounts, m => m.MountPath == "/var/lib/kubelet");
        Assert.Equal("Bidirectional", kubelet.MountPropagation);
        Assert.Equal("$(CSI_NODE_ID)", CsiContract.Flag(plugin, "--node-id"));
        Assert.Equal("node", CsiContract.Flag(plugin, "--mode"));
        Assert.Equal($"--kubelet-registration-path=/var/lib/kubelet/plugins/{CsiContract.DriverName}/csi.sock",
            Assert.Single(node.Container(CsiContract.RegistrarContainer)!.Args, a => a.StartsWith("--kubelet-registration-path=", StringComparison.Ordinal)));
        // Exactly one privileged container in the whole render.
        Assert.Single(CsiContract.Workloads(Csi).SelectMany(w => w.Containers), c => c.SecurityContext?.Privileged == true);
    }

    [Fact]
    public void Kubelet_folder_is_a_value()
    {
        RenderedChart moved = chart.TryRender(chart.Tools.ChartDirectory, ChartVariants.Csi, "csi, k0s kubelet", out ProcessResult render,
            "--set", "csi.kubeletDir=/var/lib/k0s/kubelet") ?? throw new Xunit.Sdk.XunitException(render.Describe());
        Assert.True(moved.Validation.Passed, moved.Validation.Describe());
        AssertAgrees(moved, CsiContract.Registration(moved));
        V1Container registrar = CsiContract.Node(moved)!.Container(CsiContract.RegistrarContainer)!;
        Assert.Equal($"/var/lib/k0s/kubelet/plugins/{CsiContract.DriverName}/csi.sock", CsiContract.Flag(registrar, "--kubelet-registration-path"));
    }

    [Theory]
    [MemberData(nameof(ChartVariants.All), MemberType = typeof(ChartVariants))]
    public void Disabled_csi_renders_none_of_its_objects(string variant)
    {
        if (variant == ChartVariants.Csi)
        {
            Assert.Contains(chart[variant].Documents, d => d.Source.StartsWith("gateway/templates/csi-", StringComparison.Ordinal));
            Assert.Contains($"rollout status daemonset/{RenderedChart.ReleaseName}-gateway-csi-node", chart[variant].Notes, StringComparison.Ordinal);
            return;
        }
        RenderedChart rendered = chart[variant];
        Assert.DoesNotContain(rendered.Documents, d => d.Source.StartsWith("gateway/templates/csi-", StringComparison.Ordinal));
        Assert.Empty(rendered.All<V1CSIDriver>());
        Assert.Empty(rendered.All<V1StorageClass>());
        Assert.Empty(rendered.All<V1VolumeSnapshotClass>());
        Assert.Empty(rendered.All<V1Beta1SnapshotMetadataService>());
        Assert.Empty(rendered.All<V1Deployment>());
        Assert.Empty(rendered.All<V1DaemonSet>());
        Assert.Empty(rendered.All<V1ClusterRole>());
        Assert.Empty(rendered.All<V1ClusterRoleBinding>());
        Assert.DoesNotContain(CsiContract.DriverName, rendered.Stream, StringComparison.Ordinal);
        Assert.DoesNotContain(CsiContract.DriverName, rendered.Notes, StringComparison.Ordinal);
    }

    [Fact]
    public void Classes_and_snapshot_metadata_can_be_left_out()
    {
        RenderedChart bare = chart.TryRender(chart.Tools.ChartDirectory, ChartVariants.Csi, "csi without extras", out ProcessResult render,
            "--set", "csi.storageClass.create=false,csi.volumeSnapshotClass.create=false,csi.snapshotMetadata.enabled=false")
            ?? throw new Xunit.Sdk.XunitException(render.Describe());
        Assert.True(bare.Validation.Passed, bare.Validation.Describe());
        Assert.Empty(bare.All<V1StorageClass>());
        Assert.Empty(bare.All<V1VolumeSnapshotClass>());
        Assert.Empty(bare.All<V1Beta1SnapshotMetadataService>());
        Assert.Null(CsiContract.Controller(bare)!.Container("csi-snapshot-metadata"));
        Assert.DoesNotContain(bare.All<V1ClusterRole>(), r => r.Rules.Any(rule => rule.ApiGroups.Contains("cbt.storage.k8s.io")));
        AssertAgrees(bare, CsiContract.Violations(bare));
    }

    [Theory]
    [InlineData("csi.snapshotMetadata.caCert=", "csi.snapshotMetadata.caCert")]
    [InlineData("admin.service.enabled=false", "csi.enabled needs admin.service.enabled")]
    public void Missing_prerequisite_fails_the_render(string set, string message)
    {
        Assert.Null(chart.TryRender(chart.Tools.ChartDirectory, ChartVariants.Csi, $"csi --set {set}", out ProcessResult render, "--set", set));
        Assert.Contains(message, render.Stderr, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("csi.storageClass.backend=nfs", "backend")]
    [InlineData("csi.sidecars.pullPolicy=Sometimes", "pullPolicy")]
    [InlineData("csi.controler.replicas=2", "controler")]
    [InlineData("csi.images.provisioner.tag=", "tag")]
    public void Csi_values_outside_the_schema_are_rejected(string set, string named)
    {
        Assert.Null(chart.TryRender(chart.Tools.ChartDirectory, ChartVariants.Csi, $"csi --set {set}", out ProcessResult render, "--set", set));
        Assert.Contains("values don't meet the specifications of the schema", render.Stderr, StringComparison.Ordinal);
        Assert.Contains(named, render.Stderr, StringComparison.Ordinal);
    }

    /// <summary>Valid Kubernetes that the plugin, the kubelet or the gateway would not work with: only the CSI checks see it.</summary>
    [Theory]
    [InlineData("_helpers.tpl", "csi.nbd-gateway.dev\n{{- end }}", "nbd-gateway.csi\n{{- end }}", "the plugin reports 'csi.nbd-gateway.dev'")]
    [InlineData("csi-driver.yaml", "  attachRequired: true", "  attachRequired: false", "does not require attach")]
    [InlineData("csi-controller.yaml", "            - --csi-address={{ $socket }}\n            - --timeout={{ $sidecar.timeout }}\n            - --port", "            - --csi-address=/csi/plugin.sock\n            - --timeout={{ $sidecar.timeout }}\n            - --port", "sidecar csi-snapshot-metadata dials plugin.sock")]
    [InlineData("csi-node.yaml", "- --kubelet-registration-path={{ include \"gateway.csi.pluginDir\" . }}/csi.sock", "- --kubelet-registration-path=/var/lib/kubelet/plugins/csi.sock", "the registrar registers /var/lib/kubelet/plugins/csi.sock")]
    [InlineData("csi-node.yaml", "              mountPropagation: Bidirectional\n", "", "no Bidirectional mount")]
    [InlineData("csi-node.yaml", "        - name: node-driver-registrar\n          image: {{ include \"gateway.csi.sidecarImage\" $images.nodeDriverRegistrar }}\n          imagePullPolicy: {{ $sidecar.pullPolicy }}\n          args:\n            - --csi-address={{ $socket }}\n", "        - name: node-driver-registrar\n          image: {{ include \"gateway.csi.sidecarImage\" $images.nodeDriverRegistrar }}\n          imagePullPolicy: {{ $sidecar.pullPolicy }}\n          args:\n            - --csi-address=/registration/csi.sock\n", "the registrar registers")]
    [InlineData("csi-controller.yaml", "          securityContext:\n            {{- include \"gateway.csi.restricted\" . | nindent 12 }}\n          {{- with $sidecar.resources }}", "          securityContext:\n            privileged: true\n          {{- with $sidecar.resources }}", "is privileged; only the node plugin may be")]
    [InlineData("_helpers.tpl", "{{- printf \"http://%s-admin.%s.svc:%d/\" (include \"gateway.fullname\" .) .Release.Namespace (int .Values.admin.service.port) }}", "{{- printf \"http://%s-admin.%s.svc:%d/\" (include \"gateway.fullname\" .) .Release.Namespace (add 1 (int .Values.admin.service.port)) }}", "port 10881 of Service gw-gateway-admin")]
    [InlineData("_helpers.tpl", "{{- printf \"%s.%s.svc:%d\" (include \"gateway.fullname\" .) .Release.Namespace (int .Values.service.port) }}", "{{- printf \"%s-cluster.%s.svc:%d\" (include \"gateway.fullname\" .) .Release.Namespace (int .Values.service.port) }}", "--nbd gw-gateway-cluster.storage.svc:10809")]
    [InlineData("_helpers.tpl", "- /etc/gateway-csi/admin/{{ .root.Values.admin.existingSecretKey }}", "- /etc/gateway-csi/admin/admin-token", "--token-file is key admin-token")]
    [InlineData("_helpers.tpl", "app.kubernetes.io/name: {{ printf \"%s-csi\" (include \"gateway.name\" .root) | trunc 63 | trimSuffix \"-\" }}", "app.kubernetes.io/name: {{ include \"gateway.name\" .root }}", "gateway Service gw-gateway selects the pods of Deployment")]
    [InlineData("csi-rbac.yaml", "(dict \"apiGroups\" (list \"storage.k8s.io\") \"resources\" (list \"volumeattachments/status\") \"verbs\" (list \"patch\"))", "(dict \"apiGroups\" (list \"storage.k8s.io\") \"resources\" (list \"volumeattachments\") \"verbs\" (list \"patch\"))", "csi-attacher may not patch volumeattachments/status.storage.k8s.io")]
    [InlineData("csi-rbac.yaml", "    verbs: [\"get\", \"watch\", \"list\", \"delete\", \"update\", \"create\"]", "    verbs: [\"get\", \"watch\", \"list\"]", "elect a leader but may not delete leases")]
    [InlineData("csi-controller.yaml", "            - --port={{ .Values.csi.snapshotMetadata.containerPort }}", "            - --port=50052", "does not reach the port the csi-snapshot-metadata sidecar listens on")]
    public void Csi_chart_that_disagrees_fails_the_contract(string template, string find, string replace, string violation)
    {
        string copy = chart.BrokenCopy(template, find, replace);
        RenderedChart broken = chart.TryRender(copy, ChartVariants.Csi, $"broken csi {template}", out ProcessResult render)
            ?? throw new Xunit.Sdk.XunitException($"the broken chart was meant to render:\n{render.Describe()}");
        Assert.True(broken.Validation.Passed, $"the mistake should be valid Kubernetes, seen only by the contract:\n{broken.Validation.Describe()}");
        string[] violations = [.. CsiContract.Violations(broken)];
        Assert.True(violations.Any(v => v.Contains(violation, StringComparison.Ordinal)),
            $"expected a violation containing '{violation}', got:\n  {string.Join("\n  ", violations)}");
    }

    [Theory]
    [InlineData("csi-driver.yaml", "deletionPolicy: {{ .deletionPolicy }}", "deletionPolicy: Keep", "/deletionPolicy must be equal to one of the allowed values")]
    [InlineData("csi-driver.yaml", "driver: {{ $driver }}\n", "", "must have required property 'driver'")]
    [InlineData("csi-controller.yaml", "  caCert: {{ required", "  caCerts: {{ required", "must have required property 'caCert'")]
    public void Custom_resource_outside_its_crd_schema_fails_validation(string template, string find, string replace, string message)
    {
        string copy = chart.BrokenCopy(template, find, replace);
        RenderedChart broken = chart.TryRender(copy, ChartVariants.Csi, $"broken crd {template}", out ProcessResult render)
            ?? throw new Xunit.Sdk.XunitException($"the broken chart was meant to render:\n{render.Describe()}");
        Assert.False(broken.Validation.ModelsPassed, broken.Validation.Describe());
        Assert.Contains(message, broken.Validation.Models.Stdout, StringComparison.Ordinal);
    }
}
