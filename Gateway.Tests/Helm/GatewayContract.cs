using System.Globalization;
using System.Net;
using Gateway.Host;
using k8s.Models;
using Microsoft.Extensions.Configuration;

namespace Gateway.Tests.Helm;

/// <summary>
/// What a rendered chart must agree with in the gateway itself (<see cref="Kubernetes"/>,
/// <see cref="GatewayOptions"/>, <see cref="AdminToken"/>): each check returns the violations it
/// finds, so the tests can show both that the chart passes and that a wrong chart fails.
/// </summary>
public static class GatewayContract
{
    /// <summary>Every check; empty when the chart agrees with the gateway.</summary>
    public static IEnumerable<string> Violations(RenderedChart chart) =>
        DiscoveryLabel(chart)
            .Concat(Selectors(chart))
            .Concat(ContainerPorts(chart))
            .Concat(ServiceTargetPorts(chart))
            .Concat(HeadlessService(chart))
            .Concat(Probes(chart))
            .Concat(ShutdownGrace(chart))
            .Concat(RestrictedPod(chart))
            .Concat(DiscoveryRbac(chart))
            .Concat(Configuration(chart))
            .Concat(WritablePaths(chart));

    /// <summary>
    /// Akka.Discovery.KubernetesApi lists pods with <see cref="Kubernetes.PodLabelSelector"/>
    /// formatted with the service name the gateway is configured with: the pods must match it.
    /// </summary>
    public static IEnumerable<string> DiscoveryLabel(RenderedChart chart)
    {
        IConfiguration config = chart.GatewayConfiguration();
        if (config["Gateway:Cluster:Discovery"] != "kubernetes")
        {
            yield return $"Gateway:Cluster:Discovery is '{config["Gateway:Cluster:Discovery"]}', not kubernetes";
        }
        string serviceName = config["Gateway:Cluster:ServiceName"] ?? Kubernetes.ActorSystemName;
        string selector = string.Format(CultureInfo.InvariantCulture, Kubernetes.PodLabelSelector, serviceName);
        foreach (string requirement in selector.Split(',', StringSplitOptions.TrimEntries))
        {
            string[] pair = requirement.Split('=', 2);
            if (!chart.PodLabels.TryGetValue(pair[0], out string? value) || value != pair[1])
            {
                yield return $"discovery selects pods with {requirement} (service name '{serviceName}'), but the pod labels are {Show(chart.PodLabels)}";
            }
        }
    }

    /// <summary>The StatefulSet, every Service and the disruption budget select the gateway's pods.</summary>
    public static IEnumerable<string> Selectors(RenderedChart chart)
    {
        V1StatefulSet set = chart.StatefulSet;
        foreach (string problem in Selects("the StatefulSet", set.Spec.Selector?.MatchLabels, chart.PodLabels))
        {
            yield return problem;
        }
        if (set.Spec.Selector?.MatchExpressions is { Count: > 0 })
        {
            yield return "the StatefulSet selector uses matchExpressions; the checks expect matchLabels only";
        }
        foreach (V1Service service in chart.GatewayServices)
        {
            foreach (string problem in Selects($"Service {service.Metadata.Name}", service.Spec.Selector, chart.PodLabels))
            {
                yield return problem;
            }
        }
        foreach (V1PodDisruptionBudget budget in chart.All<V1PodDisruptionBudget>())
        {
            foreach (string problem in Selects($"PodDisruptionBudget {budget.Metadata.Name}", budget.Spec.Selector?.MatchLabels, chart.PodLabels))
            {
                yield return problem;
            }
        }
    }

    private static IEnumerable<string> Selects(string what, IDictionary<string, string>? selector, IDictionary<string, string> podLabels)
    {
        if (selector is null || selector.Count == 0)
        {
            yield return $"{what} has no selector labels";
            yield break;
        }
        if (selector.Any(s => !podLabels.TryGetValue(s.Key, out string? value) || value != s.Value))
        {
            yield return $"{what} selects {Show(selector)}, which the pod labels {Show(podLabels)} do not match";
        }
    }

    /// <summary>The container's ports are exactly the gateway's named ports, at the numbers its configuration listens on.</summary>
    public static IEnumerable<string> ContainerPorts(RenderedChart chart)
    {
        IConfiguration config = chart.GatewayConfiguration();
        var listens = new Dictionary<string, string?>
        {
            [Kubernetes.NbdPortName] = config["Gateway:Nbd"],
            [Kubernetes.AdminPortName] = config["Gateway:Admin"],
            [Kubernetes.HealthPortName] = config["Gateway:Health"],
            [Kubernetes.RemotingPortName] = config["Gateway:Cluster:Remoting"],
            [Kubernetes.PeerPortName] = config["Gateway:Cluster:Peer"],
            [Kubernetes.ManagementPortName] = config["Gateway:Cluster:ManagementPort"],
        };
        IList<V1ContainerPort> ports = chart.Container.Ports ?? [];
        string[] names = [.. ports.Select(p => p.Name ?? "(unnamed)").Order(StringComparer.Ordinal)];
        string[] expected = [.. listens.Keys.Order(StringComparer.Ordinal)];
        if (!names.SequenceEqual(expected))
        {
            yield return $"container ports are named [{string.Join(", ", names)}]; the gateway's are [{string.Join(", ", expected)}]";
        }
        foreach ((string name, string? listen) in listens)
        {
            V1ContainerPort? port = ports.FirstOrDefault(p => p.Name == name);
            if (port is null)
            {
                continue;
            }
            int? configured = ListenPort(name, listen, out string? problem);
            if (problem is not null)
            {
                yield return problem;
            }
            else if (configured != port.ContainerPort)
            {
                yield return $"container port {name} is {port.ContainerPort}, but the gateway listens on {listen}";
            }
            if (port.Protocol is not (null or "TCP"))
            {
                yield return $"container port {name} is {port.Protocol}; the gateway speaks TCP";
            }
        }
    }

    private static int? ListenPort(string name, string? listen, out string? problem)
    {
        problem = null;
        if (listen is null)
        {
            problem = $"the gateway's configuration has no listen address for port {name}";
            return null;
        }
        if (name == Kubernetes.ManagementPortName)
        {
            if (int.TryParse(listen, NumberStyles.None, CultureInfo.InvariantCulture, out int management))
            {
                return management;
            }
            problem = $"Gateway:Cluster:ManagementPort '{listen}' is not a port number";
            return null;
        }
        try
        {
            // The gateway's own parser: the value must be what `gateway serve` accepts.
            IPEndPoint endpoint = GatewayOptions.ParseEndpoint(listen, name);
            if (IPAddress.IsLoopback(endpoint.Address))
            {
                problem = $"port {name} listens on loopback ({listen}): unreachable from other pods and the kubelet";
            }
            return endpoint.Port;
        }
        catch (ArgumentException e)
        {
            problem = e.Message;
            return null;
        }
    }

    /// <summary>Every Service port targets a container port by one of the gateway's names.</summary>
    public static IEnumerable<string> ServiceTargetPorts(RenderedChart chart)
    {
        HashSet<string> names = [.. (chart.Container.Ports ?? []).Select(p => p.Name ?? "")];
        foreach (V1Service service in chart.GatewayServices)
        {
            foreach (V1ServicePort port in service.Spec.Ports ?? [])
            {
                string? target = port.TargetPort?.Value;
                if (target is null || int.TryParse(target, out _))
                {
                    yield return $"Service {service.Metadata.Name} port {port.Name} targets '{target}', not a named container port";
                }
                else if (!names.Contains(target))
                {
                    yield return $"Service {service.Metadata.Name} port {port.Name} targets '{target}', which the container does not expose";
                }
            }
        }
        if (!chart.GatewayServices.Any(s => s.Spec.ClusterIP != "None" && (s.Spec.Ports ?? []).Any(p => p.TargetPort?.Value == Kubernetes.NbdPortName)))
        {
            yield return $"no (non-headless) Service exposes the {Kubernetes.NbdPortName} port to NBD clients";
        }
    }

    /// <summary>
    /// The StatefulSet's governing Service is headless, publishes not-ready pods (a node is
    /// ready only once joined, and joins through the others) and carries the cluster ports;
    /// pods start in parallel (one at a time with join-gated readiness can deadlock).
    /// </summary>
    public static IEnumerable<string> HeadlessService(RenderedChart chart)
    {
        V1StatefulSet set = chart.StatefulSet;
        if (set.Spec.PodManagementPolicy != "Parallel")
        {
            yield return $"podManagementPolicy is '{set.Spec.PodManagementPolicy}', not Parallel";
        }
        V1Service? headless = chart.GatewayServices.SingleOrDefault(s => s.Metadata.Name == set.Spec.ServiceName);
        if (headless is null)
        {
            yield return $"the StatefulSet's serviceName '{set.Spec.ServiceName}' is not a rendered Service";
            yield break;
        }
        if (headless.Spec.ClusterIP != "None")
        {
            yield return $"Service {headless.Metadata.Name} is not headless (clusterIP {headless.Spec.ClusterIP})";
        }
        if (headless.Spec.PublishNotReadyAddresses != true)
        {
            yield return $"Service {headless.Metadata.Name} does not publish not-ready addresses";
        }
        foreach (string name in new[] { Kubernetes.RemotingPortName, Kubernetes.ManagementPortName, Kubernetes.PeerPortName })
        {
            if (!(headless.Spec.Ports ?? []).Any(p => p.Name == name && p.TargetPort?.Value == name))
            {
                yield return $"headless Service {headless.Metadata.Name} has no port {name}";
            }
        }
    }

    /// <summary>Probes call the routes the gateway serves, on its health port.</summary>
    public static IEnumerable<string> Probes(RenderedChart chart)
    {
        V1Container container = chart.Container;
        foreach ((string what, V1Probe? probe, string path, bool required) in new[]
        {
            ("liveness", container.LivenessProbe, Kubernetes.LivenessPath, true),
            ("readiness", container.ReadinessProbe, Kubernetes.ReadinessPath, true),
            ("startup", container.StartupProbe, Kubernetes.LivenessPath, false),
        })
        {
            if (probe is null)
            {
                if (required)
                {
                    yield return $"no {what} probe";
                }
                continue;
            }
            if (probe.HttpGet is not { } get)
            {
                yield return $"the {what} probe is not an HTTP GET";
                continue;
            }
            if (get.Path != path)
            {
                yield return $"the {what} probe calls {get.Path}; the gateway serves {path}";
            }
            if (get.Port?.Value != Kubernetes.HealthPortName)
            {
                yield return $"the {what} probe calls port {get.Port?.Value}, not the {Kubernetes.HealthPortName} port";
            }
            if (get.Scheme is not (null or "HTTP"))
            {
                yield return $"the {what} probe uses {get.Scheme}; the health port is plain HTTP";
            }
        }
    }

    /// <summary>SIGTERM drains and flushes for up to ShutdownTimeout, then the node leaves the cluster: the kubelet must wait longer.</summary>
    public static IEnumerable<string> ShutdownGrace(RenderedChart chart)
    {
        long? grace = chart.PodSpec.TerminationGracePeriodSeconds;
        if (grace is null || grace <= Kubernetes.ShutdownTimeout.TotalSeconds)
        {
            yield return $"terminationGracePeriodSeconds {grace?.ToString(CultureInfo.InvariantCulture) ?? "(default 30)"} does not exceed the gateway's shutdown timeout {Kubernetes.ShutdownTimeout.TotalSeconds} s";
        }
    }

    /// <summary>The restricted Pod Security Standard, and nothing from the host.</summary>
    public static IEnumerable<string> RestrictedPod(RenderedChart chart)
    {
        V1PodSpec pod = chart.PodSpec;
        if (pod.HostNetwork == true || pod.HostPID == true || pod.HostIPC == true)
        {
            yield return "the pod shares the host's network, PID or IPC namespace";
        }
        if ((pod.Volumes ?? []).FirstOrDefault(v => v.HostPath is not null) is { } hostPath)
        {
            yield return $"volume {hostPath.Name} is a hostPath";
        }
        V1PodSecurityContext? podContext = pod.SecurityContext;
        foreach (V1Container container in (pod.InitContainers ?? []).Concat(pod.Containers))
        {
            string name = $"container {container.Name}";
            V1SecurityContext? context = container.SecurityContext;
            if (context?.Privileged == true)
            {
                yield return $"{name} is privileged";
            }
            if (context?.AllowPrivilegeEscalation != false)
            {
                yield return $"{name} does not set allowPrivilegeEscalation: false";
            }
            if ((context?.RunAsNonRoot ?? podContext?.RunAsNonRoot) != true)
            {
                yield return $"{name} does not run as non-root (runAsNonRoot)";
            }
            if ((context?.RunAsUser ?? podContext?.RunAsUser) == 0)
            {
                yield return $"{name} runs as user 0";
            }
            if (context?.Capabilities?.Drop?.Contains("ALL") != true)
            {
                yield return $"{name} does not drop ALL capabilities";
            }
            if (context?.Capabilities?.Add is { Count: > 0 } added)
            {
                yield return $"{name} adds capabilities {string.Join(", ", added)}";
            }
            if (context?.ReadOnlyRootFilesystem != true)
            {
                yield return $"{name} has a writable root filesystem";
            }
            if ((context?.SeccompProfile ?? podContext?.SeccompProfile)?.Type is not ("RuntimeDefault" or "Localhost"))
            {
                yield return $"{name} has no RuntimeDefault seccomp profile";
            }
            if ((container.Ports ?? []).FirstOrDefault(p => p.HostPort is not null) is { } hostPort)
            {
                yield return $"{name} binds host port {hostPort.HostPort}";
            }
        }
    }

    /// <summary>Kubernetes discovery reads pods with the pod's ServiceAccount: get, watch, list on core pods.</summary>
    public static IEnumerable<string> DiscoveryRbac(RenderedChart chart)
    {
        V1PodSpec pod = chart.PodSpec;
        string account = pod.ServiceAccountName ?? "default";
        if (pod.AutomountServiceAccountToken == false)
        {
            yield return "the pod does not mount its ServiceAccount token, which discovery needs";
        }
        string[] needed = ["get", "watch", "list"];
        var roles = chart.All<V1Role>()
            .Where(r => (r.Rules ?? []).Any(rule => (rule.ApiGroups ?? []).Contains("") && (rule.Resources ?? []).Contains("pods") && needed.All(rule.Verbs.Contains)))
            .Select(r => r.Metadata.Name)
            .ToHashSet();
        if (roles.Count == 0)
        {
            yield return "no Role grants get, watch and list on pods";
        }
        bool bound = chart.All<V1RoleBinding>().Any(b =>
            b.RoleRef.Kind == "Role" && roles.Contains(b.RoleRef.Name) &&
            (b.Subjects ?? []).Any(s => s.Kind == "ServiceAccount" && s.Name == account && (s.NamespaceProperty ?? RenderedChart.Namespace) == RenderedChart.Namespace));
        if (roles.Count > 0 && !bound)
        {
            yield return $"no RoleBinding gives the pod's ServiceAccount '{account}' the pods Role";
        }
        if (chart.All<V1ServiceAccount>().FirstOrDefault(a => a.Metadata.Name == account) is { AutomountServiceAccountToken: false })
        {
            yield return $"ServiceAccount {account} disables token automounting";
        }
    }

    /// <summary>
    /// The settings the gateway reads in cluster mode come from where they must: per-pod values
    /// from the downward API, credentials from Secrets (and rendered Secrets hold those keys).
    /// </summary>
    public static IEnumerable<string> Configuration(RenderedChart chart)
    {
        IConfiguration config = chart.GatewayConfiguration();
        var expected = new Dictionary<string, string>
        {
            ["Gateway:Cluster:NodeName"] = "fieldRef:metadata.name",
            ["Gateway:Cluster:PublicHostname"] = "fieldRef:status.podIP",
            ["Gateway:Cluster:Namespace"] = "fieldRef:metadata.namespace",
        };
        foreach ((string key, string source) in expected)
        {
            if (config[key] != source)
            {
                yield return $"{key} is '{config[key]}', expected from the downward API ({source})";
            }
        }
        if (config["Gateway:Cluster:Postgres"]?.StartsWith("secretKeyRef:", StringComparison.Ordinal) != true)
        {
            yield return $"Gateway:Cluster:Postgres is '{config["Gateway:Cluster:Postgres"]}', not from a Secret";
        }
        // Beyond loopback the gateway refuses to start without an admin token (SecurityCli).
        IList<V1EnvVar> env = chart.Container.Env ?? [];
        V1EnvVar? token = env.FirstOrDefault(e => e.Name == AdminToken.EnvironmentVariable);
        if (token?.ValueFrom?.SecretKeyRef is null && config["Gateway:AdminTokenFile"] is null)
        {
            yield return $"the admin API listens on {config["Gateway:Admin"]} but {AdminToken.EnvironmentVariable} does not come from a Secret";
        }
        foreach (string credential in new[] { "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY" })
        {
            if (env.FirstOrDefault(e => e.Name == credential) is { } variable && variable.ValueFrom?.SecretKeyRef is null)
            {
                yield return $"{credential} is not from a Secret";
            }
        }
        if (env.Any(e => e.Name == "AWS_ACCESS_KEY_ID") != env.Any(e => e.Name == "AWS_SECRET_ACCESS_KEY"))
        {
            yield return "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set";
        }
        foreach (V1EnvVar variable in env.Where(e => e.ValueFrom?.SecretKeyRef is not null))
        {
            V1SecretKeySelector reference = variable.ValueFrom.SecretKeyRef;
            if (chart.All<V1Secret>().FirstOrDefault(s => s.Metadata.Name == reference.Name) is { } secret
                && !(secret.Data?.ContainsKey(reference.Key) == true || secret.StringData?.ContainsKey(reference.Key) == true))
            {
                yield return $"{variable.Name} reads key {reference.Key} of Secret {reference.Name}, which the chart renders without it";
            }
        }
        int replicas = chart.StatefulSet.Spec.Replicas ?? 1;
        string? contactPoints = config["Gateway:Cluster:RequiredContactPoints"];
        if (!int.TryParse(contactPoints, NumberStyles.None, CultureInfo.InvariantCulture, out int required) || required < 1 || required > replicas)
        {
            yield return $"Gateway:Cluster:RequiredContactPoints '{contactPoints}' is not between 1 and the {replicas} replicas";
        }
        if (config["Gateway:Data"] is not { } data || !Path.IsPathRooted(data))
        {
            yield return $"Gateway:Data '{config["Gateway:Data"]}' is not an absolute path";
        }
    }

    /// <summary>The root filesystem is read-only: the gateway may write to its data folder and /tmp, and nowhere else.</summary>
    public static IEnumerable<string> WritablePaths(RenderedChart chart)
    {
        string? data = chart.GatewayConfiguration()["Gateway:Data"];
        string[] writable = [.. (chart.Container.VolumeMounts ?? []).Where(m => m.ReadOnlyProperty != true).Select(m => m.MountPath).Order(StringComparer.Ordinal)];
        string[] expected = [.. new[] { data ?? "(Gateway:Data)", "/tmp" }.Order(StringComparer.Ordinal)];
        if (!writable.SequenceEqual(expected))
        {
            yield return $"writable mounts are [{string.Join(", ", writable)}]; the gateway writes to [{string.Join(", ", expected)}]";
        }
    }

    private static string Show(IEnumerable<KeyValuePair<string, string>> labels) =>
        "{" + string.Join(", ", labels.Select(l => $"{l.Key}={l.Value}")) + "}";
}
