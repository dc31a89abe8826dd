using System.Collections.Concurrent;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;

namespace Gateway.Actors.Cluster;

/// <summary>
/// The exports this node owns right now (cluster mode), by name. Filled by the sharded entities;
/// read by the peer listener, which serves only what is owned here, and by connections whose
/// export turned out to be local, which then call the device directly.
/// </summary>
public sealed class LocalExports : IExportDirectory
{
    private readonly ConcurrentDictionary<string, ExportHandle> _handles = new(StringComparer.Ordinal);

    public void Add(ExportHandle handle) => _handles[handle.Info.Name] = handle;

    public void Remove(ExportHandle handle) => _handles.TryRemove(new KeyValuePair<string, ExportHandle>(handle.Info.Name, handle));

    public ExportHandle? Get(string name) =>
        _handles.TryGetValue(name, out ExportHandle? handle) && !handle.Closed.IsCancellationRequested ? handle : null;

    public IReadOnlyCollection<ExportHandle> All => [.. _handles.Values];

    // As the peer listener's directory: the node that forwards a client has already applied the
    // export's TLS, client-certificate and connection rules to that client; the peer stream
    // itself is not a client (README: bind it to the cluster's own network).
    public ValueTask<IReadOnlyList<ExportInfo>> ListAsync(CancellationToken cancellationToken) =>
        new([.. _handles.Values.Where(h => !h.Closed.IsCancellationRequested).Select(h => h.Info with { Access = ExportAccess.Open })]);

    public ValueTask<ExportHandle?> OpenAsync(string name, CancellationToken cancellationToken) =>
        new(Get(name) is { } handle
            ? new ExportHandle(handle.Info with { Access = ExportAccess.Open }, handle.Device, handle.MetaContexts, handle.Closed)
            : null);

    /// <summary>Makes every completed write of every export owned here durable (graceful shutdown; see <see cref="FinalFlush"/>).</summary>
    public async Task<ExportsFlushed> FlushAllAsync(Action<string> warn)
    {
        // At once: each may retry a failing store for up to FinalFlush.Budget.
        string?[] failures = await Task.WhenAll(All
            .Where(handle => !handle.Info.ReadOnly && !handle.Closed.IsCancellationRequested)
            .Select(async handle =>
            {
                try
                {
                    await FinalFlush.RunAsync(handle.Device, handle.Info.Name, warn).ConfigureAwait(false);
                    return null;
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    return $"{handle.Info.Name}: {e.Message}";
                }
            })).ConfigureAwait(false);
        return new ExportsFlushed(failures.Count(f => f is null), [.. failures.OfType<string>()]);
    }
}
