using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Backup;

namespace Gateway.Host;

/// <summary>
/// The admin API as <c>gateway backup</c> uses it: an export's bitmaps (incremental backups,
/// <c>verify --against-export</c>) and making or removing the export a restore writes into; an
/// error answer becomes a <see cref="BackupSourceException"/> with the API's message.
/// </summary>
public sealed class BackupAdminClient(Uri admin) : AdminClient(admin, TextWriter.Null, TextWriter.Null), IBitmapAdmin
{
    public async Task<IReadOnlyList<TrackedBitmap>> ListAsync(string export, CancellationToken cancellationToken)
    {
        using HttpResponseMessage response = await SendOrFailAsync(HttpMethod.Get, Path(export), null, cancellationToken);
        await EnsureAsync(response, $"listing the bitmaps of export '{export}'", cancellationToken);
        BitmapDto[] bitmaps = await response.Content.ReadFromJsonAsync(BitmapJson.Default.BitmapDtoArray, cancellationToken) ?? [];
        return [.. bitmaps.Select(b => new TrackedBitmap(b.Name, b.Enabled))];
    }

    public async Task AddAsync(string export, string name, CancellationToken cancellationToken)
    {
        using var body = JsonContent.Create(new CreateBitmapRequest(name, null, true), BitmapJson.Default.CreateBitmapRequest);
        using HttpResponseMessage response = await SendOrFailAsync(HttpMethod.Post, Path(export), body, cancellationToken);
        await EnsureAsync(response, $"adding bitmap '{name}' to export '{export}'", cancellationToken);
    }

    public async Task RemoveAsync(string export, string name, CancellationToken cancellationToken)
    {
        using HttpResponseMessage response = await SendOrFailAsync(HttpMethod.Delete, $"{Path(export)}/{Uri.EscapeDataString(name)}", null, cancellationToken);
        if (response.StatusCode != HttpStatusCode.NotFound)
        {
            await EnsureAsync(response, $"removing bitmap '{name}' of export '{export}'", cancellationToken);
        }
    }

    /// <summary>A new export of <paramref name="size"/> bytes on <paramref name="backend"/> (null: the gateway's default, a sparse file): it reads as zeros.</summary>
    public async Task CreateExportAsync(string export, long size, BackendDto? backend, CancellationToken cancellationToken)
    {
        var request = new CreateExportRequest(export, JsonSerializer.SerializeToElement(size), backend, null, "restored by gateway backup");
        using var body = JsonContent.Create(request, AdminJson.Default.CreateExportRequest);
        using HttpResponseMessage response = await SendOrFailAsync(HttpMethod.Post, "v1/exports", body, cancellationToken);
        await EnsureAsync(response, $"creating export '{export}'", cancellationToken);
    }

    public async Task RemoveExportAsync(string export, CancellationToken cancellationToken)
    {
        using HttpResponseMessage response = await SendOrFailAsync(HttpMethod.Delete, $"v1/exports/{Uri.EscapeDataString(export)}", null, cancellationToken);
        await EnsureAsync(response, $"removing export '{export}'", cancellationToken);
    }

    private static string Path(string export) => $"v1/exports/{Uri.EscapeDataString(export)}/bitmaps";

    private async Task<HttpResponseMessage> SendOrFailAsync(HttpMethod method, string path, HttpContent? content, CancellationToken cancellationToken)
    {
        try
        {
            return await SendAsync(method, path, content, cancellationToken);
        }
        catch (CliException e)
        {
            throw new BackupSourceException(e.Message);
        }
    }

    private static async Task EnsureAsync(HttpResponseMessage response, string what, CancellationToken cancellationToken)
    {
        if (response.IsSuccessStatusCode)
        {
            return;
        }
        throw new BackupSourceException($"{what}: {await ErrorMessageAsync(response, cancellationToken)} (HTTP {(int)response.StatusCode})");
    }
}
