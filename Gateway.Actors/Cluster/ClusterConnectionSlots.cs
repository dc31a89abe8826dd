using System.Collections.Concurrent;
using System.Globalization;
using Akka;
using Akka.Actor;
using Akka.Cluster;
using Gateway.Actors.Nbd;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Cluster;

/// <summary>
/// Where the nodes of a cluster keep the connection slots of exports (PostgreSQL in a cluster:
/// <c>Gateway.Host.PostgresConnectionSlots</c>). A slot names the node incarnation that holds it,
/// so the slots of a node that died are told apart by its absence from the membership.
/// </summary>
public interface IConnectionSlotStore
{
    /// <summary>
    /// Takes <see cref="ConnectionSlotClaim.Slot"/> when fewer than <see cref="ConnectionSlotClaim.Limit"/>
    /// slots of the export belong to <see cref="ConnectionSlotClaim.LiveNodes"/>; false when they
    /// are all taken. Atomic per export: two claims for the last slot never both win. Deletes the
    /// claim's <see cref="ConnectionSlotClaim.Released"/> slots first, in the same transaction.
    /// </summary>
    Task<bool> TryTakeAsync(ConnectionSlotClaim claim, CancellationToken cancellationToken);

    /// <summary>Gives slots back (deletes them); slots already gone are ignored.</summary>
    Task ReleaseAsync(IReadOnlyList<Guid> slots, CancellationToken cancellationToken);

    /// <summary>Gives back every slot <paramref name="node"/> holds (its graceful stop).</summary>
    Task ReleaseNodeAsync(string node, CancellationToken cancellationToken);
}

/// <summary>One attach's claim on a slot of <paramref name="Export"/>, made by <paramref name="Node"/>.</summary>
/// <param name="LiveNodes">The nodes whose slots count: the claimant's view of the members whose connections may be open.</param>
/// <param name="Released">Slots the claimant gave back that the store may still hold (a delete that failed or is in flight).</param>
public sealed record ConnectionSlotClaim(string Export, int Limit, string Node, Guid Slot, IReadOnlyList<string> LiveNodes, IReadOnlyList<Guid> Released);

/// <summary>
/// An export's connection limit for the whole cluster (<see cref="IExportConnectionSlots"/>): each
/// client attach through any node takes a slot in the shared <see cref="IConnectionSlotStore"/>,
/// and the slots of nodes that are no longer members (killed and downed, removed, or an older
/// incarnation of a restarted node) do not count, so a client of a dead node can attach through
/// another at once. An export without a limit never reaches the store. A store that fails or
/// does not answer within the timeout refuses the attach (<see cref="ConnectionSlotsUnavailableException"/>)
/// rather than hang the handshake or let a client past a limit nobody checked.
/// </summary>
public sealed class ClusterConnectionSlots : IExportConnectionSlots
{
    /// <summary>How long an attach waits for the store; a client's handshake has 10 s by default.</summary>
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(3);

    private readonly IConnectionSlotStore _store;
    private readonly string _self;
    private readonly Func<IReadOnlyList<string>> _liveNodes;
    private readonly ILogger _logger;
    private readonly TimeSpan _timeout;
    /// <summary>Slots given back whose delete has not been seen to succeed: the next claim deletes them.</summary>
    private readonly ConcurrentDictionary<Guid, byte> _released = new();

    /// <param name="self">This node's incarnation (<see cref="NodeId"/>).</param>
    /// <param name="liveNodes">The incarnations whose slots count right now; this node's own always counts.</param>
    public ClusterConnectionSlots(IConnectionSlotStore store, string self, Func<IReadOnlyList<string>> liveNodes, ILogger logger, TimeSpan? timeout = null)
    {
        _store = store;
        _self = self;
        _liveNodes = liveNodes;
        _logger = logger;
        _timeout = timeout ?? DefaultTimeout;
    }

    /// <summary>
    /// The slots of <paramref name="system"/>'s cluster node. A graceful stop gives back the
    /// node's slots (its connections were drained before CoordinatedShutdown runs).
    /// </summary>
    public static ClusterConnectionSlots Start(ActorSystem system, IConnectionSlotStore store, ILogger logger)
    {
        Akka.Cluster.Cluster cluster = Akka.Cluster.Cluster.Get(system);
        var slots = new ClusterConnectionSlots(store, NodeId(cluster.SelfUniqueAddress), () => LiveNodes(cluster.State), logger);
        CoordinatedShutdown.Get(system).AddTask(CoordinatedShutdown.PhaseBeforeActorSystemTerminate, "release-connection-slots", async () =>
        {
            await slots.ReleaseNodeAsync().ConfigureAwait(false);
            return Done.Instance;
        });
        return slots;
    }

    /// <summary>A node incarnation: its address and the uid a restart changes, so a restarted node's old slots never count.</summary>
    public static string NodeId(UniqueAddress node) => string.Create(CultureInfo.InvariantCulture, $"{node.Address}#{node.Uid}");

    /// <summary>
    /// The members whose clients may still be connected: every status but Down and Removed. A
    /// Leaving or Exiting node still serves its open connections until it stops (and then gives
    /// its slots back), and an unreachable member may be serving clients on the other side of a
    /// partition until it is downed.
    /// </summary>
    public static IReadOnlyList<string> LiveNodes(ClusterEvent.CurrentClusterState state) =>
        [.. state.Members.Where(m => m.Status is not (MemberStatus.Down or MemberStatus.Removed)).Select(m => NodeId(m.UniqueAddress))];

    public async ValueTask<IDisposable?> TryAcquireAsync(string export, int? limit, CancellationToken cancellationToken)
    {
        if (limit is not int max)
        {
            return Unlimited.Instance;
        }
        IReadOnlyList<string> members = _liveNodes();
        IReadOnlyList<string> live = members.Contains(_self, StringComparer.Ordinal) ? members : [.. members, _self];
        Guid[] released = [.. _released.Keys];
        var claim = new ConnectionSlotClaim(export, max, _self, Guid.NewGuid(), live, released);

        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(_timeout);
        Task<bool> take = _store.TryTakeAsync(claim, timeout.Token);
        bool taken;
        try
        {
            // WaitAsync too: the handshake waits no longer than the timeout even if the store
            // ignores its token (a connection attempt to a vanished server).
            taken = await take.WaitAsync(_timeout, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // The claim may still commit after this (a statement the server ran anyway): the slot
            // is given back once the store has settled, whatever it did.
            _ = take.ContinueWith(t => Release(claim.Slot, t.Exception), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            cancellationToken.ThrowIfCancellationRequested();
            throw new ConnectionSlotsUnavailableException(e is TimeoutException or OperationCanceledException
                ? $"the cluster's database did not answer within {_timeout.TotalSeconds:0.#} s"
                : $"the cluster's database failed: {e.Message}", e);
        }
        foreach (Guid slot in released)
        {
            _released.TryRemove(slot, out _);
        }
        return taken ? new Slot(this, claim.Slot) : null;
    }

    /// <summary>Gives back every slot of this node (graceful stop); failures are logged, the next members' claims ignore them anyway once it is gone.</summary>
    public async Task ReleaseNodeAsync()
    {
        try
        {
            using var timeout = new CancellationTokenSource(_timeout);
            await _store.ReleaseNodeAsync(_self, timeout.Token).ConfigureAwait(false);
            _released.Clear();
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            _logger.LogWarning("The connection slots of node {Node} could not be given back: {Reason}; they stop counting once it has left the cluster", _self, e.Message);
        }
    }

    private void Release(Guid slot, AggregateException? takeFailure)
    {
        if (takeFailure is not null)
        {
            _logger.LogDebug("A connection slot claim failed after its attach gave up: {Reason}", takeFailure.InnerException?.Message);
        }
        _released[slot] = 0;
        _ = DeleteAsync(slot);
    }

    private async Task DeleteAsync(Guid slot)
    {
        try
        {
            using var timeout = new CancellationTokenSource(_timeout);
            await _store.ReleaseAsync([slot], timeout.Token).ConfigureAwait(false);
            _released.TryRemove(slot, out _);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // Kept in _released: this node's next claim deletes it in its own transaction, and
            // a graceful stop deletes all of the node's slots.
            _logger.LogWarning("Connection slot {Slot} could not be given back yet: {Reason}", slot, e.Message);
        }
    }

    private sealed class Slot(ClusterConnectionSlots owner, Guid slot) : IDisposable
    {
        private int _released;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) == 0)
            {
                owner.Release(slot, null);
            }
        }
    }

    private sealed class Unlimited : IDisposable
    {
        public static readonly Unlimited Instance = new();

        public void Dispose()
        {
        }
    }
}
