using System.Net.Http.Json;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// A gateway in TLS-required mode with certificates made by openssl, driven by real TLS clients
/// (libnbd's nbdinfo and nbdcopy, qemu-img, qemu-io, the nbd Python module).
/// </summary>
public sealed class TlsInteropTests : IAsyncLifetime
{
    private OpensslPki _pki = null!;
    private GatewayProcess _gateway = null!;
    private string _client = null!;

    public async Task InitializeAsync()
    {
        _pki = await OpensslPki.CreateAsync();
        string server = await _pki.IssueAsync("server", "127.0.0.1", server: true);
        _client = await _pki.IssueAsync("backup", "backup", server: false);
        _gateway = await GatewayProcess.StartAsync(extraArgs: ["--tls", "required", "--tls-certificates", server]);
    }

    public async Task DisposeAsync()
    {
        await _gateway.StopAsync();
        await _gateway.DisposeAsync();
        _pki.Delete();
    }

    private string Nbds(string export, string certificates) => $"nbds://127.0.0.1:{_gateway.NbdPort}/{export}?tls-certificates={certificates}";

    private string[] QemuTls(string export, string certificates) =>
        ["--object", $"tls-creds-x509,id=tls0,dir={certificates},endpoint=client", "--image-opts",
         $"driver=nbd,host=127.0.0.1,port={_gateway.NbdPort},export={export},tls-creds=tls0"];

    [Fact]
    public async Task Tls_clients_read_and_write_and_nbdcopy_checksums_match()
    {
        ToolResult info = await _gateway.RunAsync("nbdinfo", [Nbds("disk0", _client)]);
        Assert.Contains("with TLS", info.Stdout);
        ToolResult qemuInfo = await _gateway.RunAsync("qemu-img", ["info", .. QemuTls("disk0", _client)]);
        Assert.Contains("virtual size: 1 GiB", qemuInfo.Stdout);
        await _gateway.RunAsync("qemu-io", [.. QemuTls("disk0", _client)[..2], "--image-opts", "-c", "write -P 0x5a 1M 4M", QemuTls("disk0", _client)[^1]]);
        ToolResult read = await _gateway.RunAsync("qemu-io", [.. QemuTls("disk0", _client)[..2], "--image-opts", "-c", "read -P 0x5a 1M 4M", QemuTls("disk0", _client)[^1]]);
        Assert.DoesNotContain("Pattern verification failed", read.Stdout);

        string image = Path.Combine(_pki.Root, "source.img");
        await using (FileStream file = File.Create(image))
        {
            byte[] block = new byte[1 << 20];
            for (int i = 0; i < 16; i++)
            {
                Random.Shared.NextBytes(block);
                await file.WriteAsync(block);
            }
        }
        await _gateway.CliAsync("export", "add", "tlscopy", "--size", "16M");
        await _gateway.RunAsync("nbdcopy", [image, Nbds("tlscopy", _client)]);
        string back = Path.Combine(_pki.Root, "back.img");
        await _gateway.RunAsync("nbdcopy", [Nbds("tlscopy", _client), back]);
        Assert.Equal(Tool.Sha256(image), Tool.Sha256(back));
    }

    [Fact]
    public async Task Refusals_are_clean_and_leave_other_clients_working()
    {
        await _pki.CaAsync("other");
        string wrongCa = await _pki.IssueAsync("wrongca", "backup", server: false, trust: "other");
        string expired = await _pki.IssueAsync("expired", "backup", server: false, expired: true);
        string intruder = await _pki.IssueAsync("intruder", "intruder", server: false);
        using (HttpResponseMessage created = await _gateway.Http.PostAsJsonAsync("v1/exports",
            new { name = "vault", size = "16M", access = new { tlsRequired = true, allowedClients = new[] { "backup" } } }))
        {
            Assert.True(created.IsSuccessStatusCode, await created.Content.ReadAsStringAsync());
        }

        ToolResult plaintext = await _gateway.RunAsync("nbdinfo", [$"nbd://127.0.0.1:{_gateway.NbdPort}/disk0"], check: false);
        Assert.NotEqual(0, plaintext.ExitCode);
        ToolResult distrust = await _gateway.RunAsync("nbdinfo", [Nbds("disk0", wrongCa)], check: false);
        Assert.NotEqual(0, distrust.ExitCode);
        ToolResult old = await _gateway.RunAsync("nbdinfo", [Nbds("disk0", expired)], check: false);
        Assert.NotEqual(0, old.ExitCode);
        ToolResult denied = await _gateway.RunAsync("nbdinfo", [Nbds("vault", intruder)], check: false);
        Assert.NotEqual(0, denied.ExitCode);
        ToolResult list = await _gateway.RunAsync("nbdinfo", ["--list", Nbds("", intruder)]);
        Assert.DoesNotContain("vault", list.Stdout);

        await _gateway.RunAsync("nbdinfo", [Nbds("vault", _client)]);
        await _gateway.RunAsync("nbdinfo", [Nbds("disk0", intruder)]);
        Assert.Contains("NotTimeValid", _gateway.Output);
        Assert.Contains("refused export vault", _gateway.Output);
        Assert.Contains("CN=intruder", _gateway.Output);
    }

    [Fact]
    public async Task A_rotated_certificate_serves_new_clients_while_a_connected_client_keeps_working()
    {
        // A client connected through the whole rotation: it reads, waits for the go-ahead, writes and reads again.
        string flag = Path.Combine(_pki.Root, "rotated");
        string script = Path.Combine(_pki.Root, "stay.py");
        await File.WriteAllTextAsync(script, $$"""
            import nbd, os, sys, time
            h = nbd.NBD()
            h.set_uri_allow_local_file(True)
            h.connect_uri(sys.argv[1])
            h.pread(4096, 0)
            print("connected", flush=True)
            for _ in range(600):
                if os.path.exists(sys.argv[2]):
                    break
                time.sleep(0.05)
            h.pwrite(b"\x42" * 4096, 8192)
            assert h.pread(4096, 8192) == b"\x42" * 4096
            h.shutdown()
            print("ok")
            """);
        Task<ToolResult> stay = _gateway.RunAsync("/usr/bin/python3", [script, Nbds("disk0", _client), flag], timeout: TimeSpan.FromSeconds(90));
        Assert.True(await NbdTestWait.UntilAsync(() => stay.IsCompleted || _gateway.Output.Contains("client certificate 'CN=backup'")), _gateway.Describe());
        Assert.False(stay.IsCompleted, (await stay).Describe());

        // Rotate to a certificate from another CA: only a client trusting that CA accepts the new one.
        await _pki.CaAsync("next");
        string next = await _pki.IssueAsync("server-next", "127.0.0.1", server: true, ca: "next", trust: "ca");
        string serverDir = Path.Combine(_pki.Root, "server");
        File.Copy(Path.Combine(next, "server-key.pem"), Path.Combine(serverDir, "server-key.pem.new"));
        File.Copy(Path.Combine(next, "server-cert.pem"), Path.Combine(serverDir, "server-cert.pem.new"));
        File.Move(Path.Combine(serverDir, "server-key.pem.new"), Path.Combine(serverDir, "server-key.pem"), overwrite: true);
        File.Move(Path.Combine(serverDir, "server-cert.pem.new"), Path.Combine(serverDir, "server-cert.pem"), overwrite: true);
        string trustsNext = await _pki.IssueAsync("backup-next", "backup", server: false, trust: "next");

        await _gateway.RunAsync("nbdinfo", [Nbds("disk0", trustsNext)]);
        ToolResult oldTrust = await _gateway.RunAsync("nbdinfo", [Nbds("disk0", _client)], check: false);
        Assert.NotEqual(0, oldTrust.ExitCode);
        Assert.Contains("TLS certificate reloaded", _gateway.Output);

        await File.WriteAllTextAsync(flag, "");
        ToolResult stayed = await stay;
        Assert.Contains("ok", stayed.Stdout);
    }
}

/// <summary>Unix domain socket listener beside TCP, with real clients.</summary>
public sealed class UnixSocketInteropTests
{
    [Fact]
    public async Task Nbdinfo_and_qemu_io_work_over_the_Unix_socket_with_its_mode_and_a_stale_file_replaced()
    {
        string dir = Directory.CreateTempSubdirectory("gateway-unix-").FullName;
        string socket = Path.Combine(dir, "nbd.sock");
        await File.WriteAllTextAsync(Path.Combine(dir, "placeholder"), "");
        // A stale socket file, as a killed gateway leaves: bound, never unlinked, nothing listening.
        await Tool.RunAsync("/usr/bin/python3", ["-c", "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])", socket]);
        Assert.True(File.Exists(socket));
        await using GatewayProcess gateway = await GatewayProcess.StartAsync(extraArgs: ["--nbd", $"unix:{socket}", "--nbd-socket-mode", "0600"]);
        try
        {
            if (!OperatingSystem.IsWindows())
            {
                Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(socket));
            }
            ToolResult info = await gateway.RunAsync("nbdinfo", [$"nbd+unix:///disk0?socket={socket}"]);
            Assert.Contains("export-size: 1073741824", info.Stdout);
            await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x33 0 1M", $"nbd+unix:///disk0?socket={socket}"]);
            ToolResult read = await gateway.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x33 0 1M", $"nbd+unix:///disk0?socket={socket}"]);
            Assert.DoesNotContain("Pattern verification failed", read.Stdout);
            await gateway.RunAsync("nbdinfo", [gateway.NbdUri("disk0")]); // TCP still served
            await gateway.StopAsync();
            Assert.False(File.Exists(socket), "the socket file is removed on shutdown");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}

internal static class NbdTestWait
{
    public static Task<bool> UntilAsync(Func<bool> condition) => Gateway.Tests.Protocol.NbdTestServer.EventuallyAsync(condition, TimeSpan.FromSeconds(30));
}
