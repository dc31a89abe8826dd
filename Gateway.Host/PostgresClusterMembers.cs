using Gateway.Actors.Cluster;
using Npgsql;

namespace Gateway.Host;

/// <summary>
/// The members' announcements (<see cref="IClusterMembers"/>) in the cluster's PostgreSQL: one row
/// per member address with the server's time of its last announcement, so no node's clock takes
/// part in deciding whether a cluster runs.
/// </summary>
public sealed class PostgresClusterMembers : IClusterMembers, IAsyncDisposable
{
    private readonly NpgsqlDataSource _source;
    private readonly PostgresTable _table;

    public PostgresClusterMembers(string connectionString)
    {
        _source = NpgsqlDataSource.Create(connectionString);
        _table = new PostgresTable(_source, """
            CREATE TABLE IF NOT EXISTS gateway_cluster_members (
                address text PRIMARY KEY,
                announced_at timestamptz NOT NULL)
            """);
    }

    public async Task AnnounceAsync(string address, CancellationToken cancellationToken)
    {
        await _table.EnsureAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = _source.CreateCommand("""
            INSERT INTO gateway_cluster_members (address, announced_at) VALUES ($1, now())
            ON CONFLICT (address) DO UPDATE SET announced_at = excluded.announced_at
            """);
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = address });
        await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
    }

    public async Task<IReadOnlyList<string>> AnnouncedWithinAsync(TimeSpan within, CancellationToken cancellationToken)
    {
        await _table.EnsureAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = _source.CreateCommand("""
            SELECT address FROM gateway_cluster_members WHERE announced_at > now() - $1 ORDER BY address
            """);
        command.Parameters.Add(new NpgsqlParameter<TimeSpan> { TypedValue = within });
        var addresses = new List<string>();
        await using NpgsqlDataReader reader = await command.ExecuteReaderAsync(cancellationToken).ConfigureAwait(false);
        while (await reader.ReadAsync(cancellationToken).ConfigureAwait(false))
        {
            addresses.Add(reader.GetString(0));
        }
        return addresses;
    }

    public async Task WithdrawAsync(string address, CancellationToken cancellationToken)
    {
        await _table.EnsureAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = _source.CreateCommand("DELETE FROM gateway_cluster_members WHERE address = $1");
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = address });
        await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask DisposeAsync()
    {
        await _source.DisposeAsync().ConfigureAwait(false);
        _table.Dispose();
    }
}
