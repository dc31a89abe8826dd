using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors;
using Gateway.Actors.Exports;

namespace Gateway.Host;

/// <summary>The body of a resize: the new size, in bytes or as a string such as "10G".</summary>
public sealed record ResizeExportRequest(JsonElement? Size);

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(ResizeExportRequest))]
public sealed partial class ResizeJson : JsonSerializerContext;

/// <summary>
/// <c>POST /v1/exports/{name}/resize</c> <c>{"size": N}</c>: grow an export while its clients stay
/// connected. 200 with the export (also when the size is already that, nothing changes); 400 when
/// it would shrink, the size is invalid or over the limit, or the export is read-only; 404 for an
/// unknown export. Connected clients keep the size they were told; they see the new one when they
/// reconnect (NBD has no way to tell them).
/// </summary>
public static class AdminResizeApi
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(90);

    public static WebApplication MapResizeApi(this WebApplication app)
    {
        app.MapPost("/v1/exports/{name}/resize", async (string name, HttpRequest request, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            ResizeExportRequest? body;
            try
            {
                body = await JsonSerializer.DeserializeAsync(request.Body, ResizeJson.Default.ResizeExportRequest, ct);
            }
            catch (JsonException e)
            {
                return AdminApi.Error(StatusCodes.Status400BadRequest, $"request body is not valid JSON: {e.Message}");
            }
            if (body is null)
            {
                return AdminApi.Error(StatusCodes.Status400BadRequest, "request body must be a JSON object");
            }
            if (!AdminApi.TryReadSize(body.Size, out long size, out string? problem))
            {
                return AdminApi.Error(StatusCodes.Status400BadRequest, problem!);
            }
            IActorRef exports = await registry.GetAsync(ct);
            CommandResult result = await exports.Ask<CommandResult>(new ResizeExport(name, size), Timeout, ct);
            return result.Error is null && result.Export is { } export
                ? Results.Json(ExportDto.From(export.Spec), AdminJson.Default.ExportDto)
                : AdminApi.Failure(result.Error is null ? CommandResult.Fail(ExportErrorKind.Failed, "resize failed") : result);
        });
        return app;
    }
}
