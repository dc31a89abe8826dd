namespace Gateway.Host;

/// <summary>
/// Where the runtime runs socket completions. By default .NET's epoll thread hands every
/// completion to the thread pool; a request batch then costs the hop and the pool workers'
/// spinning around it (half the gateway's CPU samples under 1 MiB writes were the workers'
/// <c>sched_yield</c>). The gateway's connection loops do only memory work in a completion: a
/// read from the page cache is <c>preadv2(RWF_NOWAIT)</c>, a file export's write of up to 1 MiB a
/// <c>pwrite</c> into the page cache (which waits only in dirty-page throttling), a forwarded
/// request a write to the peer stream; anything else that may wait is queued to the pool
/// (<c>Transmission.Start</c>), and a loop whose client keeps sending moves to the pool after
/// 5 ms (<c>Transmission.SocketThreadBudget</c>). So
/// <c>gateway serve</c> runs completions inline on the epoll threads (one per core then), unless
/// the operator set <c>DOTNET_SYSTEM_NET_SOCKETS_INLINE_COMPLETIONS</c> (0 turns it off).
/// The runtime reads the variable once, when the first socket operation starts, so this runs
/// before any.
/// </summary>
public static class SocketCompletions
{
    public const string Variable = "DOTNET_SYSTEM_NET_SOCKETS_INLINE_COMPLETIONS";

    /// <summary>True when completions run inline; <paramref name="source"/> says why.</summary>
    public static bool Configure(out string source)
    {
        if (Environment.GetEnvironmentVariable(Variable) is { Length: > 0 } given)
        {
            source = $"{Variable}={given}";
            return given == "1";
        }
        Environment.SetEnvironmentVariable(Variable, "1");
        source = "the gateway's default";
        return true;
    }
}
