using Gateway.Backends.Qcow2;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>
/// Runs of data clusters that lie one after another in the data file are mapped, and so read, as
/// one run across L2 tables (an L2 table of 4 KiB clusters covers only 2 MiB): an external raw
/// data file is laid out so, and qemu-img map shows it as one extent.
/// </summary>
public sealed class Qcow2CoalesceTests : IDisposable
{
    private const long MiB = 1 << 20;
    private readonly QemuImages _images = new();

    public void Dispose() => _images.Dispose();

    [Fact]
    public async Task Contiguous_data_clusters_map_as_one_run_across_l2_tables_and_read_as_qemu_reads_them()
    {
        string path = await _images.Qcow2Async("d.qcow2", 8 * MiB, "-o", "cluster_size=4k,data_file=d.data,data_file_raw=on");
        await _images.Io(path, "write -P 0x5a 0 8M", "write -z 6M 4k");

        using (Qcow2Layer layer = OpenLayer(path))
        {
            Assert.Equal(new LayerRun(6 * MiB, RunKind.Data, 0), layer.Map(0, 8 * MiB));
            Assert.Equal(new LayerRun(5 * MiB - 512, RunKind.Data, MiB + 512), layer.Map(MiB + 512, 5 * MiB - 512));
            Assert.Equal(new LayerRun(3 * MiB, RunKind.Data, 3 * MiB), layer.Map(3 * MiB, 3 * MiB));
            Assert.Equal(RunKind.Zero, layer.Map(6 * MiB, 2 * MiB).Kind);
            Assert.Equal(new LayerRun(2 * MiB - 4096, RunKind.Data, 6 * MiB + 4096), layer.Map(6 * MiB + 4096, 2 * MiB - 4096));
        }
        await _images.AssertMatchesQemuAsync("d.qcow2");
    }

    [Fact]
    public async Task Unallocated_l2_tables_in_a_row_map_as_one_run()
    {
        string path = await _images.Qcow2Async("u.qcow2", 16 * MiB, "-o", "cluster_size=4k");
        await _images.Io(path, "write -P 0x11 14M 4k");
        using Qcow2Layer layer = OpenLayer(path);
        Assert.Equal(new LayerRun(14 * MiB, RunKind.Unallocated), layer.Map(0, 16 * MiB));
    }

    private static Qcow2Layer OpenLayer(string path)
    {
        ImageSource file = ImageLocation.Files.Open(path);
        return Qcow2Layer.Open(file, Qcow2Header.Read(file), ImageLocation.Files);
    }
}
