using System.Globalization;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;

namespace Gateway.Host;

/// <summary><c>gateway export ...</c>: the admin API from the command line.</summary>
public sealed partial class ExportCli(Uri admin, TextWriter stdout, TextWriter stderr) : AdminClient(admin, stdout, stderr)
{
    public async Task<int> ListAsync(CancellationToken ct)
    {
        using HttpResponseMessage response = await SendAsync(HttpMethod.Get, "v1/exports", null, ct);
        if (!response.IsSuccessStatusCode)
        {
            return await FailAsync(response, ct);
        }
        ExportDto[] exports = await response.Content.ReadFromJsonAsync(AdminJson.Default.ExportDtoArray, ct) ?? [];
        var table = new StringBuilder();
        table.AppendLine(CultureInfo.InvariantCulture, $"{"NAME",-24} {"SIZE",12} {"BACKEND",-8} {"MODE",-3} DESCRIPTION");
        foreach (ExportDto e in exports)
        {
            table.AppendLine(CultureInfo.InvariantCulture, $"{e.Name,-24} {Sizes.Format(e.Size),12} {e.Backend.Type,-8} {(e.ReadOnly ? "ro" : "rw"),-3} {e.Description}");
        }
        await Stdout.WriteAsync(table.ToString());
        return 0;
    }

    public async Task<int> ShowAsync(string name, CancellationToken ct)
    {
        using HttpResponseMessage response = await SendAsync(HttpMethod.Get, $"v1/exports/{Uri.EscapeDataString(name)}", null, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }

    public async Task<int> AddAsync(string name, string size, bool readOnly, string? description, string? path, CancellationToken ct)
    {
        if (!Sizes.TryParse(size, out long bytes))
        {
            await Stderr.WriteLineAsync($"error: size '{size}' is invalid: give bytes, or a number with K, M, G or T");
            return 2;
        }
        var body = new CreateExportRequest(name, JsonSerializer.SerializeToElement(bytes), new BackendDto("file", path), readOnly, description);
        using var content = JsonContent.Create(body, AdminJson.Default.CreateExportRequest);
        using HttpResponseMessage response = await SendAsync(HttpMethod.Post, "v1/exports", content, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }

    public async Task<int> RemoveAsync(string name, CancellationToken ct)
    {
        using HttpResponseMessage response = await SendAsync(HttpMethod.Delete, $"v1/exports/{Uri.EscapeDataString(name)}", null, ct);
        if (!response.IsSuccessStatusCode)
        {
            return await FailAsync(response, ct);
        }
        await Stdout.WriteLineAsync($"export '{name}' removed");
        return 0;
    }
}
