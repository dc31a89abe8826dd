using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text.Json;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// Three real gateway processes in cluster mode on loopback against a real PostgreSQL, driven by
/// real clients: the nbd Python module, nbdinfo, qemu-io and the gateway CLI. Each test finds the
/// owner of its export through /v1/cluster and picks its other nodes from there, so the tests do
/// not depend on where the coordinator placed a shard, nor on the order they run in; a test that
/// kills or adds a node puts the cluster back to three nodes before it ends.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class ClusterInteropTests(ClusterFixture cluster, Xunit.Abstractions.ITestOutputHelper output) : IClassFixture<ClusterFixture>
{
    private const long KiB = 1 << 10;
    private const long MiB = 1 << 20;
    private const string Python = "/usr/bin/python3"; // the nbd module exists only for the system python

    /// <summary>
    /// After kill -9 of the owner the export is served again within this, measured from the kill:
    /// 3.6-4.2 s here (README "Failover"); the second and more are room for a slower CI machine.
    /// </summary>
    private static readonly TimeSpan FailoverDeadline = TimeSpan.FromSeconds(6);

    /// <summary>The three initial nodes, in start order.</summary>
    private (ClusterNode A, ClusterNode B, ClusterNode C) Three()
    {
        IReadOnlyList<ClusterNode> running = cluster.Running;
        Assert.True(running.Count >= 3, $"the cluster runs {running.Count} nodes, the test needs 3\n{cluster.Describe()}");
        return (running[0], running[1], running[2]);
    }

    private async Task<string> ScriptAsync(string name, string text)
    {
        string path = Path.Combine(cluster.DataDirectory, name);
        await File.WriteAllTextAsync(path, text);
        return path;
    }

    /// <summary>Waits (bounded) until <c>GET /v1/exports</c> on <paramref name="via"/> lists <paramref name="export"/>.</summary>
    private async Task WaitListedAsync(ClusterNode via, string export)
    {
        var clock = Stopwatch.StartNew();
        string body = "";
        while (clock.Elapsed < TimeSpan.FromSeconds(10))
        {
            body = await cluster.AdminAsync(HttpStatusCode.OK, via, HttpMethod.Get, "v1/exports");
            using JsonDocument doc = JsonDocument.Parse(body);
            if (doc.RootElement.EnumerateArray().Any(e => e.GetProperty("name").GetString() == export))
            {
                return;
            }
            await Task.Delay(100);
        }
        Assert.Fail($"GET /v1/exports on {via} does not list {export} 10 s after it was created: {body}\n{cluster.Describe()}");
    }

    private Task AddBitmapAsync(ClusterNode via, string export, string bitmap, string granularity) =>
        cluster.AdminAsync(HttpStatusCode.Created, via, HttpMethod.Post, $"v1/exports/{export}/bitmaps", new { name = bitmap, granularity, enabled = true });

    private Task<ToolResult> QemuIoAsync(ClusterNode via, string export, params string[] commands) => cluster.QemuIoAsync(via, export, commands);

    /// <summary><c>nbdinfo --map=CONTEXT --json</c> through one node: (offset, length, type) of each extent.</summary>
    private async Task<List<(long Offset, long Length, long Type)>> MapAsync(ClusterNode via, string export, string context)
    {
        ToolResult map = await cluster.RunAsync("nbdinfo", ["--map=" + context, "--json", via.NbdUri(export)]);
        using JsonDocument doc = JsonDocument.Parse(map.Stdout);
        return [.. doc.RootElement.EnumerateArray().Select(e => (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("type").GetInt64()))];
    }

    private static List<(long, long)> Merge(IEnumerable<(long Offset, long Length)> ranges) => FileExtents.Merge(ranges);

    /// <summary>The granule-aligned ranges a set of byte ranges dirties, merged.</summary>
    private static List<(long, long)> Dirtied(long granularity, params (long Offset, long Length)[] writes) =>
        Merge(writes.Select(w =>
        {
            long start = w.Offset / granularity * granularity;
            long end = (w.Offset + w.Length + granularity - 1) / granularity * granularity;
            return (start, end - start);
        }));

    private static List<(long, long)> Dirty(IEnumerable<(long Offset, long Length, long Type)> map) =>
        Merge(map.Where(e => (e.Type & 1) != 0).Select(e => (e.Offset, e.Length)));

    private static string Format<T>(IEnumerable<T> items) => "[" + string.Join(", ", items) + "]";

    // ---- cross-node multi-conn ----


    [Fact]
    public async Task Multi_conn_holds_across_nodes_a_write_through_B_and_a_flush_through_C_are_read_through_A()
    {
        (ClusterNode a, ClusterNode b, ClusterNode c) = Three();
        await cluster.CreateExportAsync(a, new { name = "multiconn", size = 16 * MiB });
        await WaitListedAsync(c, "multiconn");
        ClusterNode owner = await cluster.OwnerAsync("multiconn");
        Assert.Contains(owner, new[] { a, b, c }); // so at least two of the three connections go through a non-owner

        string script = await ScriptAsync("multi_conn.py", MultiConn.Script);
        ToolResult result = await cluster.RunAsync(Python,
            [script, a.Name, a.NbdUri("multiconn"), b.Name, b.NbdUri("multiconn"), c.Name, c.NbdUri("multiconn")]);

        Assert.Contains("ok: 6 offsets consistent across 3 connections", result.Stdout);
    }

    // ---- cross-node maps ----

    [Fact]
    public async Task Allocation_depth_dirty_bitmap_and_base_allocation_maps_through_a_non_owner_equal_the_owners()
    {
        (ClusterNode a, ClusterNode b, ClusterNode c) = Three();

        // An overlay of three layers (1 = top): [0,1M) from the bottom, [1M,2M) the middle, one 64 KiB
        // cluster of the top, unallocated from 4M on. Written and snapshotted through non-owners.
        await cluster.CreateExportAsync(a, new { name = "maps-overlay", size = 16 * MiB, backend = new { type = "overlay" } });
        ClusterNode overlayOwner = await cluster.OwnerAsync("maps-overlay");
        ClusterNode[] notOverlayOwner = [.. new[] { a, b, c }.Where(n => n != overlayOwner)];
        string[][] layers = [["write -P 0x11 0 4M"], ["write -P 0x22 1M 1M"], ["write -P 0x33 2M 64k"]];
        for (int layer = 0; layer < layers.Length; layer++)
        {
            await QemuIoAsync(notOverlayOwner[layer % 2], "maps-overlay", layers[layer]);
            if (layer < layers.Length - 1)
            {
                await cluster.AdminAsync(HttpStatusCode.OK, notOverlayOwner[(layer + 1) % 2], HttpMethod.Post, "v1/exports/maps-overlay/snapshot");
            }
        }
        (long, long, long)[] depths =
        [
            (0, 1 * MiB, 3),
            (1 * MiB, 1 * MiB, 2),
            (2 * MiB, 64 * KiB, 1),
            (2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, 3),
            (4 * MiB, 12 * MiB, 0),
        ];

        // A file export with a 64K bitmap, written through a non-owner.
        await cluster.CreateExportAsync(b, new { name = "maps-file", size = 64 * MiB });
        await AddBitmapAsync(c, "maps-file", "b64k", "64K");
        ClusterNode fileOwner = await cluster.OwnerAsync("maps-file");
        ClusterNode fileWriter = new[] { a, b, c }.First(n => n != fileOwner);
        await QemuIoAsync(fileWriter, "maps-file",
            "write -P 0x11 1000 1", "write -P 0x22 128k 64k", "write -P 0x33 3145216 1024",
            "write -z 10244k 200k", "discard 20M 64k", "write -P 0x44 67108352 512", "write -P 0x55 40M 2M");
        List<(long, long)> dirtied = Dirtied(64 * KiB,
            (1000, 1), (128 * KiB, 64 * KiB), (3 * MiB - 512, 1024), (10 * MiB + 4 * KiB, 200 * KiB), (20 * MiB, 64 * KiB), (64 * MiB - 512, 512), (40 * MiB, 2 * MiB));

        (string Export, string Context, ClusterNode Owner)[] maps =
        [
            ("maps-overlay", "qemu:allocation-depth", overlayOwner),
            ("maps-overlay", "base:allocation", overlayOwner),
            ("maps-file", "qemu:dirty-bitmap:b64k", fileOwner),
            ("maps-file", "base:allocation", fileOwner),
        ];
        foreach ((string export, string context, ClusterNode owner) in maps)
        {
            List<(long Offset, long Length, long Type)> expected = await MapAsync(owner, export, context);
            switch (context)
            {
                case "qemu:allocation-depth":
                    Assert.True(depths.SequenceEqual(expected), $"allocation depth through the owner {owner}: {Format(expected)}, expected {Format(depths)}");
                    break;
                case "qemu:dirty-bitmap:b64k":
                    Assert.True(dirtied.SequenceEqual(Dirty(expected)), $"dirty bitmap through the owner {owner}: {Format(Dirty(expected))}, expected {Format(dirtied)}");
                    break;
                default:
                    Assert.True(expected.Count > 1, $"base:allocation of {export} through the owner {owner} has no holes: {Format(expected)}");
                    break;
            }
            foreach (ClusterNode other in new[] { a, b, c }.Where(n => n != owner))
            {
                List<(long, long, long)> actual = await MapAsync(other, export, context);
                Assert.True(expected.SequenceEqual(actual),
                    $"{context} of {export} through {other} differs from the owner {owner}'s\nowner: {Format(expected)}\n{other.Name}: {Format(actual)}");
            }
        }
    }

    // ---- holes across nodes ----

    /// <summary>
    /// Reads [0, length) and prints what came back. Structured: one line per reply chunk, as libnbd
    /// hands it over (<c>DATA offset length nonzero-bytes byte-at-written-offset</c> or
    /// <c>HOLE offset length</c>); simple (structured replies refused): one <c>SIMPLE</c> line with
    /// the offset of the first nonzero byte outside the written range (-1: none) and the written
    /// range's bytes, then <c>ok</c>.
    /// </summary>
    private const string ChunksScript = """
        import nbd, sys
        uri, mode, length, written, count, pattern = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
        h = nbd.NBD()
        h.set_request_structured_replies(mode == "structured")
        h.connect_uri(uri)
        if h.get_structured_replies_negotiated() != (mode == "structured"):
            sys.exit(f"structured replies negotiated: {h.get_structured_replies_negotiated()}, asked for {mode}")
        if mode == "structured":
            chunks = []
            def chunk(subbuf, offset, status, error):
                if status == nbd.READ_DATA:
                    data = bytes(subbuf)
                    inside = data[written - offset] if offset <= written < offset + len(data) else -1
                    chunks.append(f"DATA {offset} {len(data)} {len(data) - data.count(0)} {inside}")
                elif status == nbd.READ_HOLE:
                    chunks.append(f"HOLE {offset} {len(subbuf)}")
                else:
                    chunks.append(f"ERROR {offset} {error}")
                return 0
            buf = h.pread_structured(length, 0, chunk)
            print("\n".join(chunks))
        else:
            buf = h.pread(length, 0)
            outside = next((i for i, b in enumerate(buf) if b != 0 and not written <= i < written + count), -1)
            inside = set(buf[written:written + count])
            print(f"SIMPLE {outside} {sorted(inside)}")
        if buf[written:written + count] != bytes([pattern]) * count:
            sys.exit("the written range did not read back")
        h.shutdown()
        print("ok")
        """;

    /// <summary>Issue 16 item 3: a hole on the owner is a hole for a client of any node, never zeros sent as data.</summary>
    [Fact]
    public async Task Holes_of_a_sparse_export_reach_a_client_of_a_non_owner_as_OFFSET_HOLE_chunks_and_zeros_for_a_simple_client()
    {
        const string Export = "holes";
        const long Length = 2 * MiB, Written = MiB, Count = 64 * KiB;
        (ClusterNode a, _, _) = Three();
        await cluster.CreateExportAsync(a, new { name = Export, size = 8 * MiB });
        ClusterNode owner = await cluster.OwnerAsync(Export);
        ClusterNode via = cluster.Running.First(n => n != owner);
        await QemuIoAsync(via, Export, $"write -P 0x5a {Written} {Count}", "flush");
        string script = await ScriptAsync("chunks.py", ChunksScript);

        foreach (ClusterNode node in new[] { via, owner })
        {
            ToolResult result = await cluster.RunAsync(Python, [script, node.NbdUri(Export), "structured", $"{Length}", $"{Written}", $"{Count}", $"{0x5a}"]);
            output.WriteLine($"through {(node == owner ? "the owner" : "a non-owner")} {node}:\n{result.Stdout}");
            string[][] chunks = [.. result.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => l != "ok").Select(l => l.Split(' '))];
            Assert.Contains("ok", result.Stdout);
            // The chunks tile the read exactly once (libnbd checks no overlap; here: nothing missing).
            Assert.Equal(Length, chunks.Sum(c => long.Parse(c[2], System.Globalization.CultureInfo.InvariantCulture)));
            var holes = chunks.Where(c => c[0] == "HOLE").Select(c => (Offset: long.Parse(c[1], System.Globalization.CultureInfo.InvariantCulture), Length: long.Parse(c[2], System.Globalization.CultureInfo.InvariantCulture))).ToList();
            var data = chunks.Where(c => c[0] == "DATA").ToList();
            // Everything but the written 64 KiB came back as holes; the written range as data with its bytes.
            Assert.Equal(Merge([(0L, Written), (Written + Count, Length - Written - Count)]), Merge(holes));
            Assert.Equal(
                [$"DATA {Written} {Count} {Count} {0x5a}"],
                data.Select(c => string.Join(' ', c)));
        }

        ToolResult simple = await cluster.RunAsync(Python, [script, via.NbdUri(Export), "simple", $"{Length}", $"{Written}", $"{Count}", $"{0x5a}"]);
        Assert.Contains($"SIMPLE -1 [{0x5a}]", simple.Stdout);
        Assert.Contains("ok", simple.Stdout);
    }

    // ---- failover ----

    /// <summary><c>write URI OFFSET FILE</c> writes the file there and flushes; <c>sha URI OFFSET LENGTH</c> reads. Both print the SHA-256.</summary>
    private const string RangeScript = """
        import hashlib, sys
        import nbd

        mode, uri, offset = sys.argv[1], sys.argv[2], int(sys.argv[3])
        h = nbd.NBD()
        h.connect_uri(uri)
        sha = hashlib.sha256()
        step = 1 << 20
        if mode == "write":
            with open(sys.argv[4], "rb") as f:
                data = f.read()
            for o in range(0, len(data), step):
                h.pwrite(data[o:o + step], offset + o)
            h.flush()
            sha.update(data)
        else:
            length = int(sys.argv[4])
            for o in range(0, length, step):
                sha.update(h.pread(min(step, length - o), offset + o))
        h.shutdown()
        print(sha.hexdigest())
        """;

    /// <summary>Creates a 64 MiB export; returns its owner and the two other nodes (a writer and a loader).</summary>
    private async Task<(ClusterNode Owner, ClusterNode Writer, ClusterNode Loader)> CreateOwnedElsewhereAsync(string export)
    {
        await cluster.CreateExportAsync(Three().A, new { name = export, size = 64 * MiB });
        ClusterNode owner = await cluster.OwnerAsync(export);
        ClusterNode[] others = [.. cluster.Running.Where(n => n != owner)];
        return (owner, others[0], others[1]);
    }

    /// <summary>
    /// Starts <see cref="LoadScript"/> through <paramref name="loader"/> on [32M, 64M) of the export
    /// and waits until it runs; returns it and the file to write the disruption's time into.
    /// </summary>
    private async Task<(Task<ToolResult> Loading, string Disrupted)> StartLoadAsync(ClusterNode loader, string export, string name)
    {
        string started = Path.Combine(cluster.DataDirectory, name + ".started");
        string disrupted = Path.Combine(cluster.DataDirectory, name + ".disrupted");
        string load = await ScriptAsync("load.py", LoadScript);
        Task<ToolResult> loading = cluster.RunAsync(Python,
            [load, loader.NbdUri(export), started, disrupted, (32 * MiB).ToString(), (32 * MiB).ToString(), "90", "20"], TimeSpan.FromSeconds(120), check: false);
        var clock = Stopwatch.StartNew();
        while (!File.Exists(started) && !loading.IsCompleted && clock.Elapsed < TimeSpan.FromSeconds(30))
        {
            await Task.Delay(50);
        }
        Assert.True(File.Exists(started), $"the load through {loader} did not get going\n{(loading.IsCompleted ? (await loading).Describe() : "still running")}\n{cluster.Describe()}");
        return (loading, disrupted);
    }

    /// <summary>
    /// One connection that writes a 4 KiB block, reads it back and flushes every 8th cycle, on and
    /// on, through the node it was given. A read must return the last acknowledged write of its
    /// block or a write that failed since (an EIO leaves it undecided whether the data landed);
    /// anything else is wrong data. Errors other than EIO and ESHUTDOWN, a connection that the
    /// node closes, and a request without a reply for HANG seconds are failures too. Creates
    /// STARTED after 50 good cycles; KILLED appears holding the kill's wall-clock time; stops 20 s
    /// after it, or after SECONDS. Prints a JSON summary, whatever happened.
    /// </summary>
    private const string LoadScript = """
        import errno, json, os, sys, time
        import nbd

        uri, started, killed_file = sys.argv[1], sys.argv[2], sys.argv[3]
        start, length, seconds, hang = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
        block = 4096
        blocks = length // block
        zero = bytes(block)
        h = nbd.NBD()
        h.connect_uri(uri)
        deadline = time.time() + seconds
        killed = None
        possible = {}
        s = {"cycles": 0, "good": 0, "good_after_kill": 0, "good_since_last_error": 0, "errors": {},
             "unexpected": [], "wrong": [], "dead": None, "hung": None, "first_error": None, "last_error": None, "max_wait_s": 0}

        class Hung(Exception):
            pass

        def wait(op, off, cookie):
            # Raises nbd.Error when the command failed; Hung when it got no reply in time.
            sent = time.time()
            while not h.aio_command_completed(cookie):
                if time.time() - sent > hang:
                    raise Hung(f"{op} at offset {off} sent {sent - killed if killed else -1:.1f} s after the kill got no reply within {hang} s")
                h.poll(100)
            s["max_wait_s"] = max(s["max_wait_s"], round(time.time() - sent, 3))

        def failed(op, e):
            name = e.errno or str(e.errnum)
            s["errors"][name] = s["errors"].get(name, 0) + 1
            now = time.time()
            if s["first_error"] is None:
                s["first_error"] = now
            s["last_error"] = now
            s["good_since_last_error"] = 0
            if e.errnum not in (errno.EIO, errno.ESHUTDOWN) and len(s["unexpected"]) < 10:
                s["unexpected"].append(f"{op}: {e.string} (errno {name})")

        i = 0
        try:
            while time.time() < deadline:
                if killed is None and os.path.exists(killed_file):
                    with open(killed_file) as f:
                        text = f.read().strip()
                    if text:
                        killed = float(text)
                        deadline = min(deadline, killed + 20)
                b = i % blocks
                off = start + b * block
                data = (b"%015d\n" % i) * (block // 16)
                ok = True
                try:
                    wait("write", off, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
                    possible[b] = {data}
                except nbd.Error as e:
                    ok = False
                    failed("write", e)
                    possible.setdefault(b, {zero}).add(data)
                try:
                    buf = nbd.Buffer(block)
                    wait("read", off, h.aio_pread(buf, off))
                    got = bytes(buf.to_bytearray())
                    if got in possible.get(b, {zero}):
                        possible[b] = {got}
                    elif len(s["wrong"]) < 10:
                        s["wrong"].append(f"offset {off}: read {got[:16]!r}, expected one of {[p[:16] for p in possible.get(b, {zero})]}")
                except nbd.Error as e:
                    ok = False
                    failed("read", e)
                if i % 8 == 7:
                    try:
                        wait("flush", off, h.aio_flush())
                    except nbd.Error as e:
                        ok = False
                        failed("flush", e)
                if h.aio_is_dead() or h.aio_is_closed():
                    s["dead"] = f"the connection died after {i} cycles"
                    break
                s["cycles"] += 1
                if ok:
                    s["good"] += 1
                    s["good_since_last_error"] += 1
                    if killed is not None:
                        s["good_after_kill"] += 1
                    if s["good"] == 50:
                        open(started, "w").close()
                i += 1
                time.sleep(0.002)  # load, not starvation: the 2-core machine also runs the cluster
        except Hung as e:
            s["hung"] = str(e)
        except nbd.Error as e:
            s["dead"] = f"after {i} cycles: {e.string}"
        s["killed"] = killed
        for k in ("first_error", "last_error"):
            if s[k] is not None and killed is not None:
                s[k + "_after_kill_s"] = round(s[k] - killed, 3)
        print(json.dumps(s))
        """;

    [Fact]
    public async Task Kill_9_of_the_owner_under_load_re_homes_the_export_within_6_s_with_flushed_data_and_bitmaps_intact()
    {
        const string Export = "failover";
        (ClusterNode owner, ClusterNode writer, ClusterNode loader) = await CreateOwnedElsewhereAsync(Export);
        ClusterNode[] survivors = [writer, loader];
        bool restored = false;
        try
        {
            // 8 MiB of random data written and flushed through a non-owner, before the bitmap exists.
            byte[] random = new byte[8 * MiB];
            Random.Shared.NextBytes(random);
            string randomFile = Path.Combine(cluster.DataDirectory, "failover-random.bin");
            await File.WriteAllBytesAsync(randomFile, random);
            string range = await ScriptAsync("range.py", RangeScript);
            string flushedSha = Convert.ToHexStringLower(SHA256.HashData(random));
            Assert.Equal(flushedSha, (await cluster.RunAsync(Python, [range, "write", writer.NbdUri(Export), "0", randomFile])).Stdout.Trim());

            // The bitmap, added through the other survivor's admin API, and the writes it must keep.
            await AddBitmapAsync(loader, Export, "since", "64K");
            await QemuIoAsync(writer, Export, "write -P 0x5a 16M 64k", "write -P 0x5b 20484k 4k", "write -P 0x5c 30M 1M", "flush");
            List<(long, long)> dirtied = Dirtied(64 * KiB, (16 * MiB, 64 * KiB), (20 * MiB + 4 * KiB, 4 * KiB), (30 * MiB, 1 * MiB));

            // Load through the other survivor, proxying to the owner, on [32M, 64M).
            (Task<ToolResult> loading, string killed) = await StartLoadAsync(loader, Export, "failover");

            double killedAt = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0;
            Stopwatch sinceKill = ClusterFixture.Kill(owner);
            await File.WriteAllTextAsync(killed, killedAt.ToString("F3", System.Globalization.CultureInfo.InvariantCulture));

            // Served again: a new connection through a survivor reads the flushed pattern.
            TimeSpan? servedAfter = null;
            string lastProbe = "no probe finished";
            while (sinceKill.Elapsed < TimeSpan.FromSeconds(30))
            {
                ToolResult? probe = await ClusterFixture.ProbeAsync("qemu-io", ["-f", "raw", writer.NbdUri(Export), "-c", "read -P 0x5a 16M 64k"], TimeSpan.FromSeconds(5));
                if (probe is not null)
                {
                    Assert.False(probe.Stdout.Contains("Pattern verification failed", StringComparison.Ordinal),
                        $"a read through {writer} after the kill returned wrong data\n{probe.Describe()}\n{cluster.Describe()}");
                    if (probe.Succeeded)
                    {
                        servedAfter = sinceKill.Elapsed;
                        break;
                    }
                }
                lastProbe = probe?.Describe() ?? "qemu-io did not finish within 5 s";
                await Task.Delay(100);
            }
            // The load stops by itself 20 s after the kill; its summary goes into every failure below.
            ToolResult loaded = await loading;
            string summary = loaded.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).LastOrDefault() ?? "";
            // Where the failover time goes, from the survivors' logs (README: "Failover").
            foreach (ClusterNode survivor in survivors)
            {
                foreach (string line in survivor.Gateway.Output.Split('\n').Where(l =>
                    l.Contains("as UNREACHABLE", StringComparison.Ordinal) || l.Contains("refuses connections", StringComparison.Ordinal) || l.Contains("SBR took decision", StringComparison.Ordinal) ||
                    l.Contains("Leader is removing", StringComparison.Ordinal) || l.Contains($"Export {Export} homed", StringComparison.Ordinal) || l.Contains($"Export {Export} term", StringComparison.Ordinal) ||
                    l.Contains("unable to update a distributed state", StringComparison.Ordinal) || l.Contains("Singleton manager starting singleton", StringComparison.Ordinal)))
                {
                    output.WriteLine($"{survivor.Name}: {line[..Math.Min(line.Length, 160)]}");
                }
            }
            output.WriteLine($"kill -9 of owner {owner}: served again through {writer} after {servedAfter?.TotalSeconds.ToString("F1", System.Globalization.CultureInfo.InvariantCulture) ?? "never"} s; load through {loader}: {summary}");
            Assert.True(servedAfter is not null,
                $"{Export} was not served through {writer} within 30 s of kill -9 of its owner {owner}; last probe:\n{lastProbe}\nload: {summary}\n{cluster.Describe()}");
            // The survivors saw the dead process refuse connections and downed it without waiting
            // for the failure detector (DeadPeerDowning).
            Assert.True(survivors.Any(n => n.Gateway.Output.Contains("refuses connections on its remoting port", StringComparison.Ordinal)),
                $"no survivor downed the killed owner {owner} on its refused connections\n{cluster.Describe()}");
            Assert.True(servedAfter <= FailoverDeadline,
                $"{Export} was served again {servedAfter!.Value.TotalSeconds:F1} s after kill -9 of its owner {owner}, more than {FailoverDeadline.TotalSeconds} s\nload: {summary}\n{cluster.Describe()}");

            // The proxying connection: errors allowed, wrong data and a dropped connection not, and it works again.
            Assert.True(loaded.Succeeded && summary.StartsWith('{'), $"the load through {loader} failed\n{loaded.Describe()}\n{cluster.Describe()}");
            using (JsonDocument doc = JsonDocument.Parse(summary))
            {
                JsonElement s = doc.RootElement;
                string context = $"load through {loader} while the owner {owner} was killed: {summary}\n{cluster.Describe()}";
                Assert.True(s.GetProperty("wrong").GetArrayLength() == 0, "wrong data: " + context);
                Assert.True(s.GetProperty("unexpected").GetArrayLength() == 0, "errors other than EIO/ESHUTDOWN: " + context);
                Assert.True(s.GetProperty("dead").ValueKind == JsonValueKind.Null, "the connection was dropped: " + context);
                Assert.True(s.GetProperty("hung").ValueKind == JsonValueKind.Null, "a request got no reply: " + context);
                Assert.True(s.GetProperty("good_since_last_error").GetInt32() >= 20, "the connection did not work again after re-homing: " + context);
                Assert.True(s.GetProperty("good_after_kill").GetInt32() >= 20, "too few good cycles after the kill: " + context);
            }

            // Everything flushed before the kill is intact, through either survivor.
            foreach (ClusterNode survivor in survivors)
            {
                ToolResult read = await cluster.RunAsync(Python, [range, "sha", survivor.NbdUri(Export), "0", (8 * MiB).ToString()]);
                Assert.True(read.Stdout.Trim() == flushedSha, $"the flushed 8 MiB read through {survivor} after the failover differ\n{cluster.Describe()}");
            }
            await QemuIoAsync(loader, Export, "read -P 0x5a 16M 64k", "read -P 0x5b 20484k 4k", "read -P 0x5c 30M 1M", "read -P 0 8M 8M");

            ClusterNode newOwner = await cluster.OwnerAsync(Export);
            Assert.True(newOwner != owner, $"/v1/cluster still names the killed node {owner} as the owner of {Export}");

            // The bitmap kept the granules dirtied before the kill (the load dirtied [32M, 64M) on top).
            using (JsonDocument bitmaps = JsonDocument.Parse(await cluster.AdminAsync(HttpStatusCode.OK, writer, HttpMethod.Get, $"v1/exports/{Export}/bitmaps")))
            {
                JsonElement since = bitmaps.RootElement.EnumerateArray().SingleOrDefault(e => e.GetProperty("name").GetString() == "since");
                Assert.True(since.ValueKind == JsonValueKind.Object, $"bitmap 'since' is gone after the failover: {bitmaps.RootElement}");
                Assert.True(since.GetProperty("enabled").GetBoolean(), $"bitmap 'since' is disabled after the failover: {since}");
                Assert.True(since.GetProperty("dirtyBytes").GetInt64() >= dirtied.Sum(d => d.Item2), $"bitmap 'since' lost dirty bytes: {since}");
            }
            List<(long Offset, long Length)> dirty = Dirty(await MapAsync(loader, Export, "qemu:dirty-bitmap:since"));
            List<(long, long)> low = [.. dirty.Where(d => d.Offset < 32 * MiB).Select(d => (d.Offset, Math.Min(d.Offset + d.Length, 32 * MiB) - d.Offset))];
            Assert.True(dirtied.SequenceEqual(low), $"dirty ranges below 32M after the failover: {Format(low)}, expected {Format(dirtied)}\n{cluster.Describe()}");
            Assert.True(dirty.Any(d => d.Offset + d.Length > 32 * MiB), $"the load's writes left no dirty granule: {Format(dirty)}");

            // Back to three nodes for the tests that follow: the killed node rejoins.
            await cluster.RestartAsync(owner);
            restored = true;
        }
        finally
        {
            if (!restored && !owner.Gateway.IsRunning)
            {
                await TryRestoreAsync(() => cluster.RestartAsync(owner));
            }
        }
    }

    // ---- graceful stop of an owner ----

    /// <summary>
    /// Issue 30 (3): SIGTERM of the owner under a write load through another node. The export
    /// closes in order (requests in flight, flush, then its bitmaps), so no write is refused because
    /// the bitmaps stopped first, which happened in 4 of 12 such handoffs before. The cluster issue
    /// (17) asks for no client error at all on a graceful handoff; the errors that remain (the
    /// forwarded requests cut with the peer stream, the one EIO of the first FLUSH after an owner
    /// change) are counted and printed, not yet forbidden.
    /// </summary>
    [Theory]
    [InlineData("sigterm")]
    [InlineData("drain")]
    public async Task SIGTERM_or_drain_of_the_owner_under_load_gives_a_client_on_another_node_a_pause_not_an_error_and_loses_nothing(string how)
    {
        string Export = "graceful-" + how;
        (ClusterNode owner, ClusterNode writer, ClusterNode loader) = await CreateOwnedElsewhereAsync(Export);
        bool restored = false;
        try
        {
            await AddBitmapAsync(loader, Export, "since", "64K");
            await QemuIoAsync(writer, Export, "write -P 0x6a 16M 1M", "flush");

            (Task<ToolResult> loading, string stopping) = await StartLoadAsync(loader, Export, Export);

            double stoppedAt = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0;
            await File.WriteAllTextAsync(stopping, stoppedAt.ToString("F3", System.Globalization.CultureInfo.InvariantCulture));
            var sinceStop = Stopwatch.StartNew();
            if (how == "drain")
            {
                // gateway node drain: the same graceful stop through the admin API; the CLI returns
                // once the node no longer answers, and the process exits 0.
                ToolResult drained = await owner.Gateway.CliAsync("node", "drain");
                Assert.True(drained.Succeeded, $"gateway node drain failed\n{drained.Describe()}");
                Assert.Contains("draining", drained.Stdout, StringComparison.Ordinal);
                int? code = await owner.Gateway.WaitForExitAsync(TimeSpan.FromSeconds(10));
                Assert.True(code == 0, $"the drained owner {owner} exited with {code?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "nothing (still running 10 s after the CLI returned)"}\n{owner.Gateway.Describe()}");
                await cluster.WaitUntilUpAsync();
            }
            else
            {
                await cluster.StopAsync(owner); // SIGTERM; exit code 0 asserted
            }
            TimeSpan exited = sinceStop.Elapsed;
            string ownerLog = owner.Gateway.Output;

            ToolResult loaded = await loading;
            string summary = loaded.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).LastOrDefault() ?? "";
            output.WriteLine($"{how} of owner {owner}: exited after {exited.TotalSeconds:F1} s; load through {loader}: {summary}");
            Assert.True(loaded.Succeeded && summary.StartsWith('{'), $"the load through {loader} failed\n{loaded.Describe()}\n{cluster.Describe()}");
            string context = $"load through {loader} while the owner {owner} stopped: {summary}\n{cluster.Describe()}";
            Assert.False(ownerLog.Contains("cannot be recorded", StringComparison.Ordinal) || ownerLog.Contains("stopped before the change was recorded", StringComparison.Ordinal),
                "the stopping owner refused a change because its bitmaps had stopped: " + context);
            using (JsonDocument doc = JsonDocument.Parse(summary))
            {
                JsonElement s = doc.RootElement;
                Assert.True(s.GetProperty("wrong").GetArrayLength() == 0, "wrong data: " + context);
                // Issue 17 (1): a graceful handoff is a pause. Requests the stopping owner refused
                // or never read are sent again to the next owner (ExportLink), and the FLUSH after
                // the change answers success: the old owner ended its term cleanly (ExportTerms).
                Assert.True(!s.GetProperty("errors").EnumerateObject().Any(), "errors on a graceful handoff: " + context);
                Assert.True(s.GetProperty("dead").ValueKind == JsonValueKind.Null, "the connection was dropped: " + context);
                Assert.True(s.GetProperty("hung").ValueKind == JsonValueKind.Null, "a request got no reply: " + context);
                Assert.True(s.GetProperty("good_after_kill").GetInt32() >= 20, "the connection did not work again after the handoff: " + context);
            }
            Assert.True(ownerLog.Contains("handing over from node", StringComparison.Ordinal), "the owner did not hand the export over in order: " + context);

            // Flushed before the stop, and the bitmap with it, on the new owner.
            await QemuIoAsync(writer, Export, "read -P 0x6a 16M 1M", "read -P 0 8M 8M");
            List<(long Offset, long Length)> dirty = Dirty(await MapAsync(writer, Export, "qemu:dirty-bitmap:since"));
            Assert.True(dirty.Any(d => d.Offset <= 16 * MiB && d.Offset + d.Length >= 17 * MiB), $"the bitmap lost the flushed write's granules: {Format(dirty)}");

            await cluster.RestartAsync(owner);
            restored = true;
        }
        finally
        {
            if (!restored && !owner.Gateway.IsRunning)
            {
                await TryRestoreAsync(() => cluster.RestartAsync(owner));
            }
        }
    }

    /// <summary>Puts the cluster back after a failed test; the test's own failure is the one reported.</summary>
    private static async Task TryRestoreAsync(Func<Task> restore)
    {
        try
        {
            await restore();
        }
        catch (Exception)
        {
            // The next test reports a cluster that is not whole.
        }
    }

    // ---- admin from any node ----

    [Fact]
    public async Task Admin_api_and_cli_act_cluster_wide_from_any_node()
    {
        (ClusterNode a, ClusterNode b, ClusterNode c) = Three();
        await cluster.CreateExportAsync(a, new { name = "anywhere", size = 32 * MiB, description = "made through " + a.Name });
        await WaitListedAsync(c, "anywhere");
        using (JsonDocument shown = JsonDocument.Parse(await cluster.AdminAsync(HttpStatusCode.OK, c, HttpMethod.Get, "v1/exports/anywhere")))
        {
            Assert.Equal(32 * MiB, shown.RootElement.GetProperty("size").GetInt64());
            Assert.Equal("made through " + a.Name, shown.RootElement.GetProperty("description").GetString());
        }
        string file = Path.Combine(cluster.DataDirectory, "exports", "anywhere.img");
        Assert.True(File.Exists(file), $"no file {file} for the export created through {a}");
        ToolResult list = await b.Gateway.CliAsync("export", "list");
        Assert.True(list.Succeeded && list.Stdout.Contains("anywhere", StringComparison.Ordinal), list.Describe());

        await cluster.AdminAsync(HttpStatusCode.NoContent, c, HttpMethod.Delete, "v1/exports/anywhere");
        HttpStatusCode afterRemove = HttpStatusCode.OK;
        for (int i = 0; i < 100 && (afterRemove != HttpStatusCode.NotFound || File.Exists(file)); i++)
        {
            await Task.Delay(i == 0 ? 0 : 100);
            (afterRemove, _) = await cluster.AdminAsync(a, HttpMethod.Get, "v1/exports/anywhere");
        }
        Assert.True(afterRemove == HttpStatusCode.NotFound, $"GET through {a} answers {(int)afterRemove} 10 s after the removal through {c}");
        Assert.False(File.Exists(file), $"{file} is still there 10 s after the removal through {c}");

        ToolResult status = await b.Gateway.CliAsync("cluster", "status");
        Assert.True(status.Succeeded, status.Describe());
        ClusterView view = JsonSerializer.Deserialize<ClusterView>(status.Stdout, JsonSerializerOptions.Web)!;
        Assert.Equal(b.Name, view.Self);
        IReadOnlyList<ClusterNode> running = cluster.Running;
        Assert.True(view.Members.Length == running.Count && view.Members.All(m => m.Status == "Up"), $"gateway cluster status through {b}:\n{status.Stdout}");
        foreach (ClusterNode node in running)
        {
            ClusterMember? member = view.Members.SingleOrDefault(m => m.Node == node.Name);
            Assert.True(member is not null, $"{node.Name} is not a member in\n{status.Stdout}");
            Assert.EndsWith($"@127.0.0.1:{node.RemotingPort}", member.Address);
            Assert.Equal($"127.0.0.1:{node.PeerPort}", member.Peer);
        }
        Assert.Contains(view.Leader ?? "(no leader)", running.Select(n => n.Name));
    }

    [Fact]
    public async Task Readiness_is_true_only_once_the_node_has_joined_the_cluster()
    {
        // A node whose only seed does not answer runs (liveness) but is not ready. It has a
        // database of its own: with the cluster's, it would find the running members there and
        // join them (README "Joining").
        int lonelyHealth = ClusterFixture.FreePort();
        string lonelyDatabase = await cluster.CreateOtherDatabaseAsync();
        await using (GatewayProcess lonely = GatewayProcess.StartUnready(
        [
            "--remoting", $"127.0.0.1:{ClusterFixture.FreePort()}", "--seed", $"127.0.0.1:{ClusterFixture.FreePort()}",
            "--postgres", lonelyDatabase, "--node-name", "lonely", "--health", $"127.0.0.1:{lonelyHealth}",
        ]))
        {
            Assert.Equal(HttpStatusCode.OK, await ProbeAsync(lonelyHealth, Gateway.Host.Kubernetes.LivenessPath, HttpStatusCode.OK, lonely));
            for (int i = 0; i < 3; i++)
            {
                await Task.Delay(1000);
                Assert.Equal(HttpStatusCode.ServiceUnavailable, await ProbeAsync(lonelyHealth, Gateway.Host.Kubernetes.ReadinessPath, null, lonely));
            }
        }

        // The same with the cluster's seeds: ready once it has joined, and it then serves.
        int health = ClusterFixture.FreePort();
        await using GatewayProcess joining = GatewayProcess.StartUnready(
        [
            "--remoting", $"127.0.0.1:{ClusterFixture.FreePort()}", "--peer", $"127.0.0.1:{ClusterFixture.FreePort()}",
            .. cluster.Seeds.SelectMany(seed => new[] { "--seed", seed }),
            "--postgres", cluster.Postgres, "--node-name", "joiner", "--health", $"127.0.0.1:{health}",
        ], cluster.DataDirectory);
        Assert.Equal(HttpStatusCode.OK, await ProbeAsync(health, Gateway.Host.Kubernetes.ReadinessPath, HttpStatusCode.OK, joining));
        // Ready means joined: the leader moves it to Up on its next gossip rounds.
        ClusterView view = await cluster.ViewAsync();
        for (int i = 0; i < 50 && !view.Members.Any(m => m.Node == "joiner" && m.Status == "Up"); i++)
        {
            await Task.Delay(200);
            view = await cluster.ViewAsync();
        }
        Assert.True(view.Members.Any(m => m.Node == "joiner" && m.Status == "Up"), $"ready, but not Up 10 s later in {JsonSerializer.Serialize(view)}");
        await joining.TerminateAsync();
        // It leaves gracefully; the other tests count the members.
        for (int i = 0; i < 150 && view.Members.Any(m => m.Node == "joiner"); i++)
        {
            await Task.Delay(200);
            view = await cluster.ViewAsync();
        }
        Assert.False(view.Members.Any(m => m.Node == "joiner"), $"the joiner is still a member 30 s after it stopped: {JsonSerializer.Serialize(view)}");
        await cluster.WaitUntilUpAsync();
    }

    /// <summary>GET on the health port; with <paramref name="until"/>, polls (at most 60 s) until that status.</summary>
    private static async Task<HttpStatusCode> ProbeAsync(int port, string path, HttpStatusCode? until, GatewayProcess gateway)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(5) };
        var clock = Stopwatch.StartNew();
        HttpStatusCode? last = null;
        string error = "";
        while (clock.Elapsed < TimeSpan.FromSeconds(60))
        {
            try
            {
                using HttpResponseMessage response = await http.GetAsync($"http://127.0.0.1:{port}{path}");
                last = response.StatusCode;
                if (until is null || last == until)
                {
                    return last.Value;
                }
            }
            catch (HttpRequestException e)
            {
                error = e.Message;
            }
            await Task.Delay(200);
        }
        throw new Xunit.Sdk.XunitException($"{path} on port {port}: last {last?.ToString() ?? error}, wanted {until}\n{gateway.Describe()}");
    }

    private const string UnflushedScript = """
        import nbd, os, sys, time
        uri, pid = sys.argv[1], int(sys.argv[2])
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(os.urandom(65536), 0)          # acknowledged by the owner, never flushed
        os.kill(pid, 9)
        deadline = time.time() + 30
        while True:                              # the same connection, until the export is back
            try:
                h.pread(4096, 0)
                break
            except nbd.Error:
                if time.time() > deadline:
                    sys.exit("not served again within 30 s")
                time.sleep(0.05)
        try:
            h.flush()
            sys.exit("FLUSH after the owner died answered success for a write it cannot vouch for")
        except nbd.Error as e:
            if e.errnum != 5:
                sys.exit(f"FLUSH failed with {e}, wanted EIO")
        h.flush()                                # the loss was reported once; new writes flush as usual
        h.shutdown()
        print("ok: EIO once, then flushes")
        """;

    [Fact]
    public async Task A_flush_after_the_owner_died_with_unflushed_writes_fails_with_EIO_once()
    {
        const string Export = "unflushed";
        await cluster.CreateExportAsync(Three().A, new { name = Export, size = 8 * MiB });
        ClusterNode owner = await cluster.OwnerAsync(Export);
        ClusterNode via = cluster.Running.First(n => n != owner);
        try
        {
            string script = await ScriptAsync("unflushed.py", UnflushedScript);
            ToolResult result = await cluster.RunAsync(Python, [script, via.NbdUri(Export), owner.Gateway.ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
            Assert.Contains("ok: EIO once, then flushes", result.Stdout);
        }
        finally
        {
            if (!owner.Gateway.IsRunning)
            {
                await TryRestoreAsync(() => cluster.RestartAsync(owner));
            }
        }
    }

    /// <summary>
    /// Holds one connection through a node that does not own the export, then reads on it after
    /// the export was removed and created again under its name: every read must fail, and none
    /// may return the new export's data.
    /// </summary>
    private const string RebornScript = """
        import nbd, os, sys, time
        uri, ready, recreated = sys.argv[1], sys.argv[2], sys.argv[3]
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"\x11" * 4096, 0)
        h.flush()
        open(ready, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(recreated):
            if time.time() > deadline:
                sys.exit("the export was not created again within 60 s")
            time.sleep(0.05)
        for attempt in range(5):
            try:
                data = h.pread(4096, 0)
            except nbd.Error as e:
                print(f"refused: {e}")
                continue
            sys.exit(f"a read on the connection opened before the removal returned data (first byte {data[0]:#x})")
        try:
            h.pwrite(b"\x33" * 4096, 0)
            sys.exit("a write on the connection opened before the removal was accepted")
        except nbd.Error as e:
            print(f"write refused: {e}")
        print("ok: refused")
        """;

    [Fact]
    public async Task A_connection_opened_before_an_export_was_removed_and_created_again_gets_errors_not_the_new_exports_data()
    {
        const string Export = "reborn";
        (ClusterNode a, _, _) = Three();
        await cluster.CreateExportAsync(a, new { name = Export, size = 8 * MiB });
        ClusterNode owner = await cluster.OwnerAsync(Export);
        ClusterNode via = cluster.Running.First(n => n != owner);
        string ready = Path.Combine(cluster.DataDirectory, "reborn.ready");
        string recreated = Path.Combine(cluster.DataDirectory, "reborn.recreated");
        string script = await ScriptAsync("reborn.py", RebornScript);
        Task<ToolResult> holding = cluster.RunAsync(Python, [script, via.NbdUri(Export), ready, recreated], TimeSpan.FromSeconds(120), check: false);
        var clock = Stopwatch.StartNew();
        while (!File.Exists(ready) && !holding.IsCompleted && clock.Elapsed < TimeSpan.FromSeconds(30))
        {
            await Task.Delay(50);
        }
        Assert.True(File.Exists(ready), $"the connection through {via} did not get going\n{(holding.IsCompleted ? (await holding).Describe() : "still running")}");

        await cluster.AdminAsync(HttpStatusCode.NoContent, a, HttpMethod.Delete, $"v1/exports/{Export}");
        // The removal deletes the file once the export has closed: create again only then.
        string file = Path.Combine(cluster.DataDirectory, "exports", Export + ".img");
        for (int i = 0; i < 100 && File.Exists(file); i++)
        {
            await Task.Delay(100);
        }
        Assert.False(File.Exists(file), $"{file} is still there 10 s after the removal");
        await cluster.CreateExportAsync(a, new { name = Export, size = 8 * MiB });
        await QemuIoAsync(via, Export, "read -P 0 0 4k", "write -P 0x22 0 4k", "flush");
        await File.WriteAllTextAsync(recreated, "");

        ToolResult held = await holding;
        Assert.True(held.Succeeded && held.Stdout.Contains("ok: refused", StringComparison.Ordinal),
            $"the connection opened through {via} before the removal\n{held.Describe()}\n{cluster.Describe()}");
        // The new incarnation kept its own data.
        await QemuIoAsync(owner, Export, "read -P 0x22 0 4k");
        // Not left for the tests after this one: an extra shard changes what a rebalance moves.
        await cluster.AdminAsync(HttpStatusCode.NoContent, a, HttpMethod.Delete, $"v1/exports/{Export}");
    }

    /// <summary>
    /// A client of the owner itself: once told the owner is frozen, queues 16 writes of 0xEE over
    /// [0, 1 MiB) (the frozen owner's kernel takes them into its socket), then waits for whatever
    /// answers come after the owner resumes. Prints what it saw; the data is checked by the test.
    /// </summary>
    private const string FrozenClientScript = """
        import json, nbd, os, sys, time
        uri, ready, frozen, queued = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pread(4096, 0)
        open(ready, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(frozen):
            if time.time() > deadline:
                sys.exit("not told of the freeze within 60 s")
            time.sleep(0.02)
        buf = nbd.Buffer.from_bytearray(bytearray(b"\xee" * 65536))
        cookies = [h.aio_pwrite(buf, i * 65536) for i in range(16)]
        end = time.time() + 1
        while time.time() < end:
            h.poll(100)
        open(queued, "w").close()
        s = {"ok": 0, "failed": {}, "unanswered": 0, "dropped": None}
        end = time.time() + 60
        try:
            while h.aio_in_flight() > 0 and time.time() < end:
                h.poll(100)
        except nbd.Error as e:
            s["dropped"] = str(e)
        for c in cookies:
            try:
                if h.aio_command_completed(c):
                    s["ok"] += 1
                else:
                    s["unanswered"] += 1
            except nbd.Error as e:
                name = e.errno or str(e.errnum)
                s["failed"][name] = s["failed"].get(name, 0) + 1
        print(json.dumps(s))
        """;

    [Fact]
    public async Task An_owner_frozen_with_writes_queued_applies_none_of_them_after_another_node_took_the_export_over()
    {
        const string Export = "frozen";
        await cluster.CreateExportAsync(Three().A, new { name = Export, size = 8 * MiB });
        ClusterNode owner = await cluster.OwnerAsync(Export);
        ClusterNode other = cluster.Running.First(n => n != owner);
        await QemuIoAsync(other, Export, "write -P 0x11 0 1M", "flush");
        string ready = Path.Combine(cluster.DataDirectory, "frozen.ready");
        string frozen = Path.Combine(cluster.DataDirectory, "frozen.frozen");
        string queued = Path.Combine(cluster.DataDirectory, "frozen.queued");
        string script = await ScriptAsync("frozen_client.py", FrozenClientScript);
        Task<ToolResult> client = cluster.RunAsync(Python, [script, owner.NbdUri(Export), ready, frozen, queued], TimeSpan.FromSeconds(150), check: false);
        int pid = owner.Gateway.ProcessId;
        bool resumed = false;
        try
        {
            var clock = Stopwatch.StartNew();
            while (!File.Exists(ready) && !client.IsCompleted && clock.Elapsed < TimeSpan.FromSeconds(30))
            {
                await Task.Delay(50);
            }
            Assert.True(File.Exists(ready), $"the client of the owner {owner} did not get going\n{(client.IsCompleted ? (await client).Describe() : "still running")}");

            await Signal(pid, "STOP");
            await File.WriteAllTextAsync(frozen, "");
            for (clock.Restart(); !File.Exists(queued) && !client.IsCompleted && clock.Elapsed < TimeSpan.FromSeconds(30);)
            {
                await Task.Delay(50);
            }
            Assert.True(File.Exists(queued), "the client did not queue its writes");

            // The others down the frozen owner and the export moves; the new owner writes 0x22.
            string? newOwner = null;
            for (clock.Restart(); clock.Elapsed < TimeSpan.FromSeconds(60); await Task.Delay(250))
            {
                ToolResult? probe = await ClusterFixture.ProbeAsync("qemu-io", ["-f", "raw", other.NbdUri(Export), "-c", "read 0 4k"], TimeSpan.FromSeconds(5));
                if (probe is { Succeeded: true } && (await cluster.ViewAsync(other)).OwnerOf(Export) is { } now && now != owner.Name)
                {
                    newOwner = now;
                    break;
                }
            }
            Assert.True(newOwner is not null, $"{Export} was not taken over within 60 s of freezing its owner {owner}\n{cluster.Describe()}");
            output.WriteLine($"{Export}: owner {owner} frozen; taken over by {newOwner} after {clock.Elapsed.TotalSeconds:F1} s");
            await QemuIoAsync(other, Export, "write -P 0x22 0 1M", "flush");

            // The old owner runs again with 16 writes in its socket: it must apply none of them.
            await Signal(pid, "CONT");
            resumed = true;
            ToolResult seen = await client;
            output.WriteLine($"client of the frozen owner: {seen.Stdout.Trim()}");
            await QemuIoAsync(other, Export, "read -P 0x22 0 1M");

            // Downed, the old owner stops its actor system and exits. Its host's drain must not then
            // wait 30 s for connection actors that are gone (chaos runs saw "did not finish draining").
            int? exit = await owner.Gateway.WaitForExitAsync(TimeSpan.FromSeconds(20));
            Assert.True(exit is not null, $"the downed owner {owner} still runs 20 s after the client's end\n{owner.Gateway.Describe()}");
            Assert.DoesNotContain("did not finish draining", owner.Gateway.Output, StringComparison.Ordinal);
        }
        finally
        {
            if (!resumed)
            {
                await Signal(pid, "CONT");
            }
            if (owner.Gateway.IsRunning)
            {
                ClusterFixture.Kill(owner);
            }
            await TryRestoreAsync(() => cluster.RestartAsync(owner));
            // Not left for the tests after this one: an extra shard changes what a rebalance moves.
            await TryRestoreAsync(() => cluster.AdminAsync(HttpStatusCode.NoContent, other, HttpMethod.Delete, $"v1/exports/{Export}"));
        }
    }

    private static async Task Signal(int pid, string signal)
    {
        using Process kill = Process.Start("kill", ["-" + signal, pid.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        await kill.WaitForExitAsync();
        Assert.True(kill.ExitCode == 0, $"kill -{signal} {pid} failed");
    }
}
