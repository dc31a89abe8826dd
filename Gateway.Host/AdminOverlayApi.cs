using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors;
using Gateway.Actors.Exports;

namespace Gateway.Host;

/// <summary><c>POST /v1/exports/{name}/snapshot</c>: freeze the overlay's top and push a new empty one.</summary>
public static class AdminOverlayApi
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(90);

    public static WebApplication MapOverlayApi(this WebApplication app)
    {
        app.MapPost("/v1/exports/{name}/snapshot", async (string name, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            IActorRef exports = await registry.GetAsync(ct);
            CommandResult result = await exports.Ask<CommandResult>(new SnapshotExport(name), Timeout, ct);
            if (result.Error is null && result.Export is { } export)
            {
                return Results.Json(ExportDto.From(export.Spec), AdminJson.Default.ExportDto);
            }
            int status = result.Error switch
            {
                ExportErrorKind.NotFound => StatusCodes.Status404NotFound,
                ExportErrorKind.Conflict => StatusCodes.Status409Conflict,
                ExportErrorKind.Invalid => StatusCodes.Status400BadRequest,
                _ => StatusCodes.Status500InternalServerError,
            };
            return Results.Json(new ErrorDto(result.Message ?? "snapshot failed"), AdminJson.Default.ErrorDto, statusCode: status);
        });
        return app;
    }
}
