using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Csi;
using Gateway.Csi.V1;
using Gateway.Tests.Interop;
using Grpc.Core;
using Xunit;

namespace Gateway.Tests.Csi;

/// <summary>
/// Snapshots, volumes made from them, and SnapshotMetadata against a real gateway: qemu-io writes
/// through NBD, nbdinfo reads the maps, the plugin is driven over its Unix socket.
/// </summary>
public sealed class CsiSnapshotTests(CsiControllerFixture fixture) : IClassFixture<CsiControllerFixture>
{
    private const long MiB = 1 << 20;
    private const long Granule = 64 << 10;

    private Controller.ControllerClient Controller => fixture.Plugin.Controller;

    private GatewayProcess Gateway => fixture.Gateway;

    private Task<ToolResult> QemuIoAsync(string export, params string[] commands) =>
        Gateway.RunAsync("qemu-io", ["-f", "raw", Gateway.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })], TimeSpan.FromSeconds(120));

    private async Task<Snapshot> SnapshotAsync(string volume, string name) =>
        (await Controller.CreateSnapshotAsync(new CreateSnapshotRequest { SourceVolumeId = volume, Name = name })).Snapshot;

    private async Task<List<(long Offset, long Length)>> DeltaAsync(string from, string to, long start = 0, int max = 0)
    {
        var ranges = new List<(long, long)>();
        using AsyncServerStreamingCall<GetMetadataDeltaResponse> call = fixture.Plugin.Metadata.GetMetadataDelta(new GetMetadataDeltaRequest
        {
            BaseSnapshotId = from,
            TargetSnapshotId = to,
            StartingOffset = start,
            MaxResults = max,
        });
        await foreach (GetMetadataDeltaResponse response in call.ResponseStream.ReadAllAsync())
        {
            Assert.Equal(BlockMetadataType.VariableLength, response.BlockMetadataType);
            Assert.True(max == 0 || response.BlockMetadata.Count <= max);
            ranges.AddRange(response.BlockMetadata.Select(b => (b.ByteOffset, b.SizeBytes)));
        }
        return ranges;
    }

    private async Task<List<(long Offset, long Length)>> AllocatedAsync(string snapshot, long start = 0)
    {
        var ranges = new List<(long, long)>();
        using AsyncServerStreamingCall<GetMetadataAllocatedResponse> call = fixture.Plugin.Metadata.GetMetadataAllocated(new GetMetadataAllocatedRequest { SnapshotId = snapshot, StartingOffset = start });
        await foreach (GetMetadataAllocatedResponse response in call.ResponseStream.ReadAllAsync())
        {
            ranges.AddRange(response.BlockMetadata.Select(b => (b.ByteOffset, b.SizeBytes)));
        }
        return ranges;
    }

    /// <summary>Allocated ranges (type without the hole bit) from <c>nbdinfo --map --json</c>, joined.</summary>
    private async Task<List<(long Offset, long Length)>> NbdinfoAllocatedAsync(string export)
    {
        ToolResult map = await Gateway.RunAsync("nbdinfo", ["--map", "--json", Gateway.NbdUri(export)]);
        using JsonDocument doc = JsonDocument.Parse(map.Stdout);
        return Join(doc.RootElement.EnumerateArray()
            .Where(e => (e.GetProperty("type").GetInt64() & 1) == 0)
            .Select(e => (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64())));
    }

    private static List<(long Offset, long Length)> Join(IEnumerable<(long Offset, long Length)> ranges) => ExtentReader.Union(ranges);

    private static (long, long) Granules((long Offset, long Length) write)
    {
        long start = write.Offset / Granule * Granule;
        long end = (write.Offset + write.Length + Granule - 1) / Granule * Granule;
        return (start, end - start);
    }

    /// <summary>Every written byte is in the delta, and every byte of the delta is in a granule some write touched.</summary>
    private static void AssertDeltaIs(List<(long Offset, long Length)> delta, params (long Offset, long Length)[] writes)
    {
        List<(long Offset, long Length)> joined = Join(delta);
        Assert.Equal(delta.Count, joined.Count); // already sorted, disjoint and joined
        foreach ((long offset, long length) in writes)
        {
            Assert.True(joined.Any(r => r.Offset <= offset && offset + length <= r.Offset + r.Length),
                $"write {offset}+{length} is missing from the delta [{string.Join(", ", joined)}]");
        }
        List<(long Offset, long Length)> allowed = Join(writes.Select(Granules));
        foreach ((long offset, long length) in joined)
        {
            Assert.True(allowed.Any(a => a.Offset <= offset && offset + length <= a.Offset + a.Length),
                $"delta range {offset}+{length} is outside every written granule [{string.Join(", ", allowed)}]");
        }
    }

    private async Task<string> Sha256Async(string export, long size)
    {
        string file = Path.Combine(Gateway.DataDirectory, $"copy-{export}-{Guid.NewGuid():N}.raw");
        try
        {
            await Gateway.RunAsync("nbdcopy", [Gateway.NbdUri(export), file]);
            Assert.Equal(size, new FileInfo(file).Length);
            return Tool.Sha256(file);
        }
        finally
        {
            File.Delete(file);
        }
    }

    [Fact]
    public async Task A_snapshot_holds_the_data_of_its_moment_and_a_volume_made_from_it_reads_the_same()
    {
        await Controller.CreateVolumeAsync(CsiControllerTests.NewVolume("pvc-snap-src", required: 16 * MiB));
        await QemuIoAsync("pvc-snap-src", "write -P 0x11 0 1M", "write -P 0x22 5M 64k");
        Snapshot snapshot = await SnapshotAsync("pvc-snap-src", "snapshot-data-1");
        Assert.True(snapshot.ReadyToUse);
        Assert.Equal(16 * MiB, snapshot.SizeBytes);
        Assert.Equal("pvc-snap-src", snapshot.SourceVolumeId);
        string atSnapshot = await Sha256Async("pvc-snap-src", 16 * MiB);
        await QemuIoAsync("pvc-snap-src", "write -P 0x33 0 64k");
        Assert.Equal(atSnapshot, await Sha256Async(snapshot.SnapshotId, 16 * MiB));

        // Idempotent: the same name and source give the same snapshot; another source is a conflict.
        Snapshot again = await SnapshotAsync("pvc-snap-src", "snapshot-data-1");
        Assert.Equal(snapshot, again);
        await Controller.CreateVolumeAsync(CsiControllerTests.NewVolume("pvc-snap-other", required: MiB));
        RpcException conflict = await Assert.ThrowsAsync<RpcException>(() => SnapshotAsync("pvc-snap-other", "snapshot-data-1"));
        Assert.Equal(StatusCode.AlreadyExists, conflict.StatusCode);

        CreateVolumeRequest restore = CsiControllerTests.NewVolume("pvc-from-snap", required: 0);
        restore.CapacityRange = null;
        restore.VolumeContentSource = new VolumeContentSource { Snapshot = new VolumeContentSource.Types.SnapshotSource { SnapshotId = snapshot.SnapshotId } };
        CreateVolumeResponse restored = await Controller.CreateVolumeAsync(restore);
        Assert.Equal(16 * MiB, restored.Volume.CapacityBytes);
        Assert.Equal(snapshot.SnapshotId, restored.Volume.ContentSource.Snapshot.SnapshotId);
        Assert.Equal(atSnapshot, await Sha256Async("pvc-from-snap", 16 * MiB));
        // The restored volume is writable and its writes stay its own.
        await QemuIoAsync("pvc-from-snap", "write -P 0x44 1M 64k");
        Assert.Equal(atSnapshot, await Sha256Async(snapshot.SnapshotId, 16 * MiB));

        // A clone of the volume as it is now.
        CreateVolumeRequest clone = CsiControllerTests.NewVolume("pvc-clone", required: 16 * MiB);
        clone.VolumeContentSource = new VolumeContentSource { Volume = new VolumeContentSource.Types.VolumeSource { VolumeId = "pvc-snap-src" } };
        await Controller.CreateVolumeAsync(clone);
        Assert.Equal(await Sha256Async("pvc-snap-src", 16 * MiB), await Sha256Async("pvc-clone", 16 * MiB));
        RpcException smaller = await Assert.ThrowsAsync<RpcException>(async () =>
        {
            CreateVolumeRequest tooSmall = CsiControllerTests.NewVolume("pvc-clone-small", required: MiB);
            tooSmall.VolumeContentSource = clone.VolumeContentSource;
            await Controller.CreateVolumeAsync(tooSmall);
        });
        Assert.Equal(StatusCode.OutOfRange, smaller.StatusCode);
    }

    [Fact]
    public async Task Snapshots_of_a_file_volume_are_refused_and_bad_snapshot_requests_get_the_spec_codes()
    {
        await Controller.CreateVolumeAsync(CsiControllerTests.NewVolume("pvc-file-nosnap", required: MiB, backend: "file"));
        RpcException file = await Assert.ThrowsAsync<RpcException>(() => SnapshotAsync("pvc-file-nosnap", "snapshot-of-file"));
        Assert.Equal(StatusCode.FailedPrecondition, file.StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(() => SnapshotAsync("pvc-file-nosnap", ""))).StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(() => SnapshotAsync("", "snapshot-x"))).StatusCode);
        Assert.Equal(StatusCode.NotFound, (await Assert.ThrowsAsync<RpcException>(() => SnapshotAsync("never-was", "snapshot-y"))).StatusCode);
        await Controller.DeleteSnapshotAsync(new DeleteSnapshotRequest { SnapshotId = "never-was" });
        Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(() => Controller.DeleteSnapshotAsync(new DeleteSnapshotRequest()).ResponseAsync)).StatusCode);
    }

    [Fact]
    public async Task GetMetadataDelta_is_what_was_written_between_two_snapshots_and_Allocated_is_the_snapshots_map()
    {
        await Controller.CreateVolumeAsync(CsiControllerTests.NewVolume("pvc-cbt", required: 64 * MiB));
        await QemuIoAsync("pvc-cbt", "write -P 1 0 1M", "write -P 2 40M 128k");
        Snapshot a = await SnapshotAsync("pvc-cbt", "snapshot-cbt-a");
        (long, long)[] between = [(3 * MiB + 4096, 4096), (8 * MiB, 3 * Granule), (63 * MiB + 512, 1024), (10 * MiB + 100, 70000)];
        await QemuIoAsync("pvc-cbt", [.. between.Select((w, i) => $"write -P {i + 10} {w.Item1} {w.Item2}")]);
        Snapshot b = await SnapshotAsync("pvc-cbt", "snapshot-cbt-b");
        // After the target: must not appear.
        await QemuIoAsync("pvc-cbt", "write -P 9 20M 1M");

        AssertDeltaIs(await DeltaAsync(a.SnapshotId, b.SnapshotId), between);
        // Paged by max_results and resumed from an offset: the same ranges, none ending before it.
        List<(long Offset, long Length)> paged = await DeltaAsync(a.SnapshotId, b.SnapshotId, max: 1);
        Assert.Equal(Join(paged), Join(await DeltaAsync(a.SnapshotId, b.SnapshotId)));
        List<(long Offset, long Length)> resumed = await DeltaAsync(a.SnapshotId, b.SnapshotId, start: 9 * MiB);
        Assert.All(resumed, r => Assert.True(r.Offset + r.Length > 9 * MiB));
        Assert.Contains(resumed, r => r.Offset <= 10 * MiB + 100 && r.Offset + r.Length >= 10 * MiB + 100 + 70000);
        Assert.DoesNotContain(resumed, r => r.Offset < 8 * MiB + 3 * Granule && r.Offset + r.Length > 8 * MiB);

        List<(long Offset, long Length)> allocated = await AllocatedAsync(b.SnapshotId);
        Assert.Equal(await NbdinfoAllocatedAsync(b.SnapshotId), Join(allocated));
        Assert.Contains(allocated, r => r.Offset <= 40 * MiB && r.Offset + r.Length >= 40 * MiB + 128 * 1024);
        Assert.DoesNotContain(allocated, r => r.Offset < 21 * MiB && r.Offset + r.Length > 20 * MiB);

        Assert.Equal(StatusCode.NotFound, (await Assert.ThrowsAsync<RpcException>(() => DeltaAsync("never-was", b.SnapshotId))).StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(() => DeltaAsync(b.SnapshotId, a.SnapshotId))).StatusCode);
        Assert.Equal(StatusCode.OutOfRange, (await Assert.ThrowsAsync<RpcException>(() => DeltaAsync(a.SnapshotId, b.SnapshotId, start: 65 * MiB))).StatusCode);
        Assert.Equal(StatusCode.OutOfRange, (await Assert.ThrowsAsync<RpcException>(() => AllocatedAsync(b.SnapshotId, start: -1))).StatusCode);
        Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(() => DeltaAsync("", b.SnapshotId))).StatusCode);
    }

    [Fact]
    public async Task Deleting_a_snapshot_between_two_others_keeps_the_delta_across_it_and_lost_tracking_is_refused()
    {
        await Controller.CreateVolumeAsync(CsiControllerTests.NewVolume("pvc-chain", required: 32 * MiB));
        Snapshot a = await SnapshotAsync("pvc-chain", "snapshot-chain-a");
        await QemuIoAsync("pvc-chain", "write -P 1 1M 4k");
        Snapshot b = await SnapshotAsync("pvc-chain", "snapshot-chain-b");
        await QemuIoAsync("pvc-chain", "write -P 2 5M 4k");
        Snapshot c = await SnapshotAsync("pvc-chain", "snapshot-chain-c");
        await QemuIoAsync("pvc-chain", "write -P 3 9M 4k");

        await Controller.DeleteSnapshotAsync(new DeleteSnapshotRequest { SnapshotId = b.SnapshotId });
        await Controller.DeleteSnapshotAsync(new DeleteSnapshotRequest { SnapshotId = b.SnapshotId });
        ListSnapshotsResponse listed = await Controller.ListSnapshotsAsync(new ListSnapshotsRequest { SourceVolumeId = "pvc-chain" });
        Assert.Equal([a.SnapshotId, c.SnapshotId], listed.Entries.Select(e => e.Snapshot.SnapshotId).Order(StringComparer.Ordinal).ToArray());
        AssertDeltaIs(await DeltaAsync(a.SnapshotId, c.SnapshotId), (MiB, 4096), (5 * MiB, 4096));

        // The newest deleted: the one before it takes over tracking, so a later snapshot's delta has the writes since.
        await Controller.DeleteSnapshotAsync(new DeleteSnapshotRequest { SnapshotId = c.SnapshotId });
        await QemuIoAsync("pvc-chain", "write -P 4 13M 4k");
        Snapshot d = await SnapshotAsync("pvc-chain", "snapshot-chain-d");
        AssertDeltaIs(await DeltaAsync(a.SnapshotId, d.SnapshotId), (MiB, 4096), (5 * MiB, 4096), (9 * MiB, 4096), (13 * MiB, 4096));

        // Tracking lost (its bitmap removed behind the driver's back): the spec's error, never a short list.
        using HttpResponseMessage removed = await Gateway.Http.DeleteAsync($"v1/exports/pvc-chain/bitmaps/{CsiObjects.BitmapOf(a.SnapshotId)}");
        Assert.True(removed.IsSuccessStatusCode, await removed.Content.ReadAsStringAsync());
        RpcException lost = await Assert.ThrowsAsync<RpcException>(() => DeltaAsync(a.SnapshotId, d.SnapshotId));
        Assert.Equal(StatusCode.FailedPrecondition, lost.StatusCode);
    }

    [Fact]
    public async Task ListSnapshots_filters_by_id_and_source_and_pages()
    {
        await Controller.CreateVolumeAsync(CsiControllerTests.NewVolume("pvc-list-snaps", required: MiB));
        Snapshot one = await SnapshotAsync("pvc-list-snaps", "snapshot-list-1");
        await SnapshotAsync("pvc-list-snaps", "snapshot-list-2");
        ListSnapshotsResponse byId = await Controller.ListSnapshotsAsync(new ListSnapshotsRequest { SnapshotId = one.SnapshotId });
        Assert.Equal(one, Assert.Single(byId.Entries).Snapshot);
        Assert.Empty((await Controller.ListSnapshotsAsync(new ListSnapshotsRequest { SnapshotId = "never-was" })).Entries);
        ListSnapshotsResponse first = await Controller.ListSnapshotsAsync(new ListSnapshotsRequest { SourceVolumeId = "pvc-list-snaps", MaxEntries = 1 });
        Assert.Single(first.Entries);
        Assert.NotEmpty(first.NextToken);
        ListSnapshotsResponse second = await Controller.ListSnapshotsAsync(new ListSnapshotsRequest { SourceVolumeId = "pvc-list-snaps", MaxEntries = 1, StartingToken = first.NextToken });
        Assert.NotEqual(first.Entries[0].Snapshot.SnapshotId, Assert.Single(second.Entries).Snapshot.SnapshotId);
        Assert.Equal("", second.NextToken);
    }

    [Fact]
    public async Task Snapshots_taken_together_leave_exactly_the_newest_tracking_and_no_write_untracked()
    {
        await Controller.CreateVolumeAsync(CsiControllerTests.NewVolume("pvc-concurrent", required: 16 * MiB));
        Snapshot[] taken = await Task.WhenAll(Enumerable.Range(0, 4).Select(i => SnapshotAsync("pvc-concurrent", $"snapshot-together-{i}")));
        GatewayBitmap[] bitmaps = (await Gateway.Http.GetFromJsonAsync<GatewayBitmap[]>("v1/exports/pvc-concurrent/bitmaps"))!;
        Snapshot newest = taken.MaxBy(s => s.CreationTime.ToDateTimeOffset())!;
        GatewayBitmap tracking = Assert.Single(bitmaps, b => b.Enabled);
        Assert.Equal(CsiObjects.BitmapOf(newest.SnapshotId), tracking.Name);
        Assert.Equal(4, bitmaps.Count(b => b.Name.StartsWith("csi.", StringComparison.Ordinal)));

        await QemuIoAsync("pvc-concurrent", "write -P 7 3M 4k");
        Snapshot after = await SnapshotAsync("pvc-concurrent", "snapshot-together-after");
        AssertDeltaIs(await DeltaAsync(newest.SnapshotId, after.SnapshotId), (3 * MiB, 4096));
        Snapshot oldest = taken.MinBy(s => s.CreationTime.ToDateTimeOffset())!;
        AssertDeltaIs(await DeltaAsync(oldest.SnapshotId, after.SnapshotId), (3 * MiB, 4096));
    }
}
