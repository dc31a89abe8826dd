namespace Gateway.Host;

/// <summary>
/// How many times an idle thread-pool worker spins (<c>sched_yield</c>) before it sleeps. The
/// runtime's default is 70, after every wake-up, and Akka's scheduler wakes a worker on each tick
/// (every 10 ms in a cluster, 50 ms standalone) whether or not a timer is due: an idle cluster node
/// made 15,000 <c>sched_yield</c> a second. The gateway ships 0 in <c>gateway.runtimeconfig.json</c>
/// (<c>Gateway.Host.csproj</c>): an idle cluster node then uses about half the CPU, a standalone
/// gateway a sixth, and the data path does not wait on the pool (socket completions run inline,
/// <see cref="SocketCompletions"/>). <c>DOTNET_ThreadPool_UnfairSemaphoreSpinLimit</c> overrides it.
/// </summary>
public static class PoolSpin
{
    public const string Setting = "System.Threading.ThreadPool.UnfairSemaphoreSpinLimit";
    public const string Variable = "DOTNET_ThreadPool_UnfairSemaphoreSpinLimit";

    /// <summary>The limit the runtime uses, and where it comes from.</summary>
    public static string Describe()
    {
        if (Environment.GetEnvironmentVariable(Variable) is { Length: > 0 } given)
        {
            return $"{given} ({Variable})";
        }
        return AppContext.GetData(Setting) is { } configured ? $"{configured} (gateway.runtimeconfig.json)" : "the runtime's default (70)";
    }
}
