using System.Collections.Concurrent;
using System.Diagnostics;
using System.Diagnostics.Metrics;
using Gateway.Actors.Nbd;

namespace Gateway.Actors.Telemetry;

/// <summary>
/// The gateway's one <see cref="Meter"/> and <see cref="ActivitySource"/>. Request counters are
/// plain per-export counters read when metrics are collected (observable instruments), so the
/// data path pays an interlocked add, not a tag lookup; only the latency histogram is recorded
/// per request.
/// </summary>
public static class GatewayTelemetry
{
    public const string Name = "Gateway";

    public static readonly Meter Meter = new(Name, "1.0");

    public static readonly ActivitySource ActivitySource = new(Name, "1.0");

    /// <summary>Off with GATEWAY_TELEMETRY=off: for measuring what instrumentation costs (ops/bench).</summary>
    public static readonly bool Enabled = !string.Equals(Environment.GetEnvironmentVariable("GATEWAY_TELEMETRY"), "off", StringComparison.OrdinalIgnoreCase);

    private static readonly ConcurrentDictionary<string, ExportMetrics> Exports = new(StringComparer.Ordinal);

    internal static readonly Histogram<double> RequestDuration = Meter.CreateHistogram<double>(
        "nbd.request.duration", "s", "Time from receiving an NBD request to writing its reply",
        advice: new InstrumentAdvice<double> { HistogramBucketBoundaries = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5] });

    private static readonly Histogram<double> BitmapPersistDuration = Meter.CreateHistogram<double>(
        "gateway.bitmap.persist.duration", "s", "Time to make one group of first-touched granules durable (the wait of the writes in it)",
        advice: new InstrumentAdvice<double> { HistogramBucketBoundaries = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1] });

    private static readonly Histogram<int> BitmapPersistBatch = Meter.CreateHistogram<int>(
        "gateway.bitmap.persist.batch_size", "{write}", "Writes whose first touches were committed together",
        advice: new InstrumentAdvice<int> { HistogramBucketBoundaries = [1, 2, 4, 8, 16, 32, 64, 128, 256] });

    private static readonly Counter<long> HandshakeTimeouts = Meter.CreateCounter<long>(
        "nbd.handshake.timeouts", "{connection}", "NBD connections closed because the client had not finished the handshake in time");

    private static readonly Counter<long> RefusedConnections = Meter.CreateCounter<long>(
        "nbd.connections.refused", "{connection}", "NBD connections refused because this node serves its limit of connections");

    /// <summary>A client was disconnected for not finishing the handshake within the timeout.</summary>
    public static void HandshakeTimedOut() => HandshakeTimeouts.Add(1);

    /// <summary>A connection beyond the node's limit was refused.</summary>
    public static void ConnectionRefused() => RefusedConnections.Add(1);

    /// <summary>One group commit of dirty granules, by export.</summary>
    public static void BitmapPersisted(string export, TimeSpan elapsed, int writes)
    {
        var tag = new KeyValuePair<string, object?>("export", export);
        BitmapPersistDuration.Record(elapsed.TotalSeconds, tag);
        BitmapPersistBatch.Record(writes, tag);
    }

    static GatewayTelemetry()
    {
        Meter.CreateObservableCounter("nbd.requests", () => Observe(static (m, list) => m.CollectRequests(list)), "{request}", "NBD requests answered, by export and command");
        Meter.CreateObservableCounter("nbd.bytes", () => Observe(static (m, list) => m.CollectBytes(list)), "By", "Payload bytes read and written, by export and command");
        Meter.CreateObservableCounter("nbd.errors", () => Observe(static (m, list) => m.CollectErrors(list)), "{request}", "NBD requests answered with an error, by export, command and NBD error");
        Meter.CreateObservableUpDownCounter("nbd.connections", () => Observe(static (m, list) => list.Add(new Measurement<long>(Volatile.Read(ref m.Connections), m.ExportTag))), "{connection}", "Open NBD connections, by export");
        Meter.CreateObservableUpDownCounter("nbd.requests.in_flight", () => Observe(static (m, list) => list.Add(new Measurement<long>(Volatile.Read(ref m.InFlight), m.ExportTag))), "{request}", "NBD requests received and not yet answered, by export");
    }

    /// <summary>The counters of one export; the same object for the life of the process, so counters never go back.</summary>
    public static ExportMetrics For(string export) => Exports.GetOrAdd(export, static name => new ExportMetrics(name));

    private static IEnumerable<Measurement<long>> Observe(Action<ExportMetrics, List<Measurement<long>>> collect)
    {
        var list = new List<Measurement<long>>();
        foreach (ExportMetrics metrics in Exports.Values)
        {
            collect(metrics, list);
        }
        return list;
    }
}

/// <summary>Per-export request counters, indexed by command and error.</summary>
public sealed class ExportMetrics
{
    private const int Commands = (int)NbdCommand.Resize + 2; // the last slot counts unknown commands
    private static readonly NbdError[] Errors = [NbdError.Perm, NbdError.Io, NbdError.NoMem, NbdError.Inval, NbdError.NoSpc, NbdError.Overflow, NbdError.NotSup, NbdError.Shutdown];
    private static readonly string[] CommandNames = [.. Enumerable.Range(0, Commands).Select(i => i < Commands - 1 ? ((NbdCommand)i).ToString().ToLowerInvariant() : "unknown")];
    private static readonly string[] ErrorNames = [.. Errors.Select(e => "E" + e.ToString().ToUpperInvariant())];

    private readonly long[] _requests = new long[Commands];
    private readonly long[] _bytes = new long[Commands];
    private readonly long[] _errors = new long[Commands * Errors.Length];

    internal long Connections;
    internal long InFlight;

    internal ExportMetrics(string export)
    {
        Export = export;
        ExportTag = new KeyValuePair<string, object?>("export", export);
    }

    public string Export { get; }

    internal KeyValuePair<string, object?> ExportTag { get; }

    public void ConnectionOpened() => Interlocked.Increment(ref Connections);

    public void ConnectionClosed() => Interlocked.Decrement(ref Connections);

    public void RequestStarted() => Interlocked.Increment(ref InFlight);

    /// <summary>Counts one answered request; <paramref name="bytes"/> is its payload when it succeeded.</summary>
    public void RequestDone(NbdCommand command, NbdError error, long bytes, long startTimestamp)
    {
        Interlocked.Decrement(ref InFlight);
        int c = (uint)command < Commands - 1 ? (int)command : Commands - 1;
        Interlocked.Increment(ref _requests[c]);
        if (error == NbdError.None)
        {
            if (bytes > 0)
            {
                Interlocked.Add(ref _bytes[c], bytes);
            }
        }
        else
        {
            int e = Array.IndexOf(Errors, error);
            Interlocked.Increment(ref _errors[c * Errors.Length + (e < 0 ? 1 : e)]);
        }
        GatewayTelemetry.RequestDuration.Record(Stopwatch.GetElapsedTime(startTimestamp).TotalSeconds,
            ExportTag, new KeyValuePair<string, object?>("command", CommandNames[c]));
    }

    internal void CollectRequests(List<Measurement<long>> list) => Collect(list, _requests);

    internal void CollectBytes(List<Measurement<long>> list) => Collect(list, _bytes);

    private void Collect(List<Measurement<long>> list, long[] values)
    {
        for (int c = 0; c < Commands; c++)
        {
            long value = Volatile.Read(ref values[c]);
            if (value != 0)
            {
                list.Add(new Measurement<long>(value, ExportTag, new KeyValuePair<string, object?>("command", CommandNames[c])));
            }
        }
    }

    internal void CollectErrors(List<Measurement<long>> list)
    {
        for (int c = 0; c < Commands; c++)
        {
            for (int e = 0; e < Errors.Length; e++)
            {
                long value = Volatile.Read(ref _errors[c * Errors.Length + e]);
                if (value != 0)
                {
                    list.Add(new Measurement<long>(value, ExportTag, new KeyValuePair<string, object?>("command", CommandNames[c]),
                        new KeyValuePair<string, object?>("error", ErrorNames[e])));
                }
            }
        }
    }
}
