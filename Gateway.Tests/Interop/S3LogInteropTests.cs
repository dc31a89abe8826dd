using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using Amazon.S3.Model;
using Gateway.Backends.S3;
using Gateway.Tests.Backends.S3;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Interop;

/// <summary>
/// S3 exports with the write log (<c>writeLog: true</c>) driven by real clients through the real
/// gateway, against the loopback s3rver (GATEWAY_TEST_S3_ENDPOINT; the tests fail without it): fio
/// with verification, nbdcopy, and kill -9 of the gateway after FLUSH.
/// </summary>
public sealed class S3LogInteropTests : IAsyncLifetime
{
    private const int MiB = 1024 * 1024;
    private GatewayProcess _gateway = null!;
    private readonly string _work = Directory.CreateTempSubdirectory("gateway-s3log-").FullName;
    private readonly ITestOutputHelper _output;

    public S3LogInteropTests(ITestOutputHelper output) => _output = output;

    public async Task InitializeAsync()
    {
        await S3TestServer.EnsureBucketAsync();
        _gateway = await GatewayProcess.StartAsync();
    }

    public async Task DisposeAsync()
    {
        if (_gateway is not null)
        {
            await _gateway.DisposeAsync();
        }
        Directory.Delete(_work, recursive: true);
    }

    private Task CreateLogExportAsync(string name, long size, string prefix, int? objectSize = null) =>
        CreateLogExportAsync(_gateway, name, size, prefix, objectSize);

    private static async Task CreateLogExportAsync(GatewayProcess gateway, string name, long size, string prefix, int? objectSize = null, long? logCompactBytes = null)
    {
        var body = new
        {
            name,
            size,
            backend = new
            {
                type = "s3",
                s3 = new { endpoint = S3TestServer.Endpoint, bucket = S3TestServer.Bucket, prefix, objectSize, writeLog = true, logCompactBytes, accessKey = S3TestServer.AccessKey, secretKey = S3TestServer.SecretKey },
            },
        };
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", body);
        string text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.Created, $"create {name}: {(int)response.StatusCode} {text}\n{gateway.Describe()}");
        Assert.Contains("\"writeLog\": true", text);
    }

    private Task WaitOpenAsync(string name) => WaitOpenAsync(_gateway, name);

    /// <summary>
    /// Waits (at most a minute) until the export answers: until checkpoints, opening replays every
    /// segment, and a handshake that waits longer than the server's 10 s for the export is dropped.
    /// </summary>
    internal static async Task WaitOpenAsync(GatewayProcess gateway, string name)
    {
        for (int i = 0; i < 60; i++)
        {
            ToolResult info = await gateway.RunAsync("nbdinfo", ["--size", gateway.NbdUri(name)], TimeSpan.FromSeconds(30), check: false);
            if (info.Succeeded)
            {
                return;
            }
            await Task.Delay(1000);
        }
        Assert.Fail($"export {name} did not open within a minute of the restart\n{gateway.Describe()}");
    }

    [Fact]
    public async Task Log_export_fio_random_writes_verify_and_nbdcopy_round_trips_through_a_restart()
    {
        string prefix = S3TestServer.NewPrefix("log-fio");
        await CreateLogExportAsync("s3log", 64 * MiB, prefix);
        ToolResult fio = await _gateway.RunAsync("fio",
        [
            "--name=verify", "--ioengine=nbd", $"--uri={_gateway.NbdUri("s3log")}",
            "--rw=randwrite", "--bsrange=4k-64k", "--size=32M", "--iodepth=16",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--runtime=60",
        ], timeout: TimeSpan.FromSeconds(120));
        Assert.Contains("err= 0", fio.Stdout);
        Assert.DoesNotContain("verify:", fio.Stderr);

        string input = Path.Combine(_work, "in.img");
        byte[] image = new byte[16 * MiB];
        Random.Shared.NextBytes(image);
        await File.WriteAllBytesAsync(input, image);
        await _gateway.RunAsync("nbdcopy", ["--flush", input, _gateway.NbdUri("s3log")], TimeSpan.FromSeconds(120));
        // Segments, and chunk objects only if a compaction ran (the export is quiet for 10 s at most between the jobs).
        List<string> keys = await S3TestServer.KeysAsync(prefix);
        Assert.Contains(keys, k => k.StartsWith(prefix + "/log/", StringComparison.Ordinal));

        await _gateway.StopAsync();
        await _gateway.RestartAsync();
        await WaitOpenAsync("s3log");
        string output = Path.Combine(_work, "out.img");
        await _gateway.RunAsync("nbdcopy", [_gateway.NbdUri("s3log"), output], TimeSpan.FromSeconds(120));
        byte[] read = await File.ReadAllBytesAsync(output);
        Assert.True(image.AsSpan().SequenceEqual(read.AsSpan(0, image.Length)), "the image read back after a restart differs");
    }

    [Fact]
    public async Task A_quiet_log_export_is_compacted_into_chunks_that_nbdkit_S3_reads_as_the_disk()
    {
        string prefix = S3TestServer.NewPrefix("log-to-nbdkit");
        const int Size = 8 * MiB;
        await CreateLogExportAsync("s3log-nbdkit", Size, prefix, objectSize: 64 * 1024); // the most Debian's plugin takes
        string input = Path.Combine(_work, "compact-in.img");
        byte[] image = new byte[Size];
        Random.Shared.NextBytes(image);
        image.AsSpan(2 * MiB, MiB).Clear(); // zeros: no chunk objects there after compaction
        await File.WriteAllBytesAsync(input, image);
        await _gateway.RunAsync("nbdcopy", ["--flush", input, _gateway.NbdUri("s3log-nbdkit")], TimeSpan.FromSeconds(120));

        // Quiet for the idle time (10 s): the log is folded into the chunk objects and its segments deleted.
        List<string> keys = [];
        for (int i = 0; i < 120; i++)
        {
            keys = await S3TestServer.KeysAsync(prefix);
            if (!keys.Exists(k => LogSegment.TryParseKey(prefix, k, out _, out _)))
            {
                break;
            }
            await Task.Delay(500);
        }
        Assert.DoesNotContain(keys, k => LogSegment.TryParseKey(prefix, k, out _, out _));
        Assert.DoesNotContain(S3DeviceOptions.Key(prefix, 2 * MiB / (64 * 1024)), keys);

        string output = Path.Combine(_work, "compact-out.img");
        await S3InteropTests.RunNbdkitS3Async(_gateway, [.. S3InteropTests.NbdkitS3Args(prefix, Size), "--run", $"nbdcopy \"$uri\" '{output}'"]);
        byte[] read = await File.ReadAllBytesAsync(output);
        Assert.True(image.AsSpan().SequenceEqual(read), "nbdkit read a different disk from the compacted bucket");
    }

    /// <summary>
    /// The issue's floor: 20 cycles of flushed random writes (with WRITE_ZEROES and TRIM among them),
    /// then unflushed fio writes in flight when the gateway gets kill -9; every other cycle the export
    /// opens again on the same gateway (a restart), the others on the other gateway process (its own
    /// data folder, the same bucket prefix: another node). After each open every flushed byte is read
    /// back and compared with a model of what was flushed.
    /// </summary>
    [Fact]
    public async Task Kill_9_after_FLUSH_twenty_cycles_alternating_restart_and_another_node_loses_no_flushed_byte()
    {
        const int Size = 16 * MiB;
        const int Checked = 8 * MiB; // flushed writes go here; unflushed fio writes go to the other half
        const string Export = "s3kill";
        string prefix = S3TestServer.NewPrefix("log-kill20");
        await CreateLogExportAsync(Export, Size, prefix);
        await using GatewayProcess other = await GatewayProcess.StartAsync(); // another node: no export until the first move
        GatewayProcess[] nodes = [_gateway, other];
        bool[] hasExport = [true, false];
        int node = 0, moves = 0, restarts = 0;
        byte[] model = new byte[Checked];
        var random = new Random(1820);
        var clock = Stopwatch.StartNew();
        var cycles = new List<string>();
        for (int cycle = 0; cycle < 20; cycle++)
        {
            var cycleClock = Stopwatch.StartNew();
            GatewayProcess gateway = nodes[node];
            await FlushedWritesAsync(gateway, Export, model, random, Checked, writes: 12, firstValue: 1 + (cycle * 12 % 240));
            await KillWithWritesInFlightAsync(gateway, Export, Checked, Size - Checked, TimeSpan.FromMilliseconds(300 + random.Next(900)));
            double killed = cycleClock.Elapsed.TotalSeconds;

            if (cycle % 2 == 0)
            {
                await gateway.RestartAsync();
                restarts++;
            }
            else
            {
                node = 1 - node;
                gateway = nodes[node];
                moves++;
                if (hasExport[node])
                {
                    await gateway.RestartAsync();
                }
                else
                {
                    await CreateLogExportAsync(gateway, Export, Size, prefix);
                    hasExport[node] = true;
                }
            }
            double started = cycleClock.Elapsed.TotalSeconds;
            await WaitOpenAsync(gateway, Export);
            double open = cycleClock.Elapsed.TotalSeconds;
            await AssertFlushedAsync(gateway, Export, model, $"cycle {cycle} ({(cycle % 2 == 0 ? "restart" : "another node")})");
            cycles.Add($"{killed:F1}/{started:F1}/{open:F1}/{cycleClock.Elapsed.TotalSeconds:F1}");
        }
        _output.WriteLine($"20 kill -9 cycles ({restarts} restarts, {moves} moves to the other node) in {clock.Elapsed.TotalSeconds:F1} s; per cycle, seconds to the kill/the start/the open/the check: {string.Join(" ", cycles)}");
        Assert.Equal((10, 10), (restarts, moves));
    }

    /// <summary>
    /// The issue's floor for compaction: an export whose log is compacted at every MiB
    /// (<c>logCompactBytes</c>), so passes run back to back under fio's unflushed writes, gets kill -9
    /// at a random moment, 10 cycles. Each cycle first flushes random writes (checked against a model
    /// after every open), then checks what the first pass of the new open left in the bucket: one fold
    /// marker of the new term, no segment or checkpoint below it, and every chunk object whole.
    /// </summary>
    [Fact]
    public async Task Kill_9_during_compaction_ten_cycles_loses_no_flushed_byte_and_the_next_pass_leaves_no_garbage()
    {
        const int Size = 16 * MiB;
        const int Checked = 8 * MiB;
        const int ObjectSize = 64 * 1024;
        const string Export = "s3compactkill";
        string prefix = S3TestServer.NewPrefix("log-compact-kill");
        await CreateLogExportAsync(_gateway, Export, Size, prefix, ObjectSize, logCompactBytes: MiB);
        byte[] model = new byte[Checked];
        var random = new Random(1802);
        var clock = Stopwatch.StartNew();
        var killedIn = new List<string>();
        long termBefore = -1;
        for (int cycle = 0; cycle < 10; cycle++)
        {
            await FlushedWritesAsync(_gateway, Export, model, random, Checked, writes: 48, firstValue: 1 + (cycle * 48 % 200));
            if (cycle > 0)
            {
                await AssertNoGarbageAsync(prefix, termBefore, ObjectSize, $"cycle {cycle}");
            }
            await KillWithWritesInFlightAsync(_gateway, Export, Checked, Size - Checked, TimeSpan.FromMilliseconds(300 + random.Next(1500)));
            List<S3Object> objects = await ObjectsAsync(prefix);
            killedIn.Add(MidPass(prefix, objects, ObjectSize));
            termBefore = objects.Max(o => LogSegment.TryParseKey(prefix, o.Key, out long term, out _) || LogSegment.TryParseFoldKey(prefix, o.Key, out term, out _)
                || LogSegment.TryParseFenceKey(prefix, o.Key, out term) || LogSegment.TryParseCheckpointKey(prefix, o.Key, out term, out _) ? term : -1);

            await _gateway.RestartAsync();
            await WaitOpenAsync(_gateway, Export);
            await AssertFlushedAsync(_gateway, Export, model, $"cycle {cycle} (killed {killedIn[^1]})");
        }
        await FlushedWritesAsync(_gateway, Export, model, random, Checked, writes: 48, firstValue: 7);
        await AssertNoGarbageAsync(prefix, termBefore, ObjectSize, "after the last cycle");
        await AssertFlushedAsync(_gateway, Export, model, "after the last pass");
        int midPass = killedIn.Count(k => k != "between passes");
        _output.WriteLine($"10 kill -9 cycles under compaction in {clock.Elapsed.TotalSeconds:F1} s; {midPass} kills fell inside a pass: {string.Join("; ", killedIn)}");
        Assert.True(midPass >= 3, $"only {midPass} of 10 kills fell inside a compaction pass: {string.Join("; ", killedIn)}");
    }

    /// <summary>The objects under the prefix with their sizes and times, as the server lists them.</summary>
    private static async Task<List<S3Object>> ObjectsAsync(string prefix)
    {
        using Amazon.S3.AmazonS3Client client = S3TestServer.Client();
        var objects = new List<S3Object>();
        var request = new ListObjectsV2Request { BucketName = S3TestServer.Bucket, Prefix = prefix + "/" };
        for (int page = 0; page < 1000; page++)
        {
            ListObjectsV2Response response = await client.ListObjectsV2Async(request);
            objects.AddRange(response.S3Objects ?? []);
            if (response.IsTruncated != true)
            {
                return objects;
            }
            request.ContinuationToken = response.NextContinuationToken;
        }
        throw new InvalidOperationException("over 1,000 pages of objects");
    }

    /// <summary>
    /// Where a kill fell, from the bucket it left: inside a pass when a chunk object is newer than the
    /// newest fold marker (chunks stored, marker not yet), when segments or an older marker below the
    /// newest marker are still there (marker stored, deletes not done), or when a chunk is torn.
    /// </summary>
    private static string MidPass(string prefix, List<S3Object> objects, int objectSize)
    {
        var markers = objects.Where(o => LogSegment.TryParseFoldKey(prefix, o.Key, out _, out _)).OrderBy(o => o.Key, StringComparer.Ordinal).ToList();
        List<S3Object> chunks = objects.Where(o => !o.Key.Contains("/log/", StringComparison.Ordinal)).ToList();
        DateTime marked = markers.Count > 0 ? markers[^1].LastModified ?? DateTime.MinValue : DateTime.MinValue;
        int newer = chunks.Count(c => c.LastModified > marked);
        int torn = chunks.Count(c => c.Size != objectSize);
        int below = markers.Count == 0 ? 0 : objects.Count(o => LogSegment.TryParseKey(prefix, o.Key, out _, out _) && string.CompareOrdinal(o.Key, markers[^1].Key.Replace("/log/folded-", "/log/", StringComparison.Ordinal)) < 0);
        return newer > 0 || below > 0 || markers.Count > 1 || torn > 0
            ? $"in a pass ({newer} chunks newer than the marker, {below} segments below it, {markers.Count} markers, {torn} torn chunks)"
            : "between passes";
    }

    /// <summary>
    /// Waits (at most 30 s) for a pass of the open after <paramref name="termBefore"/> to leave the
    /// bucket clean: one fold marker, of a newer term; no segment or checkpoint below it; every chunk
    /// object whole. Fences stay (they are never deleted). Anything else under the prefix fails.
    /// </summary>
    private async Task AssertNoGarbageAsync(string prefix, long termBefore, int objectSize, string when)
    {
        string problem = "not listed yet";
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromSeconds(30))
        {
            List<S3Object> objects;
            try
            {
                objects = await ObjectsAsync(prefix);
            }
            catch (Amazon.S3.AmazonS3Exception e) when (e.StatusCode == System.Net.HttpStatusCode.InternalServerError)
            {
                // s3rver answered a listing 500 ("internal error") while the gateway's pass was
                // deleting under the prefix (CI, 2026-12-07): the test's own poll asks again.
                problem = $"the listing failed: {e.Message}";
                await Task.Delay(200);
                continue;
            }
            problem = Garbage(prefix, objects, termBefore, objectSize);
            if (problem.Length == 0)
            {
                return;
            }
            await Task.Delay(200);
        }
        Assert.Fail($"{when}: the bucket is not clean 30 s after the open: {problem}\n{_gateway.Describe()}");
    }

    private static string Garbage(string prefix, List<S3Object> objects, long termBefore, int objectSize)
    {
        var markers = new List<(long Term, long Seq)>();
        foreach (S3Object o in objects)
        {
            if (LogSegment.TryParseFoldKey(prefix, o.Key, out long term, out long seq))
            {
                markers.Add((term, seq));
            }
        }
        if (markers.Count != 1 || markers[0].Term <= termBefore)
        {
            return $"fold markers {string.Join(", ", markers)} (one of a term above {termBefore} expected)";
        }
        (long markTerm, long markSeq) = markers[0];
        var problems = new List<string>();
        foreach (S3Object o in objects)
        {
            if (LogSegment.TryParseKey(prefix, o.Key, out long term, out long seq) || LogSegment.TryParseCheckpointKey(prefix, o.Key, out term, out seq))
            {
                if (term < markTerm || (term == markTerm && seq < markSeq))
                {
                    problems.Add($"{o.Key} is below the marker ({markTerm}, {markSeq})");
                }
            }
            else if (LogSegment.TryParseFoldKey(prefix, o.Key, out _, out _) || LogSegment.TryParseFenceKey(prefix, o.Key, out _))
            {
            }
            else if (o.Key.Contains("/log/", StringComparison.Ordinal))
            {
                problems.Add($"{o.Key} is no log object");
            }
            else if (o.Size != objectSize)
            {
                problems.Add($"chunk {o.Key} holds {o.Size} bytes, not {objectSize}: torn");
            }
        }
        return string.Join("; ", problems);
    }

    /// <summary>
    /// Writes <paramref name="writes"/> random extents in [0, <paramref name="region"/>) with qemu-io
    /// (a pattern byte each, and every fourth a WRITE_ZEROES or a TRIM), then FLUSH, and puts them into
    /// <paramref name="model"/> once the flush has answered.
    /// </summary>
    private static async Task FlushedWritesAsync(GatewayProcess gateway, string export, byte[] model, Random random, int region, int writes, int firstValue, int maxBlocks = 16)
    {
        var commands = new List<string>();
        var changes = new List<(int Offset, int Length, byte Value)>();
        for (int i = 0; i < writes; i++)
        {
            int length = (1 + random.Next(maxBlocks)) * 4096;
            int offset = random.Next((region - length) / 4096 + 1) * 4096;
            byte value = (byte)(firstValue + i);
            switch (i % 4)
            {
                case 3 when i % 8 == 3:
                    commands.AddRange(["-c", $"write -z {offset} {length}"]);
                    value = 0;
                    break;
                case 3:
                    commands.AddRange(["-c", $"discard {offset} {length}"]);
                    value = 0;
                    break;
                default:
                    commands.AddRange(["-c", $"write -P {value} {offset} {length}"]);
                    break;
            }
            changes.Add((offset, length, value));
        }
        commands.AddRange(["-c", "flush"]);
        await gateway.RunAsync("qemu-io", ["-f", "raw", "--discard=unmap", gateway.NbdUri(export), .. commands], TimeSpan.FromSeconds(60));
        foreach ((int offset, int length, byte value) in changes)
        {
            model.AsSpan(offset, length).Fill(value);
        }
    }

    /// <summary>fio's unflushed 4 KiB random writes to [offset, offset+length) for a while, then kill -9 of the gateway under them.</summary>
    private static async Task KillWithWritesInFlightAsync(GatewayProcess gateway, string export, long offset, long length, TimeSpan after)
    {
        Task<ToolResult> inFlight = gateway.RunAsync("fio",
        [
            "--name=inflight", "--ioengine=nbd", $"--uri={gateway.NbdUri(export)}", "--rw=randwrite", "--bs=4k",
            "--iodepth=8", $"--offset={offset}", $"--size={length}", "--time_based=1", "--runtime=30",
        ], TimeSpan.FromSeconds(60), check: false);
        // fio takes a moment to connect: the kill comes once its writes are flowing.
        await Task.Delay(500 + (int)after.TotalMilliseconds);
        gateway.Kill();
        ToolResult fio = await inFlight;
        Assert.False(fio.Succeeded, $"fio finished before the kill: no writes were in flight\n{fio.Stdout}");
    }

    /// <summary>Reads the whole export and compares the flushed region with the model, byte for byte.</summary>
    private async Task AssertFlushedAsync(GatewayProcess gateway, string export, byte[] model, string when)
    {
        string output = Path.Combine(_work, "read.img");
        File.Delete(output);
        await gateway.RunAsync("nbdcopy", [gateway.NbdUri(export), output], TimeSpan.FromSeconds(120));
        byte[] read = await File.ReadAllBytesAsync(output);
        int first = model.AsSpan().CommonPrefixLength(read.AsSpan(0, model.Length));
        if (first != model.Length)
        {
            Assert.Fail($"{when}: flushed byte {first} is {read[first]}, the model says {model[first]}, after kill -9 and open\n{gateway.Describe()}");
        }
    }
}
