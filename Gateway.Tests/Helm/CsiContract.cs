using System.Globalization;
using Gateway.Host;
using k8s.Models;

namespace Gateway.Tests.Helm;

/// <summary>
/// What the chart's CSI driver must agree with: the plugin's contract (`gateway csi`: its driver
/// name, socket and flags), the kubelet's plugin registration, the chart's own gateway Services
/// and Secrets, and what each Kubernetes CSI sidecar needs. Each check returns the violations
/// it finds, so a test shows both that the chart passes and that a wrong chart fails.
/// </summary>
public static class CsiContract
{
    /// <summary>The name the plugin reports in GetPluginInfo.</summary>
    public const string DriverName = Gateway.Csi.CsiDriver.Name;

    public const string PluginContainer = "csi-plugin";
    public const string RegistrarContainer = "node-driver-registrar";

    private const string ComponentLabel = "app.kubernetes.io/component";

    /// <summary>The sidecars each CSI pod must run beside the plugin.</summary>
    public static readonly string[] ControllerSidecars = ["csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "csi-snapshot-metadata", "liveness-probe"];

    public static readonly string[] NodeSidecars = [RegistrarContainer, "liveness-probe"];

    /// <summary>An object of the CSI driver (labelled app.kubernetes.io/component csi-*).</summary>
    public static bool IsCsiObject(V1ObjectMeta? metadata) =>
        metadata?.Labels is { } labels && labels.TryGetValue(ComponentLabel, out string? component) && component.StartsWith("csi-", StringComparison.Ordinal);

    /// <summary>Every check; empty when the CSI driver agrees with the plugin, the kubelet and the gateway.</summary>
    public static IEnumerable<string> Violations(RenderedChart chart) =>
        Driver(chart)
            .Concat(Privileges(chart))
            .Concat(Sockets(chart))
            .Concat(Registration(chart))
            .Concat(GatewayEndpoints(chart))
            .Concat(Selection(chart))
            .Concat(ControllerRbac(chart))
            .Concat(CustomResourceFields(chart));

    /// <summary>A pod template of the chart: the gateway's StatefulSet or a CSI workload.</summary>
    public sealed record Workload(string Kind, string Name, V1PodSpec Pod, IDictionary<string, string> Labels, IDictionary<string, string>? Selector)
    {
        public override string ToString() => $"{Kind} {Name}";

        public IEnumerable<V1Container> Containers => (Pod.InitContainers ?? []).Concat(Pod.Containers ?? []);

        public V1Container? Container(string name) => Containers.FirstOrDefault(c => c.Name == name);
    }

    public static IEnumerable<Workload> Workloads(RenderedChart chart) =>
        chart.All<V1StatefulSet>().Select(s => new Workload("StatefulSet", s.Metadata.Name, s.Spec.Template.Spec, s.Spec.Template.Metadata?.Labels ?? new Dictionary<string, string>(), s.Spec.Selector?.MatchLabels))
            .Concat(chart.All<V1Deployment>().Select(d => new Workload("Deployment", d.Metadata.Name, d.Spec.Template.Spec, d.Spec.Template.Metadata?.Labels ?? new Dictionary<string, string>(), d.Spec.Selector?.MatchLabels)))
            .Concat(chart.All<V1DaemonSet>().Select(d => new Workload("DaemonSet", d.Metadata.Name, d.Spec.Template.Spec, d.Spec.Template.Metadata?.Labels ?? new Dictionary<string, string>(), d.Spec.Selector?.MatchLabels)));

    /// <summary>The controller Deployment and the node DaemonSet, or null when the chart has no such workload.</summary>
    public static Workload? Controller(RenderedChart chart) => Workloads(chart).SingleOrDefault(w => w.Kind == "Deployment" && w.Labels.TryGetValue(ComponentLabel, out string? c) && c == "csi-controller");

    public static Workload? Node(RenderedChart chart) => Workloads(chart).SingleOrDefault(w => w.Kind == "DaemonSet" && w.Labels.TryGetValue(ComponentLabel, out string? c) && c == "csi-node");

    /// <summary>The value of <paramref name="flag"/> on the container's command line (<c>--f=v</c> or <c>--f v</c>), or null.</summary>
    public static string? Flag(V1Container container, string flag)
    {
        IList<string> line = [.. container.Command ?? [], .. container.Args ?? []];
        for (int i = 0; i < line.Count; i++)
        {
            if (line[i].StartsWith(flag + "=", StringComparison.Ordinal))
            {
                return line[i][(flag.Length + 1)..];
            }
            if (line[i] == flag && i + 1 < line.Count)
            {
                return line[i + 1];
            }
        }
        return null;
    }

    /// <summary>Which volume, and where in it, a path in a container is: the deepest mount that holds it.</summary>
    public static (V1Volume Volume, V1VolumeMount Mount, string Relative)? Resolve(V1PodSpec pod, V1Container container, string path)
    {
        V1VolumeMount? mount = (container.VolumeMounts ?? [])
            .Where(m => path == m.MountPath || path.StartsWith(m.MountPath.TrimEnd('/') + "/", StringComparison.Ordinal))
            .OrderByDescending(m => m.MountPath.Length)
            .FirstOrDefault();
        V1Volume? volume = mount is null ? null : pod.Volumes?.SingleOrDefault(v => v.Name == mount.Name);
        if (mount is null || volume is null)
        {
            return null;
        }
        string relative = path == mount.MountPath ? "" : path[(mount.MountPath.TrimEnd('/').Length + 1)..];
        if (!string.IsNullOrEmpty(mount.SubPath))
        {
            relative = relative.Length == 0 ? mount.SubPath : $"{mount.SubPath}/{relative}";
        }
        return (volume, mount, relative);
    }

    private static bool Selects(IDictionary<string, string>? selector, IDictionary<string, string> labels) =>
        selector is { Count: > 0 } && selector.All(s => labels.TryGetValue(s.Key, out string? value) && value == s.Value);

    /// <summary>The CSIDriver, the classes and the SnapshotMetadataService all name the plugin's driver; the CSIDriver says how the kubelet treats it.</summary>
    public static IEnumerable<string> Driver(RenderedChart chart)
    {
        V1CSIDriver[] drivers = [.. chart.All<V1CSIDriver>()];
        if (drivers.Length != 1)
        {
            yield return $"the chart renders {drivers.Length} CSIDriver objects, not one";
            yield break;
        }
        V1CSIDriver driver = drivers[0];
        if (driver.Metadata.Name != DriverName)
        {
            yield return $"the CSIDriver is named '{driver.Metadata.Name}'; the plugin reports '{DriverName}'";
        }
        V1CSIDriverSpec spec = driver.Spec;
        if (spec.AttachRequired != true)
        {
            yield return "the CSIDriver does not require attach: ControllerPublishVolume (which hands the node its NBD address) would never be called";
        }
        if (spec.PodInfoOnMount != false || spec.RequiresRepublish != false)
        {
            yield return "the CSIDriver asks for pod info on mount or republishing, which the plugin does not use";
        }
        if (!(spec.VolumeLifecycleModes ?? []).SequenceEqual(["Persistent"]))
        {
            yield return $"the CSIDriver's lifecycle modes are [{string.Join(", ", spec.VolumeLifecycleModes ?? [])}], not [Persistent]";
        }
        if (spec.FsGroupPolicy != "File")
        {
            yield return $"the CSIDriver's fsGroupPolicy is '{spec.FsGroupPolicy}', not File";
        }
        foreach (V1StorageClass storageClass in chart.All<V1StorageClass>())
        {
            if (storageClass.Provisioner != DriverName)
            {
                yield return $"StorageClass {storageClass.Metadata.Name} names provisioner '{storageClass.Provisioner}', not {DriverName}";
            }
            if (storageClass.AllowVolumeExpansion != true)
            {
                yield return $"StorageClass {storageClass.Metadata.Name} does not allow volume expansion, which the plugin supports online";
            }
            string? backend = storageClass.Parameters?.TryGetValue("backend", out string? b) == true ? b : null;
            if (backend is not ("overlay" or "file" or "s3"))
            {
                yield return $"StorageClass {storageClass.Metadata.Name} has backend '{backend}'; the plugin knows overlay, file and s3";
            }
            foreach (string key in (storageClass.Parameters ?? new Dictionary<string, string>()).Keys.Except([Gateway.Csi.ControllerService.BackendParameter]))
            {
                yield return $"StorageClass {storageClass.Metadata.Name} has parameter '{key}', which the plugin does not read";
            }
        }
        foreach (V1VolumeSnapshotClass snapshotClass in chart.All<V1VolumeSnapshotClass>())
        {
            if (snapshotClass.Driver != DriverName)
            {
                yield return $"VolumeSnapshotClass {snapshotClass.Metadata.Name} names driver '{snapshotClass.Driver}', not {DriverName}";
            }
        }
        foreach (V1Beta1SnapshotMetadataService service in chart.All<V1Beta1SnapshotMetadataService>())
        {
            if (service.Metadata.Name != DriverName)
            {
                yield return $"the SnapshotMetadataService is named '{service.Metadata.Name}'; clients look it up by the driver name {DriverName}";
            }
        }
    }

    /// <summary>
    /// Only the node plugin is privileged (it opens /dev/nbdN and mounts); every other container
    /// of the chart runs without privilege, escalation or capabilities, and the controller's as non-root
    /// on a read-only root.
    /// </summary>
    public static IEnumerable<string> Privileges(RenderedChart chart)
    {
        Workload? node = Node(chart);
        Workload? controller = Controller(chart);
        foreach (Workload workload in Workloads(chart))
        {
            foreach (V1Container container in workload.Containers)
            {
                bool nodePlugin = workload == node && container.Name == PluginContainer;
                V1SecurityContext? context = container.SecurityContext;
                if (nodePlugin)
                {
                    if (context?.Privileged != true)
                    {
                        yield return $"{workload} container {container.Name} is not privileged: it cannot open /dev/nbdN or mount";
                    }
                    continue;
                }
                if (context?.Privileged == true)
                {
                    yield return $"{workload} container {container.Name} is privileged; only the node plugin may be";
                }
                if (workload.Kind == "StatefulSet")
                {
                    continue; // The gateway's own pod: GatewayContract.RestrictedPod.
                }
                if (context?.AllowPrivilegeEscalation != false)
                {
                    yield return $"{workload} container {container.Name} does not set allowPrivilegeEscalation: false";
                }
                if (context?.Capabilities?.Drop?.Contains("ALL") != true || context.Capabilities.Add is { Count: > 0 })
                {
                    yield return $"{workload} container {container.Name} does not drop ALL capabilities (or adds some)";
                }
                if (context?.ReadOnlyRootFilesystem != true)
                {
                    yield return $"{workload} container {container.Name} has a writable root filesystem";
                }
                if (workload == controller && (context?.RunAsNonRoot ?? workload.Pod.SecurityContext?.RunAsNonRoot) != true)
                {
                    yield return $"{workload} container {container.Name} does not run as non-root";
                }
            }
        }
    }

    /// <summary>Each sidecar's --csi-address is the socket the plugin's --endpoint listens on: the same file of the same volume.</summary>
    public static IEnumerable<string> Sockets(RenderedChart chart)
    {
        foreach ((Workload? workload, string[] sidecars, string what) in new[] { (Controller(chart), ControllerSidecars, "controller"), (Node(chart), NodeSidecars, "node") })
        {
            if (workload is null)
            {
                yield return $"the chart renders no CSI {what} workload";
                continue;
            }
            V1Container? plugin = workload.Container(PluginContainer);
            string? endpoint = plugin is null ? null : Flag(plugin, "--endpoint");
            if (plugin is null || endpoint is null || !endpoint.StartsWith("unix://", StringComparison.Ordinal))
            {
                yield return $"{workload} has no {PluginContainer} container with --endpoint unix://PATH";
                continue;
            }
            if (Flag(plugin, "--mode") != what)
            {
                yield return $"{workload} runs the plugin with --mode {Flag(plugin, "--mode")}, not {what}";
            }
            var listens = Resolve(workload.Pod, plugin, endpoint["unix://".Length..]);
            if (listens is null)
            {
                yield return $"{workload}: the plugin's socket {endpoint} is on no volume the sidecars could share";
                continue;
            }
            // The snapshot-metadata sidecar comes with the SnapshotMetadataService that advertises it.
            bool advertised = chart.All<V1Beta1SnapshotMetadataService>().Any();
            foreach (string missing in sidecars.Where(s => workload.Container(s) is null && (s != "csi-snapshot-metadata" || advertised)))
            {
                yield return $"{workload} has no {missing} sidecar";
            }
            foreach (V1Container sidecar in workload.Containers.Where(c => c.Name != PluginContainer))
            {
                string? address = Flag(sidecar, "--csi-address");
                var dials = address is null ? null : Resolve(workload.Pod, sidecar, address);
                if (dials is null)
                {
                    yield return $"{workload} sidecar {sidecar.Name} dials '{address}', which is on no volume";
                }
                else if (dials.Value.Volume.Name != listens.Value.Volume.Name || dials.Value.Relative != listens.Value.Relative)
                {
                    yield return $"{workload} sidecar {sidecar.Name} dials {dials.Value.Relative} on volume {dials.Value.Volume.Name}; the plugin listens on {listens.Value.Relative} on volume {listens.Value.Volume.Name}";
                }
            }
        }
    }

    /// <summary>
    /// The registrar tells the kubelet where the plugin's socket is on the host: the node plugin's
    /// socket folder (a hostPath under the kubelet's plugins folder, named after the driver) plus
    /// the socket's name in it. The plugin mounts the kubelet's folder at the same path, Bidirectional.
    /// </summary>
    public static IEnumerable<string> Registration(RenderedChart chart)
    {
        if (Node(chart) is not { } node || node.Container(RegistrarContainer) is not { } registrar || node.Container(PluginContainer) is not { } plugin)
        {
            yield return "the chart renders no node DaemonSet with the plugin and node-driver-registrar";
            yield break;
        }
        string? registration = Flag(registrar, "--kubelet-registration-path");
        string? address = Flag(registrar, "--csi-address");
        var socket = address is null ? null : Resolve(node.Pod, registrar, address);
        if (socket?.Volume.HostPath is not { } pluginDir)
        {
            yield return $"the registrar's socket {address} is not on a hostPath the kubelet could reach";
            yield break;
        }
        string onHost = $"{pluginDir.Path.TrimEnd('/')}/{socket.Value.Relative}";
        if (registration != onHost)
        {
            yield return $"the registrar registers {registration}, but the socket is at {onHost} on the host";
        }
        var kubelet = plugin.VolumeMounts?.FirstOrDefault(m => m.MountPropagation == "Bidirectional");
        V1Volume? kubeletVolume = kubelet is null ? null : node.Pod.Volumes?.SingleOrDefault(v => v.Name == kubelet.Name);
        if (kubelet is null || kubeletVolume?.HostPath is null)
        {
            yield return "the node plugin has no Bidirectional mount of the kubelet's folder";
            yield break;
        }
        if (kubeletVolume.HostPath.Path != kubelet.MountPath)
        {
            yield return $"the node plugin mounts the kubelet's {kubeletVolume.HostPath.Path} at {kubelet.MountPath}: the paths the kubelet hands it would not exist";
        }
        string kubeletDir = kubeletVolume.HostPath.Path.TrimEnd('/');
        if (pluginDir.Path.TrimEnd('/') != $"{kubeletDir}/plugins/{DriverName}")
        {
            yield return $"the plugin's socket folder is {pluginDir.Path}, not {kubeletDir}/plugins/{DriverName}";
        }
        var registry = (registrar.VolumeMounts ?? []).Select(m => node.Pod.Volumes?.SingleOrDefault(v => v.Name == m.Name)?.HostPath?.Path);
        if (!registry.Contains($"{kubeletDir}/plugins_registry"))
        {
            yield return $"the registrar does not mount the kubelet's registration folder {kubeletDir}/plugins_registry";
        }
        if (!(plugin.VolumeMounts ?? []).Any(m => m.MountPath == "/dev" && node.Pod.Volumes?.SingleOrDefault(v => v.Name == m.Name)?.HostPath?.Path == "/dev"))
        {
            yield return "the node plugin does not mount the host's /dev (it opens /dev/nbdN)";
        }
        if (plugin.Env?.FirstOrDefault(e => e.Name == "CSI_NODE_ID")?.ValueFrom?.FieldRef?.FieldPath != "spec.nodeName" || Flag(plugin, "--node-id") != "$(CSI_NODE_ID)")
        {
            yield return "the node plugin's --node-id is not the node's name (spec.nodeName through CSI_NODE_ID)";
        }
    }

    /// <summary>
    /// Both plugins reach the gateway through the chart's own Services: --admin is the admin
    /// Service's URL at its port that targets the admin container port, --nbd the NBD Service's
    /// at the port that targets nbd, and --token-file is the key of the Secret the gateway
    /// reads its admin token from.
    /// </summary>
    public static IEnumerable<string> GatewayEndpoints(RenderedChart chart)
    {
        V1EnvVar? token = chart.Container.Env?.FirstOrDefault(e => e.Name == AdminToken.EnvironmentVariable);
        foreach (Workload? workload in new[] { Controller(chart), Node(chart) })
        {
            if (workload?.Container(PluginContainer) is not { } plugin)
            {
                yield return "a CSI workload has no plugin container";
                continue;
            }
            string? admin = Flag(plugin, "--admin");
            if (!Uri.TryCreate(admin, UriKind.Absolute, out Uri? url) || url.Scheme != "http" || url.AbsolutePath != "/")
            {
                yield return $"{workload}: --admin '{admin}' is not an http://HOST:PORT/ URL";
            }
            else
            {
                foreach (string problem in ServiceAt(chart, url.Host, url.Port, Kubernetes.AdminPortName, $"{workload}: --admin {admin}"))
                {
                    yield return problem;
                }
            }
            string? nbd = Flag(plugin, "--nbd");
            int colon = nbd?.LastIndexOf(':') ?? -1;
            if (nbd is null || colon < 0 || !int.TryParse(nbd[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out int nbdPort))
            {
                yield return $"{workload}: --nbd '{nbd}' is not HOST:PORT";
            }
            else
            {
                foreach (string problem in ServiceAt(chart, nbd[..colon], nbdPort, Kubernetes.NbdPortName, $"{workload}: --nbd {nbd}"))
                {
                    yield return problem;
                }
            }
            string? tokenFile = Flag(plugin, "--token-file");
            var file = tokenFile is null ? null : Resolve(workload.Pod, plugin, tokenFile);
            if (token?.ValueFrom?.SecretKeyRef is not { } gatewaySecret)
            {
                yield return $"the gateway reads {AdminToken.EnvironmentVariable} from no Secret";
            }
            else if (file?.Volume.Secret is not { } secret)
            {
                yield return $"{workload}: --token-file '{tokenFile}' is not on a Secret volume";
            }
            else
            {
                string key = secret.Items?.FirstOrDefault(i => i.Path == file.Value.Relative)?.Key ?? file.Value.Relative;
                if (secret.SecretName != gatewaySecret.Name || key != gatewaySecret.Key)
                {
                    yield return $"{workload}: --token-file is key {key} of Secret {secret.SecretName}; the gateway's token is key {gatewaySecret.Key} of Secret {gatewaySecret.Name}";
                }
            }
        }
    }

    /// <summary>host (NAME.NAMESPACE.svc) and port name a gateway Service port that targets <paramref name="portName"/> and selects the gateway's pods.</summary>
    private static IEnumerable<string> ServiceAt(RenderedChart chart, string host, int port, string portName, string what)
    {
        string[] labels = host.Split('.');
        if (labels.Length < 3 || labels[2] != "svc")
        {
            yield return $"{what}: {host} is not a Service's NAME.NAMESPACE.svc name";
            yield break;
        }
        V1Service? service = chart.GatewayServices.SingleOrDefault(s => s.Metadata.Name == labels[0] && (s.Metadata.NamespaceProperty ?? RenderedChart.Namespace) == labels[1]);
        if (service is null)
        {
            yield return $"{what}: the chart renders no gateway Service {labels[0]} in namespace {labels[1]}";
            yield break;
        }
        V1ServicePort? servicePort = service.Spec.Ports?.FirstOrDefault(p => p.Port == port);
        if (servicePort?.TargetPort?.Value != portName)
        {
            yield return $"{what}: port {port} of Service {service.Metadata.Name} targets '{servicePort?.TargetPort?.Value}', not the gateway's {portName} port";
        }
        if (!Selects(service.Spec.Selector, chart.PodLabels))
        {
            yield return $"{what}: Service {service.Metadata.Name} does not select the gateway's pods";
        }
    }

    /// <summary>
    /// No gateway Service, budget or StatefulSet selects a CSI pod (NBD clients and the budget
    /// would count the CSI pods as gateway nodes); the snapshot-metadata Service selects the
    /// controller and targets its sidecar's port; the SnapshotMetadataService names that Service.
    /// </summary>
    public static IEnumerable<string> Selection(RenderedChart chart)
    {
        Workload[] csi = [.. new[] { Controller(chart), Node(chart) }.OfType<Workload>()];
        foreach (Workload workload in csi)
        {
            if (!Selects(workload.Selector, workload.Labels))
            {
                yield return $"{workload}'s selector does not match its own pod labels";
            }
            foreach (V1Service service in chart.GatewayServices.Where(s => Selects(s.Spec.Selector, workload.Labels)))
            {
                yield return $"gateway Service {service.Metadata.Name} selects the pods of {workload}";
            }
            foreach (V1PodDisruptionBudget budget in chart.All<V1PodDisruptionBudget>().Where(b => Selects(b.Spec.Selector?.MatchLabels, workload.Labels)))
            {
                yield return $"PodDisruptionBudget {budget.Metadata.Name} counts the pods of {workload}";
            }
            foreach (Workload other in Workloads(chart).Where(w => w != workload && Selects(w.Selector, workload.Labels)))
            {
                yield return $"{other}'s selector matches the pods of {workload}";
            }
        }
        if (Controller(chart) is not { } controller)
        {
            yield break;
        }
        foreach (V1Service service in chart.All<V1Service>().Where(s => IsCsiObject(s.Metadata)))
        {
            if (!Selects(service.Spec.Selector, controller.Labels))
            {
                yield return $"Service {service.Metadata.Name} does not select the CSI controller's pods";
            }
            HashSet<string> names = [.. controller.Containers.SelectMany(c => c.Ports ?? []).Select(p => p.Name ?? "")];
            foreach (V1ServicePort port in service.Spec.Ports ?? [])
            {
                if (port.TargetPort?.Value is not { } target || !names.Contains(target))
                {
                    yield return $"Service {service.Metadata.Name} port {port.Name} targets '{port.TargetPort?.Value}', not a named port of the controller";
                }
            }
        }
        foreach (V1Beta1SnapshotMetadataService advertised in chart.All<V1Beta1SnapshotMetadataService>())
        {
            string? address = advertised.Spec?.Address;
            V1Service? service = chart.All<V1Service>().FirstOrDefault(s =>
                IsCsiObject(s.Metadata) && (s.Spec.Ports ?? []).Any(p => address == $"{s.Metadata.Name}.{s.Metadata.NamespaceProperty ?? RenderedChart.Namespace}.svc:{p.Port}"));
            if (service is null)
            {
                yield return $"the SnapshotMetadataService's address {address} is no port of the chart's snapshot-metadata Service";
                continue;
            }
            V1ServicePort port = service.Spec.Ports.First(p => address!.EndsWith($":{p.Port}", StringComparison.Ordinal));
            V1Container? sidecar = controller.Container("csi-snapshot-metadata");
            V1ContainerPort? listens = sidecar?.Ports?.FirstOrDefault(p => p.Name == port.TargetPort?.Value);
            if (sidecar is null || listens is null || Flag(sidecar, "--port") != listens.ContainerPort.ToString(CultureInfo.InvariantCulture))
            {
                yield return $"Service {service.Metadata.Name} port {port.Port} does not reach the port the csi-snapshot-metadata sidecar listens on (--port {(sidecar is null ? null : Flag(sidecar, "--port"))})";
            }
        }
    }

    /// <summary>One permission: API group, resource, verb.</summary>
    public sealed record Permission(string Group, string Resource, string Verb)
    {
        public override string ToString() => $"{Verb} {Resource}{(Group.Length > 0 ? "." + Group : "")}";
    }

    private static IEnumerable<Permission> Grant(string group, string resource, params string[] verbs) =>
        verbs.Select(v => new Permission(group, resource, v));

    /// <summary>
    /// What each sidecar needs cluster-wide, from its upstream deploy/kubernetes RBAC
    /// (kubernetes-csi/external-provisioner, -attacher, -resizer, -snapshotter,
    /// external-snapshot-metadata), without the optional rules (secrets, group snapshots).
    /// </summary>
    public static readonly IReadOnlyDictionary<string, Permission[]> SidecarNeeds = new Dictionary<string, Permission[]>
    {
        ["csi-provisioner"] =
        [
            .. Grant("", "persistentvolumes", "get", "list", "watch", "create", "patch", "delete"),
            .. Grant("", "persistentvolumeclaims", "get", "list", "watch", "update"),
            .. Grant("storage.k8s.io", "storageclasses", "get", "list", "watch"),
            .. Grant("", "events", "list", "watch", "create", "update", "patch"),
            .. Grant("snapshot.storage.k8s.io", "volumesnapshots", "get", "list"),
            .. Grant("snapshot.storage.k8s.io", "volumesnapshotcontents", "get", "list"),
            .. Grant("storage.k8s.io", "csinodes", "get", "list", "watch"),
            .. Grant("", "nodes", "get", "list", "watch"),
            .. Grant("storage.k8s.io", "volumeattachments", "get", "list", "watch"),
        ],
        ["csi-attacher"] =
        [
            .. Grant("", "persistentvolumes", "get", "list", "watch", "update", "patch"),
            .. Grant("", "nodes", "get", "list", "watch"),
            .. Grant("storage.k8s.io", "csinodes", "get", "list", "watch"),
            .. Grant("storage.k8s.io", "volumeattachments", "get", "list", "watch", "update", "patch"),
            .. Grant("storage.k8s.io", "volumeattachments/status", "patch"),
        ],
        ["csi-resizer"] =
        [
            .. Grant("", "persistentvolumes", "get", "list", "watch", "patch"),
            .. Grant("", "persistentvolumeclaims", "get", "list", "watch"),
            .. Grant("", "persistentvolumeclaims/status", "patch"),
            .. Grant("", "events", "list", "watch", "create", "update", "patch"),
        ],
        ["csi-snapshotter"] =
        [
            .. Grant("", "events", "list", "watch", "create", "update", "patch"),
            .. Grant("snapshot.storage.k8s.io", "volumesnapshotclasses", "get", "list", "watch"),
            .. Grant("snapshot.storage.k8s.io", "volumesnapshotcontents", "create", "get", "list", "watch", "update", "patch"),
            .. Grant("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update", "patch"),
        ],
        ["csi-snapshot-metadata"] =
        [
            .. Grant("cbt.storage.k8s.io", "snapshotmetadataservices", "get", "list", "watch"),
            .. Grant("authentication.k8s.io", "tokenreviews", "create"),
            .. Grant("authorization.k8s.io", "subjectaccessreviews", "create"),
            .. Grant("snapshot.storage.k8s.io", "volumesnapshots", "get", "list"),
            .. Grant("snapshot.storage.k8s.io", "volumesnapshotcontents", "get", "list"),
        ],
    };

    /// <summary>Leader election (provisioner, attacher, resizer, snapshotter): Leases in the release's namespace.</summary>
    public static readonly Permission[] LeaderElection = [.. Grant("coordination.k8s.io", "leases", "get", "watch", "list", "delete", "update", "create")];

    private static bool Allows(IEnumerable<V1PolicyRule> rules, Permission permission) =>
        rules.Any(r => (r.ApiGroups ?? []).Any(g => g == permission.Group || g == "*")
            && (r.Resources ?? []).Any(s => s == permission.Resource || s == "*")
            && (r.Verbs ?? []).Any(v => v == permission.Verb || v == "*"));

    /// <summary>
    /// The controller's ServiceAccount holds, through the chart's ClusterRoleBindings, what each
    /// of its sidecars needs, and Leases in its namespace; the node's holds nothing.
    /// </summary>
    public static IEnumerable<string> ControllerRbac(RenderedChart chart)
    {
        if (Controller(chart) is not { } controller || Node(chart) is not { } node)
        {
            yield break; // Sockets reports missing workloads.
        }
        bool Is(Rbacv1Subject s, string account) => s.Kind == "ServiceAccount" && s.Name == account && (s.NamespaceProperty ?? RenderedChart.Namespace) == RenderedChart.Namespace;
        string account = controller.Pod.ServiceAccountName ?? "default";
        if (controller.Pod.AutomountServiceAccountToken == false)
        {
            yield return "the CSI controller does not mount its ServiceAccount token, which the sidecars need";
        }
        V1PolicyRule[] clusterRules = [.. chart.All<V1ClusterRoleBinding>()
            .Where(b => b.RoleRef.Kind == "ClusterRole" && (b.Subjects ?? []).Any(s => Is(s, account)))
            .SelectMany(b => chart.All<V1ClusterRole>().Where(r => r.Metadata.Name == b.RoleRef.Name))
            .SelectMany(r => r.Rules ?? [])];
        foreach ((string sidecar, Permission[] needs) in SidecarNeeds)
        {
            if (controller.Container(sidecar) is null)
            {
                continue;
            }
            Permission[] missing = [.. needs.Where(p => !Allows(clusterRules, p))];
            if (missing.Length > 0)
            {
                yield return $"{sidecar} may not {string.Join(", ", missing.Select(p => p.ToString()))} (ServiceAccount {account})";
            }
        }
        V1PolicyRule[] namespaceRules = [.. chart.All<V1RoleBinding>()
            .Where(b => b.RoleRef.Kind == "Role" && (b.Subjects ?? []).Any(s => Is(s, account)))
            .SelectMany(b => chart.All<V1Role>().Where(r => r.Metadata.Name == b.RoleRef.Name))
            .SelectMany(r => r.Rules ?? [])];
        Permission[] election = [.. LeaderElection.Where(p => !Allows(namespaceRules.Concat(clusterRules), p))];
        bool elects = controller.Containers.Any(c => (c.Args ?? []).Contains("--leader-election"));
        if (elects && election.Length > 0)
        {
            yield return $"the sidecars elect a leader but may not {string.Join(", ", election.Select(p => p.ToString()))}";
        }
        string nodeAccount = node.Pod.ServiceAccountName ?? "default";
        if (chart.All<V1ClusterRoleBinding>().Any(b => (b.Subjects ?? []).Any(s => Is(s, nodeAccount)))
            || chart.All<V1RoleBinding>().Any(b => (b.Subjects ?? []).Any(s => Is(s, nodeAccount))))
        {
            yield return $"the node's ServiceAccount {nodeAccount} is bound to a role; the node plugin calls no Kubernetes API";
        }
    }

    /// <summary>
    /// The custom resources' required fields (the CRD schemas in ops/helm-render/crds check them
    /// too, but a schema can be edited with the template): the snapshot class's driver and policy,
    /// the SnapshotMetadataService's address, audience and a base64 PEM CA certificate.
    /// </summary>
    public static IEnumerable<string> CustomResourceFields(RenderedChart chart)
    {
        foreach (V1VolumeSnapshotClass snapshotClass in chart.All<V1VolumeSnapshotClass>())
        {
            if (string.IsNullOrEmpty(snapshotClass.Driver))
            {
                yield return $"VolumeSnapshotClass {snapshotClass.Metadata.Name} has no driver";
            }
            if (snapshotClass.DeletionPolicy is not ("Delete" or "Retain"))
            {
                yield return $"VolumeSnapshotClass {snapshotClass.Metadata.Name} has deletionPolicy '{snapshotClass.DeletionPolicy}', not Delete or Retain";
            }
        }
        foreach (V1Beta1SnapshotMetadataService service in chart.All<V1Beta1SnapshotMetadataService>())
        {
            SnapshotMetadataServiceSpec? spec = service.Spec;
            if (string.IsNullOrEmpty(spec?.Address) || string.IsNullOrEmpty(spec.Audience))
            {
                yield return "the SnapshotMetadataService lacks its address or audience";
            }
            string? pem = null;
            try
            {
                pem = spec?.CaCert is { } caCert ? System.Text.Encoding.ASCII.GetString(Convert.FromBase64String(caCert)) : null;
            }
            catch (FormatException)
            {
            }
            if (pem?.StartsWith("-----BEGIN CERTIFICATE-----", StringComparison.Ordinal) != true)
            {
                yield return "the SnapshotMetadataService's caCert is not the base64 of a PEM certificate";
            }
        }
    }
}
