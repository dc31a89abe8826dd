using System.Text.Json;

namespace Gateway.Host;

/// <summary>
/// What every CLI command group shares: one HttpClient for the admin API, the bearer token,
/// printing a JSON body, and turning a 4xx/5xx answer's <c>{error}</c> into one line on stderr.
/// </summary>
public abstract class AdminClient(Uri admin, TextWriter stdout, TextWriter stderr)
{
    private static readonly HttpClient Http = new() { Timeout = TimeSpan.FromSeconds(60) };

    /// <summary>The <c>--admin</c> value as a base URI: http:// when no scheme is given, a trailing slash.</summary>
    public static Uri BaseUri(string url)
    {
        if (!url.Contains("://", StringComparison.Ordinal))
        {
            url = "http://" + url;
        }
        return new Uri(url.EndsWith('/') ? url : url + "/");
    }

    protected TextWriter Stdout => stdout;

    protected TextWriter Stderr => stderr;

    protected async Task<HttpResponseMessage> SendAsync(HttpMethod method, string path, HttpContent? content, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(method, new Uri(admin, path)) { Content = content };
        CliAuth.Authorize(request);
        try
        {
            return await Http.SendAsync(request, ct);
        }
        catch (HttpRequestException e)
        {
            throw new CliException($"cannot reach the gateway admin API at {admin}: {e.Message}");
        }
    }

    protected async Task<int> PrintBodyAsync(HttpResponseMessage response, CancellationToken ct)
    {
        await stdout.WriteLineAsync(await response.Content.ReadAsStringAsync(ct));
        return 0;
    }

    protected async Task<int> FailAsync(HttpResponseMessage response, CancellationToken ct)
    {
        await stderr.WriteLineAsync($"error: {await ErrorMessageAsync(response, ct)} (HTTP {(int)response.StatusCode})");
        return 1;
    }

    /// <summary>The <c>{error}</c> of a failed answer, or its body as it came when it is not the API's JSON.</summary>
    protected static async Task<string> ErrorMessageAsync(HttpResponseMessage response, CancellationToken ct)
    {
        string text = await response.Content.ReadAsStringAsync(ct);
        try
        {
            return JsonSerializer.Deserialize(text, AdminJson.Default.ErrorDto)?.Error ?? text;
        }
        catch (JsonException)
        {
            // Not the API's JSON (a proxy's page, say): print it as it came.
            return text;
        }
    }
}

public sealed class CliException(string message) : Exception(message);
