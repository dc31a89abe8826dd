using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// Dirty bitmaps against the real gateway process and real clients: qemu-io writes, nbdinfo and
/// qemu-img read the map, the nbd Python module drives crash and incremental-backup scenarios.
/// </summary>
public sealed class BitmapInteropTests
{
    private const long MiB = 1 << 20;
    private const string Python = "/usr/bin/python3"; // the nbd module exists only for the system python

    private static async Task CreateExportAsync(GatewayProcess gateway, string name, long size)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", new { name, size });
        Assert.True(response.StatusCode == HttpStatusCode.Created, $"creating {name}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
    }

    private static async Task AddBitmapAsync(GatewayProcess gateway, string export, string bitmap, string granularity, bool enabled = true)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync($"v1/exports/{export}/bitmaps", new { name = bitmap, granularity, enabled });
        Assert.True(response.StatusCode == HttpStatusCode.Created, $"adding {bitmap}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
    }

    private static Task<ToolResult> QemuIoAsync(GatewayProcess gateway, string export, params string[] commands) =>
        gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })]);

    /// <summary>Dirty ranges (offset, length) from <c>nbdinfo --map=qemu:dirty-bitmap:NAME --json</c>.</summary>
    private static async Task<List<(long, long)>> NbdinfoDirtyAsync(GatewayProcess gateway, string export, string bitmap)
    {
        ToolResult map = await gateway.RunAsync("nbdinfo", ["--map=qemu:dirty-bitmap:" + bitmap, "--json", gateway.NbdUri(export)]);
        using JsonDocument doc = JsonDocument.Parse(map.Stdout);
        return Merge(doc.RootElement.EnumerateArray()
            .Where(e => (e.GetProperty("type").GetInt64() & 1) != 0)
            .Select(e => (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64())));
    }

    /// <summary>Dirty ranges from qemu-img map with x-dirty-bitmap (qemu reports dirty as "data": false).</summary>
    private static async Task<List<(long, long)>> QemuImgDirtyAsync(GatewayProcess gateway, string export, string bitmap)
    {
        ToolResult map = await gateway.RunAsync("qemu-img", ["map", "--output=json", "--image-opts",
            $"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={gateway.NbdPort},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"]);
        using JsonDocument doc = JsonDocument.Parse(map.Stdout);
        return Merge(doc.RootElement.EnumerateArray()
            .Where(e => !e.GetProperty("data").GetBoolean())
            .Select(e => (e.GetProperty("start").GetInt64(), e.GetProperty("length").GetInt64())));
    }

    /// <summary>The granule-aligned ranges a set of byte ranges dirties, merged.</summary>
    private static List<(long, long)> Expected(long granularity, params (long Offset, long Length)[] writes) =>
        Merge(writes.Select(w =>
        {
            long start = w.Offset / granularity * granularity;
            long end = (w.Offset + w.Length + granularity - 1) / granularity * granularity;
            return (start, end - start);
        }));

    private static List<(long, long)> Merge(IEnumerable<(long Offset, long Length)> ranges)
    {
        var merged = new List<(long, long)>();
        foreach ((long offset, long length) in ranges.OrderBy(r => r.Offset))
        {
            if (merged.Count > 0 && merged[^1].Item1 + merged[^1].Item2 >= offset)
            {
                (long o, long l) = merged[^1];
                merged[^1] = (o, Math.Max(o + l, offset + length) - o);
            }
            else
            {
                merged.Add((offset, length));
            }
        }
        return merged;
    }

    [Fact]
    public async Task Nbdinfo_and_qemu_img_maps_match_qemu_io_writes_zeroes_and_discards_at_any_granularity()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, "mapped", 64 * MiB);
        await AddBitmapAsync(gateway, "mapped", "g64k", "64K");
        await AddBitmapAsync(gateway, "mapped", "g1m", "1M");
        await AddBitmapAsync(gateway, "mapped", "g512", "512");
        await AddBitmapAsync(gateway, "mapped", "off", "64K", enabled: false);

        (long, long)[] writes =
        [
            (1000, 1),                     // inside a granule
            (128 * 1024, 64 * 1024),       // exactly one 64K granule
            (3 * MiB - 512, 1024),         // across a 1M (and 64K) boundary
            (10 * MiB + 4096, 200 * 1024), // write -z
            (20 * MiB, 64 * 1024),         // discard, on granule boundaries
            (64 * MiB - 512, 512),         // the last sector
        ];
        await QemuIoAsync(gateway, "mapped",
            "write -P 0x11 1000 1", "write -P 0x22 128k 64k", "write -P 0x33 3145216 1024",
            "write -z 10244k 200k", "discard 20M 64k", "write -P 0x44 67108352 512");

        foreach ((string bitmap, long granularity) in new[] { ("g64k", 64 * 1024L), ("g1m", MiB), ("g512", 512L) })
        {
            List<(long, long)> expected = Expected(granularity, writes);
            Assert.Equal(expected, await NbdinfoDirtyAsync(gateway, "mapped", bitmap));
            Assert.Equal(expected, await QemuImgDirtyAsync(gateway, "mapped", bitmap));
        }
        Assert.Empty(await NbdinfoDirtyAsync(gateway, "mapped", "off"));

        // Several contexts in one BLOCK_STATUS, each its own chunk: base:allocation still answers.
        ToolResult contexts = await gateway.RunAsync("nbdinfo", ["--json", gateway.NbdUri("mapped")]);
        foreach (string name in new[] { "base:allocation", "qemu:dirty-bitmap:g64k", "qemu:dirty-bitmap:g1m", "qemu:dirty-bitmap:off" })
        {
            Assert.Contains($"\"{name}\"", contexts.Stdout);
        }
        await gateway.StopAsync();
    }

    [Fact]
    public async Task Bitmap_operations_answer_errors_by_name_and_survive_a_clean_restart()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, "ops", 16 * MiB);
        ToolResult add = await gateway.CliAsync("bitmap", "add", "ops", "a", "--granularity", "4K");
        Assert.True(add.Succeeded, add.Describe());
        Assert.True((await gateway.CliAsync("bitmap", "add", "ops", "b", "--granularity", "1M", "--disabled")).Succeeded);
        Assert.True((await gateway.CliAsync("bitmap", "add", "ops", "gone")).Succeeded);

        ToolResult duplicate = await gateway.CliAsync("bitmap", "add", "ops", "a");
        Assert.Equal(1, duplicate.ExitCode);
        Assert.Contains("'a' already exists", duplicate.Stderr);
        Assert.Contains("409", duplicate.Stderr);
        ToolResult badGranularity = await gateway.CliAsync("bitmap", "add", "ops", "c", "--granularity", "32M");
        Assert.Contains("granularity", badGranularity.Stderr);
        Assert.Contains("400", badGranularity.Stderr);
        ToolResult noExport = await gateway.CliAsync("bitmap", "list", "nope");
        Assert.Contains("export 'nope' not found", noExport.Stderr);
        ToolResult noBitmap = await gateway.CliAsync("bitmap", "clear", "ops", "zz");
        Assert.Contains("bitmap 'zz' not found", noBitmap.Stderr);
        Assert.Contains("404", noBitmap.Stderr);

        await QemuIoAsync(gateway, "ops", "write 0 4k", "write 8M 4k");
        Assert.True((await gateway.CliAsync("bitmap", "enable", "ops", "b")).Succeeded);
        await QemuIoAsync(gateway, "ops", "write 12M 4k");
        Assert.True((await gateway.CliAsync("bitmap", "merge", "ops", "b", "a")).Succeeded);
        Assert.True((await gateway.CliAsync("bitmap", "disable", "ops", "a")).Succeeded);
        Assert.True((await gateway.CliAsync("bitmap", "remove", "ops", "gone")).Succeeded);
        await QemuIoAsync(gateway, "ops", "write 4M 4k");
        ToolResult before = await gateway.CliAsync("bitmap", "list", "ops");
        Assert.True(before.Succeeded, before.Describe());
        Assert.Contains("a 4 KiB disabled 12288", Rows(before.Stdout));
        Assert.Contains("b 1 MiB enabled 4194304", Rows(before.Stdout));
        Assert.DoesNotContain("gone", before.Stdout);

        await gateway.StopAsync();
        await gateway.RestartAsync();
        ToolResult after = await gateway.CliAsync("bitmap", "list", "ops");
        Assert.Equal(before.Stdout, after.Stdout);

        Assert.True((await gateway.CliAsync("bitmap", "clear", "ops", "b")).Succeeded);
        await gateway.StopAsync();
        await gateway.RestartAsync();
        Assert.Contains("b 1 MiB enabled 0", Rows((await gateway.CliAsync("bitmap", "list", "ops")).Stdout));
    }

    /// <summary>The rows of <c>gateway bitmap list</c> with runs of spaces squeezed.</summary>
    private static string[] Rows(string table) =>
        [.. table.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => string.Join(' ', l.Split(' ', StringSplitOptions.RemoveEmptyEntries)))];

    private const string CrashWriter = """
        import nbd, os, random, sys, time
        uri, conns, block, size = sys.argv[1], int(sys.argv[2]), 4096, int(sys.argv[3])
        handles = []
        for _ in range(conns):
            h = nbd.NBD()
            h.connect_uri(uri)
            handles.append(h)
        acked = []
        def done(off):
            def cb(err):
                if err.value == 0:
                    acked.append(off)
                return 1
            return cb
        buf = nbd.Buffer.from_bytearray(bytearray(b'\x5a' * block))
        rnd = random.Random(int(sys.argv[4]))
        try:
            while True:
                for h in handles:
                    while h.aio_in_flight() < 16:
                        off = rnd.randrange(size // block) * block
                        h.aio_pwrite(buf, off, completion=done(off))
                    h.poll(0)
                for off in acked:
                    print(off)
                sys.stdout.flush()
                acked.clear()
        except Exception as e:
            for off in acked:
                print(off)
            print("stopped:", e, file=sys.stderr)
        """;

    [Fact]
    public async Task After_kill_9_every_granule_written_from_several_connections_is_dirty()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        long size = 256 * MiB;
        await CreateExportAsync(gateway, "crash", size);
        await AddBitmapAsync(gateway, "crash", "fine", "4K");
        await AddBitmapAsync(gateway, "crash", "coarse", "1M");
        string script = Path.Combine(gateway.DataDirectory, "crash_writer.py");
        await File.WriteAllTextAsync(script, CrashWriter);

        Task<ToolResult> writers = gateway.RunAsync(Python, [script, gateway.NbdUri("crash"), "4", size.ToString(), "42"], TimeSpan.FromSeconds(60), check: false);
        await Task.Delay(2500);
        gateway.Kill();
        ToolResult writes = await writers;
        long[] acked = [.. writes.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(long.Parse)];
        Assert.True(acked.Length > 100, $"too few writes were acknowledged before the kill\n{writes.Describe()}");

        // Data that reached the file, acknowledged or not, must be in dirty granules too.
        var landed = new List<long>();
        await using (FileStream file = File.OpenRead(gateway.ExportFile("crash")))
        {
            byte[] block = new byte[4096];
            for (long offset = 0; offset < size; offset += block.Length)
            {
                file.ReadExactly(block);
                if (block.AsSpan().IndexOfAnyExcept((byte)0) >= 0)
                {
                    landed.Add(offset);
                }
            }
        }
        await gateway.RestartAsync();
        List<(long, long)> fine = await NbdinfoDirtyAsync(gateway, "crash", "fine");
        List<(long, long)> coarse = await NbdinfoDirtyAsync(gateway, "crash", "coarse");
        static bool Covered(List<(long Offset, long Length)> dirty, long offset) => dirty.Any(d => d.Offset <= offset && offset + 4096 <= d.Offset + d.Length);
        foreach (long offset in acked.Concat(landed).Distinct())
        {
            Assert.True(Covered(fine, offset), $"4K granule at {offset} was written but is clean after kill -9 + restart\n{gateway.Describe()}");
            Assert.True(Covered(coarse, offset), $"1M granule holding {offset} was written but is clean after kill -9 + restart");
        }
        Assert.True(landed.Count >= acked.Distinct().Count(), "acknowledged writes are missing from the file");
    }

    private const string Backup = """
        import nbd, sys
        mode, uri, target = sys.argv[1], sys.argv[2], sys.argv[3]
        ctx = "qemu:dirty-bitmap:" + sys.argv[4] if len(sys.argv) > 4 else None
        h = nbd.NBD()
        if ctx:
            h.add_meta_context(ctx)
        h.connect_uri(uri)
        size = h.get_size()
        step = 4 << 20
        copied = 0
        with open(target, "r+b" if mode == "incremental" else "wb") as out:
            if mode == "full":
                for off in range(0, size, step):
                    n = min(step, size - off)
                    out.seek(off); out.write(h.pread(n, off)); copied += n
            else:
                assert h.can_meta_context(ctx), ctx + " not negotiated"
                extents = []
                off = 0
                while off < size:
                    got = []
                    def cb(meta, start, entries, err):
                        if meta == ctx:
                            got.extend(entries)
                        return 0
                    h.block_status(min(size - off, 1 << 30), off, cb)
                    at = off
                    for i in range(0, len(got), 2):
                        if got[i + 1] & 1:
                            extents.append((at, got[i]))
                        at += got[i]
                    off = at
                for start, length in extents:
                    for o in range(start, start + length, step):
                        n = min(step, start + length - o)
                        out.seek(o); out.write(h.pread(n, o)); copied += n
            out.truncate(size)
        print(copied)
        """;

    [Fact]
    public async Task Incremental_backup_copies_only_dirty_extents_and_the_copy_equals_the_export()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await CreateExportAsync(gateway, "vm", 64 * MiB);
        await QemuIoAsync(gateway, "vm", "write -P 0x01 0 8M", "write -P 0x02 32M 1M");
        await AddBitmapAsync(gateway, "vm", "backup", "64K");
        string script = Path.Combine(gateway.DataDirectory, "backup.py");
        await File.WriteAllTextAsync(script, Backup);
        string copy = Path.Combine(gateway.DataDirectory, "copy.img");

        await gateway.RunAsync(Python, [script, "full", gateway.NbdUri("vm"), copy]);
        Assert.True((await gateway.CliAsync("bitmap", "clear", "vm", "backup")).Succeeded);

        await QemuIoAsync(gateway, "vm", "write -P 0x03 100k 10k", "write -z 4M 1M", "discard 32M 512k", "write -P 0x04 50M 3M", "write -P 0x05 64511k 1k");
        ToolResult incremental = await gateway.RunAsync(Python, [script, "incremental", gateway.NbdUri("vm"), copy, "backup"]);
        long copied = long.Parse(incremental.Stdout.Trim());
        long dirty = 64 * 1024 + 1 * MiB + 512 * 1024 + 3 * MiB + 64 * 1024; // 100k+10k lies in one 64K granule
        Assert.Equal(dirty, copied);

        string full = Path.Combine(gateway.DataDirectory, "now.img");
        await gateway.RunAsync(Python, [script, "full", gateway.NbdUri("vm"), full]);
        Assert.Equal(Tool.Sha256(full), Tool.Sha256(copy));

        Assert.True((await gateway.CliAsync("bitmap", "clear", "vm", "backup")).Succeeded);
        Assert.Empty(await NbdinfoDirtyAsync(gateway, "vm", "backup"));
        await gateway.StopAsync();
    }
}
