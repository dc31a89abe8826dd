using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using System.Text.RegularExpressions;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// Real NBD clients (libnbd's nbdinfo/nbdcopy/python module, qemu's qemu-io/qemu-img/qemu-nbd, fio)
/// against one real gateway process over TCP. Each test uses its own export.
/// </summary>
public sealed partial class NbdClientInteropTests(GatewayFixture fixture) : IClassFixture<GatewayFixture>
{
    private const long MiB = 1 << 20;
    private readonly GatewayProcess _gateway = fixture.Gateway;

    private async Task CreateExportAsync(string name, long size, bool readOnly = false, string? description = null)
    {
        using HttpResponseMessage response = await _gateway.Http.PostAsJsonAsync("v1/exports",
            new { name, size, readOnly, description, backend = new { type = "file" } });
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.Created,
            $"creating export {name} answered {(int)response.StatusCode}: {body}\n{_gateway.Describe()}");
    }

    private static JsonElement SingleExport(ToolResult nbdinfo)
    {
        using JsonDocument doc = JsonDocument.Parse(nbdinfo.Stdout);
        JsonElement exports = doc.RootElement.GetProperty("exports");
        Assert.Equal(1, exports.GetArrayLength());
        return exports[0].Clone();
    }

    [Fact]
    public async Task Nbdinfo_json_shows_disk0_size_flags_contexts_and_block_sizes()
    {
        ToolResult info = await _gateway.RunAsync("nbdinfo", ["--json", _gateway.NbdUri("disk0")]);
        using JsonDocument doc = JsonDocument.Parse(info.Stdout);
        Assert.Equal("newstyle-fixed", doc.RootElement.GetProperty("protocol").GetString());
        Assert.True(doc.RootElement.GetProperty("structured").GetBoolean(), info.Stdout);
        JsonElement disk0 = SingleExport(info);

        Assert.Equal("disk0", disk0.GetProperty("export-name").GetString());
        Assert.Equal(1L << 30, disk0.GetProperty("export-size").GetInt64());
        Assert.False(disk0.GetProperty("is_read_only").GetBoolean(), info.Stdout);
        foreach (string flag in new[] { "can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df" })
        {
            Assert.True(disk0.TryGetProperty(flag, out JsonElement value) && value.GetBoolean(), $"{flag} is not true\n{info.Stdout}");
        }
        string[] contexts = [.. disk0.GetProperty("contexts").EnumerateArray().Select(c => c.GetString()!)];
        Assert.Contains("base:allocation", contexts);
        Assert.Equal(1, disk0.GetProperty("block_size_minimum").GetInt64());
        Assert.Equal(4096, disk0.GetProperty("block_size_preferred").GetInt64());
        Assert.Equal(64 * MiB, disk0.GetProperty("block_size_maximum").GetInt64());
    }

    [Fact]
    public async Task Nbdinfo_json_shows_a_read_only_export_without_write_flags()
    {
        await CreateExportAsync("ro-info", 16 * MiB, readOnly: true, description: "read-only for nbdinfo");

        ToolResult info = await _gateway.RunAsync("nbdinfo", ["--json", _gateway.NbdUri("ro-info")]);
        JsonElement export = SingleExport(info);

        Assert.True(export.GetProperty("is_read_only").GetBoolean(), info.Stdout);
        Assert.Equal(16 * MiB, export.GetProperty("export-size").GetInt64());
        Assert.Equal("read-only for nbdinfo", export.GetProperty("description").GetString());
        foreach (string flag in new[] { "can_fua", "can_trim", "can_zero", "can_fast_zero" })
        {
            Assert.False(export.TryGetProperty(flag, out JsonElement value) && value.GetBoolean(), $"read-only export advertises {flag}\n{info.Stdout}");
        }
    }

    [Fact]
    public async Task Qemu_nbd_list_shows_every_export_with_its_description()
    {
        await CreateExportAsync("listed", 8 * MiB, description: "listed by qemu-nbd");
        ExportEntry[] api = (await _gateway.Http.GetFromJsonAsync<ExportEntry[]>("v1/exports", JsonSerializerOptions.Web))!;

        ToolResult list = await _gateway.RunAsync("qemu-nbd", ["--list", "--bind=127.0.0.1", $"--port={_gateway.NbdPort}"]);

        Match count = ExportsAvailable().Match(list.Stdout);
        Assert.True(count.Success, list.Describe());
        Assert.Equal(api.Length, int.Parse(count.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture));
        Dictionary<string, string?> listed = ListedExports().Matches(list.Stdout)
            .ToDictionary(m => m.Groups["name"].Value, m => m.Groups["description"].Success ? m.Groups["description"].Value.TrimEnd() : null);
        foreach (ExportEntry export in api)
        {
            Assert.True(listed.TryGetValue(export.Name, out string? description), $"qemu-nbd --list lacks export {export.Name}\n{list.Stdout}");
            Assert.Equal(export.Description, description);
        }
        Assert.Equal("listed by qemu-nbd", listed["listed"]);
        Assert.Equal("default export", listed["disk0"]);
    }

    private sealed record ExportEntry(string Name, long Size, string? Description);

    [GeneratedRegex(@"exports available: (\d+)")]
    private static partial Regex ExportsAvailable();

    [GeneratedRegex(@"^ export: '(?<name>[^']*)'\n(?:  description: (?<description>[^\n]*)\n)?", RegexOptions.Multiline)]
    private static partial Regex ListedExports();

    [Fact]
    public async Task Nbdcopy_of_a_random_64_MiB_image_in_and_out_keeps_the_checksum()
    {
        await CreateExportAsync("copy", 64 * MiB);
        string work = Directory.CreateTempSubdirectory("gateway-nbdcopy-").FullName;
        try
        {
            string input = Path.Combine(work, "in.img");
            string output = Path.Combine(work, "out.img");
            byte[] random = new byte[64 * MiB];
            Random.Shared.NextBytes(random);
            await File.WriteAllBytesAsync(input, random);

            await _gateway.RunAsync("nbdcopy", [input, _gateway.NbdUri("copy")]);
            await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("copy"), output]);

            string expected = Tool.Sha256(input);
            Assert.Equal(expected, Tool.Sha256(output));
            Assert.Equal(expected, Tool.Sha256(_gateway.ExportFile("copy")));
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    private Task<ToolResult> QemuIoAsync(string export, params string[] commands) =>
        _gateway.RunAsync("qemu-io", ["-f", "raw", _gateway.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })]);

    [Fact]
    public async Task Qemu_io_pattern_writes_read_back_and_zeroed_or_discarded_ranges_read_as_zeros()
    {
        await CreateExportAsync("pattern", 16 * MiB);

        await QemuIoAsync("pattern",
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "write -P 0xef 16380k 4k", // the last 4 KiB of the export
            "write -P 0x5c 5000000 1000", // unaligned offset and length
            "read -P 0xab 0 1M");
        // A new connection sees what the first one wrote.
        await QemuIoAsync("pattern",
            "read -P 0xab 0 1M",
            "read -P 0xcd 4M 64k",
            "read -P 0xef 16380k 4k",
            "read -P 0x5c 5000000 1000",
            "read -P 0 4160k 64k", // just past the 0xcd range
            "write -z 256k 128k",
            "read -P 0 256k 128k",
            "read -P 0xab 0 256k",
            "read -P 0xab 384k 640k",
            "write -z -u 640k 64k",
            "read -P 0 640k 64k",
            "discard 4M 64k",
            "read -P 0 4M 64k");
        ToolResult after = await QemuIoAsync("pattern",
            "read -P 0 256k 128k",
            "read -P 0 640k 64k",
            "read -P 0 4M 64k",
            "read -P 0xab 0 256k",
            "read -P 0xab 704k 320k",
            "read -P 0xef 16380k 4k");
        Assert.DoesNotContain("Pattern verification failed", after.Stdout + after.Stderr);
    }

    [Fact]
    public async Task Qemu_io_pattern_mismatch_is_reported_so_the_pattern_tests_can_fail()
    {
        // Guards the guard: if qemu-io exited 0 on a wrong pattern, the test above proved nothing.
        await CreateExportAsync("mismatch", 1 * MiB);
        ToolResult result = await _gateway.RunAsync("qemu-io",
            ["-f", "raw", _gateway.NbdUri("mismatch"), "-c", "write -P 0x11 0 64k", "-c", "read -P 0x22 0 64k"], check: false);
        Assert.Contains("Pattern verification failed", result.Stdout + result.Stderr);
        Assert.NotEqual(0, result.ExitCode);
    }

    /// <summary>Data extents from <c>qemu-img map --output=json</c>.</summary>
    private static List<(long, long)> QemuImgData(ToolResult map)
    {
        using JsonDocument doc = JsonDocument.Parse(map.Stdout);
        return FileExtents.Merge(doc.RootElement.EnumerateArray()
            .Where(e => e.GetProperty("data").GetBoolean())
            .Select(e => (e.GetProperty("start").GetInt64(), e.GetProperty("length").GetInt64())));
    }

    /// <summary>Data extents from <c>nbdinfo --map --json</c> (base:allocation: bit 0 = hole).</summary>
    private static List<(long, long)> NbdinfoData(ToolResult map)
    {
        using JsonDocument doc = JsonDocument.Parse(map.Stdout);
        return FileExtents.Merge(doc.RootElement.EnumerateArray()
            .Where(e => (e.GetProperty("type").GetInt32() & 1) == 0)
            .Select(e => (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64())));
    }

    [Fact]
    public async Task Qemu_img_map_and_nbdinfo_map_agree_with_the_files_real_holes()
    {
        await CreateExportAsync("mapped", 64 * MiB);
        await QemuIoAsync("mapped",
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 256k",
            "write -P 0x33 8M 4k",
            "write -P 0x44 40M 2M",
            "write -P 0x55 63M 1M", // up to the end
            "discard 1088k 64k", // a hole in the middle of the 0x22 region
            "discard 41M 1M"); // the second half of the 0x44 region

        List<(long Offset, long Length)> truth = FileExtents.Data(_gateway.ExportFile("mapped"));
        Assert.True(truth.Count >= 5, $"the file should hold separate data regions, has {FileExtents.Format(truth)}");

        ToolResult qemuMap = await _gateway.RunAsync("qemu-img", ["map", "--output=json", "-f", "raw", _gateway.NbdUri("mapped")]);
        List<(long, long)> qemu = QemuImgData(qemuMap);
        Assert.True(truth.SequenceEqual(qemu),
            $"qemu-img map disagrees with the file\nfile:     {FileExtents.Format(truth)}\nqemu-img: {FileExtents.Format(qemu)}\n{qemuMap.Stdout}");

        ToolResult nbdMap = await _gateway.RunAsync("nbdinfo", ["--map", "--json", _gateway.NbdUri("mapped")]);
        List<(long, long)> nbd = NbdinfoData(nbdMap);
        Assert.True(truth.SequenceEqual(nbd),
            $"nbdinfo --map disagrees with the file\nfile:    {FileExtents.Format(truth)}\nnbdinfo: {FileExtents.Format(nbd)}\n{nbdMap.Stdout}");
    }

    /// <summary>
    /// Writes up to the advertised 64 MiB maximum from libnbd and qemu-io, and refused writes of
    /// 4 and 40 MiB: libnbd reads replies while it is still sending a payload, so an error
    /// answered before the payload was read would desynchronise it ("no matching cookie").
    /// </summary>
    [Fact]
    public async Task Writes_up_to_64_MiB_succeed_and_refused_large_writes_keep_the_connection()
    {
        await CreateExportAsync("big", 256 * MiB);
        await CreateExportAsync("big-ro", 64 * MiB, readOnly: true);
        string script = Path.Combine(_gateway.DataDirectory, "large_requests.py");
        await File.WriteAllTextAsync(script, LargeRequestsScript);

        ToolResult result = await _gateway.RunAsync("/usr/bin/python3", [script, _gateway.NbdUri("big"), _gateway.NbdUri("big-ro")],
            timeout: TimeSpan.FromSeconds(120));

        Assert.Contains("ok: 33, 48, 64 MiB written and read back; 4, 40 MiB refused writes answered EPERM, ENOSPC, EINVAL in step", result.Stdout);

        ToolResult qemu = await QemuIoAsync("big",
            "write -P 0x21 0 33M", "write -P 0x30 40M 48M", "write -P 0x40 96M 64M", "write -P 0x41 160M 65M",
            "read -P 0x21 0 33M", "read -P 0x30 40M 48M", "read -P 0x40 96M 64M", "read -P 0x41 160M 65M");
        Assert.DoesNotContain("failed", qemu.Stdout + qemu.Stderr);
        Assert.Equal(4, Regex.Matches(qemu.Stdout, @"^read \d+/\d+ bytes", RegexOptions.Multiline).Count);
    }

    private const string LargeRequestsScript = """
        import errno
        import sys
        import nbd

        MiB = 1 << 20
        rw = nbd.NBD()
        rw.connect_uri(sys.argv[1])
        assert rw.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB, rw.get_block_size(nbd.SIZE_MAXIMUM)
        for size in (33, 48, 64):
            data = bytes([size]) * (size * MiB)
            rw.pwrite(data, MiB)
            assert rw.pread(size * MiB, MiB) == data, f"{size} MiB read back differs"

        # Not strict: libnbd then sends what it would refuse itself, and the server must answer.
        def refused(handle, expected, size, offset, flags=0):
            try:
                handle.pwrite(bytes(size * MiB), offset, flags)
            except nbd.Error as e:
                assert e.errnum == expected, f"{size} MiB write: {e}"
            else:
                sys.exit(f"{size} MiB write at {offset} was not refused")
            assert handle.pread(4096, 0) is not None  # the same connection goes on

        ro = nbd.NBD()
        ro.set_strict_mode(0)
        ro.connect_uri(sys.argv[2])
        strict_off = nbd.NBD()
        strict_off.set_strict_mode(0)
        strict_off.connect_uri(sys.argv[1])
        size = strict_off.get_size()
        for mib in (4, 40):
            refused(ro, errno.EPERM, mib, 0)
            refused(strict_off, errno.ENOSPC, mib, size - 2 * MiB)  # past the end
            refused(strict_off, errno.EINVAL, mib, 0, 0x80)         # a flag WRITE does not take
        assert strict_off.pread(64, MiB) == bytes([64]) * 64
        print("ok: 33, 48, 64 MiB written and read back; 4, 40 MiB refused writes answered EPERM, ENOSPC, EINVAL in step")
        """;

    [Fact]
    public async Task Fio_nbd_engine_random_writes_verify_with_crc32c()
    {
        await CreateExportAsync("fio", 64 * MiB);
        ToolResult fio = await _gateway.RunAsync("fio",
        [
            "--name=verify", "--ioengine=nbd", $"--uri={_gateway.NbdUri("fio")}",
            "--rw=randwrite", "--bsrange=4k-64k", "--size=32M", "--iodepth=16",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--runtime=60",
        ], timeout: TimeSpan.FromSeconds(90));
        Assert.Contains("err= 0", fio.Stdout);
        Assert.DoesNotContain("verify:", fio.Stderr);
    }

    [Fact]
    public async Task Multi_conn_write_on_one_connection_flush_on_another_is_read_on_a_third()
    {
        await CreateExportAsync("multiconn", 16 * MiB);
        string script = Path.Combine(_gateway.DataDirectory, "multi_conn.py");
        await File.WriteAllTextAsync(script, MultiConn.Script);

        string uri = _gateway.NbdUri("multiconn");
        ToolResult result = await _gateway.RunAsync("/usr/bin/python3", [script, "connection 1", uri, "connection 2", uri, "connection 3", uri]);

        Assert.Contains("ok: 6 offsets consistent across 3 connections", result.Stdout);
    }
}
