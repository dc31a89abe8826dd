using System.Runtime.InteropServices;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Backends;

/// <summary>Runs the contract against sparse files under the temp directory, plus what only a file can show.</summary>
public sealed partial class FileBackendTests : BlockDeviceContract, IDisposable
{
    private readonly string _directory = Directory.CreateTempSubdirectory("gateway-backend-").FullName;
    private int _files;

    protected override bool HasNonBlockingIo => true;

    protected override IBlockDevice CreateDevice(long size, bool readOnly = false)
    {
        string path = NewPath();
        FileBackend device = FileBackend.Create(path, size);
        if (!readOnly)
        {
            return device;
        }

        device.Dispose();
        return FileBackend.Open(path, readOnly: true);
    }

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    [Fact]
    public void Create_makes_a_sparse_file_of_the_requested_size()
    {
        string path = NewPath();

        using FileBackend device = FileBackend.Create(path, 64 * MiB);

        Assert.Equal(64 * MiB, new FileInfo(path).Length);
        Assert.Equal(0, AllocatedOnDisk(path));
        Assert.Equal(BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero | BlockCapabilities.Cache | BlockCapabilities.Flush, device.Capabilities);
    }

    [Fact]
    public void Create_refuses_an_existing_file()
    {
        string path = NewPath();
        File.WriteAllBytes(path, [1, 2, 3]);

        Assert.Throws<IOException>(() => FileBackend.Create(path, MiB));

        Assert.Equal([1, 2, 3], File.ReadAllBytes(path));
    }

    [Fact]
    public void Open_read_only_offers_only_cache_and_flush()
    {
        string path = NewPath();
        File.WriteAllBytes(path, new byte[12_345]);

        using FileBackend device = FileBackend.Open(path, readOnly: true);

        Assert.Equal(12_345, device.Size);
        Assert.Equal(BlockCapabilities.Cache | BlockCapabilities.Flush, device.Capabilities);
    }

    [Fact]
    public async Task Flushed_writes_are_in_the_file_when_reopened()
    {
        string path = NewPath();
        byte[] data = Pattern(300_000, seed: 1);
        using (FileBackend device = FileBackend.Create(path, 4 * MiB))
        {
            await device.WriteAsync(MiB + 3, data, fua: false);
            await device.FlushAsync();
        }

        using FileBackend reopened = FileBackend.Open(path, readOnly: true);

        Assert.Equal(4 * MiB, reopened.Size);
        Assert.Equal(data, await ReadAsync(reopened, MiB + 3, data.Length));
        Assert.Equal(data, File.ReadAllBytes(path).AsSpan(MiB + 3, data.Length).ToArray());
    }

    [Fact]
    public async Task Zero_with_NoHole_keeps_the_range_allocated_on_disk()
    {
        string path = NewPath();
        using FileBackend device = FileBackend.Create(path, 16 * MiB);

        await device.ZeroAsync(4 * MiB, MiB, ZeroFlags.NoHole);

        // Allocated, though possibly as unwritten extents, which SEEK_DATA reports as holes on
        // ext4 and XFS; so the blocks on disk tell, not GetAllocation.
        Assert.True(AllocatedOnDisk(path) >= MiB, $"{AllocatedOnDisk(path)} bytes allocated");
        AssertZeros(await ReadAsync(device, 4 * MiB, MiB));
    }

    [Fact]
    public async Task Zero_without_NoHole_punches_a_hole()
    {
        string path = NewPath();
        using FileBackend device = FileBackend.Create(path, 16 * MiB);
        await device.WriteAsync(4 * MiB, Pattern(2 * MiB, seed: 2), fua: true);
        long before = AllocatedOnDisk(path);

        await device.ZeroAsync(4 * MiB, MiB, ZeroFlags.None);

        Assert.Equal(before - MiB, AllocatedOnDisk(path));
        Assert.Equal([new Extent(5 * MiB, ExtentFlags.Hole | ExtentFlags.Zero), new Extent(MiB, ExtentFlags.Data), new Extent(10 * MiB, ExtentFlags.Hole | ExtentFlags.Zero)],
            await AllocationAsync(device, 0, device.Size));
    }

    [Fact]
    public async Task Device_of_a_shortened_file_reads_zeros_past_its_end()
    {
        string path = NewPath();
        using FileBackend device = FileBackend.Create(path, 2 * MiB);
        await device.WriteAsync(0, Pattern(2 * MiB, seed: 3), fua: false);

        using (var file = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
        {
            RandomAccess.SetLength(file, MiB);
        }

        AssertZeros(await ReadAsync(device, MiB, MiB));
        Assert.Equal([new Extent(MiB, ExtentFlags.Data), new Extent(MiB, ExtentFlags.Hole | ExtentFlags.Zero)], await AllocationAsync(device, 0, device.Size));
    }

    private string NewPath() => Path.Combine(_directory, $"disk{Interlocked.Increment(ref _files)}.img");

    /// <summary>Bytes the filesystem has allocated to the file (st_blocks × 512).</summary>
    private static unsafe long AllocatedOnDisk(string path)
    {
        // struct stat on Linux x86-64 is 144 bytes with st_blocks at offset 64.
        byte* buffer = stackalloc byte[144];
        Assert.Equal(0, Stat(path, buffer));
        return *(long*)(buffer + 64) * 512;
    }

    [LibraryImport("libc", EntryPoint = "stat", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static unsafe partial int Stat(string path, byte* buffer);
}
