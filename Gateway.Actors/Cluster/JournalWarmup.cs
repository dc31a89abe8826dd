using Akka.Actor;
using Akka.Persistence;

namespace Gateway.Actors.Cluster;

/// <summary>
/// Recovers a never-written persistence id once at start, then stops. On a node that has not
/// used the journal yet, the first recovery (plugin start, database connections, compiling the
/// recovery path) took about a second, and it happened during failover, when an export and
/// its bitmaps were re-homed here. Now it happens before.
/// </summary>
public sealed class JournalWarmup : ReceivePersistentActor
{
    public JournalWarmup()
    {
        Recover<RecoveryCompleted>(_ => Context.Stop(Self));
        RecoverAny(_ => { });
        CommandAny(_ => { });
    }

    public override string PersistenceId => "journal-warmup";

    public static Props Props() => Akka.Actor.Props.Create(() => new JournalWarmup());
}
