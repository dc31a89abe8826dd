using System.Net;
using System.Net.Http.Json;
using System.Text.RegularExpressions;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// Debian trixie's clients (libnbd 1.22, qemu 10.0: extended headers) from the root that
/// <c>ops/lib/trixie-root</c> makes; <c>ops/test</c> exports its path as GATEWAY_TEST_TRIXIE. It
/// shares the host's loopback, so <c>chroot ROOT nbdsh ...</c> reaches the gateway on 127.0.0.1.
/// </summary>
public static class ModernClients
{
    /// <summary>The trixie root; fails the test when it is missing (never a skip).</summary>
    public static string Root
    {
        get
        {
            string? root = Environment.GetEnvironmentVariable("GATEWAY_TEST_TRIXIE");
            Assert.False(string.IsNullOrEmpty(root), "GATEWAY_TEST_TRIXIE is not set: run the tests with ./ops/test, which makes the trixie root (ops/lib/trixie-root --mount)");
            Assert.True(File.Exists(Path.Combine(root, "usr/bin/nbdsh")) && File.Exists(Path.Combine(root, "usr/bin/qemu-io")),
                $"the trixie root {root} lacks nbdsh or qemu-io: rerun ops/lib/trixie-root");
            Assert.True(File.Exists(Path.Combine(root, "proc/self/status")), $"/proc is not mounted in {root}: run ops/lib/trixie-root --mount");
            return root;
        }
    }

    /// <summary>Runs a trixie tool (a path inside the root) against the gateway.</summary>
    public static Task<ToolResult> RunAsync(GatewayProcess gateway, string tool, IEnumerable<string> args, TimeSpan? timeout = null) =>
        gateway.RunAsync("chroot", [Root, tool, .. args], timeout);

    /// <summary>Puts a file into the root's /tmp; returns its path inside the root.</summary>
    public static async Task<string> PlaceAsync(string name, string content)
    {
        string inside = "/tmp/" + name;
        await File.WriteAllTextAsync(Path.Combine(Root, "tmp", name), content);
        return inside;
    }

    public static string Outside(string inside) => Path.Combine(Root, inside.TrimStart('/'));
}

/// <summary>
/// Extended headers negotiated by the clients that have them, against one real gateway: whole
/// multi-GiB TRIM, WRITE_ZEROES and BLOCK_STATUS requests, checked byte for byte with cmp.
/// </summary>
public sealed class ModernClientsTests(GatewayFixture fixture) : IClassFixture<GatewayFixture>
{
    private const long MiB = 1 << 20;
    private const long GiB = 1L << 30;
    private readonly GatewayProcess _gateway = fixture.Gateway;

    private async Task CreateExportAsync(string name, long size)
    {
        using HttpResponseMessage response = await _gateway.Http.PostAsJsonAsync("v1/exports", new { name, size, backend = new { type = "file" } });
        Assert.True(response.StatusCode == HttpStatusCode.Created, $"creating {name}: {(int)response.StatusCode} {await response.Content.ReadAsStringAsync()}");
    }

    private async Task CmpAsync(string export, string expected)
    {
        ToolResult cmp = await _gateway.RunAsync("cmp", [_gateway.ExportFile(export), expected], TimeSpan.FromSeconds(120), check: false);
        Assert.True(cmp.Succeeded, $"the export differs from what the client did\n{cmp.Describe()}");
    }

    private int ExtendedConnections(string export) =>
        Regex.Matches(_gateway.Output, $@"to export {Regex.Escape(export)}: plaintext, extended headers").Count;

    [Fact]
    public async Task Libnbd_1_22_extended_headers_trim_zero_and_block_status_over_4_GiB_in_one_request()
    {
        await CreateExportAsync("ext-libnbd", 6 * GiB);
        string script = await ModernClients.PlaceAsync("ext_libnbd.py", LibnbdScript);
        string expected = "/tmp/ext-libnbd.expected";

        ToolResult result = await ModernClients.RunAsync(_gateway, "/usr/bin/python3", [script, _gateway.NbdUri("ext-libnbd"), expected], TimeSpan.FromSeconds(180));

        Assert.Contains("ok: extended headers; zero 4.5 GiB, trim 4.25 GiB, block status 6 GiB in one request each", result.Stdout);
        Assert.True(ExtendedConnections("ext-libnbd") >= 1, $"the gateway logged no extended-header connection\n{_gateway.Describe()}");
        await CmpAsync("ext-libnbd", ModernClients.Outside(expected));
        File.Delete(ModernClients.Outside(expected));
    }

    // Each request is counted by libnbd's own statistics, so "one request" is what went on the wire.
    private const string LibnbdScript = """
        import os
        import sys
        import nbd

        MiB = 1 << 20
        GiB = 1 << 30
        h = nbd.NBD()
        h.set_request_extended_headers(True)
        h.add_meta_context("base:allocation")
        h.connect_uri(sys.argv[1])
        assert h.get_extended_headers_negotiated(), "extended headers were not negotiated"
        assert h.can_block_status_payload(), "BLOCK_STATUS_PAYLOAD not advertised"
        size = h.get_size()

        def pattern(byte, length):
            return bytes([byte]) * length

        writes = []
        def write(offset, data):
            h.pwrite(data, offset)
            writes.append((offset, data))

        def one_request(name, action):
            before = h.stats_chunks_sent()
            action()
            sent = h.stats_chunks_sent() - before
            assert sent == 1, f"{name} went as {sent} requests"

        write(1 * GiB, pattern(0xA1, MiB))
        write(4 * GiB + GiB // 2, pattern(0xB2, MiB))
        write(5 * GiB + GiB // 2, pattern(0xC3, MiB))
        one_request("zero", lambda: h.zero(4 * GiB + GiB // 2, GiB // 2))      # [0.5 GiB, 5 GiB)
        writes = [(o, d) for (o, d) in writes if not (GiB // 2 <= o < 5 * GiB)]
        write(2 * GiB, pattern(0xD4, 64 * MiB))                                  # the largest payload
        write(4 * GiB + GiB // 2, pattern(0xE5, MiB))
        one_request("trim", lambda: h.trim(4 * GiB + GiB // 4, 0))               # [0, 4.25 GiB)
        writes = [(o, d) for (o, d) in writes if not (o < 4 * GiB + GiB // 4)]
        write(100 * MiB, pattern(0xF6, 64 * MiB))
        h.flush()

        extents = []
        def collect(meta, offset, entries, err):
            extents.extend(entries)
        one_request("block status", lambda: h.block_status_64(size, 0, collect))
        longest = max(length for (length, flags) in extents)
        assert longest > 4 * GiB, f"no extent over 4 GiB: {extents}"

        for (offset, data) in writes:
            assert h.pread(len(data), offset) == data, f"read back at {offset} differs"
        with open(sys.argv[2], "wb") as f:
            f.truncate(size)
            for (offset, data) in writes:
                f.seek(offset)
                f.write(data)
        print("ok: extended headers; zero 4.5 GiB, trim 4.25 GiB, block status 6 GiB in one request each")
        """;

    [Fact]
    public async Task Qemu_10_negotiates_extended_headers_and_its_writes_zeroes_and_map_agree_with_the_file()
    {
        await CreateExportAsync("ext-qemu", 5 * GiB);
        string uri = _gateway.NbdUri("ext-qemu");

        ToolResult io = await ModernClients.RunAsync(_gateway, "/usr/bin/qemu-io", ["-f", "raw", uri,
            "-c", "write -P 0x5a 0 48M", "-c", "write -P 0x6b 4G 64M", "-c", "write -P 0x7c 4160M 1M",
            "-c", "write -z -n 16M 4160M", // 4.06 GiB of zeroes over [16 MiB, 4176 MiB); -n (FAST_ZERO) lifts qemu-io's 2 GiB cap
            "-c", "write -P 0x7c 4180M 1M",
            "-c", "read -P 0x5a 0 16M", "-c", "read -P 0 16M 16M", "-c", "read -P 0 4G 65M", "-c", "read -P 0x7c 4180M 1M"], TimeSpan.FromSeconds(180));
        Assert.DoesNotContain("failed", io.Stdout + io.Stderr);
        Assert.Equal(4, Regex.Matches(io.Stdout, @"^read \d+/\d+ bytes", RegexOptions.Multiline).Count);
        Assert.True(ExtendedConnections("ext-qemu") >= 1, $"qemu 10 did not negotiate extended headers\n{_gateway.Describe()}");

        ToolResult map = await ModernClients.RunAsync(_gateway, "/usr/bin/qemu-img", ["map", "--output=json", "-f", "raw", uri]);
        Assert.Contains("\"start\": 0, \"length\": 16777216, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true", map.Stdout);

        string expected = Path.Combine(_gateway.DataDirectory, "ext-qemu.expected");
        await using (FileStream file = File.Create(expected))
        {
            file.SetLength(5 * GiB);
            file.Write(Enumerable.Repeat((byte)0x5a, (int)(16 * MiB)).ToArray());
            file.Position = 4180 * MiB;
            file.Write(Enumerable.Repeat((byte)0x7c, (int)MiB).ToArray());
        }
        await CmpAsync("ext-qemu", expected);
        File.Delete(expected);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Nbdcopy_and_nbdinfo_1_22_copy_and_map_in_either_header_style(bool extended)
    {
        string name = extended ? "copy-ext" : "copy-compact";
        await CreateExportAsync(name, 64 * MiB);
        string source = Path.Combine(ModernClients.Root, "tmp", name + ".src");
        byte[] data = new byte[8 * MiB];
        new Random(42).NextBytes(data);
        await using (FileStream file = File.Create(source))
        {
            file.SetLength(64 * MiB);
            file.Position = 40 * MiB;
            file.Write(data);
        }
        // nbdcopy has no switch for the header style (libnbd 1.22 asks for extended headers), so
        // the compact run is the same libnbd with extended headers turned off.
        if (extended)
        {
            await ModernClients.RunAsync(_gateway, "/usr/bin/nbdcopy", ["/tmp/" + name + ".src", _gateway.NbdUri(name)]);
        }
        else
        {
            string script = await ModernClients.PlaceAsync(name + ".py", CompactCopyScript);
            await ModernClients.RunAsync(_gateway, "/usr/bin/python3", [script, "/tmp/" + name + ".src", _gateway.NbdUri(name)]);
        }
        await CmpAsync(name, source);

        ToolResult info = await ModernClients.RunAsync(_gateway, "/usr/bin/nbdinfo", ["--map", _gateway.NbdUri(name)]);
        Assert.Matches(@"41943040\s+8388608\s+0\s+data", info.Stdout);
        File.Delete(source);
    }

    private const string CompactCopyScript = """
        import sys
        import nbd

        h = nbd.NBD()
        h.set_request_extended_headers(False)
        h.connect_uri(sys.argv[2])
        assert not h.get_extended_headers_negotiated()
        with open(sys.argv[1], "rb") as f:
            data = f.read()
        step = 4 << 20
        for at in range(0, len(data), step):
            piece = data[at:at + step]
            if piece.count(0) != len(piece):
                h.pwrite(piece, at)
        h.flush()
        print("copied compact")
        """;
}
