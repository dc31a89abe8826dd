using System.Net;
using System.Net.Http.Json;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>
/// A real guest (libguestfs: QEMU, a Debian kernel, software emulation) on an overlay export whose
/// base is a qcow2 golden image, as a user has one: an ext4 filesystem made in a raw file, then
/// <c>qemu-img convert -c -O qcow2</c> (compressed clusters) and a qcow2 layer of changes on top
/// made by qemu-io. The guest checks and reads the golden files through the gateway, writes its
/// own; a fresh read-only guest finds the filesystem clean with both; the qcow2 files are unchanged.
/// </summary>
public sealed class Qcow2VmTests
{
    private const long MiB = 1 << 20;
    private const long DiskSize = 256 * MiB;

    [Fact]
    public async Task Vm_uses_an_overlay_over_a_compressed_qcow2_golden_image_and_a_fresh_guest_checks_it_clean()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        string folder = Path.Combine(gateway.DataDirectory, "images");
        Directory.CreateDirectory(folder);
        string raw = Path.Combine(folder, "golden.raw");
        string compressed = Path.Combine(folder, "golden-base.qcow2");
        string golden = Path.Combine(folder, "golden.qcow2");
        (string goldenPayload, string goldenSha) = Guestfish.MakePayload(gateway, "golden.bin", 4 * MiB, seed: 20);
        (string ownPayload, string ownSha) = Guestfish.MakePayload(gateway, "own.bin", 4 * MiB, seed: 21);

        // The golden image: ext4 with files, made by a guest on a local raw file, then compressed
        // into qcow2 and given a qcow2 top (a chain of two), as images come from other tools.
        await gateway.RunAsync("qemu-img", ["create", "-f", "raw", raw, DiskSize.ToString()]);
        await Guestfish.RunAsync(gateway, [raw], $"""
            run
            mkfs ext4 /dev/sda
            mount /dev/sda /
            mkdir /golden
            write /golden/motd.txt "golden motd"
            upload "{goldenPayload}" /golden/base.bin
            sync
            umount-all
            """);
        await gateway.RunAsync("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", raw, compressed]);
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-b", "golden-base.qcow2", "-F", "qcow2", golden]);
        File.Delete(raw);
        string[] goldenShas = [Tool.Sha256(compressed), Tool.Sha256(golden)];

        using (HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports",
            new { name = "vm", size = DiskSize, backend = new { type = "overlay", baseImage = golden, baseFormat = "qcow2" } }))
        {
            Assert.True(response.StatusCode == HttpStatusCode.Created, $"creating the export answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}");
        }

        // The guest: checks the golden filesystem as the gateway reads it, reads it, writes its own files.
        ToolResult use = await Guestfish.RunAsync(gateway, [gateway.NbdUri("vm")], $"""
            run
            {Guestfish.Fsck(0)}
            mount /dev/sda /
            echo @motd
            cat /golden/motd.txt
            echo @base
            checksum sha256 /golden/base.bin
            mkdir /vm
            write /vm/own.txt "written by the guest"
            upload "{ownPayload}" /vm/own.bin
            write /golden/motd.txt "motd changed by the guest"
            sync
            umount-all
            """);
        Dictionary<string, List<string>> used = Guestfish.Sections(use.Stdout);
        Assert.Equal(["golden motd"], used["motd"]);
        Assert.Equal([goldenSha], used["base"]);

        // A fresh guest, read-only: clean, with the golden and the guest's files.
        ToolResult check = await Guestfish.RunAsync(gateway, [gateway.NbdUri("vm")], $"""
            run
            {Guestfish.Fsck(0)}
            mount-ro /dev/sda /
            echo @own
            cat /vm/own.txt
            echo @own-bin
            checksum sha256 /vm/own.bin
            echo @motd
            cat /golden/motd.txt
            echo @base
            checksum sha256 /golden/base.bin
            """, readOnly: true);
        Dictionary<string, List<string>> seen = Guestfish.Sections(check.Stdout);
        Assert.Equal(["written by the guest"], seen["own"]);
        Assert.Equal([ownSha], seen["own-bin"]);
        Assert.Equal(["motd changed by the guest"], seen["motd"]);
        Assert.Equal([goldenSha], seen["base"]);

        // The golden files are read-only to the gateway: byte for byte as made, and qemu finds them consistent.
        Assert.Equal(goldenShas, new[] { Tool.Sha256(compressed), Tool.Sha256(golden) });
        await gateway.RunAsync("qemu-img", ["check", golden]);
        await gateway.StopAsync();
    }
}
