using System.Collections.Concurrent;
using Akka.Actor;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Gateway.Tests.Protocol;
using Xunit;

namespace Gateway.Tests.Backends;

/// <summary>
/// The backend contract through a non-owner node's link to the owner: an <see cref="ExportLink"/>
/// (its peer device and <see cref="PeerNbdClient"/>) over a real loopback socket to the
/// in-process NBD server, which serves a memory backend. What the link says of the export before
/// any I/O (size, mode, capabilities) comes from the owner's locate answer, built here as the
/// export entity builds it from the owner's handle.
/// <para>
/// One variant only: the peer client always negotiates structured replies and never extended
/// headers, so there is no second wire mode to run it in.
/// </para>
/// <para>
/// Serial (<see cref="NbdServerCollection"/>): these connections must not move the counters of
/// the tests that count the server's connections and pooled buffers.
/// </para>
/// </summary>
[Collection(NbdServerCollection.Name)]
public sealed class ExportLinkContractTests(ExportLinkContractTests.Owner owner) : BlockDeviceContract, IClassFixture<ExportLinkContractTests.Owner>
{
    // The link offers the non-blocking path for when the owner is this node; over the peer stream
    // nothing is in this process, so it must decline every attempt.
    protected override bool DeclinesNonBlockingIo => true;

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false) =>
        owner.OpenLinkAsync(new MemoryBackend(size, readOnly)).GetAwaiter().GetResult();

    [Fact]
    public async Task Requests_go_over_the_peer_stream()
    {
        using IBlockDevice device = CreateDevice(MiB);
        var link = Assert.IsType<ExportLink>(device);

        await device.WriteAsync(0, Pattern(4096, seed: 1), fua: false);

        Assert.True(link.IsRemote, "the owner is another node: the link must use the peer stream, not a local device");
        Assert.Equal(Pattern(4096, seed: 1), await ReadAsync(device, 0, 4096));
    }

    /// <summary>
    /// The owner node: an NBD server on loopback serving its exports, and the region a link asks
    /// where an export lives, which answers with that server.
    /// </summary>
    public sealed class Owner : IAsyncLifetime
    {
        private readonly ActorSystem _system = ActorSystem.Create("export-link-contract");
        private readonly ConcurrentDictionary<string, ExportLocated> _located = new(StringComparer.Ordinal);
        private readonly TestExportDirectory _exports = new();
        private readonly NbdTestServer _server;
        private readonly IActorRef _region;
        private int _count;

        public Owner()
        {
            _server = new NbdTestServer(_exports);
            _region = _system.ActorOf(Props.Create(() => new Region(_located)), "region");
        }

        public async Task<IBlockDevice> OpenLinkAsync(IBlockDevice backend)
        {
            string name = $"disk{Interlocked.Increment(ref _count)}";
            _exports.AddAsIs(name, backend);
            ExportHandle served = (await _exports.OpenAsync(name, CancellationToken.None))!;
            ExportInfo info = served.Info;
            _located[name] = new ExportLocated(name, "owner", _server.EndPoint.Address.ToString(), _server.EndPoint.Port,
                info.Size, info.ReadOnly, (int)info.Capabilities, [.. served.MetaContexts.Select(c => c.Name)], Epoch: 1);
            var spec = new ExportSpec(name, backend.Size, new BackendSpec(BackendSpec.File, $"{name}.raw"), backend.IsReadOnly, Description: null);
            ExportHandle? link = await ExportLink.OpenAsync(spec, _region, new LocalExports(), new ClusterNode("forwarder", "127.0.0.1", 1),
                tls: null, CancellationToken.None);
            return Assert.IsType<ExportLink>(link?.Device);
        }

        public Task InitializeAsync() => Task.CompletedTask;

        public async Task DisposeAsync()
        {
            await _server.DisposeAsync();
            await _system.Terminate();
        }

        /// <summary>Answers every locate with the owner's answer, or that the export is gone.</summary>
        private sealed class Region : ReceiveActor
        {
            public Region(ConcurrentDictionary<string, ExportLocated> located) =>
                Receive<ExportEnvelope>(envelope => Sender.Tell(located.TryGetValue(envelope.Spec.Name, out ExportLocated? answer)
                    ? answer
                    : new ExportGone(envelope.Spec.Name, "removed")));
        }
    }
}
