using Akka.Actor;
using Gateway.Actors.Exports;

namespace Gateway.Actors.Cluster;

/// <summary>
/// The handshake's view of the exports in a cluster: names and specs from the registry
/// (a cluster singleton), the owner from the export's sharded entity. Each attach gets its own
/// <see cref="ExportLink"/>.
/// </summary>
public sealed class ClusterExportDirectory(IActorRef registry, IActorRef region, LocalExports local, ClusterNode self) : IExportDirectory
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    public async ValueTask<IReadOnlyList<ExportInfo>> ListAsync(CancellationToken cancellationToken)
    {
        ExportList list = await registry.Ask<ExportList>(ListExports.Instance, Timeout, cancellationToken).ConfigureAwait(false);
        return [.. list.Exports.Select(e => e.Info ?? new ExportInfo(e.Spec.Name, e.Spec.Description, e.Spec.Size, e.Spec.ReadOnly, default) { Access = e.Spec.Access ?? ExportAccess.Open })];
    }

    public async ValueTask<ExportHandle?> OpenAsync(string name, CancellationToken cancellationToken)
    {
        ExportSpecFound found = await registry.Ask<ExportSpecFound>(new GetExportSpec(name), Timeout, cancellationToken).ConfigureAwait(false);
        return found.Spec is { } spec ? await ExportLink.OpenAsync(spec, region, local, self, cancellationToken).ConfigureAwait(false) : null;
    }
}
