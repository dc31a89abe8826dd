using System.Net;
using System.Net.Http.Json;
using Gateway.Csi;
using Gateway.Csi.V1;
using Gateway.Tests.Interop;
using Grpc.Core;
using Xunit;
using Mode = Gateway.Csi.V1.VolumeCapability.Types.AccessMode.Types.Mode;

namespace Gateway.Tests.Csi;

/// <summary>
/// The controller over its Unix socket against a real gateway: volumes, idempotency and the
/// spec's error codes (the csi-sanity points that apply; README "Kubernetes CSI driver").
/// </summary>
public sealed class CsiControllerTests(CsiControllerFixture fixture) : IClassFixture<CsiControllerFixture>
{
    private const long MiB = 1 << 20;

    private Controller.ControllerClient Controller => fixture.Plugin.Controller;

    private GatewayProcess Gateway => fixture.Gateway;

    internal static VolumeCapability Block(Mode mode = Mode.SingleNodeWriter) =>
        new() { Block = new VolumeCapability.Types.BlockVolume(), AccessMode = new VolumeCapability.Types.AccessMode { Mode = mode } };

    internal static VolumeCapability Mount(string fs = "ext4", Mode mode = Mode.SingleNodeWriter) =>
        new() { Mount = new VolumeCapability.Types.MountVolume { FsType = fs }, AccessMode = new VolumeCapability.Types.AccessMode { Mode = mode } };

    internal static CreateVolumeRequest NewVolume(string name, long required = 64 * MiB, long limit = 0, string? backend = null)
    {
        var request = new CreateVolumeRequest { Name = name, CapacityRange = new CapacityRange { RequiredBytes = required, LimitBytes = limit }, VolumeCapabilities = { Block() } };
        if (backend is not null)
        {
            request.Parameters.Add("backend", backend);
        }
        return request;
    }

    private async Task<GatewayExport?> ExportAsync(string name)
    {
        using HttpResponseMessage response = await Gateway.Http.GetAsync($"v1/exports/{name}");
        return response.StatusCode == HttpStatusCode.NotFound ? null : await response.Content.ReadFromJsonAsync<GatewayExport>();
    }

    private static async Task<StatusCode> CodeOf(Func<Task> call)
    {
        RpcException e = await Assert.ThrowsAsync<RpcException>(call);
        return e.StatusCode;
    }

    [Fact]
    public async Task Identity_names_the_driver_offers_controller_and_metadata_and_probes_the_gateway()
    {
        GetPluginInfoResponse info = await fixture.Plugin.Identity.GetPluginInfoAsync(new GetPluginInfoRequest());
        Assert.Equal("csi.nbd-gateway.dev", info.Name);
        Assert.False(string.IsNullOrEmpty(info.VendorVersion));
        GetPluginCapabilitiesResponse capabilities = await fixture.Plugin.Identity.GetPluginCapabilitiesAsync(new GetPluginCapabilitiesRequest());
        PluginCapability.Types.Service.Types.Type[] services = [.. capabilities.Capabilities.Where(c => c.Service is not null).Select(c => c.Service.Type)];
        Assert.Contains(PluginCapability.Types.Service.Types.Type.ControllerService, services);
        Assert.Contains(PluginCapability.Types.Service.Types.Type.SnapshotMetadataService, services);
        Assert.Contains(capabilities.Capabilities, c => c.VolumeExpansion?.Type == PluginCapability.Types.VolumeExpansion.Types.Type.Online);
        Assert.True((await fixture.Plugin.Identity.ProbeAsync(new ProbeRequest())).Ready);
    }

    [Fact]
    public async Task Probe_is_not_ready_when_the_gateway_does_not_answer()
    {
        int closed = GatewayProcess.FreePort();
        await using CsiPlugin orphan = await CsiPlugin.StartAsync(CsiMode.Controller, new Uri($"http://127.0.0.1:{closed}/"), closed);
        Assert.False((await orphan.Identity.ProbeAsync(new ProbeRequest())).Ready);
    }

    [Fact]
    public async Task Controller_capabilities_are_what_it_implements()
    {
        ControllerGetCapabilitiesResponse response = await Controller.ControllerGetCapabilitiesAsync(new ControllerGetCapabilitiesRequest());
        var types = response.Capabilities.Select(c => c.Rpc.Type).ToHashSet();
        foreach (ControllerServiceCapability.Types.RPC.Types.Type t in new[]
        {
            ControllerServiceCapability.Types.RPC.Types.Type.CreateDeleteVolume, ControllerServiceCapability.Types.RPC.Types.Type.CreateDeleteSnapshot,
            ControllerServiceCapability.Types.RPC.Types.Type.ListSnapshots, ControllerServiceCapability.Types.RPC.Types.Type.CloneVolume,
            ControllerServiceCapability.Types.RPC.Types.Type.ExpandVolume, ControllerServiceCapability.Types.RPC.Types.Type.ListVolumes,
            ControllerServiceCapability.Types.RPC.Types.Type.GetCapacity, ControllerServiceCapability.Types.RPC.Types.Type.PublishUnpublishVolume,
        })
        {
            Assert.Contains(t, types);
        }
        Assert.DoesNotContain(ControllerServiceCapability.Types.RPC.Types.Type.GetVolume, types);
    }

    [Fact]
    public async Task CreateVolume_makes_an_export_of_the_size_asked_and_a_repeat_gets_the_same_volume()
    {
        CreateVolumeResponse first = await Controller.CreateVolumeAsync(NewVolume("pvc-create-1", required: 10 * MiB + 1));
        Assert.Equal("pvc-create-1", first.Volume.VolumeId);
        Assert.Equal(10 * MiB + 4096, first.Volume.CapacityBytes);
        GatewayExport export = (await ExportAsync("pvc-create-1"))!;
        Assert.Equal(first.Volume.CapacityBytes, export.Size);
        Assert.Equal("overlay", export.Backend.Type);
        ToolResult size = await Gateway.RunAsync("nbdinfo", ["--size", Gateway.NbdUri("pvc-create-1")]);
        Assert.Equal(first.Volume.CapacityBytes.ToString(System.Globalization.CultureInfo.InvariantCulture), size.Stdout.Trim());

        CreateVolumeResponse again = await Controller.CreateVolumeAsync(NewVolume("pvc-create-1", required: 10 * MiB + 1));
        Assert.Equal(first.Volume, again.Volume);
        Assert.Equal(StatusCode.AlreadyExists, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("pvc-create-1", required: 20 * MiB)).ResponseAsync));
        Assert.Equal(StatusCode.AlreadyExists, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("pvc-create-1", required: 10 * MiB + 1, backend: "file")).ResponseAsync));
        // An export the driver did not make is never taken for a volume of that name.
        Assert.Equal(StatusCode.AlreadyExists, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("disk0")).ResponseAsync));
    }

    [Fact]
    public async Task CreateVolume_of_a_file_backend_and_without_a_size_uses_the_default()
    {
        var request = new CreateVolumeRequest { Name = "pvc-default-size", VolumeCapabilities = { Mount("xfs") }, Parameters = { ["backend"] = "file", ["csi.storage.k8s.io/pvc/name"] = "data" } };
        CreateVolumeResponse response = await Controller.CreateVolumeAsync(request);
        Assert.Equal(ControllerService.DefaultSize, response.Volume.CapacityBytes);
        Assert.Equal("file", (await ExportAsync("pvc-default-size"))!.Backend.Type);
    }

    [Fact]
    public async Task CreateVolume_bad_requests_get_the_spec_codes()
    {
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("")).ResponseAsync));
        var noCapabilities = new CreateVolumeRequest { Name = "pvc-bad-caps", CapacityRange = new CapacityRange { RequiredBytes = MiB } };
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.CreateVolumeAsync(noCapabilities).ResponseAsync));
        Assert.Equal(StatusCode.OutOfRange, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("pvc-huge", required: 1L << 51)).ResponseAsync));
        Assert.Equal(StatusCode.OutOfRange, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("pvc-range", required: 2 * MiB, limit: MiB)).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("pvc-negative", required: -1)).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.CreateVolumeAsync(NewVolume("pvc-backend", backend: "nfs")).ResponseAsync));
        CreateVolumeRequest typo = NewVolume("pvc-typo");
        typo.Parameters.Add("bakend", "file");
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.CreateVolumeAsync(typo).ResponseAsync));
        var sharedFs = new CreateVolumeRequest { Name = "pvc-rwx-fs", VolumeCapabilities = { Mount("ext4", Mode.MultiNodeMultiWriter) } };
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.CreateVolumeAsync(sharedFs).ResponseAsync));
        var unknownMode = new CreateVolumeRequest { Name = "pvc-no-mode", VolumeCapabilities = { Block(Mode.Unknown) } };
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.CreateVolumeAsync(unknownMode).ResponseAsync));
        var fromNothing = new CreateVolumeRequest(NewVolume("pvc-from-missing")) { VolumeContentSource = new VolumeContentSource { Snapshot = new VolumeContentSource.Types.SnapshotSource { SnapshotId = "no-such-snapshot" } } };
        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Controller.CreateVolumeAsync(fromNothing).ResponseAsync));
        foreach (string name in new[] { "pvc-huge", "pvc-range", "pvc-negative", "pvc-backend", "pvc-typo", "pvc-rwx-fs", "pvc-no-mode", "pvc-from-missing", "pvc-bad-caps" })
        {
            Assert.Null(await ExportAsync(name));
        }
    }

    [Fact]
    public async Task A_name_the_gateway_would_refuse_gets_a_stable_hashed_id()
    {
        string name = "team/a:" + new string('x', 200);
        CreateVolumeResponse first = await Controller.CreateVolumeAsync(NewVolume(name, required: MiB));
        Assert.StartsWith("vol-", first.Volume.VolumeId);
        Assert.Equal(first.Volume.VolumeId, (await Controller.CreateVolumeAsync(NewVolume(name, required: MiB))).Volume.VolumeId);
        await Controller.DeleteVolumeAsync(new DeleteVolumeRequest { VolumeId = first.Volume.VolumeId });
    }

    [Fact]
    public async Task DeleteVolume_removes_the_export_and_is_idempotent_and_leaves_other_exports_alone()
    {
        await Controller.CreateVolumeAsync(NewVolume("pvc-delete-1"));
        await Controller.DeleteVolumeAsync(new DeleteVolumeRequest { VolumeId = "pvc-delete-1" });
        Assert.Null(await ExportAsync("pvc-delete-1"));
        await Controller.DeleteVolumeAsync(new DeleteVolumeRequest { VolumeId = "pvc-delete-1" });
        await Controller.DeleteVolumeAsync(new DeleteVolumeRequest { VolumeId = "never-was" });
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.DeleteVolumeAsync(new DeleteVolumeRequest()).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.DeleteVolumeAsync(new DeleteVolumeRequest { VolumeId = "disk0" }).ResponseAsync));
        Assert.NotNull(await ExportAsync("disk0"));
    }

    [Fact]
    public async Task ValidateVolumeCapabilities_confirms_what_an_export_can_do_and_only_that()
    {
        await Controller.CreateVolumeAsync(NewVolume("pvc-validate"));
        ValidateVolumeCapabilitiesResponse ok = await Controller.ValidateVolumeCapabilitiesAsync(new ValidateVolumeCapabilitiesRequest
        {
            VolumeId = "pvc-validate",
            VolumeCapabilities = { Block(Mode.MultiNodeMultiWriter), Mount("ext4") },
        });
        Assert.NotNull(ok.Confirmed);
        Assert.Equal(2, ok.Confirmed.VolumeCapabilities.Count);
        ValidateVolumeCapabilitiesResponse no = await Controller.ValidateVolumeCapabilitiesAsync(new ValidateVolumeCapabilitiesRequest
        {
            VolumeId = "pvc-validate",
            VolumeCapabilities = { Mount("ext4", Mode.MultiNodeMultiWriter) },
        });
        Assert.Null(no.Confirmed);
        Assert.Contains("Block", no.Message);
        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Controller.ValidateVolumeCapabilitiesAsync(new ValidateVolumeCapabilitiesRequest { VolumeId = "never-was", VolumeCapabilities = { Block() } }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.ValidateVolumeCapabilitiesAsync(new ValidateVolumeCapabilitiesRequest { VolumeId = "pvc-validate" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.ValidateVolumeCapabilitiesAsync(new ValidateVolumeCapabilitiesRequest { VolumeCapabilities = { Block() } }).ResponseAsync));
    }

    [Fact]
    public async Task ListVolumes_pages_through_the_drivers_volumes_only()
    {
        string[] names = ["pvc-list-a", "pvc-list-b", "pvc-list-c"];
        foreach (string name in names)
        {
            await Controller.CreateVolumeAsync(NewVolume(name, required: MiB));
        }
        var seen = new List<string>();
        string token = "";
        int pages = 0;
        do
        {
            ListVolumesResponse page = await Controller.ListVolumesAsync(new ListVolumesRequest { MaxEntries = 2, StartingToken = token });
            Assert.True(page.Entries.Count <= 2);
            seen.AddRange(page.Entries.Select(e => e.Volume.VolumeId));
            token = page.NextToken;
        }
        while (token.Length > 0 && ++pages < 100);
        Assert.Subset(seen.ToHashSet(), names.ToHashSet());
        Assert.DoesNotContain("disk0", seen);
        Assert.Equal(seen.Count, seen.Distinct().Count());
        Assert.Equal(StatusCode.Aborted, await CodeOf(() => Controller.ListVolumesAsync(new ListVolumesRequest { StartingToken = "not-a-token" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.ListVolumesAsync(new ListVolumesRequest { MaxEntries = -1 }).ResponseAsync));
    }

    [Fact]
    public async Task ControllerPublishVolume_tells_the_node_where_the_export_is_served()
    {
        await Controller.CreateVolumeAsync(NewVolume("pvc-publish", required: MiB));
        ControllerPublishVolumeResponse published = await Controller.ControllerPublishVolumeAsync(new ControllerPublishVolumeRequest
        {
            VolumeId = "pvc-publish",
            NodeId = "node-1",
            VolumeCapability = Block(),
        });
        Assert.Equal("pvc-publish", published.PublishContext[PublishContext.Export]);
        Assert.Equal(Gateway.NbdPort.ToString(System.Globalization.CultureInfo.InvariantCulture), published.PublishContext[PublishContext.NbdPort]);
        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Controller.ControllerPublishVolumeAsync(new ControllerPublishVolumeRequest { VolumeId = "never-was", NodeId = "node-1", VolumeCapability = Block() }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.ControllerPublishVolumeAsync(new ControllerPublishVolumeRequest { VolumeId = "pvc-publish", VolumeCapability = Block() }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.ControllerPublishVolumeAsync(new ControllerPublishVolumeRequest { VolumeId = "pvc-publish", NodeId = "node-1" }).ResponseAsync));
        await Controller.ControllerUnpublishVolumeAsync(new ControllerUnpublishVolumeRequest { VolumeId = "pvc-publish", NodeId = "node-1" });
        await Controller.ControllerUnpublishVolumeAsync(new ControllerUnpublishVolumeRequest { VolumeId = "never-was", NodeId = "node-1" });
    }

    [Fact]
    public async Task GetCapacity_reports_the_data_folders_free_space()
    {
        GetCapacityResponse capacity = await Controller.GetCapacityAsync(new GetCapacityRequest());
        long free = new DriveInfo(Gateway.DataDirectory).AvailableFreeSpace;
        Assert.InRange(capacity.AvailableCapacity, free / 2, free * 2);
        Assert.Equal(ControllerService.MaxSize, capacity.MaximumVolumeSize);
        GetCapacityResponse none = await Controller.GetCapacityAsync(new GetCapacityRequest { VolumeCapabilities = { Mount("btrfs") } });
        Assert.Equal(0, none.AvailableCapacity);
    }

    [Fact]
    public async Task ControllerExpandVolume_grows_the_export_online_keeps_the_data_and_never_shrinks()
    {
        await Controller.CreateVolumeAsync(NewVolume("pvc-expand", required: 16 * MiB));
        await Gateway.RunAsync("qemu-io", ["-f", "raw", Gateway.NbdUri("pvc-expand"), "-c", "write -P 0x5a 15M 1M"]);
        ControllerExpandVolumeResponse grown = await Controller.ControllerExpandVolumeAsync(new ControllerExpandVolumeRequest
        {
            VolumeId = "pvc-expand",
            CapacityRange = new CapacityRange { RequiredBytes = 32 * MiB },
            VolumeCapability = Block(),
        });
        Assert.Equal(32 * MiB, grown.CapacityBytes);
        Assert.False(grown.NodeExpansionRequired);
        ToolResult size = await Gateway.RunAsync("nbdinfo", ["--size", Gateway.NbdUri("pvc-expand")]);
        Assert.Equal((32 * MiB).ToString(System.Globalization.CultureInfo.InvariantCulture), size.Stdout.Trim());
        ToolResult read = await Gateway.RunAsync("qemu-io", ["-f", "raw", Gateway.NbdUri("pvc-expand"), "-c", "read -P 0x5a 15M 1M", "-c", "read -P 0 16M 16M"]);
        Assert.DoesNotContain("fail", read.Stdout + read.Stderr, StringComparison.OrdinalIgnoreCase);

        // Asking for less than it has: the volume stays as it is (the spec: already at least that big).
        ControllerExpandVolumeResponse same = await Controller.ControllerExpandVolumeAsync(new ControllerExpandVolumeRequest
        {
            VolumeId = "pvc-expand",
            CapacityRange = new CapacityRange { RequiredBytes = 8 * MiB },
            VolumeCapability = Mount("ext4"),
        });
        Assert.Equal(32 * MiB, same.CapacityBytes);
        Assert.True(same.NodeExpansionRequired);
        Assert.Equal(32 * MiB, (await ExportAsync("pvc-expand"))!.Size);

        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Controller.ControllerExpandVolumeAsync(new ControllerExpandVolumeRequest { VolumeId = "never-was", CapacityRange = new CapacityRange { RequiredBytes = MiB } }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.ControllerExpandVolumeAsync(new ControllerExpandVolumeRequest { CapacityRange = new CapacityRange { RequiredBytes = MiB } }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Controller.ControllerExpandVolumeAsync(new ControllerExpandVolumeRequest { VolumeId = "pvc-expand" }).ResponseAsync));
        Assert.Equal(StatusCode.OutOfRange, await CodeOf(() => Controller.ControllerExpandVolumeAsync(new ControllerExpandVolumeRequest { VolumeId = "pvc-expand", CapacityRange = new CapacityRange { RequiredBytes = 1L << 51 } }).ResponseAsync));
    }

    [Fact]
    public async Task A_volume_from_a_snapshot_may_be_larger_and_reads_zeros_past_the_snapshot()
    {
        await Controller.CreateVolumeAsync(NewVolume("pvc-grow-src", required: 8 * MiB));
        await Gateway.RunAsync("qemu-io", ["-f", "raw", Gateway.NbdUri("pvc-grow-src"), "-c", "write -P 0x77 7M 1M"]);
        Snapshot snapshot = (await Controller.CreateSnapshotAsync(new CreateSnapshotRequest { SourceVolumeId = "pvc-grow-src", Name = "snapshot-grow" })).Snapshot;
        CreateVolumeRequest bigger = NewVolume("pvc-grow-dst", required: 24 * MiB);
        bigger.VolumeContentSource = new VolumeContentSource { Snapshot = new VolumeContentSource.Types.SnapshotSource { SnapshotId = snapshot.SnapshotId } };
        CreateVolumeResponse made = await Controller.CreateVolumeAsync(bigger);
        Assert.Equal(24 * MiB, made.Volume.CapacityBytes);
        ToolResult read = await Gateway.RunAsync("qemu-io", ["-f", "raw", Gateway.NbdUri("pvc-grow-dst"), "-c", "read -P 0x77 7M 1M", "-c", "read -P 0 8M 16M", "-c", "write -P 0x78 20M 64k", "-c", "read -P 0x78 20M 64k"]);
        Assert.DoesNotContain("fail", read.Stdout + read.Stderr, StringComparison.OrdinalIgnoreCase);
        // A repeat is the same volume, not a second grow or a conflict.
        Assert.Equal(made.Volume, (await Controller.CreateVolumeAsync(bigger)).Volume);
    }
}
