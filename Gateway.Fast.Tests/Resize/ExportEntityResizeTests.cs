using Akka.Actor;
using Akka.TestKit;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Tests.Cluster;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Resize;

/// <summary>
/// A grow reaching the owner through its sharded entity (as the registry sends it through the
/// shard region): the entity's locate answer and the handle it lists for peer streams take the new
/// size; a handle taken before keeps the old one (the connections that hold it were told that).
/// </summary>
public sealed class ExportEntityResizeTests(ITestOutputHelper output) : ExportEntityTestKit(output)
{
    private const long Old = 16 << 20;
    private const long New = 48 << 20;
    private readonly LocalExports _local = new();
    private TestProbe Registry => field ??= CreateTestProbe();

    private static ExportSpec Spec(string name) =>
        new(name, Old, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null, Incarnation: "a");

    private IActorRef Entity() =>
        Sys.ActorOf(ExportEntity.Props(Backends, _local, new global::Gateway.Actors.Cluster.ClusterNode("n1", "127.0.0.1", 1), Registry.Ref));

    [Fact]
    public async Task A_grow_of_a_located_export_changes_what_locate_answers_and_what_peers_open()
    {
        ExportSpec spec = Spec("vm");
        await Backends.CreateAsync(spec, CancellationToken.None);
        IActorRef entity = Entity();
        Task<object> first = entity.Ask<object>(new ExportEnvelope(spec, LocateExport.Instance), Patience);
        await Registry.ExpectMsgAsync<GetExportSpec>(Patience);
        Registry.Reply(new ExportSpecFound(spec));
        Assert.Equal(Old, Assert.IsType<ExportLocated>(await first).Size);
        ExportHandle before = _local.Get("vm")!;

        ExportSpec grown = spec with { Size = New };
        CommandResult result = await entity.Ask<CommandResult>(new ExportEnvelope(grown, new GrowExport(grown)), Patience);

        Assert.Null(result.Error);
        Assert.Equal(New, result.Export!.Info!.Size);
        Assert.Equal(New, Assert.IsType<ExportLocated>(await entity.Ask<object>(new ExportEnvelope(grown, LocateExport.Instance), Patience)).Size);
        Assert.Equal(New, _local.Get("vm")!.Info.Size);
        Assert.Equal(New, (await _local.OpenAsync("vm", CancellationToken.None))!.Info.Size);
        Assert.Equal(Old, before.Info.Size);
        Assert.Same(before.Device, _local.Get("vm")!.Device);
        Assert.Equal(New, new FileInfo(Backends.FilePath(spec)).Length);
    }

    [Fact]
    public async Task A_grow_of_an_export_woken_but_not_yet_located_is_what_the_first_locate_answers()
    {
        ExportSpec spec = Spec("woken");
        await Backends.CreateAsync(spec, CancellationToken.None);
        IActorRef entity = Entity();
        entity.Tell(new ExportEnvelope(spec, WakeExport.Instance));
        ExportSpec grown = spec with { Size = New };

        Assert.Null((await entity.Ask<CommandResult>(new ExportEnvelope(grown, new GrowExport(grown)), Patience)).Error);

        Assert.Equal(New, Assert.IsType<ExportLocated>(await entity.Ask<object>(new ExportEnvelope(grown, LocateExport.Instance), Patience)).Size);
        Assert.Equal(New, _local.Get("woken")!.Info.Size);
    }
}
