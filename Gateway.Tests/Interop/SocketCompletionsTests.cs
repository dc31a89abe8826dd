using System.Runtime.InteropServices;
using Gateway.Host;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>
/// Socket completions inline on the runtime's epoll threads (README "gateway serve"): on by
/// default, off with the variable at 0. That a connection gives the thread back is
/// <c>SocketThreadBudgetTests</c>; what it does for a neighbour, <c>ops/bench-hol</c>.
/// </summary>
public sealed class SocketCompletionsTests
{
    private const long MiB = 1 << 20;
    private const string ThreadCount = "DOTNET_SYSTEM_NET_SOCKETS_THREAD_COUNT";

    private static Task<ToolResult> QemuIoAsync(GatewayProcess gateway, string export, params string[] commands) =>
        gateway.RunAsync("qemu-io", ["-f", "raw", gateway.NbdUri(export), .. commands.SelectMany(c => new[] { "-c", c })]);

    private static int EpollThreads(GatewayProcess gateway) =>
        Directory.GetDirectories($"/proc/{gateway.ProcessId}/task").Count(task => File.ReadAllText(Path.Combine(task, "comm")).Trim() == ".NET Sockets");

    [Fact]
    public async Task Socket_completions_run_inline_by_default_and_the_operator_can_turn_that_off()
    {
        // Inline, the runtime starts one epoll thread per core; handing completions to the pool, one
        // per 30 cores (8 on Arm). The variables are blanked, so the test's own environment does not count.
        int inlineEngines = Environment.ProcessorCount;
        double coresPerEngine = RuntimeInformation.ProcessArchitecture is Architecture.Arm64 ? 8 : 30;
        int poolEngines = Math.Max(1, (int)Math.Round(Environment.ProcessorCount / coresPerEngine));
        await using (GatewayProcess gateway = await GatewayProcess.StartAsync(environment: new Dictionary<string, string> { [SocketCompletions.Variable] = "", [ThreadCount] = "" }))
        {
            Assert.Contains("Socket completions run inline on the epoll threads (the gateway's default)", gateway.Output);
            await gateway.CreateExportAsync(new { name = "inline", size = 16 * MiB });
            await QemuIoAsync(gateway, "inline", "write -P 0x6b 0 4M", "flush", "read -P 0x6b 0 4M", "read -P 0 4M 12M");
            Assert.Equal(inlineEngines, EpollThreads(gateway));
        }
        await using (GatewayProcess gateway = await GatewayProcess.StartAsync(environment: new Dictionary<string, string> { [SocketCompletions.Variable] = "0", [ThreadCount] = "" }))
        {
            Assert.Contains($"Socket completions run on the thread pool ({SocketCompletions.Variable}=0)", gateway.Output);
            await gateway.CreateExportAsync(new { name = "pooled", size = 16 * MiB });
            await QemuIoAsync(gateway, "pooled", "write -P 0x6c 0 4M", "flush", "read -P 0x6c 0 4M");
            if (inlineEngines != poolEngines)
            {
                Assert.Equal(poolEngines, EpollThreads(gateway));
            }
        }
    }

    [Fact]
    public async Task Idle_pool_workers_do_not_spin_unless_the_operator_says_so()
    {
        // The limit ships in the gateway's runtimeconfig.json (PoolSpin); the runtime's variable wins over it.
        await using (GatewayProcess gateway = await GatewayProcess.StartAsync())
        {
            Assert.Contains("Idle thread-pool workers' spin limit: 0 (gateway.runtimeconfig.json)", gateway.Output);
        }
        await using (GatewayProcess gateway = await GatewayProcess.StartAsync(environment: new Dictionary<string, string> { [PoolSpin.Variable] = "70" }))
        {
            Assert.Contains($"Idle thread-pool workers' spin limit: 70 ({PoolSpin.Variable})", gateway.Output);
            await gateway.CreateExportAsync(new { name = "spinning", size = 16 * MiB });
            await QemuIoAsync(gateway, "spinning", "write -P 0x6d 0 4M", "flush", "read -P 0x6d 0 4M");
        }
    }
}
