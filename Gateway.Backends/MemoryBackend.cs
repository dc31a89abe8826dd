namespace Gateway.Backends;

/// <summary>
/// A sparse device held in memory, for tests and benchmarks. Pages are allocated on first write
/// and dropped again by trim and zero, so allocation is reported per <see cref="PageSize"/> page.
/// </summary>
public sealed class MemoryBackend : IBlockDevice, INonBlockingIo
{
    public const int PageSize = 1 << PageShift;
    private const int PageShift = 16;

    // Striped rather than per-page locks: a lock per page would cost more than a sparse device's
    // pages, and 64 stripes keep unrelated requests from contending in practice.
    private const int StripeCount = 64;

    private readonly byte[]?[] _pages;
    private readonly Lock[] _stripes = new Lock[StripeCount];
    private volatile bool _disposed;

    public MemoryBackend(long size, bool readOnly = false)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        long pageCount = (size + PageSize - 1) >> PageShift;
        ArgumentOutOfRangeException.ThrowIfGreaterThan(pageCount, Array.MaxLength, nameof(size));

        Size = size;
        IsReadOnly = readOnly;
        _pages = new byte[pageCount][];
        for (int i = 0; i < _stripes.Length; i++)
        {
            _stripes[i] = new Lock();
        }
    }

    public long Size { get; }

    public bool IsReadOnly { get; }

    // No Flush or Cache: nothing here is ever durable, and there is nothing slower to prefetch from.
    public BlockCapabilities Capabilities => IsReadOnly
        ? BlockCapabilities.None
        : BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero;

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        try
        {
            ThrowIfDisposed();
            DeviceBounds.Check(offset, destination.Length, Size, BlockErrorKind.InvalidArgument);
            Read(offset, destination.Span);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(e);
        }
    }

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        try
        {
            ThrowIfNotWritable();
            DeviceBounds.Check(offset, source.Length, Size, BlockErrorKind.NoSpace);
            Write(offset, source.Span);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(e);
        }
    }

    public ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        return _disposed ? ValueTask.FromException(DeviceBounds.Shutdown()) : ValueTask.CompletedTask;
    }

    public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        try
        {
            ThrowIfNotWritable();
            DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
            Clear(offset, length, provision: false);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(e);
        }
    }

    public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        try
        {
            ThrowIfNotWritable();
            DeviceBounds.Check(offset, length, Size, BlockErrorKind.NoSpace);
            Clear(offset, length, provision: (flags & ZeroFlags.NoHole) != 0);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(e);
        }
    }

    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        try
        {
            ThrowIfDisposed();
            DeviceBounds.Check(offset, length, Size, BlockErrorKind.InvalidArgument);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(e);
        }
    }

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled<int>(cancellationToken);
        }

        try
        {
            ThrowIfDisposed();
            DeviceBounds.CheckQuery(offset, length, Size, extents.Length);

            return ValueTask.FromResult(GetAllocation(offset, length, extents.Span));
        }
        catch (Exception e)
        {
            return ValueTask.FromException<int>(e);
        }
    }

    public void Dispose()
    {
        _disposed = true;
        // Pages are left to the GC: a request racing with Dispose may still be copying from one.
    }

    /// <summary>Memory never blocks: the fast path always succeeds while the device is usable.</summary>
    public bool TryReadNoWait(long offset, Span<byte> destination)
    {
        if (_disposed || offset < 0 || destination.Length > Size - offset)
        {
            return false;
        }
        Read(offset, destination);
        return true;
    }

    public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source)
    {
        if (_disposed || IsReadOnly || offset < 0 || source.Length > Size - offset)
        {
            return false;
        }
        Write(offset, source);
        return true;
    }

    private void Read(long offset, Span<byte> destination)
    {
        while (!destination.IsEmpty)
        {
            int index = (int)(offset >> PageShift);
            int start = (int)(offset & (PageSize - 1));
            int count = Math.Min(PageSize - start, destination.Length);
            lock (StripeOf(index))
            {
                byte[]? page = _pages[index];
                if (page is null)
                {
                    destination[..count].Clear();
                }
                else
                {
                    page.AsSpan(start, count).CopyTo(destination);
                }
            }

            offset += count;
            destination = destination[count..];
        }
    }

    private void Write(long offset, ReadOnlySpan<byte> source)
    {
        while (!source.IsEmpty)
        {
            int index = (int)(offset >> PageShift);
            int start = (int)(offset & (PageSize - 1));
            int count = Math.Min(PageSize - start, source.Length);
            lock (StripeOf(index))
            {
                source[..count].CopyTo((_pages[index] ??= new byte[PageSize]).AsSpan(start));
            }

            offset += count;
            source = source[count..];
        }
    }

    /// <summary>
    /// Zeros a range. Whole pages are dropped back to holes unless <paramref name="provision"/>
    /// (NO_HOLE: the client wants the range to stay allocated, so later writes cannot run out of space).
    /// </summary>
    private void Clear(long offset, long length, bool provision)
    {
        while (length > 0)
        {
            int index = (int)(offset >> PageShift);
            int start = (int)(offset & (PageSize - 1));
            int count = (int)Math.Min(PageSize - start, length);
            // The device's last page may be short; covering all of it still counts as the whole page.
            bool wholePage = start == 0 && (count == PageSize || offset + count == Size);
            lock (StripeOf(index))
            {
                byte[]? page = _pages[index];
                if (provision)
                {
                    if (page is null)
                    {
                        _pages[index] = new byte[PageSize];
                    }
                    else
                    {
                        page.AsSpan(start, count).Clear();
                    }
                }
                else if (wholePage)
                {
                    _pages[index] = null;
                }
                else if (page is not null)
                {
                    page.AsSpan(start, count).Clear();
                }
            }

            offset += count;
            length -= count;
        }
    }

    private int GetAllocation(long offset, long length, Span<Extent> extents)
    {
        var writer = new ExtentWriter(extents);
        long end = offset + length;
        while (offset < end)
        {
            int index = (int)(offset >> PageShift);
            long next = Math.Min(((long)index + 1) << PageShift, end);
            // No lock: allocation is a snapshot that any concurrent request may change anyway.
            ExtentFlags flags = Volatile.Read(ref _pages[index]) is null ? ExtentFlags.Hole | ExtentFlags.Zero : ExtentFlags.Data;
            if (!writer.TryAdd(next - offset, flags))
            {
                break;
            }

            offset = next;
        }

        return writer.Count;
    }

    private Lock StripeOf(int pageIndex) => _stripes[pageIndex & (StripeCount - 1)];

    private void ThrowIfDisposed() => DeviceBounds.ThrowIfClosed(_disposed);

    private void ThrowIfNotWritable() => DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
}
