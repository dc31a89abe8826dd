using Akka.Hosting;
using Akka.Persistence.Sql.Hosting;
using Gateway.Actors;
using Gateway.Actors.Exports;
using LinqToDB;
using System.Data.Common;
using LinqToDB.Interceptors;
using Microsoft.Data.Sqlite;

namespace Gateway.Host;

/// <summary><c>gateway serve</c>: composes the host (actors, persistence, NBD listener, admin API).</summary>
public static class ServeCommand
{
    public static WebApplication Build(GatewayOptions options, string[]? configFiles = null)
    {
        Directory.CreateDirectory(options.DataDirectory);
        string? connectionString = null;
        if (options.Cluster is null)
        {
            connectionString = PrepareDatabase(options.DatabasePath);
            string wal = options.DatabasePath + "-wal";
            JournalDurability.Configure(() => SyncFile(wal));
        }

        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder(HostDefaults.Options());
        foreach (string file in configFiles ?? [])
        {
            builder.Configuration.AddJsonFile(Path.GetFullPath(file), optional: false);
        }
        // One line per request from ASP.NET is noise next to the gateway's own connection lines.
        builder.Logging.AddFilter("Microsoft.AspNetCore", LogLevel.Warning);
        builder.Logging.AddSimpleConsole(o =>
        {
            o.SingleLine = true;
            o.TimestampFormat = "HH:mm:ss.fff ";
        });
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Listen(options.AdminEndpoint);
            if (options.HealthEndpoint is { } health)
            {
                k.Listen(health);
            }
        });
        builder.Services.AddHealthChecks();
        var localExports = new Gateway.Actors.Cluster.LocalExports();
        builder.Services.AddSingleton(localExports);
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = Kubernetes.ShutdownTimeout);
        builder.Services.AddSingleton(options);
        builder.Services.AddSingleton<ShutdownOutcome>();
        builder.Services.AddSingleton(services => SecurityCli.NbdSettings(options, services.GetRequiredService<ILoggerFactory>()));

        var backends = new BackendFactory(options.DataDirectory);
        var initial = new ExportSpec("disk0", GatewayOptions.InitialExportSize, new BackendSpec("file"), ReadOnly: false, "default export");
        if (options.Cluster is not null)
        {
            // Registered before Akka, so it stops after Akka: other nodes keep reaching the exports
            // this node owns until CoordinatedShutdown has handed their shards over.
            builder.Services.AddHostedService<PeerListener>();
            // The owners' leases (issue 17, fencing) live in the PostgreSQL the journal uses.
            string postgres = options.Cluster.Postgres;
            builder.Services.AddSingleton(_ => new PostgresExportLeases(postgres));
            // Members announce themselves there too: a node joins itself only when no other is alive.
            builder.Services.AddSingleton(_ => new PostgresClusterMembers(postgres));
            // And the exports' connection slots, so maxConnections holds across the cluster.
            builder.Services.AddSingleton(_ => new PostgresConnectionSlots(postgres));
        }
        builder.Services.AddAkka("gateway", (akka, services) =>
        {
            akka.ConfigureLoggers(loggers => loggers.AddLoggerFactory());
            // The host alone drives shutdown: NbdListener drains connections and flushes exports
            // first, then Akka.Hosting runs CoordinatedShutdown. Akka's own SIGTERM hook would
            // race the drain and could stop export actors under requests still in flight.
            akka.AddHocon("akka.coordinated-shutdown.run-by-clr-shutdown-hook = off", HoconAddMode.Prepend);
            var nbd = services.GetRequiredService<Gateway.Actors.Nbd.NbdServerSettings>();
            Health.AddChecks(akka, cluster: options.Cluster is not null);
            if (options.Cluster is { } cluster)
            {
                // Mutual TLS of the peer data stream (server and client side, hot-reloaded as the
                // export TLS is) and of Akka remoting.
                Gateway.Actors.Tls.TlsCredentials? clusterTls = cluster.Tls is { } files
                    ? new Gateway.Actors.Tls.TlsCredentials(files.Certificate, files.Key, files.Ca, requireClientCertificate: true,
                        services.GetRequiredService<ILoggerFactory>().CreateLogger("Gateway.ClusterTls"))
                    : null;
                ClusterComposition.Configure(akka, cluster, services.GetRequiredService<PostgresClusterMembers>(), clusterTls);
                AddOperatorHocon(akka, services);
                akka.WithGatewayCluster(backends, initial, ClusterComposition.Node(cluster), localExports,
                    services.GetRequiredService<PostgresExportLeases>(), nbd, options.MaxConnections, clusterTls,
                    services.GetRequiredService<PostgresConnectionSlots>());
                return;
            }
            // Akka's scheduler wakes every tick (10 ms by default) whether or not a timer is due,
            // and each wake-up sets a pool worker spinning: an idle gateway used 0.46 CPU-s per
            // 10 s at 10 ms and 0.13 at 50 ms (idle.sh, 2026-12-07). A standalone gateway's
            // timers are a second or more (the registry's wake-up, an export's backoff) and no
            // request waits on one; a cluster keeps the default for its 250 ms heartbeats.
            akka.AddHocon("akka.scheduler.tick-duration = 50ms", HoconAddMode.Prepend);
            AddOperatorHocon(akka, services);
            akka.WithSqlPersistence(
                new DataOptions().UseConnectionString(ProviderName.SQLiteMS, connectionString!).UseInterceptor(new SqliteSessionSettings()),
                autoInitialize: true);
            akka.WithGatewayActors(backends, initial, nbd, options.MaxConnections);
        });
        builder.Services.AddHostedService<NbdListener>();
        builder.Services.AddGatewayTelemetry();

        WebApplication app = builder.Build();
        app.UseHealthEndpoint(options.HealthEndpoint);
        app.UseAdminAuthentication(options.AdminToken);
        app.MapAdminApi();
        app.MapClusterApi();
        app.MapPrometheusScrapingEndpoint("/metrics");
        return app;
    }

    /// <summary>
    /// Operators' own Akka settings (<c>Gateway:Akka:Hocon</c>, e.g. failure-detector timings), over
    /// the gateway's: added last with <see cref="HoconAddMode.Prepend"/>, so they win.
    /// </summary>
    private static void AddOperatorHocon(AkkaConfigurationBuilder akka, IServiceProvider services)
    {
        if (services.GetRequiredService<IConfiguration>()["Gateway:Akka:Hocon"] is { Length: > 0 } hocon)
        {
            akka.AddHocon(hocon, HoconAddMode.Prepend);
        }
    }

    /// <summary>
    /// Creates the SQLite file in WAL mode (Microsoft.Data.Sqlite has no connection-string keyword
    /// for it; docs/akka.md#persistence-on-sqlite measured WAL at 2.3-2.7x the write rate of the rollback journal).
    /// </summary>
    private static string PrepareDatabase(string path)
    {
        string connectionString = new SqliteConnectionStringBuilder { DataSource = path, Pooling = true }.ToString();
        using var connection = new SqliteConnection(connectionString);
        connection.Open();
        using SqliteCommand command = connection.CreateCommand();
        command.CommandText = "PRAGMA journal_mode=WAL;";
        command.ExecuteNonQuery();
        return connectionString;
    }

    /// <summary>fsync of the WAL: every commit so far becomes durable (see <see cref="JournalDurability"/>).</summary>
    private static void SyncFile(string path)
    {
        try
        {
            using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
            RandomAccess.FlushToDisk(handle);
        }
        catch (FileNotFoundException)
        {
            // Checkpointed away: its frames are already in the (synced) database file.
        }
    }

    /// <summary>
    /// synchronous=NORMAL on every journal connection: in WAL mode a commit then survives the
    /// process being killed without an fsync; durability points sync the WAL themselves.
    /// docs/akka.md#persistence-on-sqlite measured 51 k events/s this way.
    /// </summary>
    private sealed class SqliteSessionSettings : ConnectionInterceptor
    {
        public override void ConnectionOpened(ConnectionEventData eventData, DbConnection connection)
        {
            using DbCommand command = connection.CreateCommand();
            command.CommandText = "PRAGMA synchronous=NORMAL;";
            command.ExecuteNonQuery();
        }

        public override async Task ConnectionOpenedAsync(ConnectionEventData eventData, DbConnection connection, CancellationToken cancellationToken)
        {
            await using DbCommand command = connection.CreateCommand();
            command.CommandText = "PRAGMA synchronous=NORMAL;";
            await command.ExecuteNonQueryAsync(cancellationToken);
        }
    }
}
