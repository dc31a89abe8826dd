using System.CommandLine;
using System.Net.Http.Json;
using System.Text.Json;

namespace Gateway.Host;

/// <summary><c>gateway export resize NAME --size SIZE</c>.</summary>
public sealed partial class ExportCli
{
    public async Task<int> ResizeAsync(string name, string size, CancellationToken ct)
    {
        if (!Sizes.TryParse(size, out long bytes))
        {
            await Stderr.WriteLineAsync($"error: size '{size}' is invalid: give bytes, or a number with K, M, G or T");
            return 2;
        }
        using var content = JsonContent.Create(new ResizeExportRequest(JsonSerializer.SerializeToElement(bytes)), ResizeJson.Default.ResizeExportRequest);
        using HttpResponseMessage response = await SendAsync(HttpMethod.Post, $"v1/exports/{Uri.EscapeDataString(name)}/resize", content, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }
}

/// <summary>The <c>export resize</c> command.</summary>
public static class ResizeCli
{
    private static readonly Option<string> SizeOption = new("--size") { Description = "New size in bytes, or with K, M, G, T (e.g. 20G); never smaller", Required = true };

    public static Command ResizeCommand(Argument<string> name, Func<ParseResult, ExportCli> cli)
    {
        var resize = new Command("resize", "Grow an export (clients see the new size when they reconnect)");
        resize.Arguments.Add(name);
        resize.Options.Add(SizeOption);
        resize.SetAction((parse, ct) => cli(parse).ResizeAsync(parse.GetValue(name)!, parse.GetValue(SizeOption)!, ct));
        return resize;
    }
}
