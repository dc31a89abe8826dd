using System.Diagnostics;
using System.Globalization;
using Gateway.Csi;
using Gateway.Csi.Node;
using Gateway.Csi.V1;
using Gateway.Tests.Interop;
using Grpc.Core;
using Grpc.Net.Client;
using Xunit;
using NodeClient = Gateway.Csi.V1.Node.NodeClient;
using Mode = Gateway.Csi.V1.VolumeCapability.Types.AccessMode.Types.Mode;

namespace Gateway.Tests.Csi;

/// <summary>
/// One gateway, a controller plugin and a node plugin whose attach step is <see cref="FuseLoopAttacher"/>
/// (the kernel's nbd module is missing here), and a folder for staging and target paths. Whatever a
/// failed test left mounted under that folder is unmounted on dispose.
/// </summary>
public sealed class CsiNodeFixture : IAsyncLifetime
{
    public GatewayProcess Gateway { get; private set; } = null!;

    public CsiPlugin Controller { get; private set; } = null!;

    public CsiPlugin Node { get; private set; } = null!;

    public FuseLoopAttacher Attacher { get; } = new();

    public string Work { get; } = Directory.CreateTempSubdirectory("csi-node-").FullName;

    public async Task InitializeAsync()
    {
        Gateway = await GatewayProcess.StartAsync();
        Controller = await CsiPlugin.StartAsync(CsiMode.Controller, Gateway.AdminUri, Gateway.NbdPort);
        Node = await CsiPlugin.StartAsync(CsiMode.Node, Gateway.AdminUri, Gateway.NbdPort, nodeId: "node-test", attacher: Attacher);
    }

    public async Task DisposeAsync()
    {
        try
        {
            foreach (string mount in File.ReadLines("/proc/self/mountinfo").Select(l => l.Split(' ')[4]).Where(m => m.StartsWith(Work, StringComparison.Ordinal)).Reverse())
            {
                await Tool.RunAsync("umount", ["-l", mount], check: false);
            }
            await Attacher.DisposeAsync();
        }
        finally
        {
            await Node.DisposeAsync();
            await Controller.DisposeAsync();
            await Gateway.DisposeAsync();
            Directory.Delete(Work, recursive: true);
        }
    }
}

/// <summary>
/// The node plugin over its Unix socket, on a real data path to a real gateway: stage formats once
/// and mounts, publish bind-mounts, what a pod writes lands on the gateway's export (read back over
/// NBD), stats agree with df, and the spec's codes for bad requests (the csi-sanity Node points;
/// README "Kubernetes CSI driver").
/// </summary>
public sealed class CsiNodeTests(CsiNodeFixture fixture) : IClassFixture<CsiNodeFixture>
{
    private const long MiB = 1 << 20;

    private NodeClient Node => fixture.Node.Node;

    private static async Task<StatusCode> CodeOf(Func<Task> call) => (await Assert.ThrowsAsync<RpcException>(call)).StatusCode;

    /// <summary>A volume made and published to this node through the controller: its publish_context.</summary>
    private async Task<IDictionary<string, string>> VolumeAsync(string name, VolumeCapability capability, long size = 64 * MiB)
    {
        await fixture.Controller.Controller.CreateVolumeAsync(new CreateVolumeRequest { Name = name, CapacityRange = new CapacityRange { RequiredBytes = size }, VolumeCapabilities = { capability } });
        ControllerPublishVolumeResponse published = await fixture.Controller.Controller.ControllerPublishVolumeAsync(
            new ControllerPublishVolumeRequest { VolumeId = name, NodeId = "node-test", VolumeCapability = capability });
        return published.PublishContext;
    }

    private NodeStageVolumeRequest Stage(string volume, IDictionary<string, string> context, VolumeCapability capability) =>
        new() { VolumeId = volume, StagingTargetPath = Path.Combine(fixture.Work, volume, "staging"), VolumeCapability = capability, PublishContext = { context } };

    private NodePublishVolumeRequest Publish(string volume, IDictionary<string, string> context, VolumeCapability capability, string target, bool readOnly = false) =>
        new()
        {
            VolumeId = volume,
            StagingTargetPath = Path.Combine(fixture.Work, volume, "staging"),
            TargetPath = Path.Combine(fixture.Work, volume, target),
            VolumeCapability = capability,
            PublishContext = { context },
            Readonly = readOnly,
        };

    private async Task UnstageAsync(string volume) =>
        await Node.NodeUnstageVolumeAsync(new NodeUnstageVolumeRequest { VolumeId = volume, StagingTargetPath = Path.Combine(fixture.Work, volume, "staging") });

    [Fact]
    public async Task Node_offers_stage_stats_and_expand_and_names_its_node()
    {
        NodeGetCapabilitiesResponse capabilities = await Node.NodeGetCapabilitiesAsync(new NodeGetCapabilitiesRequest());
        Assert.Equal(
            new[] { NodeServiceCapability.Types.RPC.Types.Type.StageUnstageVolume, NodeServiceCapability.Types.RPC.Types.Type.GetVolumeStats, NodeServiceCapability.Types.RPC.Types.Type.ExpandVolume },
            capabilities.Capabilities.Select(c => c.Rpc.Type));
        NodeGetInfoResponse info = await Node.NodeGetInfoAsync(new NodeGetInfoRequest());
        Assert.Equal("node-test", info.NodeId);
        int devices = Directory.EnumerateFileSystemEntries("/dev", "nbd*").Count(d => Path.GetFileName(d)[3..].All(char.IsAsciiDigit));
        Assert.Equal(devices, info.MaxVolumesPerNode);
    }

    [Fact]
    public async Task Filesystem_volume_is_formatted_once_and_what_a_pod_writes_is_on_the_gateways_export()
    {
        const string volume = "pvc-node-fs";
        VolumeCapability ext4 = CsiControllerTests.Mount("ext4");
        IDictionary<string, string> context = await VolumeAsync(volume, ext4);
        NodeStageVolumeRequest stage = Stage(volume, context, ext4);
        await Node.NodeStageVolumeAsync(stage);
        MountPoint staged = Assert.IsType<MountPoint>(Mounts.At(stage.StagingTargetPath));
        Assert.Equal("ext4", staged.FsType);
        Assert.StartsWith("/dev/loop", staged.Source);
        Assert.True(File.Exists(Path.Combine(fixture.Node.StateFolder, volume + ".json")), "no state file for the staged volume");
        // The gateway's exports advertise NBD_FLAG_CAN_MULTI_CONN: the node asks for 4 connections.
        NbdTarget target = fixture.Attacher.Targets.Last(t => t.Export == volume);
        Assert.Equal((fixture.Gateway.NbdPort, 4, false), (target.Port, target.Connections, target.ReadOnly));

        await Node.NodeStageVolumeAsync(stage);
        Assert.Equal(StatusCode.AlreadyExists, await CodeOf(() => Node.NodeStageVolumeAsync(Stage(volume, context, CsiControllerTests.Mount("xfs"))).ResponseAsync));
        Assert.Equal(StatusCode.AlreadyExists, await CodeOf(() => Node.NodeStageVolumeAsync(new NodeStageVolumeRequest(stage) { StagingTargetPath = Path.Combine(fixture.Work, volume, "elsewhere") }).ResponseAsync));

        NodePublishVolumeRequest publish = Publish(volume, context, ext4, "pod-a");
        await Node.NodePublishVolumeAsync(publish);
        await Node.NodePublishVolumeAsync(publish);
        Assert.Equal(StatusCode.AlreadyExists, await CodeOf(() => Node.NodePublishVolumeAsync(new NodePublishVolumeRequest(publish) { Readonly = true }).ResponseAsync));
        await File.WriteAllTextAsync(Path.Combine(publish.TargetPath, "hello.txt"), "written by a pod\n");

        NodePublishVolumeRequest readOnly = Publish(volume, context, ext4, "pod-b", readOnly: true);
        await Node.NodePublishVolumeAsync(readOnly);
        Assert.True(Mounts.At(readOnly.TargetPath)!.ReadOnly);
        Assert.Equal("written by a pod\n", await File.ReadAllTextAsync(Path.Combine(readOnly.TargetPath, "hello.txt")));
        Assert.ThrowsAny<IOException>(() => File.WriteAllText(Path.Combine(readOnly.TargetPath, "no.txt"), "x"));

        // Stats as df sees the published file system.
        NodeGetVolumeStatsResponse stats = await Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumeId = volume, VolumePath = publish.TargetPath, StagingTargetPath = stage.StagingTargetPath });
        string[] df = (await Tool.RunAsync("df", ["-B1", "--output=size,used,avail,itotal,iused,iavail", publish.TargetPath])).Stdout.Split('\n')[1].Split(' ', StringSplitOptions.RemoveEmptyEntries);
        VolumeUsage bytes = stats.Usage.Single(u => u.Unit == VolumeUsage.Types.Unit.Bytes);
        VolumeUsage inodes = stats.Usage.Single(u => u.Unit == VolumeUsage.Types.Unit.Inodes);
        Assert.Equal(df.Select(long.Parse), new[] { bytes.Total, bytes.Used, bytes.Available, inodes.Total, inodes.Used, inodes.Available });
        Assert.InRange(bytes.Total, 50 * MiB, 64 * MiB);

        foreach (NodePublishVolumeRequest p in new[] { publish, readOnly })
        {
            await Node.NodeUnpublishVolumeAsync(new NodeUnpublishVolumeRequest { VolumeId = volume, TargetPath = p.TargetPath });
            Assert.False(Path.Exists(p.TargetPath));
            await Node.NodeUnpublishVolumeAsync(new NodeUnpublishVolumeRequest { VolumeId = volume, TargetPath = p.TargetPath });
        }
        await UnstageAsync(volume);
        Assert.Null(Mounts.At(stage.StagingTargetPath));
        Assert.False(File.Exists(Path.Combine(fixture.Node.StateFolder, volume + ".json")));
        await UnstageAsync(volume);

        // Staged again: the file system is the same one (not formatted over), with the pod's file.
        await Node.NodeStageVolumeAsync(stage);
        Assert.Equal("written by a pod\n", await File.ReadAllTextAsync(Path.Combine(stage.StagingTargetPath, "hello.txt")));
        await UnstageAsync(volume);

        // And it is on the gateway's export itself: its bytes read over NBD hold the ext4 with the file.
        string image = Path.Combine(fixture.Work, volume, "export.img");
        await fixture.Gateway.RunAsync("nbdcopy", [fixture.Gateway.NbdUri(volume), image]);
        Assert.Equal("written by a pod\n", (await Tool.RunAsync("debugfs", ["-R", "cat /hello.txt", image])).Stdout);
    }

    [Fact]
    public async Task Block_volume_is_bind_mounted_as_a_device_file_and_dd_writes_reach_the_export()
    {
        const string volume = "pvc-node-block";
        VolumeCapability block = CsiControllerTests.Block(Mode.MultiNodeMultiWriter);
        IDictionary<string, string> context = await VolumeAsync(volume, block, size: 16 * MiB);
        NodeStageVolumeRequest stage = Stage(volume, context, block);
        await Node.NodeStageVolumeAsync(stage);
        await Node.NodeStageVolumeAsync(stage);
        Assert.Null(Mounts.At(stage.StagingTargetPath));
        NodePublishVolumeRequest publish = Publish(volume, context, block, "dev");
        await Node.NodePublishVolumeAsync(publish);
        await Node.NodePublishVolumeAsync(publish);
        Assert.NotNull(Mounts.At(publish.TargetPath));
        Assert.Equal(StatusCode.FailedPrecondition, await CodeOf(() => Node.NodePublishVolumeAsync(Publish(volume, context, CsiControllerTests.Mount(), "as-fs")).ResponseAsync));

        string pattern = Path.Combine(fixture.Work, volume, "pattern");
        await File.WriteAllBytesAsync(pattern, Enumerable.Repeat((byte)0x5a, (int)MiB).ToArray());
        await Tool.RunAsync("dd", [$"if={pattern}", $"of={publish.TargetPath}", "bs=1M", "seek=3", "count=1", "oflag=direct", "conv=fsync,notrunc"]);
        NodeGetVolumeStatsResponse stats = await Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumeId = volume, VolumePath = publish.TargetPath });
        Assert.Equal(16 * MiB, Assert.Single(stats.Usage).Total);
        NodeExpandVolumeResponse expanded = await Node.NodeExpandVolumeAsync(new NodeExpandVolumeRequest
        {
            VolumeId = volume,
            VolumePath = publish.TargetPath,
            StagingTargetPath = stage.StagingTargetPath,
            CapacityRange = new CapacityRange { RequiredBytes = 16 * MiB },
        });
        Assert.Equal(16 * MiB, expanded.CapacityBytes);

        await Node.NodeUnpublishVolumeAsync(new NodeUnpublishVolumeRequest { VolumeId = volume, TargetPath = publish.TargetPath });
        Assert.False(File.Exists(publish.TargetPath));
        await UnstageAsync(volume);
        ToolResult read = await fixture.Gateway.RunAsync("qemu-io", ["-f", "raw", "-r", fixture.Gateway.NbdUri(volume), "-c", "read -P 0x5a 3M 1M", "-c", "read -P 0 2M 1M"]);
        Assert.DoesNotContain("verification failed", read.Stdout + read.Stderr, StringComparison.OrdinalIgnoreCase);
        Assert.Contains("read 1048576/1048576 bytes at offset 3145728", read.Stdout);
    }

    [Fact]
    public async Task A_record_from_before_a_reboot_is_not_trusted_a_stage_attaches_again()
    {
        const string volume = "pvc-node-reboot";
        VolumeCapability ext4 = CsiControllerTests.Mount("ext4");
        IDictionary<string, string> context = await VolumeAsync(volume, ext4, size: 16 * MiB);
        NodeStageVolumeRequest stage = Stage(volume, context, ext4);
        await Node.NodeStageVolumeAsync(stage);
        try
        {
            await File.WriteAllTextAsync(Path.Combine(stage.StagingTargetPath, "kept.txt"), "before the reboot\n");
            // As a reboot leaves it: nothing mounted, and a record whose device belongs to another boot.
            await Tool.RunAsync("umount", [stage.StagingTargetPath]);
            string record = Path.Combine(fixture.Node.StateFolder, volume + ".json");
            string old = await File.ReadAllTextAsync(record);
            await File.WriteAllTextAsync(record, old.Replace(StagedVolume.CurrentBootId, "an-earlier-boot", StringComparison.Ordinal));
            Assert.Equal(StatusCode.NotFound, await CodeOf(() => Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumeId = volume, VolumePath = stage.StagingTargetPath }).ResponseAsync));
            Assert.Equal(StatusCode.FailedPrecondition, await CodeOf(() => Node.NodePublishVolumeAsync(Publish(volume, context, ext4, "pod")).ResponseAsync));

            int attaches = fixture.Attacher.Targets.Count(t => t.Export == volume);
            await Node.NodeStageVolumeAsync(stage);
            Assert.Equal(attaches + 1, fixture.Attacher.Targets.Count(t => t.Export == volume));
            Assert.Equal("before the reboot\n", await File.ReadAllTextAsync(Path.Combine(stage.StagingTargetPath, "kept.txt")));
            Assert.Contains(StagedVolume.CurrentBootId, await File.ReadAllTextAsync(record));
        }
        finally
        {
            await UnstageAsync(volume);
        }
    }

    [Fact]
    public async Task A_volume_expanded_by_the_controller_shows_its_new_size_on_the_node_after_a_new_stage()
    {
        const string volume = "pvc-node-expand-e2e";
        VolumeCapability ext4 = CsiControllerTests.Mount("ext4");
        IDictionary<string, string> context = await VolumeAsync(volume, ext4, size: 32 * MiB);
        NodeStageVolumeRequest stage = Stage(volume, context, ext4);
        await Node.NodeStageVolumeAsync(stage);
        try
        {
            await File.WriteAllTextAsync(Path.Combine(stage.StagingTargetPath, "before.txt"), "before the expansion\n");
            long totalBefore = (await Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumeId = volume, VolumePath = stage.StagingTargetPath })).Usage
                .Single(u => u.Unit == VolumeUsage.Types.Unit.Bytes).Total;

            ControllerExpandVolumeResponse grown = await fixture.Controller.Controller.ControllerExpandVolumeAsync(new ControllerExpandVolumeRequest
            {
                VolumeId = volume,
                CapacityRange = new CapacityRange { RequiredBytes = 64 * MiB },
                VolumeCapability = ext4,
            });
            Assert.Equal(64 * MiB, grown.CapacityBytes);
            Assert.True(grown.NodeExpansionRequired);
            var expand = new NodeExpandVolumeRequest { VolumeId = volume, VolumePath = stage.StagingTargetPath, StagingTargetPath = stage.StagingTargetPath, VolumeCapability = ext4, CapacityRange = new CapacityRange { RequiredBytes = 64 * MiB } };
            // Attached before the grow, the device still has the old size: the node says so.
            Assert.Equal(StatusCode.FailedPrecondition, await CodeOf(() => Node.NodeExpandVolumeAsync(expand).ResponseAsync));

            await UnstageAsync(volume);
            await Node.NodeStageVolumeAsync(stage);
            // Staged again, the device has the new size and the data is there. (Growing the mounted
            // ext4 online needs CAP_SYS_RESOURCE, which the privileged node plugin has and this
            // test machine's root does not: resize2fs is refused here, so that step is not run.)
            string device = (await Tool.RunAsync("findmnt", ["-n", "-o", "SOURCE", stage.StagingTargetPath])).Stdout.Trim();
            Assert.Equal((64 * MiB).ToString(System.Globalization.CultureInfo.InvariantCulture), (await Tool.RunAsync("blockdev", ["--getsize64", device])).Stdout.Trim());
            Assert.True(totalBefore > 0);
            Assert.Equal("before the expansion\n", await File.ReadAllTextAsync(Path.Combine(stage.StagingTargetPath, "before.txt")));
        }
        finally
        {
            await UnstageAsync(volume);
        }
    }

    [Fact]
    public async Task NodeExpandVolume_grows_the_file_system_to_the_device_and_says_when_the_device_is_smaller()
    {
        const string volume = "pvc-node-expand";
        VolumeCapability ext4 = CsiControllerTests.Mount("ext4");
        IDictionary<string, string> context = await VolumeAsync(volume, ext4, size: 32 * MiB);
        NodeStageVolumeRequest stage = Stage(volume, context, ext4);
        await Node.NodeStageVolumeAsync(stage);
        try
        {
            var request = new NodeExpandVolumeRequest { VolumeId = volume, VolumePath = stage.StagingTargetPath, StagingTargetPath = stage.StagingTargetPath, VolumeCapability = ext4, CapacityRange = new CapacityRange { RequiredBytes = 32 * MiB } };
            Assert.Equal(32 * MiB, (await Node.NodeExpandVolumeAsync(request)).CapacityBytes);
            // The device keeps its size while attached: a bigger size is refused with what to do.
            RpcException e = await Assert.ThrowsAsync<RpcException>(() => Node.NodeExpandVolumeAsync(new NodeExpandVolumeRequest(request) { CapacityRange = new CapacityRange { RequiredBytes = 64 * MiB } }).ResponseAsync);
            Assert.Equal(StatusCode.FailedPrecondition, e.StatusCode);
            Assert.Contains("unstage and stage the volume again to see the new size", e.Status.Detail);
            Assert.Equal(StatusCode.OutOfRange, await CodeOf(() => Node.NodeExpandVolumeAsync(new NodeExpandVolumeRequest(request) { CapacityRange = new CapacityRange { RequiredBytes = 2 * MiB, LimitBytes = MiB } }).ResponseAsync));
            Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeExpandVolumeAsync(new NodeExpandVolumeRequest(request) { VolumeCapability = CsiControllerTests.Mount("btrfs") }).ResponseAsync));
        }
        finally
        {
            await UnstageAsync(volume);
        }
    }

    [Fact]
    public async Task Bad_node_requests_get_the_spec_codes()
    {
        VolumeCapability ext4 = CsiControllerTests.Mount("ext4");
        IDictionary<string, string> context = await VolumeAsync("pvc-node-bad", ext4, size: 16 * MiB);
        NodeStageVolumeRequest stage = Stage("pvc-node-bad", context, ext4);
        foreach (NodeStageVolumeRequest bad in new[]
        {
            new NodeStageVolumeRequest(stage) { VolumeId = "" },
            new NodeStageVolumeRequest(stage) { StagingTargetPath = "" },
            new NodeStageVolumeRequest(stage) { VolumeCapability = null },
            new NodeStageVolumeRequest(stage) { VolumeCapability = CsiControllerTests.Mount("btrfs") },
            new NodeStageVolumeRequest(stage) { VolumeCapability = CsiControllerTests.Mount("ext4", Mode.MultiNodeMultiWriter) },
            Stage("pvc-node-bad", new Dictionary<string, string>(context.Where(kv => kv.Key != PublishContext.Export)), ext4),
            Stage("pvc-node-bad", new Dictionary<string, string>(context) { [PublishContext.NbdPort] = "none" }, ext4),
        })
        {
            Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeStageVolumeAsync(bad).ResponseAsync));
        }
        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Node.NodeStageVolumeAsync(Stage("pvc-node-bad", new Dictionary<string, string>(context) { [PublishContext.Export] = "no-such-export" }, ext4)).ResponseAsync));
        Assert.DoesNotContain(fixture.Attacher.Targets, t => t.Export == "no-such-export");

        NodePublishVolumeRequest publish = Publish("pvc-node-bad", context, ext4, "pod");
        Assert.Equal(StatusCode.FailedPrecondition, await CodeOf(() => Node.NodePublishVolumeAsync(publish).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodePublishVolumeAsync(new NodePublishVolumeRequest(publish) { TargetPath = "" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodePublishVolumeAsync(new NodePublishVolumeRequest(publish) { StagingTargetPath = "" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodePublishVolumeAsync(new NodePublishVolumeRequest(publish) { VolumeCapability = null }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodePublishVolumeAsync(new NodePublishVolumeRequest(publish) { VolumeId = "" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeUnpublishVolumeAsync(new NodeUnpublishVolumeRequest { TargetPath = publish.TargetPath }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeUnpublishVolumeAsync(new NodeUnpublishVolumeRequest { VolumeId = "pvc-node-bad" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeUnstageVolumeAsync(new NodeUnstageVolumeRequest { VolumeId = "pvc-node-bad" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeUnstageVolumeAsync(new NodeUnstageVolumeRequest { StagingTargetPath = stage.StagingTargetPath }).ResponseAsync));
        // Undoing what was never done is OK.
        await Node.NodeUnpublishVolumeAsync(new NodeUnpublishVolumeRequest { VolumeId = "pvc-node-bad", TargetPath = publish.TargetPath });
        await UnstageAsync("pvc-node-bad");

        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumeId = "pvc-node-bad" }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumePath = fixture.Work }).ResponseAsync));
        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumeId = "pvc-node-bad", VolumePath = Path.Combine(fixture.Work, "no-such-path") }).ResponseAsync));
        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Node.NodeGetVolumeStatsAsync(new NodeGetVolumeStatsRequest { VolumeId = "never-staged", VolumePath = fixture.Work }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeExpandVolumeAsync(new NodeExpandVolumeRequest { VolumePath = fixture.Work }).ResponseAsync));
        Assert.Equal(StatusCode.InvalidArgument, await CodeOf(() => Node.NodeExpandVolumeAsync(new NodeExpandVolumeRequest { VolumeId = "never-staged" }).ResponseAsync));
        Assert.Equal(StatusCode.NotFound, await CodeOf(() => Node.NodeExpandVolumeAsync(new NodeExpandVolumeRequest { VolumeId = "never-staged", VolumePath = fixture.Work }).ResponseAsync));
    }

    [Fact]
    public async Task NbdClientAttacher_runs_nbd_client_newstyle_with_multi_conn_and_tls_and_needs_the_nbd_module()
    {
        var target = new NbdTarget("gw.example", 10809, "pvc-1", ReadOnly: false, Connections: 4);
        Assert.Equal(["gw.example", "10809", "/dev/nbd3", "-N", "pvc-1", "-C", "4", "-timeout", "120", "-persist"], NbdClientAttacher.Arguments(target, "/dev/nbd3"));
        var secure = target with { ReadOnly = true, Connections = 1, Tls = new NbdTls("/tls/ca.crt", "/tls/tls.crt", "/tls/tls.key", "gateway") };
        Assert.Equal(
            ["gw.example", "10809", "/dev/nbd0", "-N", "pvc-1", "-C", "1", "-timeout", "120", "-persist", "-readonly",
             "-enable-tls", "-cacertfile", "/tls/ca.crt", "-certfile", "/tls/tls.crt", "-keyfile", "/tls/tls.key", "-tlshostname", "gateway"],
            NbdClientAttacher.Arguments(secure, "/dev/nbd0"));

        // A node without the module (an empty root: no /sys/module/nbd, no /dev/nbd0).
        string root = Directory.CreateTempSubdirectory("csi-noroot-").FullName;
        try
        {
            RpcException e = await Assert.ThrowsAsync<RpcException>(() => new NbdClientAttacher("node-7", root).AttachAsync(target, CancellationToken.None));
            Assert.Equal(StatusCode.FailedPrecondition, e.StatusCode);
            Assert.Contains("the kernel's nbd module is not loaded on node node-7: modprobe nbd", e.Status.Detail);
            Assert.Equal(0, NbdClientAttacher.DeviceCount(root));
        }
        finally
        {
            Directory.Delete(root);
        }

        // The real nbd-client takes those arguments: it negotiates the export with the gateway
        // and stops only where the kernel is needed.
        if (!Directory.Exists("/sys/module/nbd"))
        {
            var local = new NbdTarget("127.0.0.1", fixture.Gateway.NbdPort, "disk0", ReadOnly: true, Connections: 4);
            ToolResult run = await Tool.RunAsync("nbd-client", NbdClientAttacher.Arguments(local, "/dev/nbd0"), check: false);
            Assert.NotEqual(0, run.ExitCode);
            Assert.DoesNotContain("Usage", run.Stdout + run.Stderr, StringComparison.Ordinal);
            Assert.Contains("Negotiation", run.Stdout + run.Stderr, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task The_gateway_binary_serves_the_node_plugin_on_its_socket()
    {
        string folder = Path.Combine(fixture.Work, "binary");
        string socket = Path.Combine(folder, "csi.sock");
        var start = new ProcessStartInfo(GatewayProcess.DotnetHost) { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string arg in new[]
                 {
                     GatewayProcess.GatewayDll, "csi", "--mode", "node", "--endpoint", "unix://" + socket,
                     "--admin", fixture.Gateway.AdminUri.ToString(), "--nbd", "127.0.0.1:" + fixture.Gateway.NbdPort.ToString(CultureInfo.InvariantCulture), "--node-id", "node-binary",
                 })
        {
            start.ArgumentList.Add(arg);
        }
        using Process plugin = Process.Start(start)!;
        Task<string> stderr = plugin.StandardError.ReadToEndAsync();
        try
        {
            for (int i = 0; i < 300 && !File.Exists(socket) && !plugin.HasExited; i++)
            {
                await Task.Delay(100);
            }
            Assert.True(File.Exists(socket), $"the plugin made no socket (exited: {plugin.HasExited})");
            using GrpcChannel channel = CsiPlugin.ChannelTo(socket);
            NodeGetInfoResponse info = await new NodeClient(channel).NodeGetInfoAsync(new NodeGetInfoRequest(), deadline: DateTime.UtcNow.AddSeconds(30));
            Assert.Equal("node-binary", info.NodeId);
            Assert.True((await new Identity.IdentityClient(channel).ProbeAsync(new ProbeRequest())).Ready);
        }
        finally
        {
            if (!plugin.HasExited)
            {
                plugin.Kill(entireProcessTree: true);
                await plugin.WaitForExitAsync();
            }
        }
        _ = await stderr;

        ToolResult half = await Tool.RunAsync(GatewayProcess.DotnetHost,
            [GatewayProcess.GatewayDll, "csi", "--mode", "node", "--endpoint", "unix://" + socket, "--nbd-tls-ca", "/tls/ca.crt", "--nbd-tls-cert", "/tls/tls.crt"], check: false);
        Assert.Equal(2, half.ExitCode);
        Assert.Contains("--nbd-tls-cert and --nbd-tls-key go together", half.Stderr);
    }
}
