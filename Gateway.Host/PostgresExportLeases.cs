using Gateway.Actors.Cluster;
using Npgsql;

namespace Gateway.Host;

/// <summary>
/// The owners' leases (<see cref="IExportLeases"/>) in the cluster's PostgreSQL: one row per
/// export naming its holder, term and expiry. Every decision is one statement compared against
/// the server's <c>now()</c>, so it is atomic and no node's clock takes part.
/// </summary>
public sealed class PostgresExportLeases(string connectionString) : PostgresStore(connectionString, Create), IExportLeases
{
    private const string Create = """
            CREATE TABLE IF NOT EXISTS gateway_export_leases (
                export text PRIMARY KEY,
                node text NOT NULL,
                term bigint NOT NULL,
                expires_at timestamptz NOT NULL)
            """;

    public async Task<bool> TryAcquireAsync(string export, string node, long term, TimeSpan timeToLive, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        // Taken when there is no row, or the holder released it or let it run out.
        await using NpgsqlCommand command = source.CreateCommand("""
            INSERT INTO gateway_export_leases (export, node, term, expires_at)
            VALUES ($1, $2, $3, now() + $4)
            ON CONFLICT (export) DO UPDATE SET node = excluded.node, term = excluded.term, expires_at = excluded.expires_at
            WHERE gateway_export_leases.expires_at <= now()
            """);
        Bind(command, export, node, term, timeToLive);
        return await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false) == 1;
    }

    public async Task<bool> RenewAsync(string export, string node, long term, TimeSpan timeToLive, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        // Only the holder's own row of its own term: a lease another node took is not taken back.
        await using NpgsqlCommand command = source.CreateCommand("""
            UPDATE gateway_export_leases SET expires_at = now() + $4
            WHERE export = $1 AND node = $2 AND term = $3
            """);
        Bind(command, export, node, term, timeToLive);
        return await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false) == 1;
    }

    public async Task ReleaseAsync(string export, string node, long term, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = source.CreateCommand("""
            UPDATE gateway_export_leases SET expires_at = '-infinity'
            WHERE export = $1 AND node = $2 AND term = $3
            """);
        Bind(command, export, node, term, TimeSpan.Zero);
        await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
    }

    private static void Bind(NpgsqlCommand command, string export, string node, long term, TimeSpan timeToLive)
    {
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = export });
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = node });
        command.Parameters.Add(new NpgsqlParameter<long> { TypedValue = term });
        command.Parameters.Add(new NpgsqlParameter<TimeSpan> { TypedValue = timeToLive });
    }

}
