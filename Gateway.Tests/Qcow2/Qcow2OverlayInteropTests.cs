using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>
/// Overlay exports whose base is a qcow2 image with its own backing chain, through the real
/// gateway: nbdcopy reads what <c>qemu-img convert -O raw</c> gives, and <c>qemu:allocation-depth</c>
/// and <c>base:allocation</c> (nbdinfo) equal what qemu-nbd serves for the same chain under an
/// empty qcow2 top (the overlay's own empty top layer).
/// </summary>
public sealed class Qcow2OverlayInteropTests
{
    private const long MiB = 1 << 20;

    [Fact]
    public async Task An_overlay_over_a_qcow2_chain_reads_and_maps_as_qemu_serves_the_chain()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        string golden = Path.Combine(gateway.DataDirectory, "golden");
        Directory.CreateDirectory(golden);
        string baseRaw = Path.Combine(golden, "base.raw");
        string mid = Path.Combine(golden, "mid.qcow2");
        string top = Path.Combine(golden, "golden.qcow2");
        await gateway.RunAsync("qemu-img", ["create", "-f", "raw", baseRaw, "6M"]);
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 6M", baseRaw]);
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw", mid, "8M"]);
        await gateway.RunAsync("qemu-io", ["-c", "write -P 0x22 1M 1M", "-c", "write -z 2560k 8k", "-c", "write -P 0x23 7M 64k", mid]);
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-o", "extended_l2=on", "-b", mid, "-F", "qcow2", top, "8M"]);
        await gateway.RunAsync("qemu-io", ["-c", "write -P 0x33 1536k 64k", "-c", "write -P 0x34 3M 6k", "-c", "discard 4M 64k", "-c", "write -z 5M 128k", top]);

        await gateway.CreateExportAsync(new { name = "vm", size = 8 * MiB, backend = new { type = "overlay", baseImage = top } });

        string expected = Path.Combine(gateway.DataDirectory, "expected.raw");
        string copy = Path.Combine(gateway.DataDirectory, "copy.raw");
        await gateway.RunAsync("qemu-img", ["convert", "-O", "raw", top, expected]);
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri("vm"), copy]);
        Assert.True(Tool.Sha256(expected) == Tool.Sha256(copy), "the overlay over the qcow2 chain, read with nbdcopy, differs from qemu-img convert");

        // qemu-nbd serving the same chain under an empty qcow2 top: the overlay's empty top layer is depth 1 in both.
        string reference = Path.Combine(gateway.DataDirectory, "reference.qcow2");
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-b", top, "-F", "qcow2", reference, "8M"]);
        foreach (string context in new[] { "qemu:allocation-depth", "base:allocation" })
        {
            List<(long, long, uint)> ours = await gateway.MapRunsAsync(context, [gateway.NbdUri("vm")]);
            List<(long, long, uint)> qemu = await gateway.MapRunsAsync(context, ["--", "[", Tool.Locate("qemu-nbd"), "-r", "-A", "-f", "qcow2", reference, "]"]);
            Assert.True(qemu.SequenceEqual(ours), $"{context}: the gateway serves\n{string.Join("\n", ours)}\nqemu-nbd serves\n{string.Join("\n", qemu)}");
        }
        Assert.Contains((7 * MiB, 64 * 1024L, 3u), await gateway.MapRunsAsync("qemu:allocation-depth", [gateway.NbdUri("vm")]));

        // Writes land in the overlay's top; a second export on the same base still sees the base.
        await gateway.CreateExportAsync(new { name = "vm2", size = 8 * MiB, backend = new { type = "overlay", baseImage = top } });
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x55 1M 4k", gateway.NbdUri("vm")]);
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x55 1M 4k", "-c", "read -P 0x22 1028k 4k", gateway.NbdUri("vm")]);
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x22 1M 4k", "-c", "read -P 0x33 1536k 64k", "-c", "read -P 0x11 0 1M", gateway.NbdUri("vm2")]);
    }

    [Fact]
    public async Task A_qcow2_base_the_reader_refuses_is_refused_at_creation()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        string dirty = Path.Combine(gateway.DataDirectory, "dirty.qcow2");
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", dirty, "8M"]);
        await using (FileStream file = File.Open(dirty, FileMode.Open, FileAccess.ReadWrite))
        {
            file.Position = 79; // incompatible_features, big-endian: bit 0 (dirty) is the last byte's
            file.WriteByte(1);
        }
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports",
            new { name = "on-dirty", size = 8 * MiB, backend = new { type = "overlay", baseImage = dirty } });
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.BadRequest, $"a dirty qcow2 base answered {(int)response.StatusCode}: {body}");
        Assert.Contains("dirty", body);
        Assert.Contains(dirty, body);
    }
}
