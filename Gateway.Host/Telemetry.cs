using Gateway.Actors.Telemetry;
using OpenTelemetry.Metrics;
using OpenTelemetry.Resources;
using OpenTelemetry.Trace;

namespace Gateway.Host;

public static class Telemetry
{
    /// <summary>The gateway's meter and activity source.</summary>
    public static MeterProviderBuilder AddGatewayInstrumentation(this MeterProviderBuilder builder) =>
        builder.AddMeter(GatewayTelemetry.Name);

    public static TracerProviderBuilder AddGatewayInstrumentation(this TracerProviderBuilder builder) =>
        builder.AddSource(GatewayTelemetry.Name);

    /// <summary>
    /// Metrics as Prometheus text at <c>GET /metrics</c> on the admin port; metrics and traces
    /// over OTLP too when OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard variable).
    /// </summary>
    public static IServiceCollection AddGatewayTelemetry(this IServiceCollection services)
    {
        bool otlp = !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("OTEL_EXPORTER_OTLP_ENDPOINT"));
        services.AddOpenTelemetry()
            .ConfigureResource(r => r.AddService("gateway"))
            .WithMetrics(metrics =>
            {
                // No scrape cache: a scrape right after traffic must show it.
                metrics.AddGatewayInstrumentation().AddPrometheusExporter(o => o.ScrapeResponseCacheDurationMilliseconds = 0);
                if (otlp)
                {
                    metrics.AddOtlpExporter();
                }
            })
            .WithTracing(tracing =>
            {
                tracing.AddGatewayInstrumentation();
                if (otlp)
                {
                    tracing.AddOtlpExporter();
                }
            });
        return services;
    }
}
