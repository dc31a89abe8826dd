namespace Gateway.Host;

/// <summary>
/// Bearer-token authentication of the admin API. With a token configured (mandatory when the API
/// is bound beyond loopback), every request needs <c>Authorization: Bearer TOKEN</c>; anything
/// else is answered 401. The token is compared in constant time and never logged.
/// </summary>
public static class AdminAuth
{
    public static WebApplication UseAdminAuthentication(this WebApplication app, AdminToken? token)
    {
        if (token is null)
        {
            return app;
        }
        ILogger logger = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("Gateway.Admin");
        app.Use(async (context, next) =>
        {
            string header = context.Request.Headers.Authorization.ToString();
            const string Scheme = "Bearer ";
            if (header.StartsWith(Scheme, StringComparison.OrdinalIgnoreCase) && token.Matches(header[Scheme.Length..]))
            {
                await next(context);
                return;
            }
            logger.LogWarning("Admin request {Method} {Path} from {Client} refused: {Reason}", context.Request.Method, context.Request.Path,
                context.Connection.RemoteIpAddress, header.Length == 0 ? "no bearer token" : "wrong bearer token");
            context.Response.StatusCode = StatusCodes.Status401Unauthorized;
            context.Response.Headers.WWWAuthenticate = "Bearer";
            await context.Response.WriteAsJsonAsync(new ErrorDto("a valid bearer token is required (Authorization: Bearer TOKEN)"), AdminJson.Default.ErrorDto);
        });
        return app;
    }
}
