using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace Gateway.Csi;

/// <summary>An export as the admin API shows it (the fields the plugin reads).</summary>
public sealed record GatewayExport(string Name, long Size, GatewayBackend Backend, bool ReadOnly, string? Description);

public sealed record GatewayBackend(string? Type, string? Base = null, string[]? Layers = null);

public sealed record GatewayBitmap(string Name, int Granularity, bool Enabled, long DirtyBytes);

public sealed record GatewayCapacity(long AvailableBytes, long TotalBytes);

internal sealed record GatewayError(string Error);

internal sealed record NewBitmap(string Name, bool Enabled);

internal sealed record BitmapSources(string[] Sources);

internal sealed record NewSize(long Size);

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(GatewayExport))]
[JsonSerializable(typeof(GatewayExport[]))]
[JsonSerializable(typeof(GatewayBitmap))]
[JsonSerializable(typeof(GatewayBitmap[]))]
[JsonSerializable(typeof(GatewayCapacity))]
[JsonSerializable(typeof(GatewayError))]
[JsonSerializable(typeof(NewBitmap))]
[JsonSerializable(typeof(BitmapSources))]
[JsonSerializable(typeof(NewSize))]
[JsonSerializable(typeof(JsonElement))]
internal sealed partial class GatewayJson : JsonSerializerContext;

/// <summary>The admin API answered with an error: its HTTP status and its one-line message.</summary>
public sealed class GatewayAdminException(HttpStatusCode status, string message) : Exception(message)
{
    public HttpStatusCode Status { get; } = status;
}

/// <summary>
/// The plugin's only way to change the gateway: its admin API, as the <c>gateway export</c> CLI uses
/// it. The plugin keeps no state of its own; every answer is read back from the gateway, so a
/// restarted plugin (or another replica) answers the same.
/// </summary>
public sealed class GatewayAdmin(HttpClient http)
{
    public static GatewayAdmin Create(Uri admin, string? token)
    {
        var http = new HttpClient { BaseAddress = admin.AbsoluteUri.EndsWith('/') ? admin : new Uri(admin.AbsoluteUri + "/"), Timeout = TimeSpan.FromSeconds(100) };
        if (token is not null)
        {
            http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        }
        return new GatewayAdmin(http);
    }

    public async Task<bool> IsHealthyAsync(CancellationToken ct)
    {
        try
        {
            using HttpResponseMessage response = await http.GetAsync("healthz", ct);
            return response.IsSuccessStatusCode;
        }
        catch (HttpRequestException)
        {
            return false;
        }
    }

    public async Task<GatewayExport[]> ListExportsAsync(CancellationToken ct) =>
        await SendAsync(HttpMethod.Get, "v1/exports", null, GatewayJson.Default.GatewayExportArray, ct) ?? [];

    /// <summary>The export, or null when the gateway has none of that name.</summary>
    public async Task<GatewayExport?> GetExportAsync(string name, CancellationToken ct)
    {
        try
        {
            return await SendAsync(HttpMethod.Get, $"v1/exports/{Uri.EscapeDataString(name)}", null, GatewayJson.Default.GatewayExport, ct);
        }
        catch (GatewayAdminException e) when (e.Status == HttpStatusCode.NotFound)
        {
            return null;
        }
    }

    /// <summary>POST /v1/exports with the create request as JSON (the CLI's shape: name, size, backend, readOnly, description).</summary>
    public async Task<GatewayExport> CreateExportAsync(JsonElement request, CancellationToken ct) =>
        (await SendAsync(HttpMethod.Post, "v1/exports", JsonContent.Create(request, GatewayJson.Default.JsonElement), GatewayJson.Default.GatewayExport, ct))!;

    public Task RemoveExportAsync(string name, CancellationToken ct) =>
        SendAsync(HttpMethod.Delete, $"v1/exports/{Uri.EscapeDataString(name)}", null, GatewayJson.Default.JsonElement, ct);

    public async Task<GatewayExport> ResizeExportAsync(string name, long size, CancellationToken ct) =>
        (await SendAsync(HttpMethod.Post, $"v1/exports/{Uri.EscapeDataString(name)}/resize", JsonContent.Create(new NewSize(size), GatewayJson.Default.NewSize), GatewayJson.Default.GatewayExport, ct))!;

    public async Task<GatewayCapacity> GetCapacityAsync(CancellationToken ct) =>
        (await SendAsync(HttpMethod.Get, "v1/capacity", null, GatewayJson.Default.GatewayCapacity, ct))!;

    public async Task<GatewayBitmap[]> ListBitmapsAsync(string export, CancellationToken ct) =>
        await SendAsync(HttpMethod.Get, $"v1/exports/{Uri.EscapeDataString(export)}/bitmaps", null, GatewayJson.Default.GatewayBitmapArray, ct) ?? [];

    public Task AddBitmapAsync(string export, string bitmap, CancellationToken ct) =>
        SendAsync(HttpMethod.Post, $"v1/exports/{Uri.EscapeDataString(export)}/bitmaps", JsonContent.Create(new NewBitmap(bitmap, true), GatewayJson.Default.NewBitmap), GatewayJson.Default.GatewayBitmap, ct);

    public Task RemoveBitmapAsync(string export, string bitmap, CancellationToken ct) =>
        SendAsync(HttpMethod.Delete, BitmapPath(export, bitmap), null, GatewayJson.Default.JsonElement, ct);

    public Task SetBitmapEnabledAsync(string export, string bitmap, bool enabled, CancellationToken ct) =>
        SendAsync(HttpMethod.Post, BitmapPath(export, bitmap) + (enabled ? "/enable" : "/disable"), null, GatewayJson.Default.GatewayBitmap, ct);

    public Task MergeBitmapsAsync(string export, string target, string[] sources, CancellationToken ct) =>
        SendAsync(HttpMethod.Post, BitmapPath(export, target) + "/merge", JsonContent.Create(new BitmapSources(sources), GatewayJson.Default.BitmapSources), GatewayJson.Default.GatewayBitmap, ct);

    private static string BitmapPath(string export, string bitmap) => $"v1/exports/{Uri.EscapeDataString(export)}/bitmaps/{Uri.EscapeDataString(bitmap)}";

    private async Task<T?> SendAsync<T>(HttpMethod method, string path, HttpContent? content, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> type, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(method, path) { Content = content };
        HttpResponseMessage response;
        try
        {
            response = await http.SendAsync(request, ct);
        }
        catch (HttpRequestException e)
        {
            throw new GatewayAdminException(HttpStatusCode.ServiceUnavailable, $"cannot reach the gateway admin API at {http.BaseAddress}: {e.Message}");
        }
        using (response)
        {
            if (!response.IsSuccessStatusCode)
            {
                string text = await response.Content.ReadAsStringAsync(ct);
                string message = text;
                try
                {
                    message = JsonSerializer.Deserialize(text, GatewayJson.Default.GatewayError)?.Error ?? text;
                }
                catch (JsonException)
                {
                    // Not the API's JSON (a proxy's page): keep it as it came.
                }
                throw new GatewayAdminException(response.StatusCode, message);
            }
            if (response.StatusCode == HttpStatusCode.NoContent)
            {
                return default;
            }
            return await response.Content.ReadFromJsonAsync(type, ct);
        }
    }
}
