using System.Net;
using System.Net.Sockets;
using Gateway.Csi;
using Gateway.Csi.Node;
using Gateway.Csi.V1;
using Gateway.Tests.Interop;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Xunit;

namespace Gateway.Tests.Csi;

/// <summary>
/// The real CSI plugin on its own Unix socket, driving a real gateway process, and gRPC clients
/// that reach it only through that socket, as the CO and the sidecars do.
/// </summary>
public sealed class CsiPlugin : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly GrpcChannel _channel;
    private readonly string _folder;

    private CsiPlugin(WebApplication app, GrpcChannel channel, string folder, string socket)
    {
        _app = app;
        _channel = channel;
        _folder = folder;
        SocketPath = socket;
        Identity = new Identity.IdentityClient(channel);
        Controller = new Controller.ControllerClient(channel);
        Metadata = new SnapshotMetadata.SnapshotMetadataClient(channel);
        Node = new Node.NodeClient(channel);
    }

    public string SocketPath { get; }

    /// <summary>Where the node plugin records staged volumes (beside the socket).</summary>
    public string StateFolder => Path.Combine(_folder, "volumes");

    public Identity.IdentityClient Identity { get; }

    public Controller.ControllerClient Controller { get; }

    public SnapshotMetadata.SnapshotMetadataClient Metadata { get; }

    public Node.NodeClient Node { get; }

    /// <param name="attacher">The node's attach step (node mode): the real nbd-client one unless given.</param>
    public static async Task<CsiPlugin> StartAsync(CsiMode mode, Uri admin, int nbdPort, string? nodeId = null, IBlockAttacher? attacher = null)
    {
        string folder = Directory.CreateTempSubdirectory("csi-").FullName;
        string socket = Path.Combine(folder, "csi.sock");
        var options = new CsiOptions(mode, CsiOptions.ParseEndpoint("unix://" + socket), admin, new DnsEndPoint("127.0.0.1", nbdPort), nodeId);
        WebApplication app = CsiHost.Build(options, attacher);
        await app.StartAsync();
        GrpcChannel channel = ChannelTo(socket);
        return new CsiPlugin(app, channel, folder, socket);
    }

    /// <summary>A gRPC channel that reaches a plugin only through its Unix socket.</summary>
    public static GrpcChannel ChannelTo(string socket) => GrpcChannel.ForAddress("http://localhost", new GrpcChannelOptions
    {
        HttpHandler = new SocketsHttpHandler
        {
            ConnectCallback = async (_, ct) =>
            {
                var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                await client.ConnectAsync(new UnixDomainSocketEndPoint(socket), ct);
                return new NetworkStream(client, ownsSocket: true);
            },
        },
    });

    public async ValueTask DisposeAsync()
    {
        _channel.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
        Directory.Delete(_folder, recursive: true);
    }
}

/// <summary>One gateway and one controller plugin for a test class.</summary>
public sealed class CsiControllerFixture : IAsyncLifetime
{
    public GatewayProcess Gateway { get; private set; } = null!;

    public CsiPlugin Plugin { get; private set; } = null!;

    public async Task InitializeAsync()
    {
        Gateway = await GatewayProcess.StartAsync();
        Plugin = await CsiPlugin.StartAsync(CsiMode.Controller, Gateway.AdminUri, Gateway.NbdPort);
    }

    public async Task DisposeAsync()
    {
        await Plugin.DisposeAsync();
        await Gateway.DisposeAsync();
    }
}
