using Akka.Actor;
using Akka.TestKit;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Gateway.Backends;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Cluster;

/// <summary>
/// Issue 17 (fencing of incarnations): a connection holds the spec it attached with; after the
/// export is removed (and maybe created again under its name) its locate must be answered
/// <see cref="ExportGone"/>, never with an owner, and must not open the removed export again.
/// The registry is a probe, so each answer is chosen here.
/// </summary>
public sealed class ExportEntityTests(ITestOutputHelper output) : ExportEntityTestKit(output)
{
    private readonly LocalExports _local = new();
    private TestProbe Registry => field ??= CreateTestProbe();

    private static ExportSpec Spec(string name, string incarnation) =>
        new(name, 16 << 20, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null, Incarnation: incarnation);

    private IActorRef Entity() =>
        Sys.ActorOf(ExportEntity.Props(Backends, _local, new global::Gateway.Actors.Cluster.ClusterNode("n1", "127.0.0.1", 1), Registry.Ref));

    [Fact]
    public async Task A_locate_for_a_removed_export_is_answered_gone_and_opens_nothing()
    {
        ExportSpec old = Spec("removed", "a");
        await Backends.CreateAsync(old, CancellationToken.None);
        IActorRef entity = Entity();
        Task<object> located = entity.Ask<object>(new ExportEnvelope(old, LocateExport.Instance), Patience);
        Assert.Equal("removed", (await Registry.ExpectMsgAsync<GetExportSpec>(Patience)).ExportName);
        Registry.Reply(new ExportSpecFound(null));
        Assert.IsType<ExportGone>(await located);
        Assert.Null(_local.Get("removed"));
    }

    [Fact]
    public async Task A_locate_with_the_spec_of_an_earlier_incarnation_is_answered_gone_and_the_current_one_is_served()
    {
        ExportSpec earlier = Spec("reborn", "a");
        ExportSpec current = Spec("reborn", "b");
        await Backends.CreateAsync(current, CancellationToken.None);
        IActorRef entity = Entity();

        // The link of the earlier incarnation asks first: the registry knows only the current one.
        Task<object> stale = entity.Ask<object>(new ExportEnvelope(earlier, LocateExport.Instance), Patience);
        await Registry.ExpectMsgAsync<GetExportSpec>(Patience);
        Registry.Reply(new ExportSpecFound(current));
        Assert.IsType<ExportGone>(await stale);

        Task<object> fresh = entity.Ask<object>(new ExportEnvelope(current, LocateExport.Instance), Patience);
        await Registry.ExpectMsgAsync<GetExportSpec>(Patience);
        Registry.Reply(new ExportSpecFound(current));
        Assert.IsType<ExportLocated>(await fresh);

        // Once the current incarnation runs, an earlier one's locate is refused without asking.
        Assert.IsType<ExportGone>(await entity.Ask<object>(new ExportEnvelope(earlier, LocateExport.Instance), Patience));
        await Registry.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(200));
        Assert.IsType<ExportLocated>(await entity.Ask<object>(new ExportEnvelope(current, LocateExport.Instance), Patience));
    }

    [Fact]
    public async Task An_export_woken_by_theRegistry_opens_without_asking_it()
    {
        ExportSpec spec = Spec("woken", "a");
        await Backends.CreateAsync(spec, CancellationToken.None);
        IActorRef entity = Entity();
        entity.Tell(new ExportEnvelope(spec, WakeExport.Instance));
        Assert.IsType<ExportLocated>(await entity.Ask<object>(new ExportEnvelope(spec, LocateExport.Instance), Patience));
        await Registry.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(200));
    }
}
