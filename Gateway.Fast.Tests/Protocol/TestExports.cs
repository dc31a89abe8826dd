using System.Collections.Concurrent;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;

namespace Gateway.Tests.Protocol;

/// <summary>
/// An <see cref="IExportDirectory"/> over in-memory devices, for driving <c>NbdConnection</c>
/// without the export actors. <see cref="FailOn"/> names an export whose opening throws, to
/// stand for an unexpected failure of the server itself.
/// </summary>
public sealed class TestExportDirectory : IExportDirectory
{
    private readonly ConcurrentDictionary<string, ExportHandle> _exports = new(StringComparer.Ordinal);
    private readonly List<string> _order = [];

    /// <summary>OpenAsync of this name throws <see cref="InvalidOperationException"/>.</summary>
    public string? FailOn { get; init; }

    public TestDevice Add(string name, IBlockDevice device, string? description = null, ExportAccess? access = null)
    {
        var tracked = new TestDevice(device);
        var info = new ExportInfo(name, description, device.Size, device.IsReadOnly, device.Capabilities) { Access = access ?? ExportAccess.Open };
        _exports[name] = new ExportHandle(info, tracked, [new BaseAllocationContext(tracked)], CancellationToken.None);
        lock (_order)
        {
            _order.Add(name);
        }
        return tracked;
    }

    /// <summary>Serves <paramref name="device"/> itself, not a <see cref="TestDevice"/> around it: the connection sees the device's own capabilities.</summary>
    public void AddAsIs(string name, IBlockDevice device)
    {
        var info = new ExportInfo(name, null, device.Size, device.IsReadOnly, device.Capabilities) { Access = ExportAccess.Open };
        _exports[name] = new ExportHandle(info, device, [new BaseAllocationContext(device)], CancellationToken.None);
        lock (_order)
        {
            _order.Add(name);
        }
    }

    public ValueTask<IReadOnlyList<ExportInfo>> ListAsync(CancellationToken cancellationToken)
    {
        lock (_order)
        {
            return ValueTask.FromResult<IReadOnlyList<ExportInfo>>([.. _order.Select(n => _exports[n].Info)]);
        }
    }

    /// <summary>
    /// When set, each OpenAsync waits for it: the server's own work (an export opening after a
    /// restart) lasts until the test completes it. <see cref="OpenBegun"/> says an open is waiting.
    /// </summary>
    public Task? HoldOpens { get; init; }

    /// <summary>Completed when an OpenAsync has begun.</summary>
    public TaskCompletionSource OpenBegun { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public async ValueTask<ExportHandle?> OpenAsync(string name, CancellationToken cancellationToken)
    {
        OpenBegun.TrySetResult();
        if (HoldOpens is not null)
        {
            await HoldOpens.WaitAsync(cancellationToken);
        }
        if (name == FailOn)
        {
            throw new InvalidOperationException($"export '{name}' failed to open (injected by the test)");
        }
        return _exports.TryGetValue(name, out ExportHandle? handle) ? handle : null;
    }
}

/// <summary>
/// A device decorator that records disposal and can hold back requests, so a test can keep
/// requests in flight or make later requests finish first.
/// </summary>
public sealed class TestDevice(IBlockDevice inner) : IBlockDevice
{
    private volatile bool _disposed;

    public IBlockDevice Inner { get; } = inner;

    public bool IsDisposed => _disposed;

    /// <summary>How long a read or write at a given offset takes; null for no delay.</summary>
    public Func<long, TimeSpan>? Delay { get; set; }

    public long Size => Inner.Size;

    public bool IsReadOnly => Inner.IsReadOnly;

    public BlockCapabilities Capabilities => Inner.Capabilities;

    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        await DelayAsync(offset, cancellationToken);
        await Inner.ReadAsync(offset, destination, cancellationToken);
    }

    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        await DelayAsync(offset, cancellationToken);
        await Inner.WriteAsync(offset, source, fua, cancellationToken);
    }

    /// <summary>Given the number of the flush (from 1), the failure it throws; null (or no function) for none.</summary>
    public Func<int, Exception?>? FlushFailure { get; set; }

    /// <summary>Flushes asked for so far, failed ones included.</summary>
    public int Flushes => Volatile.Read(ref _flushes);

    private int _flushes;

    public ValueTask FlushAsync(CancellationToken cancellationToken = default) =>
        FlushFailure?.Invoke(Interlocked.Increment(ref _flushes)) is { } failure ? ValueTask.FromException(failure) : Inner.FlushAsync(cancellationToken);

    public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) =>
        Inner.TrimAsync(offset, length, fua, cancellationToken);

    public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) =>
        Inner.ZeroAsync(offset, length, flags, cancellationToken);

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
        Inner.CacheAsync(offset, length, cancellationToken);

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
        Inner.GetAllocationAsync(offset, length, extents, cancellationToken);

    public void Dispose()
    {
        _disposed = true;
        Inner.Dispose();
    }

    private async ValueTask DelayAsync(long offset, CancellationToken cancellationToken)
    {
        if (Delay?.Invoke(offset) is TimeSpan delay && delay > TimeSpan.Zero)
        {
            await Task.Delay(delay, cancellationToken);
        }
    }
}
