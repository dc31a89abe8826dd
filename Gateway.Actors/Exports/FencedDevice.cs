using System.Diagnostics;
using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>
/// This node's permission to touch an export's storage, good until a deadline on the monotonic
/// clock (<see cref="Stopwatch.GetTimestamp"/>, which keeps running while the process is frozen).
/// In a cluster the deadline is the owner's lease (<c>Cluster/ExportLease.cs</c>): each renewal
/// moves it to the renewal's start plus the lease's time to live, minus a margin, so it always
/// ends before the lease can have expired in the database and another node can have taken the
/// export. An owner frozen (SIGSTOP, a long pause, a partition) past the deadline finds it
/// passed the moment it runs again, before it can apply a request it had queued.
/// </summary>
public sealed class OwnershipFence
{
    // Closed until the first ExtendTo.
    private long _validUntil = long.MinValue;
    private volatile string _reason = "";
    private volatile bool _revoked;

    public bool IsOpen => Stopwatch.GetTimestamp() < Volatile.Read(ref _validUntil);

    /// <summary>Opens the fence until <paramref name="timestamp"/> (a <see cref="Stopwatch"/> timestamp); never moves it back, never reopens a revoked fence.</summary>
    public void ExtendTo(long timestamp)
    {
        long current = Volatile.Read(ref _validUntil);
        while (!_revoked && timestamp > current)
        {
            long seen = Interlocked.CompareExchange(ref _validUntil, timestamp, current);
            if (seen == current)
            {
                if (_revoked)
                {
                    // Revoke ran between the check and the exchange: its close wins.
                    Volatile.Write(ref _validUntil, long.MinValue);
                }
                return;
            }
            current = seen;
        }
    }

    /// <summary>Closes the fence for good: the lease was lost, another node may own the export now.</summary>
    public void Revoke(string reason)
    {
        _reason = reason;
        _revoked = true;
        Volatile.Write(ref _validUntil, long.MinValue);
    }

    /// <summary>Throws ESHUTDOWN when the fence is closed: a forwarding node sends the request again to the next owner.</summary>
    public void Check()
    {
        if (!IsOpen)
        {
            throw Refusal();
        }
    }

    public BlockDeviceException Refusal() => new(BlockErrorKind.Shutdown,
        _revoked ? $"this node no longer owns the export: {_reason}" : "this node's lease on the export is not current (it was not renewed in time)");
}

/// <summary>
/// A device that serves requests only while this node's <see cref="OwnershipFence"/> is open:
/// every request checks it as it starts, so no change reaches the layers below (the bitmaps'
/// journal, the backend) from an owner that may have been replaced. The export's device stack
/// has it twice: on top, so a refused request records nothing, and right above the backend, so a
/// request that waited (for its granules to be recorded) re-checks just before its write.
/// </summary>
public sealed class FencedDevice(IBlockDevice inner, OwnershipFence fence) : IBlockDevice, INonBlockingIo, IFileRegions
{
    public long Size => inner.Size;

    public bool IsReadOnly => inner.IsReadOnly;

    public BlockCapabilities Capabilities => inner.Capabilities;

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        fence.IsOpen ? inner.ReadAsync(offset, destination, cancellationToken) : ValueTask.FromException(fence.Refusal());

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) =>
        fence.IsOpen ? inner.WriteAsync(offset, source, fua, cancellationToken) : ValueTask.FromException(fence.Refusal());

    public ValueTask FlushAsync(CancellationToken cancellationToken = default) =>
        fence.IsOpen ? inner.FlushAsync(cancellationToken) : ValueTask.FromException(fence.Refusal());

    public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) =>
        fence.IsOpen ? inner.TrimAsync(offset, length, fua, cancellationToken) : ValueTask.FromException(fence.Refusal());

    public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) =>
        fence.IsOpen ? inner.ZeroAsync(offset, length, flags, cancellationToken) : ValueTask.FromException(fence.Refusal());

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
        fence.IsOpen ? inner.CacheAsync(offset, length, cancellationToken) : ValueTask.FromException(fence.Refusal());

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
        fence.IsOpen ? inner.GetAllocationAsync(offset, length, extents, cancellationToken) : ValueTask.FromException<int>(fence.Refusal());

    // Closed: the asynchronous path answers (with ESHUTDOWN).
    public bool TryReadNoWait(long offset, Span<byte> destination) =>
        fence.IsOpen && inner is INonBlockingIo io && io.TryReadNoWait(offset, destination);

    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source) =>
        fence.IsOpen && inner is INonBlockingIo io && io.TryWriteNoWait(offset, source);

    public bool TryGetFileRegion(long offset, int length, out FileRegion region)
    {
        region = default;
        return fence.IsOpen && inner is IFileRegions files && files.TryGetFileRegion(offset, length, out region);
    }

    public void Dispose() => inner.Dispose();
}
