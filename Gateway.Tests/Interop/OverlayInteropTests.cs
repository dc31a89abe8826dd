using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// Overlay chains through the real gateway: qemu-io writes with snapshots between them, depths
/// read back with nbdinfo and qemu-img map, content with nbdcopy against a flat raw reference.
/// </summary>
public sealed class OverlayInteropTests
{
    private const long MiB = 1 << 20;
    private const long KiB = 1 << 10;

    // The writes of the four-layer chain, per layer from the bottom; a snapshot follows each but the last.
    private static readonly string[][] ChainWrites =
    [
        ["write -P 0x11 0 4M"],
        ["write -P 0x22 1M 1M"],
        ["write -P 0x33 2M 512k", "write -z 3M 64k", "discard 3584k 64k"],
        ["write -P 0x44 2400k 4k"], // partial cluster over layer 2's data: a copy-up
    ];

    // (offset, length, depth) of the chain above: 1 = top.
    private static readonly (long Offset, long Length, uint Depth)[] ExpectedDepths =
    [
        (0, 1 * MiB, 4),
        (1 * MiB, 1 * MiB, 3),
        (2 * MiB, 320 * KiB, 2),
        (2368 * KiB, 64 * KiB, 1),
        (2432 * KiB, 128 * KiB, 2),
        (2560 * KiB, 512 * KiB, 4),
        (3 * MiB, 64 * KiB, 2),     // zeroed in layer 2: masks layer 4
        (3136 * KiB, 448 * KiB, 4),
        (3584 * KiB, 64 * KiB, 2),  // trimmed in layer 2: masks layer 4
        (3648 * KiB, 448 * KiB, 4),
        (4 * MiB, 12 * MiB, 0),
    ];

    [Fact]
    public async Task Four_layer_chain_gives_nbdinfo_and_qemu_img_the_expected_depths_and_reads_like_a_flat_image_across_a_restart()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await gateway.CreateExportAsync(new { name = "chain", size = 16 * MiB, backend = new { type = "overlay" } });
        string reference = Path.Combine(gateway.DataDirectory, "reference.raw");
        await using (FileStream file = File.Create(reference))
        {
            file.SetLength(16 * MiB);
        }
        for (int layer = 0; layer < ChainWrites.Length; layer++)
        {
            await QemuIoAsync(gateway, gateway.NbdUri("chain"), ChainWrites[layer]);
            await QemuIoAsync(gateway, reference, ChainWrites[layer]);
            if (layer < ChainWrites.Length - 1)
            {
                await SnapshotAsync(gateway, "chain", viaCli: layer == 0);
            }
        }

        await AssertChainAsync(gateway, reference);
        // Zero and trim mask the 0x11 of layer 4; the copy-up kept layer 2's bytes around the 4 KiB.
        await QemuIoAsync(gateway, gateway.NbdUri("chain"), "read -P 0 3M 64k", "read -P 0 3584k 64k", "read -P 0x33 2368k 32k", "read -P 0x44 2400k 4k", "read -P 0x33 2404k 28k");

        await gateway.StopAsync();
        await gateway.RestartAsync();

        await AssertChainAsync(gateway, reference);
        using JsonDocument show = JsonDocument.Parse(await gateway.Http.GetStringAsync("v1/exports/chain"));
        Assert.Equal(4, show.RootElement.GetProperty("backend").GetProperty("layers").GetArrayLength());
    }

    [Fact]
    public async Task Snapshots_while_a_client_writes_lose_no_write()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await gateway.CreateExportAsync(new { name = "busy", size = 64 * MiB, backend = new { type = "overlay" } });
        const int Writes = 600;
        // One qemu-io connection, each write a distinct pattern at its own 64 KiB slot; partial
        // clusters (60 KiB) so many writes copy up while the top changes under them.
        string[] writes = [.. Enumerable.Range(0, Writes).Select(i => $"write -P {1 + i % 250} {(long)i * 64 * KiB + 2 * KiB} 60k")];
        Task<ToolResult> client = QemuIoAsync(gateway, gateway.NbdUri("busy"), writes);
        int snapshots = 0;
        while (!client.IsCompleted && snapshots < 8)
        {
            await SnapshotAsync(gateway, "busy", viaCli: false);
            snapshots++;
        }
        await client;

        Assert.True(snapshots >= 1, "no snapshot ran while the client was writing");
        await QemuIoAsync(gateway, gateway.NbdUri("busy"),
            [.. Enumerable.Range(0, Writes).SelectMany(i => new[] { $"read -P {1 + i % 250} {(long)i * 64 * KiB + 2 * KiB} 60k", $"read -P 0 {(long)i * 64 * KiB} 2k" })]);
    }

    [Fact]
    public async Task Overlays_on_a_golden_export_share_its_frozen_data_and_write_independently()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await gateway.CreateExportAsync(new { name = "golden", size = 8 * MiB, backend = new { type = "overlay" } });
        await QemuIoAsync(gateway, gateway.NbdUri("golden"), "write -P 0x5a 0 8M");
        await gateway.CreateExportAsync(new { name = "vm1", size = 8 * MiB, backend = new { type = "overlay", @base = "golden" } });
        ToolResult cli = await gateway.CliAsync("export", "add", "vm2", "--size", "8M", "--base", "golden");
        Assert.True(cli.Succeeded, cli.Describe());

        await QemuIoAsync(gateway, gateway.NbdUri("vm1"), "write -P 0x01 1M 4k");
        await QemuIoAsync(gateway, gateway.NbdUri("golden"), "write -P 0x02 2M 4k"); // the golden export goes on, above its frozen layer

        await QemuIoAsync(gateway, gateway.NbdUri("vm1"), "read -P 0x01 1M 4k", "read -P 0x5a 2M 4k", "read -P 0x5a 0 1M");
        await QemuIoAsync(gateway, gateway.NbdUri("vm2"), "read -P 0x5a 1M 4k", "read -P 0x5a 2M 4k");
        await QemuIoAsync(gateway, gateway.NbdUri("golden"), "read -P 0x5a 1M 4k", "read -P 0x02 2M 4k");
        Assert.Equal([(0, 1 * MiB, 2u), (1 * MiB, 64 * KiB, 1u), (1 * MiB + 64 * KiB, 7 * MiB - 64 * KiB, 2u)], await NbdinfoDepthsAsync(gateway, "vm1"));

        // Removing vm1 leaves the shared layer to vm2 and golden.
        ToolResult remove = await gateway.CliAsync("export", "remove", "vm1");
        Assert.True(remove.Succeeded, remove.Describe());
        await QemuIoAsync(gateway, gateway.NbdUri("vm2"), "read -P 0x5a 0 8M");
    }

    private static async Task AssertChainAsync(GatewayProcess gateway, string reference)
    {
        (long, long, uint)[] expected = [.. ExpectedDepths];
        Assert.Equal(expected, await NbdinfoDepthsAsync(gateway, "chain"));
        Assert.Equal(expected, await QemuImgDepthsAsync(gateway, "chain"));
        string copy = Path.Combine(gateway.DataDirectory, $"copy-{Guid.NewGuid():N}.raw");
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri("chain"), copy]);
        Assert.True(Tool.Sha256(reference) == Tool.Sha256(copy), "the chain read with nbdcopy differs from the flat reference image");
        File.Delete(copy);
    }

    /// <summary><c>nbdinfo --map=qemu:allocation-depth</c>: lines of offset, length, depth.</summary>
    private static async Task<(long, long, uint)[]> NbdinfoDepthsAsync(GatewayProcess gateway, string export)
    {
        ToolResult map = await gateway.RunAsync("nbdinfo", ["--map=qemu:allocation-depth", gateway.NbdUri(export)]);
        return [.. map.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Select(f => (long.Parse(f[0]), long.Parse(f[1]), uint.Parse(f[2])))];
    }

    /// <summary>
    /// <c>qemu-img map</c> over the context with x-dirty-bitmap. qemu folds the depth into its
    /// block-status bits, as observed with qemu-img: depth 0 shows as data, depth 1 as not
    /// present, any deeper layer as data + zero; the expected depths are folded the same way.
    /// </summary>
    private static async Task<(long, long, uint)[]> QemuImgDepthsAsync(GatewayProcess gateway, string export)
    {
        ToolResult map = await gateway.RunAsync("qemu-img", ["map", "--output=json", "--image-opts",
            $"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={gateway.NbdPort},export={export},x-dirty-bitmap=qemu:allocation-depth"]);
        using JsonDocument json = JsonDocument.Parse(map.Stdout);
        var actual = new List<(long Offset, long Length, uint Flags)>();
        foreach (JsonElement e in json.RootElement.EnumerateArray())
        {
            uint flags = (e.GetProperty("present").GetBoolean() ? 1u : 0u) | (e.GetProperty("data").GetBoolean() ? 2u : 0u) | (e.GetProperty("zero").GetBoolean() ? 4u : 0u);
            Add(actual, e.GetProperty("start").GetInt64(), e.GetProperty("length").GetInt64(), flags);
        }
        var expected = new List<(long, long, uint)>();
        foreach ((long offset, long length, uint depth) in ExpectedDepths)
        {
            Add(expected, offset, length, depth switch { 0 => 1u | 2u, 1 => 0u, _ => 1u | 2u | 4u });
        }
        Assert.True(expected.SequenceEqual(actual), $"qemu-img map differs from the expected depths {string.Join(", ", expected)}:\n{map.Stdout}");
        return [.. ExpectedDepths]; // equal once the flag views agree

        static void Add(List<(long Offset, long Length, uint Flags)> list, long offset, long length, uint flags)
        {
            if (list.Count > 0 && list[^1].Flags == flags)
            {
                list[^1] = (list[^1].Offset, list[^1].Length + length, flags);
            }
            else
            {
                list.Add((offset, length, flags));
            }
        }
    }

    /// <summary>
    /// A base image in another format than raw or qcow2 is refused at creation, naming the format
    /// and the conversion: served as raw, its header and tables would be the guest's disk. A raw
    /// base next to it is served byte for byte (qcow2 bases: Qcow2OverlayInteropTests).
    /// </summary>
    [Fact]
    public async Task Base_images_neither_raw_nor_qcow2_are_refused_and_a_raw_one_is_served()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        string raw = Path.Combine(gateway.DataDirectory, "golden.raw");
        await gateway.RunAsync("qemu-img", ["create", "-f", "raw", raw, "8M"]);
        await QemuIoAsync(gateway, raw, "write -P 0x6d 1M 64k");
        foreach (string format in new[] { "vmdk", "vdi", "vhdx", "qed", "vpc" })
        {
            string image = Path.Combine(gateway.DataDirectory, "golden." + format);
            await gateway.RunAsync("qemu-img", ["convert", "-f", "raw", "-O", format, raw, image]);

            using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports",
                new { name = "on-" + format, size = 8 * MiB, backend = new { type = "overlay", baseImage = image } });
            string body = await response.Content.ReadAsStringAsync();

            Assert.True(response.StatusCode == HttpStatusCode.BadRequest, $"{format} base image answered {(int)response.StatusCode}: {body}");
            Assert.Contains($"is a {format} image, not raw or qcow2", body);
            Assert.Contains("qemu-img convert -O raw", body);
            using HttpResponseMessage listed = await gateway.Http.GetAsync("v1/exports/on-" + format);
            Assert.Equal(HttpStatusCode.NotFound, listed.StatusCode);
        }

        await gateway.CreateExportAsync(new { name = "on-raw", size = 8 * MiB, backend = new { type = "overlay", baseImage = raw } });
        await QemuIoAsync(gateway, gateway.NbdUri("on-raw"), "read -P 0x6d 1M 64k", "read -P 0 0 1M");
        string copy = Path.Combine(gateway.DataDirectory, "copy.raw");
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri("on-raw"), copy]);
        ToolResult cmp = await gateway.RunAsync("cmp", [raw, copy], check: false);
        Assert.True(cmp.Succeeded, cmp.Describe());
    }

    private static async Task SnapshotAsync(GatewayProcess gateway, string export, bool viaCli)
    {
        if (viaCli)
        {
            ToolResult cli = await gateway.CliAsync("export", "snapshot", export);
            Assert.True(cli.Succeeded, cli.Describe());
            return;
        }
        using HttpResponseMessage response = await gateway.Http.PostAsync($"v1/exports/{export}/snapshot", null);
        Assert.True(response.StatusCode == HttpStatusCode.OK,
            $"snapshot of {export} answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
    }

    private static Task<ToolResult> QemuIoAsync(GatewayProcess gateway, string target, params string[] commands) =>
        gateway.RunAsync("qemu-io", ["-f", "raw", target, .. commands.SelectMany(c => new[] { "-c", c })], TimeSpan.FromSeconds(120));
}
