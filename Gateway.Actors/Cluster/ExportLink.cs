using System.Diagnostics;
using System.Net;
using System.Runtime.CompilerServices;
using Akka.Actor;
using Gateway.Actors.Exports;
using Gateway.Actors.Tls;
using Gateway.Actors.Nbd;
using Gateway.Backends;

namespace Gateway.Actors.Cluster;

/// <summary>
/// One client connection's way to an export in a cluster: the device itself when this node owns
/// the export, else a <see cref="PeerNbdClient"/> stream to the owner. When the owner goes away
/// (it hands the export over, its node died, the shard moved), a request that fails with
/// ESHUTDOWN, because the owner refused it while closing or the stream ended before its reply,
/// is sent again to the new owner once the export is re-homed: the client sees a pause, not an
/// error. Sending it again is safe: the request was not acknowledged, so the client cannot have
/// ordered anything after it, and the old owner applies nothing more once the new one serves
/// (a graceful owner drains before it lets go).
/// </summary>
public sealed class ExportLink : IBlockDevice, INonBlockingIo, IFileRegions, IForwardingDevice, ISegmentedReads, IAsyncDisposable
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
    private readonly TlsCredentials? _tls;
    private readonly CancellationTokenSource _disposed = new();
    private readonly Lock _gate = new();
    private ExportLocated? _located;
    private ExportLocated? _first;
    /// <summary>The durability epoch the last successful FLUSH (or the attach) went to.</summary>
    private long _flushedEpoch;
    private ExportHandle? _localHandle;
    private PeerDevice? _peer;
    private Task? _resolving;
    /// <summary>Why the export is gone for this link (removed since it attached); null while it exists.</summary>
    private volatile string? _gone;

    private ExportLink(ExportSpec spec, IActorRef region, LocalExports local, ClusterNode self, TlsCredentials? tls, ExportLocated located)
    {
        _tls = tls;
        _spec = spec;
        _region = region;
        _local = local;
        _self = self;
        _first = located;
        _flushedEpoch = located.Epoch;
        Size = located.Size;
        IsReadOnly = located.ReadOnly;
        Capabilities = (BlockCapabilities)located.Capabilities;
    }

    /// <summary>
    /// Finds the export's owner (starting the export if no node runs it) and returns a handle whose
    /// device is a link to it. No data stream is opened until the first request.
    /// </summary>
    /// <param name="tls">Cluster TLS for the data stream to the owner; null: plaintext.</param>
    /// <returns>null when the export was removed meanwhile (the client is told it does not exist).</returns>
    public static async Task<ExportHandle?> OpenAsync(ExportSpec spec, IActorRef region, LocalExports local, ClusterNode self, TlsCredentials? tls, CancellationToken cancellationToken)
    {
        ExportLocated located;
        try
        {
            located = await LocateAsync(spec, region, cancellationToken).ConfigureAwait(false);
        }
        catch (ExportGoneException)
        {
            return null;
        }
        var link = new ExportLink(spec, region, local, self, tls, located);
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
                switch (await region.Ask<object>(new ExportEnvelope(spec, LocateExport.Instance), LocateTimeout, deadline.Token).ConfigureAwait(false))
                {
                    case ExportLocated located:
                        return located;
                    case ExportGone gone:
                        throw new ExportGoneException(gone.Reason);
                }
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

    /// <summary>The link's export was removed: every request fails with EIO from now on.</summary>
    private sealed class ExportGoneException(string reason) : Exception(reason);

    private static BlockDeviceException NoOwner(ExportSpec spec) =>
        new(BlockErrorKind.Io, $"export '{spec.Name}' has no owner in the cluster after {ResolveTimeout.TotalSeconds:0} s");

    public long Size { get; }

    public bool IsReadOnly { get; }

    public BlockCapabilities Capabilities { get; }

    /// <summary>Requests go over a working peer stream (nothing blocks before the reply comes back).</summary>
    public bool IsRemote => _localHandle is null && _peer is { Client.IsBroken: false, Retired: false };

    /// <summary>The peer stream requests go over now, held back until uncorked (see <see cref="PeerNbdClient.Cork"/>); null when local.</summary>
    public IRequestBatch? Cork()
    {
        PeerNbdClient? client = _localHandle is null ? _peer?.Client : null;
        client?.Cork();
        return client;
    }

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        Run((offset, destination), static (device, s, ct) => device.ReadAsync(s.offset, s.destination, ct), cancellationToken);

    /// <summary>
    /// While the owner is another node or not found yet: <see cref="Transmission.HolesOf"/> asks
    /// for the allocation only while the export is served here, or was found here at attach and
    /// not looked for since (a connection's first read).
    /// </summary>
    public bool ReadsSegments => _localHandle is null && Volatile.Read(ref _first)?.Node != _self.Name;

    /// <summary>
    /// A read that keeps the owner's holes: over the peer stream, its OFFSET_HOLE chunks come back
    /// as hole segments (no allocation query of its own). A read that finds the owner on this node
    /// (the first of a connection, or one begun as the owner moved here) is one data segment; the
    /// reads after it go through the protocol layer's allocation path (<see cref="ReadsSegments"/>).
    /// </summary>
    public ValueTask<int> ReadSegmentsAsync(long offset, Memory<byte> destination, Memory<Extent> segments, CancellationToken cancellationToken = default) =>
        Run((offset, destination, segments), static (device, s, ct) => device is PeerDevice peer
            ? peer.Client.ReadSegmentsAsync(s.offset, s.destination, s.segments, ct)
            : ReadAsOneSegmentAsync(device, s.destination, s.segments, s.offset, ct), cancellationToken);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private static async ValueTask<int> ReadAsOneSegmentAsync(IBlockDevice device, Memory<byte> destination, Memory<Extent> segments, long offset, CancellationToken cancellationToken)
    {
        await device.ReadAsync(offset, destination, cancellationToken).ConfigureAwait(false);
        segments.Span[0] = new Extent(destination.Length, ExtentFlags.Data);
        return 1;
    }

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) =>
        Run((offset, source, fua), static (device, s, ct) => device.WriteAsync(s.offset, s.source, s.fua, ct), cancellationToken);

    /// <summary>
    /// FLUSH through the current owner. When the durability epoch changed since this link's last
    /// flush (an owner died with writes it had acknowledged and not flushed), writes completed
    /// through the old owner, on this or any other connection, may never have reached storage:
    /// that flush fails with EIO once, instead of answering success for writes it cannot vouch for
    /// (multi-conn). A graceful handoff keeps the epoch (<see cref="ExportTerms"/>), so the FLUSH
    /// after it answers success.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        long started = Stopwatch.GetTimestamp();
        IBlockDevice? failed = null;
        while (true)
        {
            IBlockDevice target = await RetargetAsync(failed, cancellationToken).ConfigureAwait(false);
            long epoch = _located?.Epoch ?? _flushedEpoch;
            try
            {
                await target.FlushAsync(cancellationToken).ConfigureAwait(false);
            }
            catch (BlockDeviceException e) when (MaySendAgain(e, target, started))
            {
                failed = target;
                continue;
            }
            if (epoch != _flushedEpoch)
            {
                _flushedEpoch = epoch;
                throw new BlockDeviceException(BlockErrorKind.Io,
                    $"export '{_spec.Name}' changed owner since the last flush and the old owner did not hand over cleanly: writes completed through it may be lost");
            }
            return;
        }
    }

    public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) =>
        Run((offset, length, fua), static (device, s, ct) => device.TrimAsync(s.offset, s.length, s.fua, ct), cancellationToken);

    public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) =>
        Run((offset, length, flags), static (device, s, ct) => device.ZeroAsync(s.offset, s.length, s.flags, ct), cancellationToken);

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
        Run((offset, length), static (device, s, ct) => device.CacheAsync(s.offset, s.length, ct), cancellationToken);

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
        Run((offset, length, extents), static (device, s, ct) => device.GetAllocationAsync(s.offset, s.length, s.extents, ct), cancellationToken);

    /// <summary>Block status of one context, from the owner's device or over the peer stream.</summary>
    public ValueTask<int> GetExtentsAsync(string context, long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken) =>
        Run((link: this, context, offset, length, extents), static (device, s, ct) => s.link.GetExtentsOnAsync(device, s.context, s.offset, s.length, s.extents, ct), cancellationToken);

    private ValueTask<int> GetExtentsOnAsync(IBlockDevice target, string context, long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken)
    {
        if (target is PeerDevice peer)
        {
            // The peer stream has compact headers: the hint is capped at 32 bits (the owner MAY answer less).
            return peer.Client.GetExtentsAsync(context, offset, (uint)Math.Min(length, uint.MaxValue), extents, extents.Length == 1, cancellationToken);
        }
        ExportHandle? handle = _localHandle;
        if (handle is null || !ReferenceEquals(handle.Device, target))
        {
            return ValueTask.FromException<int>(new BlockDeviceException(BlockErrorKind.Shutdown, $"export '{_spec.Name}' moved during the request"));
        }
        MetaContext? local = handle.MetaContexts.FirstOrDefault(c => c.Name == context);
        return local is null
            ? ValueTask.FromException<int>(new BlockDeviceException(BlockErrorKind.NotSupported, $"context {context} is gone from export '{_spec.Name}'"))
            : local.GetExtentsAsync(offset, length, extents, cancellationToken);
    }

    /// <summary>
    /// Runs one request on the owner. The fast path is the call itself (no state machine when it
    /// completes at once); a request that fails with ESHUTDOWN goes to <see cref="RetryAsync{TState}"/>.
    /// </summary>
    private ValueTask Run<TState>(TState state, Func<IBlockDevice, TState, CancellationToken, ValueTask> operation, CancellationToken cancellationToken)
    {
        if (Current() is not { } device)
        {
            return RetryAsync(null, null, state, operation, cancellationToken);
        }
        ValueTask pending = operation(device, state, cancellationToken);
        return pending.IsCompletedSuccessfully ? pending : RetryAsync(pending, device, state, operation, cancellationToken);
    }

    private ValueTask<int> Run<TState>(TState state, Func<IBlockDevice, TState, CancellationToken, ValueTask<int>> operation, CancellationToken cancellationToken)
    {
        if (Current() is not { } device)
        {
            return RetryAsync(null, null, state, operation, cancellationToken);
        }
        ValueTask<int> pending = operation(device, state, cancellationToken);
        return pending.IsCompletedSuccessfully ? pending : RetryAsync(pending, device, state, operation, cancellationToken);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask RetryAsync<TState>(ValueTask? first, IBlockDevice? device, TState state,
        Func<IBlockDevice, TState, CancellationToken, ValueTask> operation, CancellationToken cancellationToken)
    {
        long started = Stopwatch.GetTimestamp();
        if (first is { } pending)
        {
            try
            {
                await pending.ConfigureAwait(false);
                return;
            }
            catch (BlockDeviceException e) when (MaySendAgain(e, device!, started))
            {
            }
        }
        while (true)
        {
            IBlockDevice target = await RetargetAsync(device, cancellationToken).ConfigureAwait(false);
            try
            {
                await operation(target, state, cancellationToken).ConfigureAwait(false);
                return;
            }
            catch (BlockDeviceException e) when (MaySendAgain(e, target, started))
            {
                device = target;
            }
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<int> RetryAsync<TState>(ValueTask<int>? first, IBlockDevice? device, TState state,
        Func<IBlockDevice, TState, CancellationToken, ValueTask<int>> operation, CancellationToken cancellationToken)
    {
        long started = Stopwatch.GetTimestamp();
        if (first is { } pending)
        {
            try
            {
                return await pending.ConfigureAwait(false);
            }
            catch (BlockDeviceException e) when (MaySendAgain(e, device!, started))
            {
            }
        }
        while (true)
        {
            IBlockDevice target = await RetargetAsync(device, cancellationToken).ConfigureAwait(false);
            try
            {
                return await operation(target, state, cancellationToken).ConfigureAwait(false);
            }
            catch (BlockDeviceException e) when (MaySendAgain(e, target, started))
            {
                device = target;
            }
        }
    }

    /// <summary>
    /// ESHUTDOWN from the owner (it refused the request while closing, or the stream ended before
    /// the reply) means "not here any more", not "failed": the request goes again to whoever owns
    /// the export next, for as long as a resolution may take. The stream that said so takes no
    /// new requests.
    /// </summary>
    private bool MaySendAgain(BlockDeviceException e, IBlockDevice target, long started)
    {
        if (e.Kind != BlockErrorKind.Shutdown || _disposed.IsCancellationRequested || Stopwatch.GetElapsedTime(started) > ResolveTimeout)
        {
            return false;
        }
        if (target is PeerDevice peer)
        {
            peer.Retire();
        }
        return true;
    }

    /// <summary>The device to send a request to; after <paramref name="failed"/> refused one, a different one, or the same after a pause.</summary>
    private async ValueTask<IBlockDevice> RetargetAsync(IBlockDevice? failed, CancellationToken cancellationToken)
    {
        IBlockDevice target = await TargetAsync(cancellationToken).ConfigureAwait(false);
        if (failed is not null && ReferenceEquals(target, failed))
        {
            // The owner's device said ESHUTDOWN and is still the one this node serves: the export
            // is closing here and its handle not yet marked closed. Wait, do not spin.
            await Task.Delay(RetryDelay, cancellationToken).ConfigureAwait(false);
            target = await TargetAsync(cancellationToken).ConfigureAwait(false);
        }
        return target;
    }

    public bool TryReadNoWait(long offset, Span<byte> destination) =>
        Current() is INonBlockingIo io && io.TryReadNoWait(offset, destination);

    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source) =>
        Current() is INonBlockingIo io && io.TryWriteNoWait(offset, source);

    public bool TryGetFileRegion(long offset, int length, out FileRegion region)
    {
        region = default;
        return Current() is IFileRegions files && files.TryGetFileRegion(offset, length, out region);
    }

    /// <summary>The owner's device when it is on this node, else the stream to it; null when neither is usable.</summary>
    private IBlockDevice? Current() =>
        _localHandle is { Closed.IsCancellationRequested: false } handle ? handle.Device
        : _peer is { Client.IsBroken: false, Retired: false } peer ? peer
        : null;

    private async ValueTask<IBlockDevice> TargetAsync(CancellationToken cancellationToken)
    {
        if (Current() is { } device)
        {
            return device;
        }
        if (_gone is { } gone)
        {
            throw new BlockDeviceException(BlockErrorKind.Io, gone);
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
                        client = await PeerNbdClient.ConnectAsync(new DnsEndPoint(located.PeerHost, located.PeerPort), _spec.Name, _tls, attempt.Token).ConfigureAwait(false);
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
            catch (ExportGoneException gone)
            {
                _gone = gone.Message;
                throw new BlockDeviceException(BlockErrorKind.Io, gone.Message);
            }
            catch (Exception e) when (e is PeerExportUnavailableException or IOException or System.Net.Sockets.SocketException or BlockDeviceException
                or System.Security.Authentication.AuthenticationException && !deadline.IsCancellationRequested)
            {
                // The owner moved or is dying (or, TLS refused, is mid-rotation of its certificate): locate again.
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
        private volatile bool _retired;

        public PeerNbdClient Client { get; } = client;

        /// <summary>The owner answered ESHUTDOWN on this stream: it is closing the export, so new requests look for the next owner.</summary>
        public bool Retired => _retired;

        public void Retire() => _retired = true;

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
            if (length == 0)
            {
                // Nothing to describe, as on a local device; BLOCK_STATUS of length 0 is EINVAL on the wire.
                return 0;
            }
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
