using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using Akka.TestKit;
using Gateway.Actors.Exports;
using Gateway.Tests.Bitmaps;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Actors;

/// <summary>
/// Issue 30: the registry (a cluster-wide singleton) makes an export's storage off its thread. It
/// used to block on the S3 bucket check, so one silent endpoint stalled every admin operation for
/// up to a minute. Now lookups are answered meanwhile, and catalog commands still apply in order.
/// </summary>
[Collection(GatedJournalCollection.Name)]
public sealed class ExportRegistryStorageTests : Akka.TestKit.Xunit2.TestKit
{
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);
    private readonly string _data = Directory.CreateTempSubdirectory("gateway-registry-storage-").FullName;

    public ExportRegistryStorageTests(ITestOutputHelper output) : base(BitmapsActorTests.Config, output)
    {
        GatedJournal.Open();
    }

    [Fact]
    public async Task While_an_s3_create_waits_on_a_silent_store_lists_are_answered_and_a_later_create_follows_it_in_order()
    {
        using var store = new SilentStore();
        // Bounded for the test: the check fails when the store goes away, or at the latest here.
        var backends = new BackendFactory(_data) { S3CreateTimeout = TimeSpan.FromSeconds(20) };
        IActorRef registry = Sys.ActorOf(ExportRegistryActor.Props(backends, initialExport: null));
        TestProbe client = CreateTestProbe();
        var s3 = new ExportSpec("remote", 1 << 20,
            new BackendSpec(BackendSpec.S3Type, S3: new S3Spec(store.Endpoint, "bucket", "disk", AccessKey: "test", SecretKey: "test")),
            ReadOnly: false, Description: null);
        var file = new ExportSpec("local", 1 << 20, new BackendSpec(BackendSpec.File), ReadOnly: false, Description: null);

        registry.Tell(new CreateExport(s3), client);
        // The bucket check is in flight (and will get no answer) before anything else is asked.
        await store.Connected.WaitAsync(Patience);
        registry.Tell(new CreateExport(file), client);

        ExportList during = await registry.Ask<ExportList>(ListExports.Instance, TimeSpan.FromSeconds(2));
        Assert.Empty(during.Exports);
        // The file create is queued behind the S3 one: neither has been answered.
        await client.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(300));

        // The store goes away: the check fails, then the queued create runs.
        store.Close();
        CommandResult first = await client.ExpectMsgAsync<CommandResult>(TimeSpan.FromSeconds(30));
        Assert.Equal(ExportErrorKind.Invalid, first.Error);
        Assert.Contains("'remote'", first.Message);
        CommandResult second = await client.ExpectMsgAsync<CommandResult>(Patience);
        Assert.True(second.Error is null, second.Message);
        Assert.Equal("local", second.Export?.Spec.Name);

        ExportList after = await registry.Ask<ExportList>(ListExports.Instance, Patience);
        Assert.Equal(["local"], after.Exports.Select(e => e.Spec.Name));
    }

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        if (disposing)
        {
            Directory.Delete(_data, recursive: true);
        }
    }

    /// <summary>A loopback endpoint that accepts connections and never answers; once closed it refuses them.</summary>
    private sealed class SilentStore : IDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly List<Socket> _held = [];
        private readonly TaskCompletionSource _connected = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly Task _accepting;

        public SilentStore()
        {
            _listener.Start();
            Endpoint = $"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}";
            _accepting = AcceptAsync();
        }

        public string Endpoint { get; }

        public Task Connected => _connected.Task;

        private async Task AcceptAsync()
        {
            try
            {
                while (true)
                {
                    Socket socket = await _listener.AcceptSocketAsync().ConfigureAwait(false);
                    lock (_held)
                    {
                        _held.Add(socket);
                    }
                    _connected.TrySetResult();
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                // Closed.
            }
        }

        public void Close()
        {
            _listener.Stop();
            lock (_held)
            {
                foreach (Socket socket in _held)
                {
                    socket.Dispose();
                }
                _held.Clear();
            }
        }

        public void Dispose()
        {
            Close();
            _accepting.Wait(TimeSpan.FromSeconds(5));
        }
    }
}
