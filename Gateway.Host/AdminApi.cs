using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using Akka.Hosting;
using Gateway.Actors;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends.Qcow2;

namespace Gateway.Host;

/// <summary>JSON shapes of the admin API (docs/architecture.md#the-interface-contract).</summary>
/// <summary>Overlays add <c>base</c> (an export) or <c>baseImage</c> (a raw file) on create, and show their <c>layers</c> (top first).</summary>
/// <remarks>S3 exports add <c>s3</c> {endpoint, bucket, prefix, region, objectSize, accessKey, secretKey, cacheBytes, parallelism, writeLog}; answers never carry secretKey.</remarks>
public sealed record BackendDto(string? Type, string? Path, string? Base = null, string? BaseImage = null, string[]? Layers = null, S3Spec? S3 = null,
    string? BaseFormat = null);

/// <remarks><c>access</c> {tlsRequired, allowedClients, maxConnections}: who may use the export over NBD (README "TLS").</remarks>
public sealed record CreateExportRequest(string? Name, JsonElement? Size, BackendDto? Backend, bool? ReadOnly, string? Description, ExportAccess? Access = null);

public sealed record ExportDto(string Name, long Size, BackendDto Backend, bool ReadOnly, string? Description, ExportAccess? Access = null)
{
    public static ExportDto From(ExportSpec spec) =>
        new(spec.Name, spec.Size, new BackendDto(spec.Backend.Type, spec.Backend.Path, spec.Backend.Base, spec.Backend.BaseImage, spec.Backend.Layers, spec.Backend.S3?.Redacted(), spec.Backend.BaseFormat), spec.ReadOnly, spec.Description, spec.Access);
}

public sealed record ErrorDto(string Error);

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, WriteIndented = true)]
[JsonSerializable(typeof(CreateExportRequest))]
[JsonSerializable(typeof(ExportDto))]
[JsonSerializable(typeof(ExportDto[]))]
[JsonSerializable(typeof(ErrorDto))]
public sealed partial class AdminJson : JsonSerializerContext;

public static class AdminApi
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    public static WebApplication MapAdminApi(this WebApplication app)
    {
        app.MapGet("/healthz", () => Results.Text("ok\n"));

        app.MapGet("/v1/exports", async (IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            IActorRef exports = await registry.GetAsync(ct);
            ExportList list = await exports.Ask<ExportList>(ListExports.Instance, Timeout, ct);
            return Results.Json(list.Exports.Select(e => ExportDto.From(e.Spec)).ToArray(), AdminJson.Default.ExportDtoArray);
        });

        app.MapGet("/v1/exports/{name}", async (string name, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            IActorRef exports = await registry.GetAsync(ct);
            ExportFound found = await exports.Ask<ExportFound>(new GetExport(name), Timeout, ct);
            return found.Export is null
                ? Error(StatusCodes.Status404NotFound, $"export '{name}' not found")
                : Results.Json(ExportDto.From(found.Export.Spec), AdminJson.Default.ExportDto);
        });

        app.MapPost("/v1/exports", async (HttpRequest request, IRequiredActor<ExportRegistryKey> registry, IConfiguration config, CancellationToken ct) =>
        {
            CreateExportRequest? body;
            try
            {
                body = await JsonSerializer.DeserializeAsync(request.Body, AdminJson.Default.CreateExportRequest, ct);
            }
            catch (JsonException e)
            {
                return Error(StatusCodes.Status400BadRequest, $"request body is not valid JSON: {e.Message}");
            }
            if (body is null)
            {
                return Error(StatusCodes.Status400BadRequest, "request body must be a JSON object");
            }
            if (ToSpec(body, out string? problem, S3Defaults(config)) is not ExportSpec spec)
            {
                return Error(StatusCodes.Status400BadRequest, problem!);
            }
            IActorRef exports = await registry.GetAsync(ct);
            CommandResult result = await exports.Ask<CommandResult>(new CreateExport(spec), Timeout, ct);
            return result.Error is null
                ? Results.Json(ExportDto.From(spec), AdminJson.Default.ExportDto, statusCode: StatusCodes.Status201Created)
                : Failure(result);
        });

        app.MapDelete("/v1/exports/{name}", async (string name, IRequiredActor<ExportRegistryKey> registry, CancellationToken ct) =>
        {
            IActorRef exports = await registry.GetAsync(ct);
            CommandResult result = await exports.Ask<CommandResult>(new RemoveExport(name), Timeout, ct);
            return result.Error is null ? Results.NoContent() : Failure(result);
        });

        app.MapBitmapApi();
        app.MapOverlayApi();
        app.MapCapacityApi();
        app.MapResizeApi();
        return app;
    }

    /// <summary>
    /// Where S3 exports go when a request names no endpoint or bucket: <c>Gateway:S3:ServiceUrl</c>,
    /// <c>Gateway:S3:Bucket</c>, <c>Gateway:S3:Region</c> (the helm chart sets them), with the
    /// export's name as its prefix unless the request gives one. Credentials
    /// then come from the AWS SDK's usual places (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    /// </summary>
    public static S3Spec? S3Defaults(IConfiguration config) =>
        config["Gateway:S3:ServiceUrl"] is null && config["Gateway:S3:Bucket"] is null
            ? null
            : new S3Spec(config["Gateway:S3:ServiceUrl"], config["Gateway:S3:Bucket"], null, config["Gateway:S3:Region"]);

    /// <summary>Turns a request into a spec, or says what is wrong with it.</summary>
    public static ExportSpec? ToSpec(CreateExportRequest body, out string? problem, S3Spec? s3Defaults = null)
    {
        problem = null;
        if (string.IsNullOrEmpty(body.Name))
        {
            problem = "name is required";
            return null;
        }
        if (!TryReadSize(body.Size, out long size, out problem))
        {
            return null;
        }
        if (body.Backend?.Layers is not null)
        {
            problem = "layers are made by the gateway (snapshot), not given";
            return null;
        }
        S3Spec? s3 = body.Backend?.S3;
        if (body.Backend?.Type == "s3" && s3Defaults is not null)
        {
            // In the shared default bucket each export gets its own prefix unless it names one.
            s3 = (s3 ?? s3Defaults) with
            {
                Endpoint = s3?.Endpoint ?? s3Defaults.Endpoint,
                Bucket = s3?.Bucket ?? s3Defaults.Bucket,
                Region = s3?.Region ?? s3Defaults.Region,
                Prefix = s3?.Prefix ?? body.Name + "/",
            };
        }
        if (body.Backend is { Type: "overlay", BaseImage: { } image } && S3ImageLocation.IsS3Name(image) && s3Defaults is not null)
        {
            // An S3 base image in the gateway's default store unless the request names another.
            s3 ??= new S3Spec(s3Defaults.Endpoint, null, null, s3Defaults.Region);
        }
        var spec = new ExportSpec(body.Name, size, new BackendSpec(body.Backend?.Type ?? "file", body.Backend?.Path, Base: body.Backend?.Base, BaseImage: body.Backend?.BaseImage, S3: s3, BaseFormat: body.Backend?.BaseFormat), body.ReadOnly ?? false, body.Description,
            body.Access == ExportAccess.Open ? null : body.Access);
        problem = ExportRules.Validate(spec);
        return problem is null ? spec : null;
    }

    /// <summary>A size as requests give it: bytes, or a string such as "10G" (<see cref="Sizes.TryParse"/>).</summary>
    public static bool TryReadSize(JsonElement? value, out long size, out string? problem)
    {
        problem = null;
        size = 0;
        switch (value)
        {
            case null:
                problem = "size is required (bytes, or a string such as \"10G\")";
                return false;
            case { ValueKind: JsonValueKind.Number } number when number.TryGetInt64(out size):
                return true;
            case { ValueKind: JsonValueKind.String } text when Sizes.TryParse(text.GetString()!, out size):
                return true;
            default:
                problem = $"size {value} is invalid: give bytes, or a string such as \"10G\"";
                return false;
        }
    }

    public static IResult Failure(CommandResult result) => Error(result.Error switch
    {
        ExportErrorKind.NotFound => StatusCodes.Status404NotFound,
        ExportErrorKind.Conflict => StatusCodes.Status409Conflict,
        ExportErrorKind.Invalid => StatusCodes.Status400BadRequest,
        _ => StatusCodes.Status500InternalServerError,
    }, result.Message ?? "failed");

    public static IResult Error(int status, string message) =>
        Results.Json(new ErrorDto(message), AdminJson.Default.ErrorDto, statusCode: status);
}
