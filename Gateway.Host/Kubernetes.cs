namespace Gateway.Host;

/// <summary>
/// What the helm chart (helm/gateway) must agree with: health routes, port names, discovery
/// settings, shutdown timing. Tests render the chart and compare it with these values.
/// </summary>
public static class Kubernetes
{
    /// <summary>Liveness: the actor system is running.</summary>
    public const string LivenessPath = "/healthz";

    /// <summary>Readiness: the node has joined the cluster (single-node mode: the actor system runs).</summary>
    public const string ReadinessPath = "/readyz";

    /// <summary>Port names the gateway's container exposes.</summary>
    public const string NbdPortName = "nbd";
    public const string AdminPortName = "admin";
    public const string HealthPortName = "health";
    public const string RemotingPortName = "remoting";
    public const string PeerPortName = "peer";

    /// <summary>Akka.Management's bootstrap port must carry this name (Akka.Discovery.KubernetesApi).</summary>
    public const string ManagementPortName = "management";

    /// <summary>The actor system name; also the default Akka.Management service name.</summary>
    public const string ActorSystemName = "gateway";

    /// <summary>Akka.Discovery.KubernetesApi's default pod label selector; {0} is the service name.</summary>
    public const string PodLabelSelector = "app={0}";

    /// <summary>How long the host waits for connections to drain and exports to flush on SIGTERM.</summary>
    public static readonly TimeSpan ShutdownTimeout = TimeSpan.FromSeconds(60);
}
