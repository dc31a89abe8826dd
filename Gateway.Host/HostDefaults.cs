namespace Gateway.Host;

/// <summary>
/// What the ASP.NET host is built with. Its defaults take the working directory as the content
/// root and watch it, with every folder under it, for changes to <c>appsettings.json</c>
/// (inotify). The working directory usually holds the data directory (<c>./data</c>), so every
/// write to an export's file raised an event that a thread-pool thread read and checked with
/// <c>lstat</c>: 0.6 events per 4 KiB random write (strace), CPU taken from the data path. The
/// gateway reads no <c>appsettings.json</c> (configuration is the command line, <c>--config</c>
/// and environment variables), so the content root is the install folder and nothing is watched.
/// </summary>
public static class HostDefaults
{
    public static WebApplicationOptions Options() => new()
    {
        ContentRootPath = AppContext.BaseDirectory,
        Args = ["--hostBuilder:reloadConfigOnChange=false"],
    };
}
