using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Tests.Backends.S3;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// Real VMs on the real gateway: libguestfs guests (QEMU, a Debian kernel, software emulation)
/// whose disks are the gateway's exports over <c>nbd://127.0.0.1:PORT/EXPORT</c>. A guest makes
/// and writes an ext4 filesystem; a fresh guest, attached read-only through a local overlay,
/// checks it with <c>e2fsck -fn</c> and reads the files back. About 20 s per guest launch.
/// </summary>
public sealed class VmInteropTests
{
    private const long MiB = 1 << 20;
    private const long DiskSize = 256 * MiB;
    private const string Python = "/usr/bin/python3"; // the nbd module exists only for the system python

    [Fact]
    public async Task Vm_formats_a_file_export_as_ext4_and_a_fresh_guest_checks_it_clean_and_reads_the_files_back()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, new { name = "vmdisk", size = DiskSize });
        await FormatWriteCheckReadAsync(gateway, "vmdisk");
        await gateway.StopAsync();
    }

    [Fact]
    public async Task Vm_formats_an_s3_export_as_ext4_and_a_fresh_guest_checks_it_clean_and_reads_the_files_back()
    {
        await S3TestServer.EnsureBucketAsync(); // the loopback s3rver that ops/test starts; fails without it
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await S3InteropTests.CreateS3ExportAsync(gateway, "s3vm", DiskSize, S3TestServer.NewPrefix("vm"));
        await FormatWriteCheckReadAsync(gateway, "s3vm");
        await gateway.StopAsync();
    }

    /// <summary>
    /// One guest makes ext4 on the export, writes a small and an 8 MiB file, syncs and exits; a
    /// fresh read-only guest checks the filesystem and reads both back; the export is unchanged by it.
    /// </summary>
    private static async Task FormatWriteCheckReadAsync(GatewayProcess gateway, string export)
    {
        (string payload, string payloadSha) = Guestfish.MakePayload(gateway, "payload.bin", 8 * MiB, seed: 1);
        await Guestfish.RunAsync(gateway, [gateway.NbdUri(export)], $"""
            run
            mkfs ext4 /dev/sda
            mount /dev/sda /
            mkdir /data
            write /data/hello.txt "written by the first guest"
            upload "{payload}" /data/payload.bin
            sync
            umount-all
            """);
        string exportSha = await CopySha256Async(gateway, export);

        ToolResult check = await Guestfish.RunAsync(gateway, [gateway.NbdUri(export)], $"""
            run
            {Guestfish.Fsck(0)}
            mount-ro /dev/sda /
            echo @hello
            cat /data/hello.txt
            echo @payload
            checksum sha256 /data/payload.bin
            """, readOnly: true);

        Dictionary<string, List<string>> seen = Guestfish.Sections(check.Stdout);
        Assert.Equal(["written by the first guest"], seen["hello"]);
        Assert.Equal([payloadSha], seen["payload"]);
        Assert.True(exportSha == await CopySha256Async(gateway, export), "the read-only checking guest changed the export");
    }

    [Fact]
    public async Task Vm_golden_image_two_guests_write_their_own_overlays_at_once_and_the_golden_layer_stays_unchanged()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, new { name = "golden", size = DiskSize, backend = new { type = "overlay" } });
        (string goldenPayload, string goldenSha) = Guestfish.MakePayload(gateway, "golden.bin", 4 * MiB, seed: 10);
        await Guestfish.RunAsync(gateway, [gateway.NbdUri("golden")], $"""
            run
            mkfs ext4 /dev/sda
            mount /dev/sda /
            mkdir /golden
            write /golden/motd.txt "golden motd"
            upload "{goldenPayload}" /golden/base.bin
            sync
            umount-all
            """);
        bool[] goldenAllocated = [.. (await DepthsAsync(gateway, "golden")).Select(d => d != 0)];

        // Freeze the golden data as a shared read-only layer: each overlay created on it shares it.
        await CreateExportAsync(gateway, new { name = "vm1", size = DiskSize, backend = new { type = "overlay", @base = "golden" } });
        await CreateExportAsync(gateway, new { name = "vm2", size = DiskSize, backend = new { type = "overlay", @base = "golden" } });
        string[] shared = [.. (await LayersAsync(gateway, "vm1"))[1..].Concat((await LayersAsync(gateway, "vm2"))[1..]).Distinct()];
        Dictionary<string, string> layerShas = LayerFileShas(gateway, shared);
        string goldenImageSha = await CopySha256Async(gateway, "golden");

        (string payload1, string sha1) = Guestfish.MakePayload(gateway, "vm1.bin", 4 * MiB, seed: 11);
        (string payload2, string sha2) = Guestfish.MakePayload(gateway, "vm2.bin", 4 * MiB, seed: 12);
        var clock = Stopwatch.StartNew();
        async Task<(TimeSpan Start, TimeSpan End)> Guest(string vm, string payload)
        {
            TimeSpan start = clock.Elapsed;
            await Guestfish.RunAsync(gateway, [gateway.NbdUri(vm)], $"""
                run
                mount /dev/sda /
                mkdir /{vm}
                write /{vm}/own.txt "written by {vm}"
                upload "{payload}" /{vm}/own.bin
                write /golden/motd.txt "motd changed by {vm}"
                sync
                umount-all
                """);
            return (start, clock.Elapsed);
        }
        (TimeSpan Start, TimeSpan End)[] runs = await Task.WhenAll(Guest("vm1", payload1), Guest("vm2", payload2));
        Assert.True(runs[0].Start < runs[1].End && runs[1].Start < runs[0].End, $"the two guests did not run at the same time: {runs[0]} {runs[1]}");

        // One checking guest with the three disks, read-only: both overlays and the golden export.
        ToolResult check = await Guestfish.RunAsync(gateway, [gateway.NbdUri("vm1"), gateway.NbdUri("vm2"), gateway.NbdUri("golden")], $"""
            run
            {Guestfish.Fsck(0)}
            {Guestfish.Fsck(1)}
            {Guestfish.Fsck(2)}
            {CheckScript("vm1", "/dev/sda", "vm2")}
            {CheckScript("vm2", "/dev/sdb", "vm1")}
            mount-ro /dev/sdc /
            echo @golden-motd
            cat /golden/motd.txt
            echo @golden-base
            checksum sha256 /golden/base.bin
            echo @golden-has-vms
            is-dir /vm1
            is-dir /vm2
            umount /
            """, readOnly: true);
        Dictionary<string, List<string>> seen = Guestfish.Sections(check.Stdout);
        foreach ((string vm, string other, string sha) in new[] { ("vm1", "vm2", sha1), ("vm2", "vm1", sha2) })
        {
            Assert.Equal([$"written by {vm}"], seen[$"{vm}-own"]);
            Assert.Equal([sha], seen[$"{vm}-bin"]);
            Assert.Equal([$"motd changed by {vm}"], seen[$"{vm}-motd"]);
            Assert.Equal([goldenSha], seen[$"{vm}-base"]);
            Assert.True(seen[$"{vm}-other"] is ["false"], $"{vm} sees /{other}, written by the other guest");
        }
        Assert.Equal(["golden motd"], seen["golden-motd"]);
        Assert.Equal([goldenSha], seen["golden-base"]);
        Assert.Equal(["false", "false"], seen["golden-has-vms"]);
        Assert.Equal(layerShas, LayerFileShas(gateway, shared));
        Assert.True(goldenImageSha == await CopySha256Async(gateway, "golden"), "the golden export's content changed");

        // qemu:allocation-depth: the guest's writes at depth 1, the golden data at depth 2, the rest 0,
        // on every overlay of the golden image, not only the first one created on it.
        foreach (string vm in new[] { "vm1", "vm2" })
        {
            uint[] depths = await DepthsAsync(gateway, vm);
            long written = depths.LongCount(d => d == 1) * DepthUnit;
            Assert.True(written >= 4 * MiB && written < 64 * MiB, $"{vm}: {written} bytes at depth 1; the guest wrote a 4 MiB file and metadata");
            var wrong = Enumerable.Range(0, depths.Length)
                .Where(i => depths[i] != (depths[i] == 1 ? 1u : goldenAllocated[i] ? 2u : 0u))
                .Select(i => (Offset: (long)i * DepthUnit, Depth: depths[i], Expected: goldenAllocated[i] ? 2u : 0u)).ToList();
            Assert.True(wrong.Count == 0,
                $"{vm}: {wrong.Count} blocks of {DepthUnit} B have the wrong allocation depth (offset, depth, expected), e.g. {string.Join(", ", wrong.Take(5))}; " +
                $"layers of {vm}: [{string.Join(", ", await LayersAsync(gateway, vm))}], of golden: [{string.Join(", ", await LayersAsync(gateway, "golden"))}] " +
                "(creating an overlay on a writable overlay base snapshots the base even when its top is empty, so each further clone " +
                "shares one more empty frozen layer and sees the golden data one layer deeper: ExportRegistryActor.Overlay.cs CreateOverlay)");
        }
        await gateway.StopAsync();
    }

    private static string CheckScript(string vm, string device, string other) => $"""
        mount-ro {device} /
        echo @{vm}-own
        cat /{vm}/own.txt
        echo @{vm}-bin
        checksum sha256 /{vm}/own.bin
        echo @{vm}-motd
        cat /golden/motd.txt
        echo @{vm}-base
        checksum sha256 /golden/base.bin
        echo @{vm}-other
        is-dir /{other}
        umount /
        """;

    [Fact]
    public async Task Vm_synced_file_survives_kill_9_of_the_gateway_and_the_filesystem_checks_clean()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, new { name = "crashdisk", size = DiskSize });
        await SyncedFileSurvivesKill9Async(gateway, "crashdisk");
    }

    /// <summary>The same on an S3 export with the write log (issue 18): the log replayed after the kill is a disk ext4 finds clean.</summary>
    [Fact]
    public async Task Vm_synced_file_survives_kill_9_of_the_gateway_on_an_s3_log_export_and_the_filesystem_checks_clean()
    {
        await S3TestServer.EnsureBucketAsync(); // the loopback s3rver that ops/test starts; fails without it
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, new
        {
            name = "s3crashdisk",
            size = DiskSize,
            backend = new
            {
                type = "s3",
                s3 = new { endpoint = S3TestServer.Endpoint, bucket = S3TestServer.Bucket, prefix = S3TestServer.NewPrefix("vm-log-kill"), writeLog = true, accessKey = S3TestServer.AccessKey, secretKey = S3TestServer.SecretKey },
            },
        });
        await SyncedFileSurvivesKill9Async(gateway, "s3crashdisk");
    }

    /// <summary>
    /// A guest makes ext4, writes and syncs a file, then keeps writing (direct I/O, and a file only in
    /// its page cache) when the gateway gets kill -9; after the restart a fresh guest mounts (replaying
    /// the journal into its local overlay), reads the synced file back and checks the filesystem clean.
    /// </summary>
    private static async Task SyncedFileSurvivesKill9Async(GatewayProcess gateway, string export)
    {
        (string payload, string payloadSha) = Guestfish.MakePayload(gateway, "synced.bin", 8 * MiB, seed: 20);

        await using (GuestfishSession guest = await GuestfishSession.StartAsync(gateway, gateway.NbdUri(export)))
        {
            await guest.RunAsync("run");
            await guest.RunAsync("mkfs", "ext4", "/dev/sda", ":", "mount", "/dev/sda", "/", ":", "mkdir", "/data",
                ":", "upload", payload, "/data/synced.bin", ":", "write", "/data/synced.txt", "synced before the crash", ":", "sync");
            // Unsynced work in flight when the gateway dies: a direct-I/O writer looping in the background
            // and a file only in the guest's page cache.
            await guest.RunAsync("debug", "sh", "(while :; do dd if=/dev/urandom of=/sysroot/data/inflight.bin bs=256k count=64 oflag=direct conv=notrunc; done) >/dev/null 2>&1 &");
            await guest.RunAsync("write", "/data/unsynced.txt", "never synced");
            await guest.RunAsync("debug", "sh", "sleep 1; test -s /sysroot/data/inflight.bin"); // the writer is writing
            gateway.Kill();
            await guest.PowerOffAsync(); // the guest goes down with it (kill -9 of its QEMU): no clean unmount
        }
        await gateway.RestartAsync();
        await S3LogInteropTests.WaitOpenAsync(gateway, export); // an S3 log export replays its log before it answers

        // The next boot: mounting replays the ext4 journal (into the local overlay), then a full check.
        ToolResult check = await Guestfish.RunAsync(gateway, [gateway.NbdUri(export)], $"""
            run
            mount /dev/sda /
            echo @txt
            cat /data/synced.txt
            echo @bin
            checksum sha256 /data/synced.bin
            echo @ls
            ls /data
            umount-all
            {Guestfish.Fsck(0)}
            """, readOnly: true);
        Dictionary<string, List<string>> seen = Guestfish.Sections(check.Stdout);
        Assert.Equal(["synced before the crash"], seen["txt"]);
        Assert.Equal([payloadSha], seen["bin"]);
        await gateway.StopAsync();
    }

    private const string ApplyDirtyExtents = """
        import nbd, sys
        uri, target, bitmap = sys.argv[1], sys.argv[2], sys.argv[3]
        ctx = "qemu:dirty-bitmap:" + bitmap
        h = nbd.NBD()
        h.add_meta_context(ctx)
        h.connect_uri(uri)
        assert h.can_meta_context(ctx), ctx + " was not negotiated"
        size = h.get_size()
        extents = []
        off = 0
        while off < size:
            got = []
            def cb(meta, start, entries, err):
                if meta == ctx:
                    got.extend(entries)
                return 0
            h.block_status(min(size - off, 1 << 30), off, cb)
            assert got, "no extents for " + ctx
            for i in range(0, len(got), 2):
                length = min(got[i], size - off)
                if got[i + 1] & 1:
                    extents.append((off, length))
                off += length
        copied = 0
        with open(target, "r+b") as out:
            for start, length in extents:
                o = start
                while o < start + length:
                    n = min(4 << 20, start + length - o)
                    out.seek(o)
                    out.write(h.pread(n, o))
                    copied += n
                    o += n
        h.shutdown()
        print(copied, len(extents))
        """;

    [Fact]
    public async Task Vm_incremental_backup_from_the_dirty_bitmap_gives_a_copy_a_third_guest_mounts_with_the_new_files()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, new { name = "bkdisk", size = DiskSize });
        (string oldPayload, string oldSha) = Guestfish.MakePayload(gateway, "old.bin", 4 * MiB, seed: 30);
        (string newPayload, string newSha) = Guestfish.MakePayload(gateway, "new.bin", 4 * MiB, seed: 31);
        await Guestfish.RunAsync(gateway, [gateway.NbdUri("bkdisk")], $"""
            run
            mkfs ext4 /dev/sda
            mount /dev/sda /
            mkdir /data
            write /data/keep.txt "unchanged"
            write /data/change.txt "version 1"
            write /data/delete.txt "deleted after the full backup"
            upload "{oldPayload}" /data/old.bin
            sync
            umount-all
            """);

        // Start tracking, then the full copy (the guest is down: nothing writes in between).
        using (HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports/bkdisk/bitmaps", new { name = "backup", granularity = "64K", enabled = true }))
        {
            Assert.True(response.StatusCode == HttpStatusCode.Created, $"adding the bitmap answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
        }
        string copy = Path.Combine(gateway.DataDirectory, "full.img");
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri("bkdisk"), copy]);

        await Guestfish.RunAsync(gateway, [gateway.NbdUri("bkdisk")], $"""
            run
            mount /dev/sda /
            write /data/change.txt "version 2"
            rm /data/delete.txt
            write /data/new.txt "added after the full backup"
            upload "{newPayload}" /data/new.bin
            sync
            umount-all
            """);

        string script = Path.Combine(gateway.DataDirectory, "apply_dirty.py");
        await File.WriteAllTextAsync(script, ApplyDirtyExtents);
        ToolResult applied = await gateway.RunAsync(Python, [script, gateway.NbdUri("bkdisk"), copy, "backup"]);
        long copied = long.Parse(applied.Stdout.Split(' ')[0]);
        Assert.True(copied >= 4 * MiB && copied < DiskSize / 8, $"the increment copied {copied} bytes: expected the new 4 MiB file and some metadata, not the disk");
        string now = Path.Combine(gateway.DataDirectory, "now.img");
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri("bkdisk"), now]);
        Assert.True(Tool.Sha256(now) == Tool.Sha256(copy), "the full copy plus the dirty extents differs from the export");

        ToolResult check = await Guestfish.RunAsync(gateway, [copy], $"""
            run
            {Guestfish.Fsck(0)}
            mount-ro /dev/sda /
            echo @keep
            cat /data/keep.txt
            echo @change
            cat /data/change.txt
            echo @new
            cat /data/new.txt
            echo @bins
            checksum sha256 /data/old.bin
            checksum sha256 /data/new.bin
            echo @deleted
            is-file /data/delete.txt
            """, readOnly: true);
        Dictionary<string, List<string>> seen = Guestfish.Sections(check.Stdout);
        Assert.Equal(["unchanged"], seen["keep"]);
        Assert.Equal(["version 2"], seen["change"]);
        Assert.Equal(["added after the full backup"], seen["new"]);
        Assert.Equal([oldSha, newSha], seen["bins"]);
        Assert.Equal(["false"], seen["deleted"]);
        await gateway.StopAsync();
    }

    private static async Task CreateExportAsync(GatewayProcess gateway, object request)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", request);
        Assert.True(response.StatusCode == HttpStatusCode.Created,
            $"creating an export answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
    }

    private static async Task<string[]> LayersAsync(GatewayProcess gateway, string export)
    {
        using JsonDocument show = JsonDocument.Parse(await gateway.Http.GetStringAsync($"v1/exports/{export}"));
        return [.. show.RootElement.GetProperty("backend").GetProperty("layers").EnumerateArray().Select(e => e.GetString()!)];
    }

    /// <summary>SHA-256 of every file of the given layers (data and map) in data/layers.</summary>
    private static Dictionary<string, string> LayerFileShas(GatewayProcess gateway, IEnumerable<string> layers)
    {
        var shas = new Dictionary<string, string>();
        foreach (string layer in layers)
        {
            string[] files = Directory.GetFiles(Path.Combine(gateway.DataDirectory, "layers"), layer + ".*");
            Assert.True(files.Length > 0, $"no files for layer {layer} in {gateway.DataDirectory}/layers");
            foreach (string file in files)
            {
                shas[Path.GetFileName(file)] = Tool.Sha256(file);
            }
        }
        return shas;
    }

    private static async Task<string> CopySha256Async(GatewayProcess gateway, string export)
    {
        string copy = Path.Combine(gateway.DataDirectory, $"{export}-{Guid.NewGuid():N}.img");
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri(export), copy]);
        string sha = Tool.Sha256(copy);
        File.Delete(copy);
        return sha;
    }

    private const long DepthUnit = 4096;

    /// <summary><c>nbdinfo --map=qemu:allocation-depth</c> as one depth per 4 KiB block.</summary>
    private static async Task<uint[]> DepthsAsync(GatewayProcess gateway, string export)
    {
        ToolResult map = await gateway.RunAsync("nbdinfo", ["--map=qemu:allocation-depth", gateway.NbdUri(export)]);
        uint[] depths = new uint[DiskSize / DepthUnit];
        long covered = 0;
        foreach (string[] f in map.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                     .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries)))
        {
            long offset = long.Parse(f[0]), length = long.Parse(f[1]);
            uint depth = uint.Parse(f[2]);
            Assert.True(offset % DepthUnit == 0 && length % DepthUnit == 0, $"extent {offset}+{length} is not 4 KiB aligned:\n{map.Stdout}");
            Array.Fill(depths, depth, (int)(offset / DepthUnit), (int)(length / DepthUnit));
            covered += length;
        }
        Assert.True(covered == DiskSize, $"the depth map of {export} covers {covered} of {DiskSize} bytes:\n{map.Stdout}");
        return depths;
    }
}
