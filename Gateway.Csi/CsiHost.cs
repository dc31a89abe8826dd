using Gateway.Csi.Node;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace Gateway.Csi;

/// <summary>The plugin's host: gRPC over HTTP/2 on the CSI Unix socket, the services its mode offers.</summary>
public static class CsiHost
{
    /// <param name="attacher">How the node attaches exports: <see cref="NbdClientAttacher"/> (the kernel's nbd) unless a test reaches them another way.</param>
    public static WebApplication Build(CsiOptions options, IBlockAttacher? attacher = null)
    {
        // As the gateway's host (Gateway.Host.HostDefaults): no appsettings.json, so no watch of
        // the working directory and every folder under it (a node plugin runs where mounts live).
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions
        {
            ContentRootPath = AppContext.BaseDirectory,
            Args = ["--hostBuilder:reloadConfigOnChange=false"],
        });
        builder.Logging.AddSimpleConsole(o => o.SingleLine = true);
        // One line per gRPC call is noise; failures are logged by the gRPC layer and the services.
        builder.Logging.AddFilter("Microsoft.AspNetCore", LogLevel.Warning);
        string? folder = Path.GetDirectoryName(options.SocketPath);
        if (folder is not null)
        {
            Directory.CreateDirectory(folder);
        }
        // A socket left by a plugin that did not stop cleanly would refuse the bind.
        if (File.Exists(options.SocketPath))
        {
            File.Delete(options.SocketPath);
        }
        builder.WebHost.ConfigureKestrel(k => k.ListenUnixSocket(options.SocketPath, l => l.Protocols = HttpProtocols.Http2));
        builder.Services.AddGrpc();
        builder.Services.AddSingleton(options);
        builder.Services.AddSingleton(GatewayAdmin.Create(options.Admin, options.Token));
        builder.Services.AddSingleton<VolumeLocks>();
        if (options.Mode == CsiMode.Node)
        {
            builder.Services.AddSingleton(attacher ?? new NbdClientAttacher(options.NodeId ?? Environment.MachineName));
            builder.Services.AddSingleton(StagedVolumes.Beside(options.SocketPath));
        }
        builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = TimeSpan.FromSeconds(10));

        WebApplication app = builder.Build();
        app.MapGrpcService<IdentityService>();
        if (options.Mode == CsiMode.Controller)
        {
            app.MapGrpcService<ControllerService>();
            app.MapGrpcService<SnapshotMetadataService>();
        }
        else
        {
            app.MapGrpcService<NodeService>();
        }
        return app;
    }
}
