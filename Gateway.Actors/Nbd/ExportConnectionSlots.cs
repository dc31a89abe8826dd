using System.Collections.Concurrent;

namespace Gateway.Actors.Nbd;

/// <summary>
/// The connection slots of exports (<c>ExportAccess.MaxConnections</c>): an attach (GO,
/// EXPORT_NAME) takes one and holds it until the connection ends. <see cref="ExportConnectionCounter"/>
/// counts one node's connections; in a cluster the slots are shared by every node
/// (<c>Cluster.ClusterConnectionSlots</c>), so the limit holds for the whole export.
/// </summary>
public interface IExportConnectionSlots
{
    /// <summary>
    /// Takes a slot on <paramref name="export"/>; null when <paramref name="limit"/> slots are
    /// taken already (no limit: always a slot). Disposing the slot gives it back.
    /// </summary>
    /// <exception cref="ConnectionSlotsUnavailableException">The slots cannot be counted now (the store failed or did not answer in time).</exception>
    ValueTask<IDisposable?> TryAcquireAsync(string export, int? limit, CancellationToken cancellationToken);
}

/// <summary>The export's slots could not be counted: the attach is refused rather than let past the limit.</summary>
public sealed class ConnectionSlotsUnavailableException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// Slots nobody counts: every attach gets one. For the cluster's peer data stream, whose
/// connections are not clients (the node that forwards a client took the client's slot).
/// </summary>
public sealed class UncountedConnectionSlots : IExportConnectionSlots
{
    public static readonly UncountedConnectionSlots Instance = new();

    private static readonly ValueTask<IDisposable?> Taken = new(new Slot());

    private UncountedConnectionSlots()
    {
    }

    public ValueTask<IDisposable?> TryAcquireAsync(string export, int? limit, CancellationToken cancellationToken) => Taken;

    private sealed class Slot : IDisposable
    {
        public void Dispose()
        {
        }
    }
}

/// <summary>Connections per export on this node (the single-node <see cref="IExportConnectionSlots"/>).</summary>
public sealed class ExportConnectionCounter : IExportConnectionSlots
{
    private readonly ConcurrentDictionary<string, int> _counts = new(StringComparer.Ordinal);

    public int this[string export] => _counts.TryGetValue(export, out int n) ? n : 0;

    public ValueTask<IDisposable?> TryAcquireAsync(string export, int? limit, CancellationToken cancellationToken) =>
        new(TryAcquire(export, limit));

    /// <summary>Takes a place on <paramref name="export"/>, or null when <paramref name="limit"/> are taken.</summary>
    public IDisposable? TryAcquire(string export, int? limit)
    {
        while (true)
        {
            int n = this[export];
            if (limit is int max && n >= max)
            {
                return null;
            }
            if (n == 0 ? _counts.TryAdd(export, 1) : _counts.TryUpdate(export, n + 1, n))
            {
                return new Lease(this, export);
            }
        }
    }

    private void Release(string export)
    {
        while (true)
        {
            int n = this[export];
            if (n == 0)
            {
                return;
            }
            if (n == 1 ? ((ICollection<KeyValuePair<string, int>>)_counts).Remove(new(export, n)) : _counts.TryUpdate(export, n - 1, n))
            {
                return;
            }
        }
    }

    private sealed class Lease(ExportConnectionCounter owner, string export) : IDisposable
    {
        private int _released;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) == 0)
            {
                owner.Release(export);
            }
        }
    }
}
