using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Resize;

/// <summary>
/// Growing exports online through the real gateway: a file export and an overlay export with a
/// frozen layer below its top, written by qemu-io, grown over the admin API and the CLI while a
/// libnbd client stays connected, then read back by new connections (nbdinfo, qemu-io) and again
/// after a restart. A dirty bitmap made before the grow keeps its extents and covers the new range.
/// </summary>
public sealed class ResizeInteropTests
{
    private const long MiB = 1 << 20;
    private const long Old = 4 * MiB;
    private const long New = 8 * MiB;
    private const string Python = "/usr/bin/python3"; // the nbd module exists only for the system python

    // Connects before the grow and goes on after it: the size it was told, the errors past that
    // size (strict mode off, so libnbd sends what it would refuse itself), and a write that works.
    private const string HeldConnection = """
        import nbd, os, sys, time
        uri, ready, go = sys.argv[1:4]
        h = nbd.NBD()
        h.set_strict_mode(0)
        h.connect_uri(uri)
        before = h.get_size()
        open(ready, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(go):
            if time.time() > deadline:
                sys.exit("not told to go on")
            time.sleep(0.05)
        def errno_of(request):
            try:
                request()
                return 0
            except nbd.Error as e:
                return e.errno
        read_past = errno_of(lambda: h.pread(4096, before))
        write_past = errno_of(lambda: h.pwrite(b"\x01" * 4096, before))
        h.pwrite(b"\x77" * 4096, 8192)
        h.flush()
        same = h.pread(4096, 8192) == b"\x77" * 4096
        print(before, h.get_size(), read_past, write_past, same)
        h.shutdown()
        """;

    [Fact]
    public async Task File_and_overlay_exports_grow_while_connected_clients_keep_their_size_and_new_clients_see_the_new_size_zeros_and_holes_across_a_restart()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await PostAsync(gateway, "v1/exports", new { name = "flat", size = Old }, HttpStatusCode.Created);
        await PostAsync(gateway, "v1/exports", new { name = "layered", size = Old, backend = new { type = "overlay" } }, HttpStatusCode.Created);
        await QemuIoAsync(gateway, "flat", "write -P 0x5a 0 4M");
        await QemuIoAsync(gateway, "layered", "write -P 0x11 0 4M");
        await PostAsync(gateway, "v1/exports/layered/snapshot", null, HttpStatusCode.OK);
        await QemuIoAsync(gateway, "layered", "write -P 0x22 1M 64k");
        await PostAsync(gateway, "v1/exports/flat/bitmaps", new { name = "backup", granularity = "64K", enabled = true }, HttpStatusCode.Created);
        await QemuIoAsync(gateway, "flat", "write -P 0x33 2M 64k");
        Assert.Equal([(2 * MiB, 64 * 1024L)], await DirtyAsync(gateway, "flat", "backup"));

        string script = Path.Combine(gateway.DataDirectory, "held.py");
        await File.WriteAllTextAsync(script, HeldConnection);
        string ready = Path.Combine(gateway.DataDirectory, "ready"), go = Path.Combine(gateway.DataDirectory, "go");
        Task<ToolResult> held = gateway.RunAsync(Python, [script, gateway.NbdUri("flat"), ready, go], TimeSpan.FromSeconds(90));
        await WaitForFileAsync(ready, held);

        using (JsonDocument grown = await PostAsync(gateway, "v1/exports/flat/resize", new { size = New }, HttpStatusCode.OK))
        {
            Assert.Equal(New, grown.RootElement.GetProperty("size").GetInt64());
            Assert.Equal("flat", grown.RootElement.GetProperty("name").GetString());
        }
        ToolResult cli = await gateway.CliAsync("export", "resize", "layered", "--size", "8M");
        Assert.True(cli.Succeeded, cli.Describe());
        using (JsonDocument shown = JsonDocument.Parse(cli.Stdout))
        {
            Assert.Equal(New, shown.RootElement.GetProperty("size").GetInt64());
            Assert.Equal(2, shown.RootElement.GetProperty("backend").GetProperty("layers").GetArrayLength());
        }

        // The client connected before: still the old size, the old errors past it (EINVAL, ENOSPC), and it still works.
        await File.WriteAllTextAsync(go, "");
        ToolResult heldResult = await held;
        Assert.Equal($"{Old} {Old} EINVAL ENOSPC True", heldResult.Stdout.Trim());

        await AssertGrownAsync(gateway);
        await QemuIoAsync(gateway, "flat", "write -P 0x66 6M 64k");
        await QemuIoAsync(gateway, "layered", "write -P 0x67 6M 64k");
        await QemuIoAsync(gateway, "flat", "read -P 0x66 6M 64k", "read -P 0 6208k 1984k");
        await QemuIoAsync(gateway, "layered", "read -P 0x67 6M 64k", "read -P 0 6208k 1984k");
        // The bitmap made before the grow: its extents kept (the held client's write at 8 KiB too), the new write marked.
        List<(long, long)> expectedDirty = [(0, 64 * 1024), (2 * MiB, 64 * 1024), (6 * MiB, 64 * 1024)];
        Assert.Equal(expectedDirty, await DirtyAsync(gateway, "flat", "backup"));

        await gateway.StopAsync();
        await gateway.RestartAsync();

        await AssertGrownAsync(gateway);
        await QemuIoAsync(gateway, "flat", "read -P 0x66 6M 64k");
        await QemuIoAsync(gateway, "layered", "read -P 0x67 6M 64k");
        Assert.Equal(expectedDirty, await DirtyAsync(gateway, "flat", "backup"));
        using JsonDocument list = JsonDocument.Parse(await gateway.Http.GetStringAsync("v1/exports"));
        Assert.All(list.RootElement.EnumerateArray().Where(e => e.GetProperty("name").GetString() is "flat" or "layered"),
            e => Assert.Equal(New, e.GetProperty("size").GetInt64()));
    }

    [Fact]
    public async Task Resize_answers_200_for_the_same_size_and_4xx_naming_the_problem_otherwise()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        await PostAsync(gateway, "v1/exports", new { name = "vm", size = Old }, HttpStatusCode.Created);
        await PostAsync(gateway, "v1/exports", new { name = "ro", size = Old, readOnly = true }, HttpStatusCode.Created);

        using (JsonDocument same = await PostAsync(gateway, "v1/exports/vm/resize", new { size = "4M" }, HttpStatusCode.OK))
        {
            Assert.Equal(Old, same.RootElement.GetProperty("size").GetInt64());
        }
        Assert.Contains("shrinking is refused", await ErrorAsync(gateway, "v1/exports/vm/resize", new { size = "1M" }, HttpStatusCode.BadRequest));
        Assert.Contains("size 0 is invalid", await ErrorAsync(gateway, "v1/exports/vm/resize", new { size = 0 }, HttpStatusCode.BadRequest));
        Assert.Contains("is invalid", await ErrorAsync(gateway, "v1/exports/vm/resize", new { size = "lots" }, HttpStatusCode.BadRequest));
        Assert.Contains("over the limit", await ErrorAsync(gateway, "v1/exports/vm/resize", new { size = "2048T" }, HttpStatusCode.BadRequest));
        Assert.Contains("size is required", await ErrorAsync(gateway, "v1/exports/vm/resize", new { }, HttpStatusCode.BadRequest));
        Assert.Contains("read-only", await ErrorAsync(gateway, "v1/exports/ro/resize", new { size = "8M" }, HttpStatusCode.BadRequest));
        Assert.Contains("not found", await ErrorAsync(gateway, "v1/exports/nope/resize", new { size = "8M" }, HttpStatusCode.NotFound));
        using (var content = new StringContent("{not json", System.Text.Encoding.UTF8, "application/json"))
        using (HttpResponseMessage bad = await gateway.Http.PostAsync("v1/exports/vm/resize", content))
        {
            Assert.Equal(HttpStatusCode.BadRequest, bad.StatusCode);
            Assert.Contains("not valid JSON", await bad.Content.ReadAsStringAsync());
        }

        ToolResult shrink = await gateway.CliAsync("export", "resize", "vm", "--size", "1M");
        Assert.NotEqual(0, shrink.ExitCode);
        string error = Assert.Single(shrink.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.StartsWith("error: shrinking is refused", error);
        Assert.Equal("", shrink.Stdout);
        ToolResult nbdinfo = await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri("vm")]);
        Assert.Equal(Old.ToString(System.Globalization.CultureInfo.InvariantCulture), nbdinfo.Stdout.Trim());
    }

    /// <summary>Both exports as a new client sees them after the grow: size, old data, zeros and holes past the old end.</summary>
    private static async Task AssertGrownAsync(GatewayProcess gateway)
    {
        foreach (string export in new[] { "flat", "layered" })
        {
            ToolResult size = await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri(export)]);
            Assert.Equal(New.ToString(System.Globalization.CultureInfo.InvariantCulture), size.Stdout.Trim());
            List<(long Offset, long Length, long Type)> map = await MapAsync(gateway, export, "base:allocation");
            // Past the old end only the 64 KiB written at 6 MiB (after the grow) is data.
            Assert.All(map.Where(e => e.Offset >= Old && (e.Offset >= 6 * MiB + 64 * 1024 || e.Offset + e.Length <= 6 * MiB)),
                e => Assert.True(e.Type == 3, $"{export}: {e} past the old end is not a hole of zeros"));
            Assert.Contains(map, e => e.Offset <= Old && e.Offset + e.Length >= 6 * MiB && e.Type == 3);
        }
        await QemuIoAsync(gateway, "flat", "read -P 0x5a 0 8k", "read -P 0x77 8k 4k", "read -P 0x5a 12k 2036k", "read -P 0x33 2M 64k", "read -P 0x5a 2112k 1984k", "read -P 0 4M 2M");
        await QemuIoAsync(gateway, "layered", "read -P 0x11 0 1M", "read -P 0x22 1M 64k", "read -P 0x11 1088k 3008k", "read -P 0 4M 2M");
        List<(long Offset, long Length, long Type)> depth = await MapAsync(gateway, "layered", "qemu:allocation-depth");
        Assert.Contains(depth, e => e.Offset <= Old && e.Offset + e.Length >= 6 * MiB && e.Type == 0);
        Assert.Contains(depth, e => e.Offset == 0 && e.Type == 2);
    }

    private static Task<ToolResult> QemuIoAsync(GatewayProcess gateway, string export, params string[] commands) =>
        gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })]);

    private static async Task<List<(long, long, long)>> MapAsync(GatewayProcess gateway, string export, string context)
    {
        ToolResult map = await gateway.RunAsync("nbdinfo", ["--map=" + context, "--json", gateway.NbdUri(export)]);
        using JsonDocument doc = JsonDocument.Parse(map.Stdout);
        return [.. doc.RootElement.EnumerateArray().Select(e => (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("type").GetInt64()))];
    }

    /// <summary>Dirty ranges of a bitmap, merged.</summary>
    private static async Task<List<(long, long)>> DirtyAsync(GatewayProcess gateway, string export, string bitmap) =>
        [.. (await MapAsync(gateway, export, "qemu:dirty-bitmap:" + bitmap)).Where(e => (e.Item3 & 1) != 0).Select(e => (e.Item1, e.Item2))];

    private static async Task<JsonDocument> PostAsync(GatewayProcess gateway, string path, object? body, HttpStatusCode expected)
    {
        using HttpResponseMessage response = body is null ? await gateway.Http.PostAsync(path, null) : await gateway.Http.PostAsJsonAsync(path, body);
        string text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == expected, $"POST {path}: {(int)response.StatusCode} {text}\n{gateway.Describe()}");
        return JsonDocument.Parse(text.Length == 0 ? "{}" : text);
    }

    private static async Task<string> ErrorAsync(GatewayProcess gateway, string path, object body, HttpStatusCode expected)
    {
        using JsonDocument error = await PostAsync(gateway, path, body, expected);
        return error.RootElement.GetProperty("error").GetString()!;
    }

    private static async Task WaitForFileAsync(string path, Task<ToolResult> client)
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (!File.Exists(path))
        {
            if (client.IsCompleted)
            {
                Assert.Fail($"the client ended before it connected\n{(await client).Describe()}");
            }
            Assert.True(DateTime.UtcNow < deadline, "the client did not connect within 30 s");
            await Task.Delay(50);
        }
    }
}
