using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Gateway.Actors.Exports;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Qcow2;

/// <summary>
/// An overlay's <c>baseFormat</c> (raw | qcow2): left out, the base image's format is read from
/// its header; given, the header must agree, or the export is refused at creation with the
/// reason. Raw forced on a qcow2 file would serve its header and tables as the disk; qcow2 forced
/// on a raw file has no tables. Neither may ever be served.
/// </summary>
public sealed class BaseFormatTests
{
    private const long MiB = 1 << 20;

    private static ExportSpec Spec(string type, string? baseImage, string? baseFormat, string? baseExport = null) =>
        new("vm", MiB, new BackendSpec(type, Base: baseExport, BaseImage: baseImage, BaseFormat: baseFormat), ReadOnly: false, Description: null);

    [Theory]
    [InlineData("overlay", "/images/a.qcow2", "qcow2", null)]
    [InlineData("overlay", "/images/a.raw", "raw", null)]
    [InlineData("overlay", "/images/a.qcow2", null, null)]
    [InlineData("overlay", "/images/a.qcow2", "vmdk", "baseFormat 'vmdk' is not supported")]
    [InlineData("overlay", "/images/a.qcow2", "QCOW2", "baseFormat 'QCOW2' is not supported")]
    [InlineData("overlay", null, "qcow2", "baseFormat applies to a baseImage only")]
    [InlineData("file", null, "raw", "apply to backend type overlay only")]
    public void BaseFormat_is_raw_or_qcow2_and_goes_with_a_baseImage(string type, string? baseImage, string? baseFormat, string? problem)
    {
        string? actual = ExportRules.Validate(Spec(type, baseImage, baseFormat));
        if (problem is null)
        {
            Assert.Null(actual);
        }
        else
        {
            Assert.NotNull(actual);
            Assert.Contains(problem, actual);
        }
        Assert.Contains("baseFormat applies to a baseImage only", ExportRules.Validate(Spec("overlay", null, "raw", baseExport: "golden")));
    }

    [Fact]
    public void Specs_differing_only_in_baseFormat_are_not_equal()
    {
        Assert.NotEqual(Spec("overlay", "/a", "raw"), Spec("overlay", "/a", null));
        Assert.Equal(Spec("overlay", "/a", "qcow2"), Spec("overlay", "/a", "qcow2"));
    }

    [Fact]
    public async Task A_forced_format_the_header_disagrees_with_is_refused_at_creation_and_one_it_agrees_with_is_served()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        string qcow2 = Path.Combine(gateway.DataDirectory, "golden.qcow2");
        string raw = Path.Combine(gateway.DataDirectory, "golden.raw");
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-o", "cluster_size=4k", qcow2, "8M"]);
        await gateway.RunAsync("qemu-io", ["-c", "write -P 0x42 1M 64k", "-c", "write -z 2M 4k", qcow2]);
        await gateway.RunAsync("qemu-img", ["create", "-f", "raw", raw, "8M"]);
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x24 0 8M", raw]);

        // Raw forced on a qcow2 file: its header would be the guest's first bytes.
        string body = await RefusedAsync(gateway, new { name = "q-as-raw", size = 8 * MiB, backend = new { type = "overlay", baseImage = qcow2, baseFormat = "raw" } });
        Assert.Contains("is a qcow2 image", body);
        Assert.Contains("baseFormat is raw", body);
        Assert.Contains(qcow2, body);

        // qcow2 forced on a raw file: it has no tables to read.
        body = await RefusedAsync(gateway, new { name = "r-as-q", size = 8 * MiB, backend = new { type = "overlay", baseImage = raw, baseFormat = "qcow2" } });
        Assert.Contains("is not a qcow2 image", body);
        Assert.Contains(raw, body);

        body = await RefusedAsync(gateway, new { name = "vmdk", size = 8 * MiB, backend = new { type = "overlay", baseImage = qcow2, baseFormat = "vmdk" } });
        Assert.Contains("baseFormat 'vmdk' is not supported", body);
        body = await RefusedAsync(gateway, new { name = "alone", size = 8 * MiB, backend = new { type = "overlay", baseFormat = "qcow2" } });
        Assert.Contains("baseFormat applies to a baseImage only", body);

        using (HttpResponseMessage list = await gateway.Http.GetAsync("v1/exports"))
        {
            string names = await list.Content.ReadAsStringAsync();
            Assert.DoesNotContain("q-as-raw", names);
            Assert.DoesNotContain("r-as-q", names);
        }

        // Agreeing formats are served, and the spec keeps the forced format.
        await CreatedAsync(gateway, new { name = "q", size = 8 * MiB, backend = new { type = "overlay", baseImage = qcow2, baseFormat = "qcow2" } });
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x42 1M 64k", "-c", "read -P 0 2M 4k", "-c", "read -P 0 0 1M", gateway.NbdUri("q")]);
        Assert.Equal("qcow2", await BaseFormatOfAsync(gateway, "q"));

        // Through the CLI: --base-format raw on the raw file is served; qcow2 on it is refused with the reason.
        ToolResult add = await gateway.CliAsync("export", "add", "r", "--size", "8M", "--base-image", raw, "--base-format", "raw");
        Assert.True(add.Succeeded, add.Describe());
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x24 0 8M", gateway.NbdUri("r")]);
        Assert.Equal("raw", await BaseFormatOfAsync(gateway, "r"));
        ToolResult wrong = await gateway.CliAsync("export", "add", "r2", "--size", "8M", "--base-image", raw, "--base-format", "qcow2");
        Assert.True(wrong.ExitCode != 0, wrong.Describe());
        Assert.Contains("is not a qcow2 image", wrong.Stderr);
        ToolResult unknown = await gateway.CliAsync("export", "add", "r3", "--size", "8M", "--base-image", raw, "--base-format", "vmdk");
        Assert.True(unknown.ExitCode != 0, unknown.Describe());

        // An overlay made on an overlay export shares its base image, and its forced format with it.
        await CreatedAsync(gateway, new { name = "q-clone", size = 8 * MiB, backend = new { type = "overlay", @base = "q" } });
        Assert.Equal("qcow2", await BaseFormatOfAsync(gateway, "q-clone"));
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x42 1M 64k", gateway.NbdUri("q-clone")]);

        // The forced format holds across a restart and is checked again at every open: the raw
        // base replaced by a qcow2 image meanwhile is refused, not served as its header and tables.
        await gateway.StopAsync();
        await gateway.RunAsync("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, raw + ".qcow2"]);
        File.Move(raw + ".qcow2", raw, overwrite: true);
        await gateway.RestartAsync();
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x42 1M 64k", gateway.NbdUri("q")]);
        Assert.Equal("qcow2", await BaseFormatOfAsync(gateway, "q"));
        ToolResult replaced = await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x24 0 64k", gateway.NbdUri("r")], check: false);
        Assert.True(!replaced.Succeeded, $"an export whose raw base became a qcow2 file was served\n{replaced.Describe()}");
        Assert.Contains("baseFormat is raw", gateway.Output);
    }

    [Fact]
    public async Task A_file_export_whose_guest_wrote_a_qcow2_header_is_served_raw_as_a_base_never_as_qcow2()
    {
        await using GatewayProcess gateway = await GatewayProcess.StartAsync();
        // What a guest can write to its own disk: a qcow2 header whose backing file is a file of the
        // gateway's host. Read as qcow2, the overlay would serve the host's file as the guest's disk.
        string disk = Path.Combine(gateway.DataDirectory, "guest.img");
        string secret = Path.Combine(gateway.DataDirectory, "host-secret.raw");
        await gateway.RunAsync("qemu-img", ["create", "-f", "raw", secret, "1M"]);
        await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 1M", secret]);
        await gateway.RunAsync("qemu-img", ["create", "-f", "qcow2", "-b", secret, "-F", "raw", disk, "1M"]);
        await gateway.RunAsync("qemu-img", ["resize", "-f", "raw", disk, "1M"]);
        byte[] written = await File.ReadAllBytesAsync(disk);

        await CreatedAsync(gateway, new { name = "guest", size = MiB, readOnly = true, backend = new { type = "file", path = disk } });
        await CreatedAsync(gateway, new { name = "on-guest", size = MiB, backend = new { type = "overlay", @base = "guest" } });
        Assert.Equal("raw", await BaseFormatOfAsync(gateway, "on-guest"));
        await CreatedAsync(gateway, new { name = "clone", size = MiB, backend = new { type = "overlay", @base = "on-guest" } });

        foreach (string name in new[] { "on-guest", "clone" })
        {
            string copy = Path.Combine(gateway.DataDirectory, name + ".copy");
            await gateway.RunAsync("nbdcopy", [gateway.NbdUri(name), copy]);
            byte[] read = await File.ReadAllBytesAsync(copy);
            Assert.True(written.AsSpan().SequenceEqual(read), $"{name}: the overlay on a file export does not serve the file's own bytes (first byte 0x{read[0]:x2}; 0x77 is the host file the header names)");
        }
    }

    private static async Task<string> RefusedAsync(GatewayProcess gateway, object request)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", request);
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.BadRequest, $"expected 400, got {(int)response.StatusCode}: {body}");
        using JsonDocument error = JsonDocument.Parse(body);
        return error.RootElement.GetProperty("error").GetString()!;
    }

    private static async Task CreatedAsync(GatewayProcess gateway, object request)
    {
        using HttpResponseMessage response = await gateway.Http.PostAsJsonAsync("v1/exports", request);
        Assert.True(response.StatusCode == HttpStatusCode.Created,
            $"creating an export answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}\n{gateway.Describe()}");
    }

    private static async Task<string?> BaseFormatOfAsync(GatewayProcess gateway, string name)
    {
        using JsonDocument export = JsonDocument.Parse(await gateway.Http.GetStringAsync($"v1/exports/{name}"));
        return export.RootElement.GetProperty("backend").TryGetProperty("baseFormat", out JsonElement format) ? format.GetString() : null;
    }
}
