using System.CommandLine;
using System.Net;
using Akka.Cluster.Hosting;
using Akka.Hosting;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;

namespace Gateway.Host;

/// <summary>
/// Liveness and readiness on their own port, without admin authentication, for Kubernetes
/// probes: <see cref="Kubernetes.LivenessPath"/> is healthy while the actor system runs;
/// <see cref="Kubernetes.ReadinessPath"/> once the node has joined the cluster (on a single
/// node: as soon as the actor system runs).
/// </summary>
public static class Health
{
    private const string LivenessTag = "liveness";
    private const string ReadinessTag = "readiness";

    public static readonly Option<string?> Option = new("--health") { Description = $"Health probe listen address HOST:PORT ({Kubernetes.LivenessPath}, {Kubernetes.ReadinessPath}; default: none)" };

    public static GatewayOptions Apply(GatewayOptions options, ParseResult parse, IConfiguration config) =>
        (parse.GetValue(Option) ?? config["Gateway:Health"]) is { } text
            ? options with { HealthEndpoint = GatewayOptions.ParseEndpoint(text, "--health") }
            : options;

    public static void AddChecks(AkkaConfigurationBuilder akka, bool cluster)
    {
        akka.WithActorSystemLivenessCheck(tags: cluster ? [LivenessTag] : [LivenessTag, ReadinessTag]);
        if (cluster)
        {
            akka.WithAkkaClusterReadinessCheck(tags: [ReadinessTag]);
        }
    }

    /// <summary>Serves the probes on the health endpoint only, ahead of admin authentication.</summary>
    public static void UseHealthEndpoint(this WebApplication app, IPEndPoint? endpoint)
    {
        if (endpoint is null)
        {
            return;
        }
        app.MapWhen(context => context.Connection.LocalPort == endpoint.Port, probes =>
        {
            probes.UseHealthChecks(Kubernetes.LivenessPath, new HealthCheckOptions { Predicate = check => check.Tags.Contains(LivenessTag) });
            probes.UseHealthChecks(Kubernetes.ReadinessPath, new HealthCheckOptions { Predicate = check => check.Tags.Contains(ReadinessTag) });
            probes.Run(context =>
            {
                context.Response.StatusCode = StatusCodes.Status404NotFound;
                return Task.CompletedTask;
            });
        });
    }
}
