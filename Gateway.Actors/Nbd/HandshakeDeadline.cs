namespace Gateway.Actors.Nbd;

/// <summary>
/// The client's deadline for the handshake (<see cref="NbdServerSettings.HandshakeTimeout"/>):
/// it bounds the time the client takes, not the server's. While the server opens an export for
/// the client (after a restart or a failover that can take seconds: the journal's recovery, the
/// owner's lease), the clock stops, so a client that did nothing wrong is not cut off for the
/// server's slowness (seen in ops/chaos-kill9: a restart that took 11 s closed the first
/// nbdinfo with "handshake not finished"). The open itself ends with the node's stopping token
/// or the directory's own timeouts. The clock is <see cref="NbdServerSettings.Time"/>, so tests
/// move it instead of waiting on it.
/// </summary>
public sealed class HandshakeDeadline : IDisposable
{
    private readonly CancellationTokenSource _deadline;
    private readonly CancellationTokenSource _source;
    private readonly TimeProvider _time;
    private readonly TimeSpan _limit;
    private readonly long _started;
    private TimeSpan _stopped;

    public HandshakeDeadline(TimeSpan limit, CancellationToken stopping, TimeProvider? time = null)
    {
        _time = time ?? TimeProvider.System;
        _started = _time.GetTimestamp();
        // The timer's source runs on the given clock; a linked source cannot take one.
        _deadline = new CancellationTokenSource(limit > TimeSpan.Zero ? limit : Timeout.InfiniteTimeSpan, _time);
        _source = CancellationTokenSource.CreateLinkedTokenSource(stopping, _deadline.Token);
        _limit = limit;
        Stopping = stopping;
    }

    /// <summary>Cancelled at the deadline or when the node stops.</summary>
    public CancellationToken Token => _source.Token;

    /// <summary>Cancelled only when the node stops: for what the server does while the clock is stopped.</summary>
    public CancellationToken Stopping { get; }

    /// <summary>Whether the deadline (not the node stopping) ended the handshake.</summary>
    public bool Expired => _deadline.IsCancellationRequested && !Stopping.IsCancellationRequested;

    /// <summary>Runs the server's own work with the clock stopped; the client's time left is the same after it.</summary>
    public async ValueTask<T> ExcludingAsync<T>(Func<CancellationToken, ValueTask<T>> work)
    {
        if (_limit <= TimeSpan.Zero || _source.IsCancellationRequested)
        {
            return await work(Token).ConfigureAwait(false);
        }
        long stoppedAt = _time.GetTimestamp();
        _deadline.CancelAfter(Timeout.InfiniteTimeSpan);
        try
        {
            return await work(Stopping).ConfigureAwait(false);
        }
        finally
        {
            _stopped += _time.GetElapsedTime(stoppedAt);
            Restart();
        }
    }

    /// <summary>Attached: the deadline no longer applies (an idle attached client is fine).</summary>
    public void End() => _deadline.CancelAfter(Timeout.InfiniteTimeSpan);

    public void Dispose()
    {
        _source.Dispose();
        _deadline.Dispose();
    }

    private void Restart()
    {
        TimeSpan left = _limit - (_time.GetElapsedTime(_started) - _stopped);
        _deadline.CancelAfter(left > TimeSpan.Zero ? left : TimeSpan.Zero);
    }
}
