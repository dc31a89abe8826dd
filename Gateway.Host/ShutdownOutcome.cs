namespace Gateway.Host;

/// <summary>
/// How the graceful stop ended: <c>serve</c> exits 1 rather than 0 when it could not finish it
/// (an export's final flush failed, connections did not drain in time), so a supervisor or an
/// operator sees that writes may be lost.
/// </summary>
public sealed class ShutdownOutcome
{
    private int _failed;

    public int ExitCode => Volatile.Read(ref _failed) == 0 ? 0 : 1;

    public void Fail() => Volatile.Write(ref _failed, 1);
}
