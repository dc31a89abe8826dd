using System.Text.Json;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary><c>gateway image inspect</c> as a user runs it, on images made with qemu-img and qemu-io.</summary>
public sealed class ImageInspectTests : IDisposable
{
    private readonly QemuImages _images = new();

    public void Dispose() => _images.Dispose();

    private Task<ToolResult> InspectAsync(params string[] args) =>
        Tool.RunAsync(GatewayProcess.DotnetHost, [GatewayProcess.GatewayDll, "image", "inspect", .. args], timeout: TimeSpan.FromMinutes(1), check: false, workingDirectory: _images.Folder);

    [Fact]
    public async Task Inspect_shows_format_chain_features_and_allocation_per_depth_and_refuses_what_is_not_served()
    {
        const long MiB = 1 << 20;
        await _images.RawAsync("base.raw", 8 * MiB, 0x11);
        await _images.Qcow2Async("top.qcow2", 8 * MiB, "-b", "base.raw", "-F", "raw", "-o", "cluster_size=65536,compression_type=zstd");
        await _images.Io(_images.PathOf("top.qcow2"), "write -P 0x22 1M 256k", "write -z 4M 128k");

        ToolResult result = await InspectAsync(_images.PathOf("top.qcow2"), "--json");
        Assert.True(result.Succeeded, result.Describe());
        using JsonDocument report = JsonDocument.Parse(result.Stdout);
        JsonElement root = report.RootElement;
        Assert.Equal("qcow2", root.GetProperty("format").GetString());
        Assert.Equal(3, root.GetProperty("version").GetInt32());
        Assert.Equal(8 * MiB, root.GetProperty("virtualSize").GetInt64());
        Assert.Equal(65536, root.GetProperty("clusterSize").GetInt32());
        Assert.Equal("zstd", root.GetProperty("compression").GetString());
        JsonElement[] chain = [.. root.GetProperty("chain").EnumerateArray()];
        Assert.Equal(2, chain.Length);
        Assert.Equal(_images.PathOf("base.raw"), chain[1].GetProperty("path").GetString());
        Assert.Equal("raw", chain[1].GetProperty("format").GetString());
        JsonElement allocated = root.GetProperty("allocated");
        // 256 KiB of data in the top file, 128 KiB of zero clusters there, the rest from the raw base.
        Assert.Equal(256 * 1024, allocated.GetProperty("byDepth").GetProperty("1").GetInt64());
        Assert.Equal(8 * MiB - 256 * 1024 - 128 * 1024, allocated.GetProperty("byDepth").GetProperty("2").GetInt64());
        Assert.Equal(128 * 1024, allocated.GetProperty("zero").GetInt64());

        ToolResult text = await InspectAsync(_images.PathOf("top.qcow2"));
        Assert.True(text.Succeeded, text.Describe());
        Assert.Contains("format:       qcow2 (version 3)", text.Stdout);
        Assert.Contains("depth 1: 262144", text.Stdout);

        // Raw is served as it is; another format, or a qcow2 the reader refuses, is exit 1 with the reason.
        ToolResult raw = await InspectAsync(_images.PathOf("base.raw"));
        Assert.True(raw.Succeeded, raw.Describe());
        Assert.Contains("format:       raw", raw.Stdout);
        await _images.Img("create", "-f", "vmdk", "disk.vmdk", "1M");
        ToolResult vmdk = await InspectAsync(_images.PathOf("disk.vmdk"));
        Assert.Equal(1, vmdk.ExitCode);
        Assert.Contains("vmdk is not served", vmdk.Stdout);
        await _images.Qcow2Async("loop-a.qcow2", 1 * MiB, "-b", "loop-b.qcow2", "-F", "qcow2", "-u");
        await _images.Qcow2Async("loop-b.qcow2", 1 * MiB, "-b", "loop-a.qcow2", "-F", "qcow2", "-u");
        ToolResult loop = await InspectAsync(_images.PathOf("loop-a.qcow2"));
        Assert.Equal(1, loop.ExitCode);
        Assert.Contains("refused:", loop.Stdout);
        ToolResult missing = await InspectAsync(_images.PathOf("absent.qcow2"));
        Assert.Equal(1, missing.ExitCode);
        Assert.Contains("no such file", missing.Stderr);
    }
}
