using Npgsql;

namespace Gateway.Host;

/// <summary>
/// A table the gateway keeps in the cluster's PostgreSQL, created on first use (once per process;
/// a failed create is tried again on the next use; a create that lost a race with another node's
/// counts as done).
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
                try
                {
                    await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
                }
                catch (PostgresException e) when (e.SqlState is PostgresErrorCodes.UniqueViolation or PostgresErrorCodes.DuplicateTable or PostgresErrorCodes.DuplicateObject)
                {
                    // Two nodes' first uses at once: IF NOT EXISTS does not serialise the create, and
                    // the loser trips over the winner's catalog row (23505) or its row type (42710). The table is there either way.
                }
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
