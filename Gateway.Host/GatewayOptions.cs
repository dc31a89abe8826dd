using System.Net;

namespace Gateway.Host;

/// <summary>Settings of <c>gateway serve</c>, from the command line over the config file.</summary>
public sealed record GatewayOptions(string DataDirectory, IPEndPoint NbdEndpoint, IPEndPoint AdminEndpoint)
{
    public const string DefaultData = "./data";
    public const string DefaultNbd = "127.0.0.1:10809";
    public const string DefaultAdmin = "127.0.0.1:10880";

    /// <summary>The export made on first start, when there are none: 1 GiB, sparse.</summary>
    public const long InitialExportSize = 1L << 30;

    public string DatabasePath => Path.Combine(DataDirectory, "gateway.db");

    public static IPEndPoint ParseEndpoint(string value, string what)
    {
        if (IPEndPoint.TryParse(value, out IPEndPoint? endpoint) && endpoint.Port != 0 || value.EndsWith(":0", StringComparison.Ordinal) && IPEndPoint.TryParse(value, out endpoint))
        {
            return endpoint!;
        }
        if (value.StartsWith("localhost:", StringComparison.OrdinalIgnoreCase) && int.TryParse(value["localhost:".Length..], out int port))
        {
            return new IPEndPoint(IPAddress.Loopback, port);
        }
        throw new ArgumentException($"{what} '{value}' is not HOST:PORT with a numeric IP address (e.g. 127.0.0.1:10809 or [::1]:10809)");
    }
}
