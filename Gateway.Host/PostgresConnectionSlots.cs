using Gateway.Actors.Cluster;
using Npgsql;

namespace Gateway.Host;

/// <summary>
/// The exports' connection slots (<see cref="IConnectionSlotStore"/>) in the cluster's
/// PostgreSQL: one row per attached client connection, naming the export and the node
/// incarnation that serves it. A claim counts and inserts under a transaction-scoped advisory
/// lock on the export, so claims for the same export are serialized by the server and two
/// claims for the last slot never both win; claims for different exports do not wait for each
/// other.
/// </summary>
public sealed class PostgresConnectionSlots(string connectionString) : PostgresStore(connectionString, Create), IConnectionSlotStore
{
    private const string Create = """
            CREATE TABLE IF NOT EXISTS gateway_connection_slots (
                slot uuid PRIMARY KEY,
                export text NOT NULL,
                node text NOT NULL,
                taken_at timestamptz NOT NULL);
            CREATE INDEX IF NOT EXISTS gateway_connection_slots_export ON gateway_connection_slots (export);
            CREATE INDEX IF NOT EXISTS gateway_connection_slots_node ON gateway_connection_slots (node)
            """;

    /// <summary>
    /// The first key of the two-key advisory locks taken here ('nbdc'), so they never meet
    /// another user's locks on the same database.
    /// </summary>
    private const int LockSpace = 0x6e626463;

    /// <summary>
    /// How long the slot of a node the claimant does not see as a member is kept before a claim
    /// deletes it. Such slots never count; the wait only spares a node that joined so recently
    /// that the claimant has not heard of it yet, whose slots would otherwise be lost for good.
    /// </summary>
    public static readonly TimeSpan ForeignSlotGrace = TimeSpan.FromMinutes(1);

    public async Task<bool> TryTakeAsync(ConnectionSlotClaim claim, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        // One round trip: a batch without a transaction runs as one implicit transaction (one Sync
        // at its end), so the advisory lock is held from the first statement to the commit, and
        // the count sees every slot committed by the claim that held it before.
        await using NpgsqlBatch batch = source.CreateBatch();
        var take = new NpgsqlBatchCommand("""
            INSERT INTO gateway_connection_slots (slot, export, node, taken_at)
            SELECT $1, $2, $3, now()
            WHERE (SELECT count(*) FROM gateway_connection_slots WHERE export = $2 AND node = ANY($4)) < $5
            """)
        {
            Parameters =
            {
                new NpgsqlParameter<Guid> { TypedValue = claim.Slot },
                new NpgsqlParameter<string> { TypedValue = claim.Export },
                new NpgsqlParameter<string> { TypedValue = claim.Node },
                new NpgsqlParameter<string[]> { TypedValue = [.. claim.LiveNodes] },
                new NpgsqlParameter<int> { TypedValue = claim.Limit },
            },
        };
        batch.BatchCommands.Add(new NpgsqlBatchCommand("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        {
            Parameters =
            {
                new NpgsqlParameter<int> { TypedValue = LockSpace },
                new NpgsqlParameter<string> { TypedValue = claim.Export },
            },
        });
        // Slots this node gave back without seeing the delete succeed, and the slots of nodes
        // that are gone, of any export (lazily: nothing else deletes the rows of a killed node;
        // the table holds one row per open connection, so this is cheap). Rows of other exports
        // are deleted without their lock: they count for nobody anyway.
        batch.BatchCommands.Add(new NpgsqlBatchCommand("""
            DELETE FROM gateway_connection_slots
            WHERE slot = ANY($1) OR (node <> ALL($2) AND taken_at < now() - $3)
            """)
        {
            Parameters =
            {
                new NpgsqlParameter<Guid[]> { TypedValue = [.. claim.Released] },
                new NpgsqlParameter<string[]> { TypedValue = [.. claim.LiveNodes] },
                new NpgsqlParameter<TimeSpan> { TypedValue = ForeignSlotGrace },
            },
        });
        batch.BatchCommands.Add(take);
        await batch.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
        return take.RecordsAffected == 1;
    }

    public async Task ReleaseAsync(IReadOnlyList<Guid> slots, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = source.CreateCommand("DELETE FROM gateway_connection_slots WHERE slot = ANY($1)");
        command.Parameters.Add(new NpgsqlParameter<Guid[]> { TypedValue = [.. slots] });
        await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
    }

    public async Task ReleaseNodeAsync(string node, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = source.CreateCommand("DELETE FROM gateway_connection_slots WHERE node = $1");
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = node });
        await command.ExecuteNonQueryAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>The slots of <paramref name="export"/> held by any node, live or not (tests, diagnostics).</summary>
    public async Task<IReadOnlyList<(string Node, Guid Slot)>> ListAsync(string export, CancellationToken cancellationToken)
    {
        NpgsqlDataSource source = await SourceAsync(cancellationToken).ConfigureAwait(false);
        await using NpgsqlCommand command = source.CreateCommand("SELECT node, slot FROM gateway_connection_slots WHERE export = $1 ORDER BY taken_at");
        command.Parameters.Add(new NpgsqlParameter<string> { TypedValue = export });
        await using NpgsqlDataReader reader = await command.ExecuteReaderAsync(cancellationToken).ConfigureAwait(false);
        var slots = new List<(string, Guid)>();
        while (await reader.ReadAsync(cancellationToken).ConfigureAwait(false))
        {
            slots.Add((reader.GetString(0), reader.GetGuid(1)));
        }
        return slots;
    }

}
