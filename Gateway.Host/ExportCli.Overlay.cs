using System.CommandLine;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Actors.Exports;
using Gateway.Backends.Qcow2;

namespace Gateway.Host;

/// <summary><c>gateway export add --overlay [--base NAME | --base-image FILE [--base-format raw|qcow2]]</c> and <c>gateway export snapshot NAME</c>.</summary>
public sealed partial class ExportCli
{
    public async Task<int> AddOverlayAsync(string name, string size, bool readOnly, string? description, string? baseExport, string? baseImage, CancellationToken ct,
        string? baseFormat = null, S3Spec? s3 = null)
    {
        if (!Sizes.TryParse(size, out long bytes))
        {
            await Stderr.WriteLineAsync($"error: size '{size}' is invalid: give bytes, or a number with K, M, G or T");
            return 2;
        }
        // A relative image path means the caller's folder, not the gateway's.
        string? image = baseImage is null || S3ImageLocation.IsS3Name(baseImage) ? baseImage : Path.GetFullPath(baseImage);
        var body = new CreateExportRequest(name, JsonSerializer.SerializeToElement(bytes), new BackendDto("overlay", null, baseExport, image, S3: s3, BaseFormat: baseFormat), readOnly, description);
        using var content = JsonContent.Create(body, AdminJson.Default.CreateExportRequest);
        using HttpResponseMessage response = await SendAsync(HttpMethod.Post, "v1/exports", content, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }

    public async Task<int> SnapshotAsync(string name, CancellationToken ct)
    {
        using HttpResponseMessage response = await SendAsync(HttpMethod.Post, $"v1/exports/{Uri.EscapeDataString(name)}/snapshot", null, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }
}

/// <summary>The overlay options of <c>export add</c> and the <c>export snapshot</c> command.</summary>
public static class OverlayCli
{
    private static readonly Option<bool> OverlayOption = new("--overlay") { Description = "Make an overlay export: a writable top layer over frozen layers (see 'export snapshot')" };
    private static readonly Option<string?> BaseOption = new("--base") { Description = "Overlay on another export's frozen data (a golden image); implies --overlay" };
    private static readonly Option<string?> BaseImageOption = new("--base-image") { Description = "Overlay on a raw or qcow2 image (with its backing chain), read-only: a file, or s3://BUCKET/KEY read by range (with --s3-endpoint, and --s3-region and keys if needed); implies --overlay" };

    private static readonly Option<string?> BaseFormatOption = new Option<string?>("--base-format")
    {
        Description = "The --base-image's format, raw or qcow2 (detected from its header when left out; a header that disagrees is refused)",
    }.AcceptOnlyFromAmong("raw", "qcow2");

    public static void AddOptions(Command add)
    {
        add.Options.Add(OverlayOption);
        add.Options.Add(BaseOption);
        add.Options.Add(BaseImageOption);
        add.Options.Add(BaseFormatOption);
    }

    public static bool IsOverlay(ParseResult parse) =>
        parse.GetValue(OverlayOption) || parse.GetValue(BaseOption) is not null || parse.GetValue(BaseImageOption) is not null;

    public static string? Base(ParseResult parse) => parse.GetValue(BaseOption);

    public static string? BaseImage(ParseResult parse) => parse.GetValue(BaseImageOption);

    public static string? BaseFormat(ParseResult parse) => parse.GetValue(BaseFormatOption);

    public static Command SnapshotCommand(Argument<string> name, Func<ParseResult, ExportCli> cli)
    {
        var snapshot = new Command("snapshot", "Freeze an overlay export's top layer and push a new empty one (clients stay connected)");
        snapshot.Arguments.Add(name);
        snapshot.SetAction((parse, ct) => cli(parse).SnapshotAsync(parse.GetValue(name)!, ct));
        return snapshot;
    }
}
