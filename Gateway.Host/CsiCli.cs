using System.CommandLine;
using Gateway.Csi;
using Gateway.Csi.Node;

namespace Gateway.Host;

/// <summary><c>gateway csi</c>: the Kubernetes CSI plugin, controller or node, in the gateway's own binary.</summary>
public static class CsiCli
{
    public static Command Build(Option<string> adminUrl)
    {
        var mode = new Option<string>("--mode") { Description = "controller (volumes, snapshots, SnapshotMetadata) or node (attach and mount on this node)", Required = true };
        mode.AcceptOnlyFromAmong("controller", "node");
        var endpoint = new Option<string>("--endpoint")
        {
            Description = "The Unix socket to serve CSI on (unix:///csi/csi.sock; default $CSI_ENDPOINT)",
            DefaultValueFactory = _ => Environment.GetEnvironmentVariable("CSI_ENDPOINT") ?? "unix:///csi/csi.sock",
        };
        var nbd = new Option<string>("--nbd") { Description = "The gateway's NBD address HOST:PORT, as nodes reach it", DefaultValueFactory = _ => "127.0.0.1:10809" };
        var nodeId = new Option<string?>("--node-id") { Description = "This node's name (node mode; default $CSI_NODE_ID, else the host name)" };
        var tlsCa = new Option<string?>("--nbd-tls-ca") { Description = "Node mode: the CA (PEM) the gateway's NBD certificate chains to; given, nbd-client attaches with TLS" };
        var tlsCert = new Option<string?>("--nbd-tls-cert") { Description = "Node mode: this node's client certificate (PEM) for exports that allow only some clients; with --nbd-tls-key" };
        var tlsKey = new Option<string?>("--nbd-tls-key") { Description = "Node mode: the private key (PEM) of --nbd-tls-cert" };
        var tlsHost = new Option<string?>("--nbd-tls-hostname") { Description = "Node mode: the name the gateway's certificate carries, when it is not the --nbd host" };
        var csi = new Command("csi", "Run the Kubernetes CSI plugin (README \"Kubernetes CSI driver\")");
        csi.Options.Add(mode);
        csi.Options.Add(endpoint);
        csi.Options.Add(nbd);
        csi.Options.Add(nodeId);
        csi.Options.Add(tlsCa);
        csi.Options.Add(tlsCert);
        csi.Options.Add(tlsKey);
        csi.Options.Add(tlsHost);
        csi.Options.Add(adminUrl);
        csi.Options.Add(CliAuth.TokenFile);
        csi.SetAction(async (parse, ct) =>
        {
            CsiOptions options;
            try
            {
                options = new CsiOptions(
                    parse.GetValue(mode) == "node" ? CsiMode.Node : CsiMode.Controller,
                    CsiOptions.ParseEndpoint(parse.GetValue(endpoint)!),
                    AdminClient.BaseUri(parse.GetValue(adminUrl)!),
                    CsiOptions.ParseNbd(parse.GetValue(nbd)!),
                    parse.GetValue(nodeId) ?? Environment.GetEnvironmentVariable("CSI_NODE_ID"),
                    AdminToken.Read(parse.GetValue(CliAuth.TokenFile)),
                    NbdTls(parse.GetValue(tlsCa), parse.GetValue(tlsCert), parse.GetValue(tlsKey), parse.GetValue(tlsHost)));
            }
            catch (ArgumentException e)
            {
                await Console.Error.WriteLineAsync($"error: {e.Message}");
                return 2;
            }
            await CsiHost.Build(options).RunAsync(ct);
            return 0;
        });
        return csi;
    }

    private static NbdTls? NbdTls(string? ca, string? cert, string? key, string? hostName)
    {
        if ((cert is null) != (key is null))
        {
            throw new ArgumentException("--nbd-tls-cert and --nbd-tls-key go together");
        }
        return ca is not null ? new NbdTls(ca, cert, key, hostName)
            : cert is not null || hostName is not null ? throw new ArgumentException("--nbd-tls-cert and --nbd-tls-hostname need --nbd-tls-ca")
            : null;
    }
}
