using Akka.Actor;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;

namespace Gateway.Actors.Connections;

/// <summary>The handshake's view of the exports, asked of the registry (control plane only).</summary>
public sealed class ActorExportDirectory(IActorRef registry) : IExportDirectory
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    public async ValueTask<IReadOnlyList<ExportInfo>> ListAsync(CancellationToken cancellationToken)
    {
        ExportList list = await registry.Ask<ExportList>(ListExports.Instance, Timeout, cancellationToken).ConfigureAwait(false);
        return [.. list.Exports.Select(e => e.ListedInfo())];
    }

    public async ValueTask<ExportHandle?> OpenAsync(string name, CancellationToken cancellationToken)
    {
        ExportOpened opened = await registry.Ask<ExportOpened>(new OpenExport(name), Timeout, cancellationToken).ConfigureAwait(false);
        return opened.Handle;
    }
}
