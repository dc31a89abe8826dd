using Akka.Actor;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Actors.Tls;

namespace Gateway.Actors.Cluster;

/// <summary>
/// The handshake's view of the exports in a cluster: names and specs from the registry
/// (a cluster singleton), the owner from the export's sharded entity. Each attach gets its own
/// <see cref="ExportLink"/>.
/// </summary>
public sealed class ClusterExportDirectory(IActorRef registry, IActorRef region, LocalExports local, ClusterNode self, TlsCredentials? peerTls = null) : IExportDirectory
{
    /// <summary>One ask; a lost message (the registry moving, a remoting association being
    /// re-established) is asked again until <see cref="ExportLink.ResolveTimeout"/>.</summary>
    private static readonly TimeSpan AskTimeout = TimeSpan.FromSeconds(2);

    public async ValueTask<IReadOnlyList<ExportInfo>> ListAsync(CancellationToken cancellationToken)
    {
        ExportList list = await AskRegistryAsync<ExportList>(ListExports.Instance, cancellationToken).ConfigureAwait(false);
        return [.. list.Exports.Select(e => e.ListedInfo())];
    }

    public async ValueTask<ExportHandle?> OpenAsync(string name, CancellationToken cancellationToken)
    {
        ExportSpecFound found = await AskRegistryAsync<ExportSpecFound>(new GetExportSpec(name), cancellationToken).ConfigureAwait(false);
        return found.Spec is { } spec ? await ExportLink.OpenAsync(spec, region, local, self, peerTls, cancellationToken).ConfigureAwait(false) : null;
    }

    private async Task<T> AskRegistryAsync<T>(object query, CancellationToken cancellationToken)
    {
        DateTime deadline = DateTime.UtcNow + ExportLink.ResolveTimeout;
        while (true)
        {
            try
            {
                return await registry.Ask<T>(query, AskTimeout, cancellationToken).ConfigureAwait(false);
            }
            catch (AskTimeoutException) when (DateTime.UtcNow < deadline)
            {
                // Queries are idempotent: ask again.
            }
        }
    }
}
