namespace Gateway.Backends.Overlay;

/// <summary>
/// An async reader/writer gate: writes enter shared, a layer switch closes it exclusively for the
/// moment it takes to flush the old top and swap the chain. Writes arriving while it is closed
/// wait and then run against the new top, so every write lands before the switch or after it.
/// A plain lock guards the counters: uncontended it costs tens of nanoseconds per write.
/// </summary>
internal sealed class WriteGate
{
    private readonly Lock _lock = new();
    private int _inside;
    private TaskCompletionSource? _reopened;
    private TaskCompletionSource? _drained;

    public ValueTask EnterAsync(CancellationToken cancellationToken)
    {
        Task wait;
        lock (_lock)
        {
            if (_reopened is null)
            {
                _inside++;
                return ValueTask.CompletedTask;
            }
            wait = _reopened.Task;
        }
        return EnterSlowAsync(wait, cancellationToken);
    }

    private async ValueTask EnterSlowAsync(Task wait, CancellationToken cancellationToken)
    {
        while (true)
        {
            await wait.WaitAsync(cancellationToken).ConfigureAwait(false);
            lock (_lock)
            {
                if (_reopened is null)
                {
                    _inside++;
                    return;
                }
                wait = _reopened.Task;
            }
        }
    }

    public void Exit()
    {
        TaskCompletionSource? drained = null;
        lock (_lock)
        {
            if (--_inside == 0 && _drained is not null)
            {
                drained = _drained;
                _drained = null;
            }
        }
        drained?.TrySetResult();
    }

    /// <summary>Stops new writers and returns once the ones inside have left. One closer at a time.</summary>
    public Task CloseAsync()
    {
        lock (_lock)
        {
            _reopened = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            if (_inside == 0)
            {
                return Task.CompletedTask;
            }
            _drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            return _drained.Task;
        }
    }

    public void Open()
    {
        TaskCompletionSource? reopened;
        lock (_lock)
        {
            reopened = _reopened;
            _reopened = null;
            _drained = null;
        }
        reopened?.TrySetResult();
    }
}
