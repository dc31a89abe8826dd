using System.CommandLine;
using System.Net.Http.Headers;

namespace Gateway.Host;

/// <summary>The CLI's side of admin authentication: the bearer token from <c>--token-file</c> or the environment.</summary>
public static class CliAuth
{
    public static readonly Option<string?> TokenFile = new("--token-file")
    {
        Description = $"File holding the admin API bearer token (default: ${AdminToken.EnvironmentVariable})",
        Recursive = true,
    };

    private static string? _token;

    public static void Configure(ParseResult parse)
    {
        try
        {
            _token = AdminToken.Read(parse.GetValue(TokenFile));
        }
        catch (ArgumentException e)
        {
            throw new CliException(e.Message);
        }
    }

    public static void Authorize(HttpRequestMessage request)
    {
        if (_token is not null)
        {
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", _token);
        }
    }
}
