using System.Diagnostics;
using Gateway.Actors.Exports;

namespace Gateway.Actors.Cluster;

/// <summary>
/// One lease per export, in a store every node reaches (PostgreSQL in a cluster): the node that
/// owns the export in a term holds it and renews it; a new owner takes it only once its holder
/// released it (a clean handoff) or let it run out (died, froze, lost the store). Expiry is
/// decided by the store's clock alone, so the nodes' clocks never need to agree.
/// </summary>
public interface IExportLeases
{
    /// <summary>Takes the export's lease for <paramref name="node"/> in <paramref name="term"/>; false while another holder's lease still runs.</summary>
    Task<bool> TryAcquireAsync(string export, string node, long term, TimeSpan timeToLive, CancellationToken cancellationToken);

    /// <summary>Extends the lease held by <paramref name="node"/> in <paramref name="term"/>; false when it is not theirs any more.</summary>
    Task<bool> RenewAsync(string export, string node, long term, TimeSpan timeToLive, CancellationToken cancellationToken);

    /// <summary>Ends the lease now, so the next owner need not wait for it to run out.</summary>
    Task ReleaseAsync(string export, string node, long term, CancellationToken cancellationToken);
}

/// <summary>
/// The timing of the owner's lease and the local deadline it gives the <see cref="OwnershipFence"/>.
/// The time to live is shorter than the failover time (an owner is downed about 4.5 s after it
/// went silent), so a new owner almost never waits for an old lease; renewals come three times
/// per time to live, so one slow renewal of the store costs nothing.
/// </summary>
public sealed record LeaseTiming(TimeSpan TimeToLive, TimeSpan RenewEvery, TimeSpan Margin)
{
    public static readonly LeaseTiming Default = new(TimeSpan.FromSeconds(3), TimeSpan.FromSeconds(1), TimeSpan.FromMilliseconds(500));

    /// <summary>How long to keep trying to take a lease whose holder went away without releasing it.</summary>
    public TimeSpan AcquirePatience => TimeToLive * 2 + TimeSpan.FromSeconds(1);

    /// <summary>
    /// Where the fence may stay open after a renewal sent at <paramref name="sentAt"/> succeeded:
    /// the store set its expiry to its own now (later than the send) plus the time to live, so
    /// this ends at least <see cref="Margin"/> before it, on this node's monotonic clock.
    /// </summary>
    public long FenceDeadline(long sentAt) => sentAt + (long)((TimeToLive - Margin).TotalSeconds * Stopwatch.Frequency);

    /// <summary>Takes the lease, waiting out another holder's for up to <see cref="AcquirePatience"/>; opens the fence on success.</summary>
    public async Task AcquireAsync(IExportLeases leases, string export, string node, long term, OwnershipFence fence, CancellationToken cancellationToken)
    {
        long started = Stopwatch.GetTimestamp();
        while (true)
        {
            long sentAt = Stopwatch.GetTimestamp();
            if (await leases.TryAcquireAsync(export, node, term, TimeToLive, cancellationToken).ConfigureAwait(false))
            {
                fence.ExtendTo(FenceDeadline(sentAt));
                return;
            }
            if (Stopwatch.GetElapsedTime(started) > AcquirePatience)
            {
                throw new TimeoutException($"the lease on export '{export}' is still held by another node after {AcquirePatience.TotalSeconds:0.#} s");
            }
            await Task.Delay(RenewEvery / 4, cancellationToken).ConfigureAwait(false);
        }
    }
}
