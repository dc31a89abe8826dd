using System.Runtime.CompilerServices;
using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>
/// The export's device as connections see it: counts the requests in flight so that a graceful
/// stop (a handoff, a removal) can wait for them before its final flush and before the export's
/// bitmaps stop. Requests that arrive while the drain waits are served like any other (a
/// connection may have read them just before it saw the export close); only once the count has
/// reached zero is the device shut, and later requests get <see cref="BlockErrorKind.Shutdown"/>
/// (ESHUTDOWN) instead of reaching a device that is being flushed and disposed.
/// </summary>
public sealed class DrainingDevice(IBlockDevice inner) : IBlockDevice, INonBlockingIo, IFileRegions
{
    // One word, so that entering and shutting are one atomic decision: the low bits count the
    // requests in flight, Closing says a drain waits for the count to reach zero, Shut says it did.
    private const int Closing = 1 << 30;
    private const int Shut = 1 << 29;
    private const int CountMask = Shut - 1;

    private readonly TaskCompletionSource _drained = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _state;

    public IBlockDevice Inner => inner;

    public long Size => inner.Size;

    public bool IsReadOnly => inner.IsReadOnly;

    public BlockCapabilities Capabilities => inner.Capabilities;

    /// <summary>Requests in flight right now (for tests and diagnostics).</summary>
    public int InFlight => Volatile.Read(ref _state) & CountMask;

    /// <summary>True once the drain finished: every later request is refused with ESHUTDOWN.</summary>
    public bool IsShut => (Volatile.Read(ref _state) & Shut) != 0;

    /// <summary>
    /// Completes once no request is in flight (true), or after <paramref name="timeout"/> with some
    /// still running (false: the caller flushes anyway and says so). From then on the device is shut.
    /// </summary>
    public async Task<bool> DrainAsync(TimeSpan timeout)
    {
        int state = Interlocked.Or(ref _state, Closing) | Closing;
        if ((state & CountMask) == 0)
        {
            TryShut();
        }
        bool drained = await _drained.Task.WaitAsync(timeout).ContinueWith(t => t.IsCompletedSuccessfully, TaskScheduler.Default).ConfigureAwait(false);
        // Timed out: shut anyway, so nothing new starts while the export flushes and closes.
        Interlocked.Or(ref _state, Shut);
        return drained;
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        Enter();
        try
        {
            await inner.ReadAsync(offset, destination, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Exit();
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        Enter();
        try
        {
            await inner.WriteAsync(offset, source, fua, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Exit();
        }
    }

    public async ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        Enter();
        try
        {
            await inner.FlushAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Exit();
        }
    }

    public async ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default)
    {
        Enter();
        try
        {
            await inner.TrimAsync(offset, length, fua, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Exit();
        }
    }

    public async ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default)
    {
        Enter();
        try
        {
            await inner.ZeroAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Exit();
        }
    }

    public async ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        Enter();
        try
        {
            await inner.CacheAsync(offset, length, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Exit();
        }
    }

    public async ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
    {
        Enter();
        try
        {
            return await inner.GetAllocationAsync(offset, length, extents, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Exit();
        }
    }

    public bool TryReadNoWait(long offset, Span<byte> destination)
    {
        if (inner is not INonBlockingIo io || !TryEnter())
        {
            return false; // the asynchronous path answers, with ESHUTDOWN when shut
        }
        try
        {
            return io.TryReadNoWait(offset, destination);
        }
        finally
        {
            Exit();
        }
    }

    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source)
    {
        if (inner is not INonBlockingIo io || !TryEnter())
        {
            return false;
        }
        try
        {
            return io.TryWriteNoWait(offset, source);
        }
        finally
        {
            Exit();
        }
    }

    /// <summary>
    /// Entered only while the region is looked up: the data is sent after this returns, from the
    /// file (its handle stays open while the send holds it), like a read that finished just then.
    /// </summary>
    public bool TryGetFileRegion(long offset, int length, out FileRegion region)
    {
        region = default;
        if (inner is not IFileRegions files || !TryEnter())
        {
            return false;
        }
        try
        {
            return files.TryGetFileRegion(offset, length, out region);
        }
        finally
        {
            Exit();
        }
    }

    public void Dispose() => inner.Dispose();

    private void Enter()
    {
        if (!TryEnter())
        {
            throw new BlockDeviceException(BlockErrorKind.Shutdown, "the export is closing on this node");
        }
    }

    private bool TryEnter()
    {
        int state = Volatile.Read(ref _state);
        while (true)
        {
            if ((state & Shut) != 0)
            {
                return false;
            }
            int seen = Interlocked.CompareExchange(ref _state, state + 1, state);
            if (seen == state)
            {
                return true;
            }
            state = seen;
        }
    }

    private void Exit()
    {
        if (Interlocked.Decrement(ref _state) == Closing)
        {
            TryShut();
        }
    }

    /// <summary>Closing with nothing in flight: shut, unless a request entered in between.</summary>
    private void TryShut()
    {
        if (Interlocked.CompareExchange(ref _state, Closing | Shut, Closing) == Closing)
        {
            _drained.TrySetResult();
        }
    }
}
