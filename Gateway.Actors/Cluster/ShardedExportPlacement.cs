using Akka.Actor;
using Gateway.Actors.Exports;

namespace Gateway.Actors.Cluster;

/// <summary>
/// The registry's exports as sharded entities (<see cref="ExportEntity"/>), reached through the
/// shard region with their spec in an <see cref="ExportEnvelope"/>; exports whose node is removed
/// from the cluster are woken at once (the registry's timer wakes them every second besides).
/// </summary>
public sealed class ShardedExportPlacement(IActorRef region) : IExportPlacement
{
    private object? _wakeAll;

    public void Start(IActorContext registry, object wakeAll)
    {
        _wakeAll = wakeAll;
        Akka.Cluster.Cluster.Get(registry.System).Subscribe(registry.Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.MemberRemoved));
    }

    public void Stop(IActorContext registry) => Akka.Cluster.Cluster.Get(registry.System).Unsubscribe(registry.Self);

    public void Wake(ExportSpec spec) => region.Tell(new ExportEnvelope(spec, WakeExport.Instance));

    public void Forward(ExportSpec spec, object message) => region.Forward(new ExportEnvelope(spec, message));

    public Task<T> Ask<T>(ExportSpec spec, object message, TimeSpan timeout) => region.Ask<T>(new ExportEnvelope(spec, message), timeout);

    public Task RetireAsync(ExportSpec spec, TimeSpan timeout) => region.Ask<ExportRetired>(new ExportEnvelope(spec, RetireExport.Instance), timeout);

    public bool TryHandle(object message, Func<string, ExportSpec?> lookup, IActorContext registry)
    {
        switch (message)
        {
            case GetExportSpec get:
                registry.Sender.Tell(new ExportSpecFound(lookup(get.ExportName)));
                return true;
            case Akka.Cluster.ClusterEvent.MemberRemoved when _wakeAll is not null:
                registry.Self.Tell(_wakeAll);
                return true;
            default:
                return false;
        }
    }
}
