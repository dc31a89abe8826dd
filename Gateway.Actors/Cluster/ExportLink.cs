using System.Net;
using Akka.Actor;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;

namespace Gateway.Actors.Cluster;

/// <summary>
/// One client connection's way to an export in a cluster: the device itself when this node owns
/// the export, else a <see cref="PeerNbdClient"/> stream to the owner. When the owner goes away
/// (its node died, the shard moved), requests in flight fail with ESHUTDOWN, and the next request
/// finds the new owner, so the client's connection keeps working once the export is re-homed.
/// </summary>
public sealed class ExportLink : IBlockDevice, INonBlockingIo, IAsyncDisposable
{
    /// <summary>How long a request waits for the export to be (re-)homed before it fails with EIO.</summary>
    public static readonly TimeSpan ResolveTimeout = TimeSpan.FromSeconds(20);

    private static readonly TimeSpan LocateTimeout = TimeSpan.FromSeconds(1);
    private static readonly TimeSpan RetryDelay = TimeSpan.FromMilliseconds(200);
    /// <summary>A silent address (a vanished machine) must not use up the whole resolve time.</summary>
    private static readonly TimeSpan ConnectTimeout = TimeSpan.FromSeconds(2);

    private readonly ExportSpec _spec;
    private readonly IActorRef _region;
    private readonly LocalExports _local;
    private readonly ClusterNode _self;
    private readonly CancellationTokenSource _disposed = new();
    private readonly Lock _gate = new();
    private ExportLocated? _located;
    private ExportLocated? _first;
    /// <summary>The owner generation the last successful FLUSH (or the attach) went to.</summary>
    private string _flushedGeneration;
    private ExportHandle? _localHandle;
    private PeerDevice? _peer;
    private Task? _resolving;

    private ExportLink(ExportSpec spec, IActorRef region, LocalExports local, ClusterNode self, ExportLocated located)
    {
        _spec = spec;
        _region = region;
        _local = local;
        _self = self;
        _first = located;
        _flushedGeneration = located.Generation;
        Size = located.Size;
        IsReadOnly = located.ReadOnly;
        Capabilities = (BlockCapabilities)located.Capabilities;
    }

    /// <summary>
    /// Finds the export's owner (starting the export if no node runs it) and returns a handle whose
    /// device is a link to it. No data stream is opened until the first request.
    /// </summary>
    public static async Task<ExportHandle> OpenAsync(ExportSpec spec, IActorRef region, LocalExports local, ClusterNode self, CancellationToken cancellationToken)
    {
        ExportLocated located = await LocateAsync(spec, region, cancellationToken).ConfigureAwait(false);
        var link = new ExportLink(spec, region, local, self, located);
        var info = new ExportInfo(spec.Name, spec.Description, located.Size, located.ReadOnly || spec.ReadOnly, link.Capabilities)
        {
            Access = spec.Access ?? ExportAccess.Open,
        };
        MetaContext[] contexts = [.. located.Contexts.Select(name => new LinkContext(name, link))];
        return new ExportHandle(info, link, contexts, CancellationToken.None) { OwnedByConnection = true };
    }

    private static async Task<ExportLocated> LocateAsync(ExportSpec spec, IActorRef region, CancellationToken cancellationToken)
    {
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        deadline.CancelAfter(ResolveTimeout);
        while (true)
        {
            try
            {
                return await region.Ask<ExportLocated>(new ExportEnvelope(spec, LocateExport.Instance), LocateTimeout, deadline.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is AskTimeoutException or InvalidOperationException && !deadline.IsCancellationRequested)
            {
                // The shard is moving (its node died or left): ask again until it is home.
            }
            catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
            {
                throw NoOwner(spec);
            }
            try
            {
                await Task.Delay(RetryDelay, deadline.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
            {
                throw NoOwner(spec);
            }
        }
    }

    private static BlockDeviceException NoOwner(ExportSpec spec) =>
        new(BlockErrorKind.Io, $"export '{spec.Name}' has no owner in the cluster after {ResolveTimeout.TotalSeconds:0} s");

    public long Size { get; }

    public bool IsReadOnly { get; }

    public BlockCapabilities Capabilities { get; }

    /// <summary>Requests go over a working peer stream (nothing blocks before the reply comes back).</summary>
    public bool IsRemote => _localHandle is null && _peer is { Client.IsBroken: false };

    /// <summary>The peer stream requests go over now, held back until uncorked (see <see cref="PeerNbdClient.Cork"/>); null when local.</summary>
    public PeerNbdClient? Cork()
    {
        PeerNbdClient? client = _localHandle is null ? _peer?.Client : null;
        client?.Cork();
        return client;
    }

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        Current() is { } device ? device.ReadAsync(offset, destination, cancellationToken) : ReadSlowAsync(offset, destination, cancellationToken);

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) =>
        Current() is { } device ? device.WriteAsync(offset, source, fua, cancellationToken) : WriteSlowAsync(offset, source, fua, cancellationToken);

    /// <summary>
    /// FLUSH through the current owner. When the owner changed since this link's last flush (the
    /// old one died, or the export moved), writes completed through the old owner, on this or
    /// any other connection, may never have reached storage: that flush fails with EIO once,
    /// instead of answering success for writes it cannot vouch for (multi-conn).
    /// </summary>
    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        IBlockDevice target = await TargetAsync(cancellationToken).ConfigureAwait(false);
        string generation = _located?.Generation ?? _flushedGeneration;
        await target.FlushAsync(cancellationToken).ConfigureAwait(false);
        if (generation != _flushedGeneration)
        {
            _flushedGeneration = generation;
            throw new BlockDeviceException(BlockErrorKind.Io,
                $"export '{_spec.Name}' changed owner since the last flush: writes completed through the old owner may be lost");
        }
    }

    public async ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) =>
        await (await TargetAsync(cancellationToken).ConfigureAwait(false)).TrimAsync(offset, length, fua, cancellationToken).ConfigureAwait(false);

    public async ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) =>
        await (await TargetAsync(cancellationToken).ConfigureAwait(false)).ZeroAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);

    public async ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
        await (await TargetAsync(cancellationToken).ConfigureAwait(false)).CacheAsync(offset, length, cancellationToken).ConfigureAwait(false);

    public async ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
        await (await TargetAsync(cancellationToken).ConfigureAwait(false)).GetAllocationAsync(offset, length, extents, cancellationToken).ConfigureAwait(false);

    /// <summary>Block status of one context, from the owner's device or over the peer stream.</summary>
    public async ValueTask<int> GetExtentsAsync(string context, long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken)
    {
        ExportHandle? handle = _localHandle;
        IBlockDevice target = handle is { Closed.IsCancellationRequested: false } ? handle.Device : await TargetAsync(cancellationToken).ConfigureAwait(false);
        if (target is PeerDevice peer)
        {
            // The peer stream has compact headers: the hint is capped at 32 bits (the owner MAY answer less).
            return await peer.Client.GetExtentsAsync(context, offset, (uint)Math.Min(length, uint.MaxValue), extents, extents.Length == 1, cancellationToken).ConfigureAwait(false);
        }
        handle = _localHandle;
        if (handle is null || !ReferenceEquals(handle.Device, target))
        {
            throw new BlockDeviceException(BlockErrorKind.Shutdown, $"export '{_spec.Name}' moved during the request");
        }
        MetaContext local = handle.MetaContexts.FirstOrDefault(c => c.Name == context)
            ?? throw new BlockDeviceException(BlockErrorKind.NotSupported, $"context {context} is gone from export '{_spec.Name}'");
        return await local.GetExtentsAsync(offset, length, extents, cancellationToken).ConfigureAwait(false);
    }

    public bool TryReadNoWait(long offset, Span<byte> destination) =>
        Current() is INonBlockingIo io && io.TryReadNoWait(offset, destination);

    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source) =>
        Current() is INonBlockingIo io && io.TryWriteNoWait(offset, source);

    /// <summary>The owner's device when it is on this node, else the stream to it; null when neither is usable.</summary>
    private IBlockDevice? Current() =>
        _localHandle is { Closed.IsCancellationRequested: false } handle ? handle.Device
        : _peer is { Client.IsBroken: false } peer ? peer
        : null;

    private async ValueTask ReadSlowAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        await (await TargetAsync(cancellationToken).ConfigureAwait(false)).ReadAsync(offset, destination, cancellationToken).ConfigureAwait(false);

    private async ValueTask WriteSlowAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        await (await TargetAsync(cancellationToken).ConfigureAwait(false)).WriteAsync(offset, source, fua, cancellationToken).ConfigureAwait(false);

    private async ValueTask<IBlockDevice> TargetAsync(CancellationToken cancellationToken)
    {
        if (Current() is { } device)
        {
            return device;
        }
        await ResolveAsync(cancellationToken).ConfigureAwait(false);
        return Current() ?? throw new BlockDeviceException(BlockErrorKind.Shutdown, $"export '{_spec.Name}' lost its owner");
    }

    /// <summary>One resolution at a time; concurrent requests wait for the same one.</summary>
    private Task ResolveAsync(CancellationToken cancellationToken)
    {
        Task resolving;
        lock (_gate)
        {
            if (_resolving is null || _resolving.IsCompleted)
            {
                // Not under the lock, not on the caller: the resolution outlives any one request.
                _resolving = Task.Run(ResolveCoreAsync, CancellationToken.None);
            }
            resolving = _resolving;
        }
        return resolving.WaitAsync(cancellationToken);
    }

    private async Task ResolveCoreAsync()
    {
        if (Current() is not null)
        {
            return;
        }
        PeerDevice? old = _peer;
        _peer = null;
        _localHandle = null;
        if (old is not null)
        {
            await old.Client.DisposeAsync().ConfigureAwait(false);
        }
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(_disposed.Token);
        deadline.CancelAfter(ResolveTimeout);
        // The owner found at attach is tried first, once; after a failure, always ask again.
        ExportLocated? located = Interlocked.Exchange(ref _first, null);
        while (true)
        {
            try
            {
                located ??= await LocateAsync(_spec, _region, deadline.Token).ConfigureAwait(false);
                if (located.Node == _self.Name)
                {
                    if (_local.Get(_spec.Name) is { } handle)
                    {
                        _localHandle = handle;
                        _located = located;
                        return;
                    }
                }
                else
                {
                    using var attempt = CancellationTokenSource.CreateLinkedTokenSource(deadline.Token);
                    attempt.CancelAfter(ConnectTimeout);
                    PeerNbdClient client;
                    try
                    {
                        client = await PeerNbdClient.ConnectAsync(new DnsEndPoint(located.PeerHost, located.PeerPort), _spec.Name, attempt.Token).ConfigureAwait(false);
                    }
                    catch (OperationCanceledException) when (!deadline.IsCancellationRequested)
                    {
                        throw new IOException($"no answer from {located.PeerHost}:{located.PeerPort} within {ConnectTimeout.TotalSeconds:0} s");
                    }
                    lock (_gate)
                    {
                        if (!_disposed.IsCancellationRequested)
                        {
                            _peer = new PeerDevice(client);
                            _located = located;
                            return;
                        }
                    }
                    // The connection ended while this one was being made: nobody will close it.
                    await client.DisposeAsync().ConfigureAwait(false);
                    throw new BlockDeviceException(BlockErrorKind.Shutdown, "the connection ended");
                }
            }
            catch (Exception e) when (e is PeerExportUnavailableException or IOException or System.Net.Sockets.SocketException or BlockDeviceException && !deadline.IsCancellationRequested)
            {
                // The owner moved or is dying: locate again.
            }
            catch (OperationCanceledException) when (deadline.IsCancellationRequested)
            {
                throw new BlockDeviceException(_disposed.IsCancellationRequested ? BlockErrorKind.Shutdown : BlockErrorKind.Io,
                    $"export '{_spec.Name}' could not be reached within {ResolveTimeout.TotalSeconds:0} s");
            }
            located = null;
            try
            {
                await Task.Delay(RetryDelay, deadline.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                throw new BlockDeviceException(BlockErrorKind.Io, $"export '{_spec.Name}' could not be reached within {ResolveTimeout.TotalSeconds:0} s");
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        lock (_gate)
        {
            _disposed.Cancel();
        }
        if (_peer is { } peer)
        {
            await peer.Client.DisposeAsync().ConfigureAwait(false);
        }
    }

    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    /// <summary>A metadata context of the export, answered wherever the export lives.</summary>
    private sealed class LinkContext(string name, ExportLink link) : MetaContext(name)
    {
        public override ValueTask<int> GetExtentsAsync(long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken) =>
            link.GetExtentsAsync(Name, offset, length, extents, cancellationToken);
    }

    /// <summary>The peer stream as a device (allocation = the owner's base:allocation).</summary>
    private sealed class PeerDevice(PeerNbdClient client) : IBlockDevice
    {
        public PeerNbdClient Client { get; } = client;

        public long Size => Client.Info.Size;

        public bool IsReadOnly => Client.Info.ReadOnly;

        public BlockCapabilities Capabilities => Client.Info.Capabilities;

        public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) => Client.ReadAsync(offset, destination, cancellationToken);

        public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) => Client.WriteAsync(offset, source, fua, cancellationToken);

        public ValueTask FlushAsync(CancellationToken cancellationToken = default) => Client.FlushAsync(cancellationToken);

        public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) => Client.TrimAsync(offset, length, fua, cancellationToken);

        public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) => Client.ZeroAsync(offset, length, flags, cancellationToken);

        public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) => Client.CacheAsync(offset, length, cancellationToken);

        public async ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
        {
            MetaExtent[] buffer = new MetaExtent[Math.Min(extents.Length, NbdLimits.MaxExtentsPerReply)];
            int n = await Client.GetExtentsAsync(NbdLimits.BaseAllocation, offset, (uint)Math.Min(length, uint.MaxValue), buffer, buffer.Length == 1, cancellationToken).ConfigureAwait(false);
            for (int i = 0; i < n; i++)
            {
                extents.Span[i] = new Extent((long)buffer[i].Length, (ExtentFlags)buffer[i].Status);
            }
            return n;
        }

        public void Dispose() => Client.DisposeAsync().AsTask().GetAwaiter().GetResult();
    }
}
