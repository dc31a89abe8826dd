using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Gateway.Backends;

/// <summary>
/// A sparse raw file (Linux). Data moves with synchronous pread/pwrite: callers run requests on
/// thread-pool work items already, and the kernel's page cache answers most reads without blocking,
/// so an async hop would only add cost. Holes are punched and found with fallocate and SEEK_DATA/SEEK_HOLE.
/// </summary>
public sealed partial class FileBackend : IBlockDevice, INonBlockingIo, IGrowableDevice, IFileRegions
{
    private static readonly ReadOnlyMemory<byte> s_zeros = new byte[1 << 20];

    private readonly SafeFileHandle _handle;
    private volatile bool _disposed;
    private long _size;

    private FileBackend(SafeFileHandle handle, long size, bool readOnly)
    {
        _handle = handle;
        _size = size;
        IsReadOnly = readOnly;
        _send = new SendStream((int)handle.DangerousGetHandle());
    }

    /// <summary>Opens an existing file; the device has the file's current length.</summary>
    public static FileBackend Open(string path, bool readOnly)
    {
        SafeFileHandle handle = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite, FileShare.Read);
        try
        {
            return new FileBackend(handle, RandomAccess.GetLength(handle), readOnly);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Creates a new sparse file of <paramref name="size"/> bytes; fails if the file exists.</summary>
    public static FileBackend Create(string path, long size)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        SafeFileHandle handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.Read);
        try
        {
            RandomAccess.SetLength(handle, size);
            return new FileBackend(handle, size, readOnly: false);
        }
        catch
        {
            handle.Dispose();
            File.Delete(path);
            throw;
        }
    }

    /// <summary>The device's size: the file's length when it was opened, or what <see cref="GrowAsync"/> made it since.</summary>
    public long Size => Volatile.Read(ref _size);

    public bool IsReadOnly { get; }

    /// <summary>
    /// Extends the file to <paramref name="size"/> bytes (a hole: it reads as zeros) and syncs the
    /// new length (fdatasync covers a size change) before the device shows it. A file already that
    /// long keeps its bytes.
    /// </summary>
    public ValueTask GrowAsync(long size, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }
        try
        {
            DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);
            if (size <= Size)
            {
                return ValueTask.CompletedTask;
            }
            if (RandomAccess.GetLength(_handle) < size)
            {
                RandomAccess.SetLength(_handle, size);
            }
            DataSync();
            Volatile.Write(ref _size, size);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(Translate(e));
        }
    }

    public BlockCapabilities Capabilities => IsReadOnly
        ? BlockCapabilities.Cache | BlockCapabilities.Flush
        : BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero | BlockCapabilities.Cache | BlockCapabilities.Flush;

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
            return ValueTask.FromException(Translate(e));
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
            RandomAccess.Write(_handle, source.Span, offset);
            if (fua)
            {
                DataSync();
            }

            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(Translate(e));
        }
    }

    public ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        try
        {
            ThrowIfDisposed();
            DataSync();
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(Translate(e));
        }
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
            if (length > 0)
            {
                int errno = Fallocate(Libc.FALLOC_FL_KEEP_SIZE | Libc.FALLOC_FL_PUNCH_HOLE, offset, length);
                // A trim must never expose old data, so a filesystem that cannot punch gets zeros written.
                if (IsUnsupported(errno))
                {
                    WriteZeros(offset, length);
                }
                else
                {
                    ThrowOnError(errno, "fallocate(PUNCH_HOLE)");
                }
            }

            if (fua)
            {
                DataSync();
            }

            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(Translate(e));
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
            if (length > 0)
            {
                Zero(offset, length, flags);
            }

            if ((flags & ZeroFlags.Fua) != 0)
            {
                DataSync();
            }

            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(Translate(e));
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
            // Length 0 would mean "to the end of the file" to posix_fadvise.
            if (length > 0)
            {
                using var lease = new FdLease(_handle);
                // posix_fadvise returns the error number instead of setting errno.
                ThrowOnError(Libc.posix_fadvise(lease.Fd, offset, length, Libc.POSIX_FADV_WILLNEED), "posix_fadvise");
            }

            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(Translate(e));
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
            return ValueTask.FromException<int>(Translate(e));
        }
    }

    public void Dispose()
    {
        _disposed = true;
        // Requests in flight hold a reference on the handle, so the fd closes only after they finish;
        // reads still to be sent from the file hold the send stream alike.
        _send.Close();
        _handle.Dispose();
    }

    private void Read(long offset, Span<byte> destination)
    {
        while (!destination.IsEmpty)
        {
            int read = RandomAccess.Read(_handle, destination, offset);
            if (read == 0)
            {
                // Past the end of a file someone shortened: a sparse device reads as zeros there.
                destination.Clear();
                return;
            }

            offset += read;
            destination = destination[read..];
        }
    }

    private void Zero(long offset, long length, ZeroFlags flags)
    {
        int errno;
        if ((flags & ZeroFlags.NoHole) != 0)
        {
            errno = Fallocate(Libc.FALLOC_FL_KEEP_SIZE | Libc.FALLOC_FL_ZERO_RANGE, offset, length);
            if (IsUnsupported(errno))
            {
                // tmpfs and others lack ZERO_RANGE; punching then allocating still provisions
                // the range without moving any data.
                errno = Fallocate(Libc.FALLOC_FL_KEEP_SIZE | Libc.FALLOC_FL_PUNCH_HOLE, offset, length);
                if (errno == 0)
                {
                    errno = Fallocate(Libc.FALLOC_FL_KEEP_SIZE, offset, length);
                }
            }
        }
        else
        {
            errno = Fallocate(Libc.FALLOC_FL_KEEP_SIZE | Libc.FALLOC_FL_PUNCH_HOLE, offset, length);
        }

        if (!IsUnsupported(errno))
        {
            ThrowOnError(errno, "fallocate");
            return;
        }

        // NBD FAST_ZERO: the client would rather write zeros itself than wait for us to.
        if ((flags & ZeroFlags.FastZero) != 0)
        {
            throw new BlockDeviceException(BlockErrorKind.NotSupported, "The filesystem cannot zero this range without writing it.");
        }

        WriteZeros(offset, length);
    }

    private void WriteZeros(long offset, long length)
    {
        while (length > 0)
        {
            int count = (int)Math.Min(length, s_zeros.Length);
            RandomAccess.Write(_handle, s_zeros.Span[..count], offset);
            offset += count;
            length -= count;
        }
    }

    private int GetAllocation(long offset, long length, Span<Extent> extents)
    {
        var writer = new ExtentWriter(extents);
        long end = offset + length;
        using var lease = new FdLease(_handle);
        while (offset < end)
        {
            // Asking for the next hole first makes the common all-data range a single call.
            long next = Seek(lease.Fd, offset, Libc.SEEK_HOLE);
            ExtentFlags flags = ExtentFlags.Data;
            if (next == offset)
            {
                next = Seek(lease.Fd, offset, Libc.SEEK_DATA);
                flags = ExtentFlags.Hole | ExtentFlags.Zero;
                if (next == offset)
                {
                    // A write landed between the two calls; look again.
                    continue;
                }
            }

            next = Math.Min(next, end);
            if (!writer.TryAdd(next - offset, flags))
            {
                break;
            }

            offset = next;
        }

        return writer.Count;
    }

    private static long Seek(int fd, long offset, int whence)
    {
        long result = Libc.lseek(fd, offset, whence);
        if (result >= 0)
        {
            return result;
        }

        int errno = Marshal.GetLastPInvokeError();
        if (errno == Libc.ENXIO)
        {
            // No data at or after offset (or offset is past a shortened file's end): the rest is a hole.
            return whence == Libc.SEEK_HOLE ? offset : long.MaxValue;
        }

        throw Error(errno, "lseek");
    }

    private int Fallocate(int mode, long offset, long length)
    {
        using var lease = new FdLease(_handle);
        while (Libc.fallocate(lease.Fd, mode, offset, length) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            if (errno != Libc.EINTR)
            {
                return errno;
            }
        }

        return 0;
    }

    private void DataSync()
    {
        using var lease = new FdLease(_handle);
        while (Libc.fdatasync(lease.Fd) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            if (errno != Libc.EINTR)
            {
                throw Error(errno, "fdatasync");
            }
        }
    }

    private static bool IsUnsupported(int errno) => errno is Libc.EOPNOTSUPP or Libc.ENOSYS;

    private static void ThrowOnError(int errno, string call)
    {
        if (errno != 0)
        {
            throw Error(errno, call);
        }
    }

    private static BlockDeviceException Error(int errno, string call) => new(
        errno == Libc.ENOSPC ? BlockErrorKind.NoSpace : BlockErrorKind.Io,
        $"{call} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno}).");

    /// <summary>Maps what the runtime throws onto the kinds the server answers with.</summary>
    private static Exception Translate(Exception e) => e switch
    {
        BlockDeviceException or OperationCanceledException => e,
        ObjectDisposedException => DeviceBounds.Shutdown(e),
        // The runtime keeps the raw errno in HResult for errors it has no specific exception for.
        IOException { HResult: Libc.ENOSPC } => new BlockDeviceException(BlockErrorKind.NoSpace, e.Message, e),
        IOException or UnauthorizedAccessException => new BlockDeviceException(BlockErrorKind.Io, e.Message, e),
        _ => e,
    };

    private void ThrowIfDisposed() => DeviceBounds.ThrowIfClosed(_disposed);

    private void ThrowIfNotWritable() => DeviceBounds.ThrowIfNotWritable(_disposed, IsReadOnly);

    /// <summary>
    /// Holds a reference on the handle while its raw fd is in use, so a concurrent Dispose cannot
    /// close the fd (and the number be reused for another file) under a native call.
    /// </summary>
    /// <summary>
    /// A read served from the page cache on the caller's thread: <c>preadv2(RWF_NOWAIT)</c> fails
    /// instead of waiting for the disk, and then the caller takes the blocking path.
    /// </summary>
    public bool TryReadNoWait(long offset, Span<byte> destination) =>
        !_disposed && offset >= 0 && destination.Length <= Size - offset && TryPreadNoWait(_handle, destination, offset);

    /// <summary>A whole read of another read-only file from the page cache (<c>preadv2(RWF_NOWAIT)</c>), or false.</summary>
    internal static unsafe bool TryPreadNoWait(SafeFileHandle handle, Span<byte> destination, long offset)
    {
        try
        {
            using var lease = new FdLease(handle);
            fixed (byte* p = destination)
            {
                var iov = new Libc.Iovec { Base = p, Length = (nuint)destination.Length };
                return Libc.preadv2(lease.Fd, &iov, 1, offset, Libc.RWF_NOWAIT) == destination.Length;
            }
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
    }

    /// <summary>
    /// A write into the page cache on the caller's thread when it needs no waiting
    /// (<c>pwritev2(RWF_NOWAIT)</c>); false sends the caller down the blocking path. Filesystems
    /// that refuse the flag for buffered writes are not asked again.
    /// </summary>
    public unsafe bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source)
    {
        if (IsReadOnly || _disposed || offset < 0 || source.Length > Size - offset)
        {
            return false;
        }
        try
        {
            using var lease = new FdLease(_handle);
            fixed (byte* p = source)
            {
                var iov = new Libc.Iovec { Base = p, Length = (nuint)source.Length };
                if (_nowaitWritesUnsupported)
                {
                    // ext4 refuses RWF_NOWAIT for buffered writes. A small buffered write waits only
                    // under dirty-page throttling, when the node is bound by writeback anyway;
                    // serving it here saves a thread-pool hop per write.
                    return source.Length <= InlineWriteLimit && Libc.pwritev2(lease.Fd, &iov, 1, offset, 0) == source.Length;
                }
                nint written = Libc.pwritev2(lease.Fd, &iov, 1, offset, Libc.RWF_NOWAIT);
                if (written < 0 && Marshal.GetLastPInvokeError() is Libc.EOPNOTSUPP or Libc.ENOSYS)
                {
                    _nowaitWritesUnsupported = true;
                }
                return written == source.Length;
            }
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
    }

    private volatile bool _nowaitWritesUnsupported;

    /// <summary>
    /// The file behind a device range, for <c>sendfile(2)</c>, when <c>cachestat(2)</c> (Linux 6.5)
    /// finds every page of it in the page cache. A read of pages not cached would wait for the disk
    /// inside sendfile, on the connection's one writer, where <c>pread</c> on the pool reads many
    /// at once; a file shorter than the device has no cached pages past its end, so that case
    /// reads (zeros) through <c>pread</c> too. On older kernels cachestat is ENOSYS: never asked again.
    /// </summary>
    public bool TryGetFileRegion(long offset, int length, out FileRegion region)
    {
        region = default;
        if (s_cachestatUnsupported || _disposed || offset < 0 || length <= 0 || length > Size - offset)
        {
            return false;
        }
        try
        {
            using var lease = new FdLease(_handle);
            if (!AllCached(lease.Fd, offset, length))
            {
                return false;
            }
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
        if (_send.TryHold() is not FileStream stream)
        {
            return false;
        }
        region = new FileRegion(stream, offset, _send);
        return true;
    }

    private static volatile bool s_cachestatUnsupported;

    /// <summary>Writes the file's dirty pages back and drops all its pages from the page cache (tests: the cold path).</summary>
    internal void DropCachedPages()
    {
        using var lease = new FdLease(_handle);
        ThrowOnError(Libc.fdatasync(lease.Fd) == 0 ? 0 : Marshal.GetLastPInvokeError(), "fdatasync");
        ThrowOnError(Libc.posix_fadvise(lease.Fd, 0, 0, Libc.POSIX_FADV_DONTNEED), "posix_fadvise");
    }

    private static unsafe bool AllCached(int fd, long offset, int length)
    {
        long page = Environment.SystemPageSize;
        long first = offset / page;
        long pages = (offset + length + page - 1) / page - first;
        var range = new Libc.CachestatRange { Offset = (ulong)offset, Length = (ulong)length };
        Libc.Cachestat stat;
        if (Libc.syscall(Libc.SYS_cachestat, fd, &range, &stat, 0) != 0)
        {
            if (Marshal.GetLastPInvokeError() is Libc.ENOSYS or Libc.EOPNOTSUPP)
            {
                s_cachestatUnsupported = true;
            }
            return false;
        }
        return (long)stat.Cached >= pages;
    }

    private readonly SendStream _send;

    /// <summary>
    /// The device's read-only stream for the socket layer's <c>sendfile</c>, which takes an
    /// asynchronous <see cref="FileStream"/> and passes the offset explicitly (the stream's position
    /// is never used). Opened on first use through <c>/proc/self/fd</c>, so it is the same file
    /// even if its path was renamed; shared by the regions in flight, and closed when the device
    /// is closed and no region holds it any more (a read sent after a graceful stop drained the
    /// export still finds its file).
    /// </summary>
    private sealed class SendStream(int fd) : IFileRegionHolder
    {
        private readonly Lock _gate = new();
        private FileStream? _stream;
        private int _holders;
        private bool _closed;
        private bool _unavailable;

        public FileStream? TryHold()
        {
            lock (_gate)
            {
                if (_closed || _unavailable)
                {
                    return null;
                }
                if (_stream is null)
                {
                    try
                    {
                        _stream = new FileStream($"/proc/self/fd/{fd}", FileMode.Open, FileAccess.Read, FileShare.ReadWrite, bufferSize: 0, FileOptions.Asynchronous);
                    }
                    catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                    {
                        // No /proc (or no access to it): reads take the pread path.
                        _unavailable = true;
                        return null;
                    }
                }
                _holders++;
                return _stream;
            }
        }

        public void Release()
        {
            FileStream? closing = null;
            lock (_gate)
            {
                if (--_holders == 0 && _closed)
                {
                    (closing, _stream) = (_stream, null);
                }
            }
            closing?.Dispose();
        }

        /// <summary>Called before the device's own handle closes, so <c>fd</c> is still this file while a first open runs.</summary>
        public void Close()
        {
            FileStream? closing = null;
            lock (_gate)
            {
                _closed = true;
                if (_holders == 0)
                {
                    (closing, _stream) = (_stream, null);
                }
            }
            closing?.Dispose();
        }
    }


    /// <summary>Largest write served inline where the filesystem has no non-blocking buffered writes
    /// (ops/bench, 4 KiB random writes QD32: 1.18x the throughput of handing them to the pool). Up
    /// to 1 MiB, as nbdkit writes on the thread that read the request: 1 MiB writes QD8 gained 1.31x
    /// over a 64 KiB limit with a build running beside (ops/bench-ab, 2026-12-07), where each had cost
    /// a pool hop and the workers' spinning around it (half the gateway's CPU samples were the pool's
    /// sched_yield); on the quiet machine the same day, 0.98 (noise): it pays when cores are scarce.</summary>
    private const int InlineWriteLimit = 1024 * 1024;

    private readonly ref struct FdLease
    {
        private readonly SafeFileHandle _handle;

        public FdLease(SafeFileHandle handle)
        {
            bool added = false;
            handle.DangerousAddRef(ref added);
            _handle = handle;
            Fd = (int)handle.DangerousGetHandle();
        }

        public int Fd { get; }

        public void Dispose() => _handle.DangerousRelease();
    }

    private static partial class Libc
    {
        public const int EINTR = 4;
        public const int ENXIO = 6;
        public const int ENOSPC = 28;
        public const int ENOSYS = 38;
        public const int EOPNOTSUPP = 95;

        public const int FALLOC_FL_KEEP_SIZE = 0x01;
        public const int FALLOC_FL_PUNCH_HOLE = 0x02;
        public const int FALLOC_FL_ZERO_RANGE = 0x10;

        public const int SEEK_DATA = 3;
        public const int SEEK_HOLE = 4;

        public const int POSIX_FADV_WILLNEED = 3;
        public const int POSIX_FADV_DONTNEED = 4;

        // Only blittable arguments (off_t is 64-bit on Linux x64), so no marshalling code is generated.
        [LibraryImport("libc", SetLastError = true)]
        public static partial int fallocate(int fd, int mode, long offset, long len);

        [LibraryImport("libc", SetLastError = true)]
        public static partial long lseek(int fd, long offset, int whence);

        [LibraryImport("libc", SetLastError = true)]
        public static partial int fdatasync(int fd);

        [LibraryImport("libc")]
        public static partial int posix_fadvise(int fd, long offset, long len, int advice);

        /// <summary>preadv2/pwritev2 flag: fail with EAGAIN rather than wait (page cache only).</summary>
        public const int RWF_NOWAIT = 0x08;
        public const int EAGAIN = 11;

        [LibraryImport("libc", SetLastError = true)]
        public static unsafe partial nint preadv2(int fd, Iovec* iov, int iovcnt, long offset, int flags);

        [LibraryImport("libc", SetLastError = true)]
        public static unsafe partial nint pwritev2(int fd, Iovec* iov, int iovcnt, long offset, int flags);

        /// <summary>cachestat(2), the same number on x86-64 and arm64 (the generic table).</summary>
        public const long SYS_cachestat = 451;

        [LibraryImport("libc", SetLastError = true)]
        public static unsafe partial long syscall(long number, int fd, CachestatRange* range, Cachestat* stat, uint flags);

        [System.Runtime.InteropServices.StructLayout(System.Runtime.InteropServices.LayoutKind.Sequential)]
        public struct CachestatRange
        {
            public ulong Offset;
            public ulong Length;
        }

        /// <summary>struct cachestat: pages cached, dirty, under writeback, evicted, recently evicted.</summary>
        [System.Runtime.InteropServices.StructLayout(System.Runtime.InteropServices.LayoutKind.Sequential)]
        public struct Cachestat
        {
            public ulong Cached;
            public ulong Dirty;
            public ulong Writeback;
            public ulong Evicted;
            public ulong RecentlyEvicted;
        }

        [System.Runtime.InteropServices.StructLayout(System.Runtime.InteropServices.LayoutKind.Sequential)]
        public unsafe struct Iovec
        {
            public byte* Base;
            public nuint Length;
        }
    }
}
