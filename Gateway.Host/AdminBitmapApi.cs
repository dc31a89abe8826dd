using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Exports;

namespace Gateway.Host;

/// <summary>JSON shapes of the bitmap endpoints (docs/architecture.md#the-interface-contract).</summary>
public sealed record CreateBitmapRequest(string? Name, JsonElement? Granularity, bool? Enabled);

public sealed record MergeBitmapsRequest(string[]? Sources);

public sealed record BitmapDto(string Name, int Granularity, bool Enabled, long DirtyBytes)
{
    public static BitmapDto From(BitmapInfo info) => new(info.Name, info.Granularity, info.Enabled, info.DirtyBytes);
}

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(CreateBitmapRequest))]
[JsonSerializable(typeof(MergeBitmapsRequest))]
[JsonSerializable(typeof(BitmapDto))]
[JsonSerializable(typeof(BitmapDto[]))]
[JsonSerializable(typeof(ErrorDto))]
public sealed partial class BitmapJson : JsonSerializerContext;

/// <summary>
/// <c>/v1/exports/{name}/bitmaps</c>: list, add, remove, clear, enable, disable, merge. Every
/// request goes to the export registry, which routes it to the export's bitmaps actor.
/// </summary>
public static class AdminBitmapApi
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    public static WebApplication MapBitmapApi(this WebApplication app)
    {
        app.MapGet("/v1/exports/{name}/bitmaps", (string name, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
            SendAsync(registry, new ListBitmaps(name), r => Results.Json(r.Bitmaps.Select(BitmapDto.From).ToArray(), BitmapJson.Default.BitmapDtoArray), ct));

        app.MapPost("/v1/exports/{name}/bitmaps", async (string name, HttpRequest request, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            (CreateBitmapRequest? body, IResult? bad) = await ReadAsync(request, BitmapJson.Default.CreateBitmapRequest, ct);
            if (body is null)
            {
                return bad!;
            }
            long granularity = DirtyBitmap.DefaultGranularity;
            switch (body.Granularity)
            {
                case null:
                    break;
                case { ValueKind: JsonValueKind.Number } number when number.TryGetInt64(out granularity):
                    break;
                case { ValueKind: JsonValueKind.String } text when Sizes.TryParse(text.GetString()!, out granularity):
                    break;
                default:
                    return Error(StatusCodes.Status400BadRequest,
                        $"granularity {body.Granularity} is invalid: give bytes, or a string such as \"64K\" (a power of two from 512 bytes to 16 MiB)");
            }
            return await SendAsync(registry, new AddBitmap(name, body.Name ?? "", granularity, body.Enabled ?? true),
                r => Results.Json(BitmapDto.From(r.Bitmaps[0]), BitmapJson.Default.BitmapDto, statusCode: StatusCodes.Status201Created), ct);
        });

        app.MapDelete("/v1/exports/{name}/bitmaps/{bitmap}", (string name, string bitmap, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
            SendAsync(registry, new RemoveBitmap(name, bitmap), _ => Results.NoContent(), ct));

        app.MapPost("/v1/exports/{name}/bitmaps/{bitmap}/clear", (string name, string bitmap, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
            SendAsync(registry, new ClearBitmap(name, bitmap), One, ct));

        app.MapPost("/v1/exports/{name}/bitmaps/{bitmap}/enable", (string name, string bitmap, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
            SendAsync(registry, new SetBitmapEnabled(name, bitmap, true), One, ct));

        app.MapPost("/v1/exports/{name}/bitmaps/{bitmap}/disable", (string name, string bitmap, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
            SendAsync(registry, new SetBitmapEnabled(name, bitmap, false), One, ct));

        app.MapPost("/v1/exports/{name}/bitmaps/{bitmap}/merge", async (string name, string bitmap, HttpRequest request, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            (MergeBitmapsRequest? body, IResult? bad) = await ReadAsync(request, BitmapJson.Default.MergeBitmapsRequest, ct);
            if (body is null)
            {
                return bad!;
            }
            if (body.Sources is null)
            {
                return Error(StatusCodes.Status400BadRequest, "sources is required: a list of bitmap names to merge into the target");
            }
            return await SendAsync(registry, new MergeBitmaps(name, bitmap, body.Sources), One, ct);
        });

        return app;
    }

    private static IResult One(BitmapResult result) =>
        result.Bitmaps.Count > 0 ? Results.Json(BitmapDto.From(result.Bitmaps[0]), BitmapJson.Default.BitmapDto) : Results.NoContent();

    private static async Task<IResult> SendAsync(IRequiredActor<ExportRegistryKey> registry, IBitmapCommand command, Func<BitmapResult, IResult> ok, CancellationToken ct)
    {
        IActorRef exports = await registry.GetAsync(ct);
        BitmapResult result = await exports.Ask<BitmapResult>(command, Timeout, ct);
        return result.Error is null ? ok(result) : Error(result.Error switch
        {
            ExportErrorKind.NotFound => StatusCodes.Status404NotFound,
            ExportErrorKind.Conflict => StatusCodes.Status409Conflict,
            ExportErrorKind.Invalid => StatusCodes.Status400BadRequest,
            _ => StatusCodes.Status500InternalServerError,
        }, result.Message ?? "failed");
    }

    private static async Task<(T? Body, IResult? Problem)> ReadAsync<T>(HttpRequest request, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> type, CancellationToken ct)
        where T : class
    {
        try
        {
            T? body = await JsonSerializer.DeserializeAsync(request.Body, type, ct);
            return body is null ? (null, Error(StatusCodes.Status400BadRequest, "request body must be a JSON object")) : (body, null);
        }
        catch (JsonException e)
        {
            return (null, Error(StatusCodes.Status400BadRequest, $"request body is not valid JSON: {e.Message}"));
        }
    }

    private static IResult Error(int status, string message) =>
        Results.Json(new ErrorDto(message), BitmapJson.Default.ErrorDto, statusCode: status);
}
