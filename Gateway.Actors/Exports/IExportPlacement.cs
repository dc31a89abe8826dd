using Akka.Actor;

namespace Gateway.Actors.Exports;

/// <summary>
/// Where the registry's exports run when they are not its children: in a cluster, sharded entities
/// (<c>Cluster/ShardedExportPlacement</c>). Declared here and implemented there, so the single-node
/// registry never names the cluster (docs/architecture.md: no <c>Exports</c> → <c>Cluster</c>).
/// Every method is called on the registry's thread, while it handles a message.
/// </summary>
public interface IExportPlacement
{
    /// <summary>The registry has recovered: start watching for what may strand exports (a lost node), and then tell the registry <paramref name="wakeAll"/>.</summary>
    void Start(IActorContext registry, object wakeAll);

    /// <summary>The registry stops.</summary>
    void Stop(IActorContext registry);

    /// <summary>Keep <paramref name="spec"/>'s export running somewhere.</summary>
    void Wake(ExportSpec spec);

    /// <summary>Passes <paramref name="message"/> to the export, keeping its sender (who gets the answer).</summary>
    void Forward(ExportSpec spec, object message);

    /// <summary>Sends <paramref name="message"/> to the export (starting it if need be) and returns its answer.</summary>
    Task<T> Ask<T>(ExportSpec spec, object message, TimeSpan timeout);

    /// <summary>The export was removed: its owner purges its bitmaps and closes it; completes once it has.</summary>
    Task RetireAsync(ExportSpec spec, TimeSpan timeout);

    /// <summary>
    /// A message that only the placement knows (another node asking for a spec, a node lost): answers
    /// it through <paramref name="registry"/> and returns true. <paramref name="lookup"/> gives an
    /// export's spec by name ("" names the default export), or null.
    /// </summary>
    bool TryHandle(object message, Func<string, ExportSpec?> lookup, IActorContext registry);
}
