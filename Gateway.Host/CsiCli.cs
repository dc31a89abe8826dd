using System.CommandLine;
using Gateway.Csi;

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
        var csi = new Command("csi", "Run the Kubernetes CSI plugin (README \"Kubernetes CSI driver\")");
        csi.Options.Add(mode);
        csi.Options.Add(endpoint);
        csi.Options.Add(nbd);
        csi.Options.Add(nodeId);
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
                    AdminToken.Read(parse.GetValue(CliAuth.TokenFile)));
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
}
