using Gateway.Actors.Cluster;
using Npgsql;

namespace Gateway.Host;

/// <summary>
/// The members' announcements (<see cref="IClusterMembers"/>) in the cluster's PostgreSQL: one row
/// per member address with the server's time of its last announcement, so no node's clock takes
/// part in deciding whether a cluster runs.
/// </summary>
public sealed class PostgresClusterMembers(string connectionString) : PostgresStore(connectionString, Create), IClusterMembers
{
    private const string Create = """
            CREATE TABLE IF NOT EXISTS gateway_cluster_members (
                address text PRIMARY KEY,
                announced_at timestamptz NOT NULL)
            """;

    public async Task AnnounceAsync(string address, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = source.CreateCommand("""
            INSERT INTO gateway_cluster_members (address, announced_at) VALUES ($1, now())
            ON CONFLICT (address) DO UPDATE SET announced_at = excluded.announced_at
            """);
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = address });
        await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
    }

    public async Task<IReadOnlyList<string>> AnnouncedWithinAsync(TimeSpan within, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = source.CreateCommand("""
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
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = source.CreateCommand("DELETE FROM gateway_cluster_members WHERE address = $1");
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = address });
        await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
    }

}
