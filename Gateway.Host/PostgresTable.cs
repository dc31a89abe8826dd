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

/// <summary>
/// What the gateway's stores in the cluster's PostgreSQL share: a data source of their own and
/// their table (<see cref="PostgresTable"/>), made before the first statement.
/// </summary>
public abstract class PostgresStore : IAsyncDisposable
{
    private readonly NpgsqlDataSource _source;
    private readonly PostgresTable _table;

    /// <param name="create">The statements that make the store's table and indexes, each IF NOT EXISTS.</param>
    protected PostgresStore(string connectionString, string create)
    {
        _source = NpgsqlDataSource.Create(connectionString);
        _table = new PostgresTable(_source, create);
    }

    /// <summary>The data source, once the table exists.</summary>
    protected async ValueTask<NpgsqlDataSource> SourceAsync(CancellationToken cancellationToken)
    {
        await _table.EnsureAsync(cancellationToken).ConfigureAwait(false);
        return _source;
    }

    public async ValueTask DisposeAsync()
    {
        await _source.DisposeAsync().ConfigureAwait(false);
        _table.Dispose();
        GC.SuppressFinalize(this);
    }
}
