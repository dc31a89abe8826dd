using System.Collections.Concurrent;

namespace Gateway.Csi;

/// <summary>
/// One operation at a time per volume for what must not interleave: taking and deleting snapshots
/// moves which bitmap tracks the volume, and two of them at once could both switch tracking off.
/// The CO may well send them together (two VolumeSnapshots of one claim). The controller runs as
/// one leader (the sidecars' leader election), so a lock in the process is enough.
/// </summary>
public sealed class VolumeLocks
{
    private readonly ConcurrentDictionary<string, SemaphoreSlim> _locks = new(StringComparer.Ordinal);

    public async Task<IDisposable> TakeAsync(string volume, CancellationToken ct)
    {
        SemaphoreSlim gate = _locks.GetOrAdd(volume, _ => new SemaphoreSlim(1, 1));
        await gate.WaitAsync(ct);
        return new Release(gate);
    }

    private sealed class Release(SemaphoreSlim gate) : IDisposable
    {
        private int _released;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) == 0)
            {
                gate.Release();
            }
        }
    }
}
