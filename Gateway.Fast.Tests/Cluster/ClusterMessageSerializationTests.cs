using Gateway.Actors;
using Akka.Actor;
using Akka.Serialization;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// Every message that crosses nodes (registry singleton, shard region, replies to asks on other
/// nodes) survives the serializer Akka.Remote uses for it. A message that does not is dropped
/// with only a log line, and its asker times out: found this way once (a collection expression
/// made a compiler-internal list type that JSON cannot rebuild).
/// </summary>
public sealed class ClusterMessageSerializationTests : Akka.TestKit.Xunit2.TestKit
{
    private static readonly ExportSpec Overlay = new("vm1", 1L << 30,
        new BackendSpec("overlay", Layers: ["vm1-top", "golden-1"], BaseImage: "/data/golden.img", BaseFormat: "qcow2"), ReadOnly: false, "a VM disk",
        new ExportAccess(TlsRequired: true, AllowedClients: ["CN=backup"], MaxConnections: 4));

    private static readonly ExportSpec S3 = new("bucketed", 1L << 34,
        new BackendSpec("s3", S3: new S3Spec("http://127.0.0.1:9000", "disks", "vm2/", "us-east-1", 4 << 20, "key", "secret", 64 << 20, 8)), ReadOnly: true, null);

    private static readonly ExportInfo Info = new("vm1", "a VM disk", 1L << 30, false, BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.Flush)
    {
        Access = new ExportAccess(MaxConnections: 2),
    };

    public static TheoryData<string, object> Messages() => new()
    {
        { "envelope+locate", new ExportEnvelope(Overlay, LocateExport.Instance) },
        { "envelope+wake", new ExportEnvelope(S3, WakeExport.Instance) },
        { "envelope+retire", new ExportEnvelope(Overlay, RetireExport.Instance) },
        { "envelope+get", new ExportEnvelope(Overlay, new GetExport("vm1")) },
        { "envelope+push", new ExportEnvelope(Overlay, new PushLayer(Overlay, "vm1-top")) },
        { "envelope+top-empty", new ExportEnvelope(Overlay, QueryTopEmpty.Instance) },
        { "envelope+add-bitmap", new ExportEnvelope(Overlay, new AddBitmap("vm1", "b1", 65536, true)) },
        { "envelope+merge", new ExportEnvelope(Overlay, new MergeBitmaps("vm1", "b1", ["b2", "b3"])) },
        { "located", new ExportLocated("vm1", "gw2", "10.0.0.2", 4054, 1L << 30, false, 19, ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1"], 7) },
        { "term started (journal)", new TermStarted(12, 7) },
        { "term closed (journal)", new TermClosedCleanly(12) },
        { "retired", new ExportRetired("vm1") },
        { "spec?", new GetExportSpec("") },
        { "spec", new ExportSpecFound(S3) },
        { "no spec", new ExportSpecFound(null) },
        { "found", new ExportFound(new ExportStatus(Overlay, Info)) },
        { "list", new ExportList([new ExportStatus(Overlay, null), new ExportStatus(S3, Info)]) },
        { "create", new CreateExport(Overlay) },
        { "remove", new RemoveExport("vm1") },
        { "snapshot", new SnapshotExport("vm1", "vm1-l2") },
        { "ok", CommandResult.Ok(new ExportStatus(Overlay, Info)) },
        { "fail", CommandResult.Fail(ExportErrorKind.Conflict, "exists") },
        { "bitmap one", BitmapResult.Ok(new BitmapInfo("b1", 65536, true, 1 << 20)) },
        { "bitmap many", BitmapResult.Ok([new BitmapInfo("b1", 65536, true, 0), new BitmapInfo("b2", 4096, false, 4096)]) },
        { "bitmap fail", BitmapResult.Fail(ExportErrorKind.NotFound, "no such bitmap") },
    };

    [Theory]
    [MemberData(nameof(Messages))]
    public void Survives_the_remote_serializer(string what, object message)
    {
        Serializer serializer = Sys.Serialization.FindSerializerFor(message);
        byte[] bytes = serializer.ToBinary(message);
        object back = serializer is SerializerWithStringManifest manifest
            ? manifest.FromBinary(bytes, manifest.Manifest(message))
            : serializer.FromBinary(bytes, message.GetType());
        Assert.True(back.GetType() == message.GetType(), $"{what}: came back as {back.GetType()}");
        Assert.Equivalent(message, back, strict: true);
    }
}
