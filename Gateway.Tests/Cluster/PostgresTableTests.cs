using Gateway.Host;
using Npgsql;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// The gateway's tables in PostgreSQL are created by whichever node uses them first; several nodes
/// starting at once must all go on. Needs GATEWAY_TEST_POSTGRES (./ops/test starts a server).
/// </summary>
public sealed class PostgresTableTests
{
    [Fact]
    public async Task Nodes_creating_the_same_table_at_once_all_succeed()
    {
        string postgres = Environment.GetEnvironmentVariable("GATEWAY_TEST_POSTGRES") is { Length: > 0 } p
            ? p
            : throw new InvalidOperationException("GATEWAY_TEST_POSTGRES is not set: this test needs a PostgreSQL server (./ops/test starts one)");
        await using NpgsqlDataSource source = NpgsqlDataSource.Create(postgres);
        for (int round = 0; round < 5; round++)
        {
            string table = $"gateway_race_{Guid.NewGuid():N}";
            PostgresTable[] nodes = [.. Enumerable.Range(0, 16).Select(_ => new PostgresTable(source, $"CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY)"))];
            try
            {
                await Task.WhenAll(nodes.Select(n => Task.Run(() => n.EnsureAsync(default))));
                await using NpgsqlCommand insert = source.CreateCommand($"INSERT INTO {table} VALUES ('x')");
                Assert.Equal(1, await insert.ExecuteNonQueryAsync());
            }
            finally
            {
                await using NpgsqlCommand drop = source.CreateCommand($"DROP TABLE IF EXISTS {table}");
                await drop.ExecuteNonQueryAsync();
                foreach (PostgresTable node in nodes)
                {
                    node.Dispose();
                }
            }
        }
    }
}
