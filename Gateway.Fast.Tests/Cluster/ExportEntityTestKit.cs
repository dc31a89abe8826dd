using Gateway.Actors.Exports;
using Xunit.Abstractions;

namespace Gateway.Tests.Cluster;

/// <summary>
/// An actor system with an in-memory journal and a data folder of its own, for the tests of an
/// export's sharded entity and its terms (no cluster: one entity at a time stands for each owner).
/// </summary>
public abstract class ExportEntityTestKit(ITestOutputHelper output) : Akka.TestKit.Xunit2.TestKit(Config, output)
{
    private const string Config = """
        akka.loglevel = INFO
        akka.persistence.journal.plugin = "akka.persistence.journal.inmem"
        akka.persistence.snapshot-store.plugin = "akka.persistence.snapshot-store.inmem"
        """;

    protected static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    protected string Data { get; } = Directory.CreateTempSubdirectory("gateway-export-entity-").FullName;

    protected BackendFactory Backends => field ??= new BackendFactory(Data);

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        if (disposing)
        {
            Directory.Delete(Data, recursive: true);
        }
    }
}
