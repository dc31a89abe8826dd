namespace Gateway.Backends;

/// <summary>The range checks every backend applies before touching its storage.</summary>
internal static class DeviceBounds
{
    /// <summary>
    /// Refuses a range that is malformed (<see cref="BlockErrorKind.InvalidArgument"/>) or runs past
    /// the end of the device (<paramref name="pastEnd"/>: NoSpace for writes, InvalidArgument otherwise,
    /// as the NBD spec asks). Written to avoid overflowing <c>offset + length</c>.
    /// </summary>
    public static void Check(long offset, long length, long size, BlockErrorKind pastEnd)
    {
        if (offset < 0 || length < 0)
        {
            throw new BlockDeviceException(BlockErrorKind.InvalidArgument, $"Negative offset {offset} or length {length}.");
        }

        if (offset > size || length > size - offset)
        {
            throw new BlockDeviceException(pastEnd, $"Range at {offset} of {length} bytes runs past the end of the device ({size} bytes).");
        }
    }

    /// <summary>An allocation or depth query: in bounds, with room for at least one extent.</summary>
    public static void CheckQuery(long offset, long length, long size, int room)
    {
        Check(offset, length, size, BlockErrorKind.InvalidArgument);
        if (length > 0 && room == 0)
        {
            throw new BlockDeviceException(BlockErrorKind.InvalidArgument, "No room for even one extent.");
        }
    }

    /// <summary>Every backend's guard: a closed device refuses everything.</summary>
    public static void ThrowIfClosed(bool disposed)
    {
        if (disposed)
        {
            throw Shutdown();
        }
    }

    /// <summary>Every backend's guard for changes: closed, then read-only.</summary>
    public static void ThrowIfNotWritable(bool disposed, bool readOnly)
    {
        ThrowIfClosed(disposed);
        if (readOnly)
        {
            throw ReadOnly();
        }
    }

    public static BlockDeviceException ReadOnly() => new(BlockErrorKind.ReadOnly, "The device is read-only.");

    public static BlockDeviceException Shutdown(Exception? inner = null) => new(BlockErrorKind.Shutdown, "The device has been closed.", inner);
}

/// <summary>Appends extents to a caller's buffer, merging neighbours with the same flags.</summary>
internal ref struct ExtentWriter(Span<Extent> extents)
{
    private readonly Span<Extent> _extents = extents;

    public int Count { get; private set; }

    /// <summary>Returns false when the buffer is full and the extent could not be merged into the last one.</summary>
    public bool TryAdd(long length, ExtentFlags flags)
    {
        if (Count > 0 && _extents[Count - 1].Flags == flags)
        {
            _extents[Count - 1] = new Extent(_extents[Count - 1].Length + length, flags);
            return true;
        }

        if (Count == _extents.Length)
        {
            return false;
        }

        _extents[Count++] = new Extent(length, flags);
        return true;
    }
}
