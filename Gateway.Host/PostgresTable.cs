using Npgsql;

namespace Gateway.Host;

/// <summary>
/// A table the gateway keeps in the cluster's PostgreSQL, created on first use (once per process;
/// a failed create is tried again on the next use).
/// </summary>
public sealed class PostgresTable(NpgsqlDataSource source, string create) : IDisposable
{
    private readonly SemaphoreSlim _creating = new(1, 1);
    private volatile bool _exists;

    public async Task EnsureAsync(CancellationToken cancellationToken)
    {
        if (_exists)
        {
            return;
        }
        await _creating.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (!_exists)
            {
                await using NpgsqlCommand command = source.CreateCommand(create);
                await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
                _exists = true;
            }
        }
        finally
        {
            _creating.Release();
        }
    }

    public void Dispose() => _creating.Dispose();
}
