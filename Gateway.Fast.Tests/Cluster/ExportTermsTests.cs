using Akka.Actor;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Cluster;

/// <summary>
/// Issue 17 (1): the FLUSH after a graceful owner change answers success; only an owner that died
/// (or failed its final flush) starts a new durability epoch, whose first FLUSH through a
/// forwarding node answers EIO once. The terms live in the journal, so a new owner on another
/// node learns how the last one ended; here, a new entity in the same actor system stands for it.
/// </summary>
public sealed class ExportTermsTests(ITestOutputHelper output) : ExportEntityTestKit(output)
{
    [Fact]
    public async Task A_term_after_a_clean_end_keeps_the_epoch_and_one_after_an_unclean_end_does_not()
    {
        TermBegun first = await BeginAsync("vm1");
        Assert.Equal(new TermBegun(1, 1), first);
        IActorRef terms = Sys.ActorOf(ExportTerms.Props("vm1"));
        TermBegun second = await terms.Ask<TermBegun>(BeginTerm.Instance, Patience);
        Assert.Equal(new TermBegun(2, 2), second); // term 1 never ended: a new epoch
        Assert.Equal(new TermEnded(2), await terms.Ask<TermEnded>(new EndTerm(2), Patience));
        await StopAsync(terms);

        Assert.Equal(new TermBegun(3, 2), await BeginAsync("vm1")); // clean: the epoch of term 2 goes on
        Assert.Equal(new TermBegun(4, 4), await BeginAsync("vm1")); // term 3 died: new epoch
        Assert.Equal(new TermBegun(1, 1), await BeginAsync("vm2")); // per export
    }

    [Fact]
    public async Task Ending_a_term_that_is_not_the_current_one_is_refused()
    {
        IActorRef terms = Sys.ActorOf(ExportTerms.Props("vm3"));
        await terms.Ask<TermBegun>(BeginTerm.Instance, Patience);
        await terms.Ask<TermBegun>(BeginTerm.Instance, Patience);
        await Assert.ThrowsAsync<InvalidOperationException>(() => terms.Ask<TermEnded>(new EndTerm(1), Patience));
        await StopAsync(terms);
        Assert.Equal(new TermBegun(3, 3), await BeginAsync("vm3"));
    }

    /// <summary>The whole handoff: the entity closes its export in order, records the clean end, and the next owner keeps the epoch.</summary>
    [Fact]
    public async Task An_export_handed_over_in_order_keeps_its_epoch_and_one_stopped_without_a_handoff_does_not()
    {
        BackendFactory backends = Backends;
        var spec = new ExportSpec("handed", 16 << 20, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null);
        await backends.CreateAsync(spec, CancellationToken.None);
        var local = new LocalExports();
        var node = new global::Gateway.Actors.Cluster.ClusterNode("n1", "127.0.0.1", 1);

        IActorRef owner = Sys.ActorOf(ExportEntity.Props(backends, local, node));
        ExportLocated located = await owner.Ask<ExportLocated>(new ExportEnvelope(spec, LocateExport.Instance), Patience);
        long epoch = located.Epoch;
        ExportHandle handle = local.Get("handed") ?? throw new InvalidOperationException("the entity did not list its export");
        await handle.Device.WriteAsync(0, new byte[4096], fua: false);

        Watch(owner);
        owner.Tell(CloseExport.Instance); // sharding's hand-off stop message
        await ExpectTerminatedAsync(owner, Patience);

        IActorRef next = Sys.ActorOf(ExportEntity.Props(backends, local, node));
        ExportLocated after = await next.Ask<ExportLocated>(new ExportEnvelope(spec, LocateExport.Instance), Patience);
        Assert.True(after.Epoch == epoch, $"a graceful handoff changed the durability epoch from {epoch} to {after.Epoch}");

        // Stopped without the hand-off message (a node that died stands for this): new epoch.
        await StopAsync(next);
        IActorRef third = Sys.ActorOf(ExportEntity.Props(backends, local, node));
        ExportLocated died = await third.Ask<ExportLocated>(new ExportEnvelope(spec, LocateExport.Instance), Patience);
        Assert.True(died.Epoch > after.Epoch, $"an owner that stopped without handing over kept the epoch {died.Epoch}");
        await StopAsync(third);
    }

    private async Task<TermBegun> BeginAsync(string export)
    {
        IActorRef terms = Sys.ActorOf(ExportTerms.Props(export));
        TermBegun begun = await terms.Ask<TermBegun>(BeginTerm.Instance, Patience);
        await StopAsync(terms);
        return begun;
    }

    private async Task StopAsync(IActorRef actor)
    {
        Watch(actor);
        Sys.Stop(actor);
        await ExpectTerminatedAsync(actor, Patience);
        Unwatch(actor);
    }
}
