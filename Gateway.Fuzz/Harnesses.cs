using System.IO.Pipelines;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Gateway.Tests.Protocol;
using Microsoft.Extensions.Logging.Abstractions;

namespace Gateway.Fuzz;

/// <summary>
/// The fuzz targets. Each takes the bytes a client sends and serves them to the end; returning
/// means the server handled them (a clean close included), an exception escaping is a finding.
/// </summary>
public static class Harnesses
{
    /// <summary>The size of the fuzzed exports: small, so a run allocates little, large enough for the seeds' offsets.</summary>
    public const long ExportSize = 2 * 1024 * 1024;

    public static readonly IReadOnlyDictionary<string, Func<byte[], Task>> All = new Dictionary<string, Func<byte[], Task>>(StringComparer.Ordinal)
    {
        ["handshake"] = Handshake,
        ["transmission"] = TransmissionPhase,
        ["qcow2"] = Qcow2Harness.Run,
    };

    /// <summary>
    /// A whole connection from the client's first byte: the newstyle handshake, option haggling
    /// (OptionNegotiator) and, after GO or EXPORT_NAME, transmission, exactly as
    /// <see cref="NbdConnection.ServeAsync"/> runs it for a socket. ServeAsync itself absorbs what
    /// a misbehaving client may cause (protocol violations, end of stream); anything else
    /// escapes it and is a finding.
    /// </summary>
    public static async Task Handshake(byte[] input)
    {
        var exports = new TestExportDirectory();
        exports.Add("disk0", new MemoryBackend(ExportSize), "fuzzed export");
        exports.Add("ro", new MemoryBackend(ExportSize, readOnly: true));
        // Refused without TLS (the server offers none here), and one with a connection limit.
        exports.Add("tls", new MemoryBackend(ExportSize), access: new ExportAccess(TlsRequired: true));
        exports.Add("one", new MemoryBackend(ExportSize), access: new ExportAccess(MaxConnections: 1));
        using var stream = new ClientStream(input);
        await NbdConnection.ServeAsync(stream, exports, NullLogger.Instance, CancellationToken.None);
        CheckPayloadPool();
    }

    /// <summary>
    /// The transmission phase alone (NbdRequest.TryRead, Transmission's read loop, payload reads
    /// and discards, replies). The first byte picks the session; the rest is the client's
    /// request stream:
    /// bit 0 structured replies, bit 1 base:allocation selected, bit 2 read-only export,
    /// bit 3 requests on the thread pool (a device that is not INonBlockingIo),
    /// bits 4-7 n: reads return at most 2^n bytes (0: unlimited).
    /// </summary>
    public static async Task TransmissionPhase(byte[] input)
    {
        if (input.Length == 0)
        {
            return;
        }
        byte mode = input[0];
        bool structured = (mode & 1) != 0;
        bool context = (mode & 2) != 0;
        bool readOnly = (mode & 4) != 0;
        bool threadPool = (mode & 8) != 0;
        int chunk = mode >> 4 == 0 ? int.MaxValue : 1 << (mode >> 4);

        var memory = new MemoryBackend(ExportSize, readOnly);
        IBlockDevice device = threadPool ? new TestDevice(memory) : memory;
        var info = new ExportInfo("disk0", null, device.Size, device.IsReadOnly, device.Capabilities);
        var export = new ExportHandle(info, device, [new BaseAllocationContext(device)], CancellationToken.None);
        SelectedContext[] contexts = context ? [new SelectedContext(0, export.MetaContexts[0])] : [];
        var session = new NegotiatedSession(export, structured, contexts);

        using var stream = new ClientStream(input[1..], chunk);
        // As NbdConnection.CreatePipes makes them.
        PipeReader reader = PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: 256 * 1024, minimumReadSize: 64 * 1024, leaveOpen: true));
        PipeWriter writer = PipeWriter.Create(stream, new StreamPipeWriterOptions(minimumBufferSize: 64 * 1024, leaveOpen: true));
        var transmission = new Transmission(reader, writer, stream, session, NullLogger.Instance);
        try
        {
            await transmission.RunAsync(CancellationToken.None);
        }
        catch (Exception e) when (e is NbdProtocolException or IOException)
        {
            // What NbdConnection.ServeAsync closes cleanly (EndOfStreamException is an IOException).
        }
        finally
        {
            await reader.CompleteAsync();
            await writer.CompleteAsync();
        }
        CheckPayloadPool();
    }

    /// <summary>Every payload buffer rented during the run must be back once the connection has ended.</summary>
    private static void CheckPayloadPool()
    {
        long outstanding = PayloadPool.Outstanding;
        if (outstanding != 0)
        {
            throw new InvalidOperationException($"{outstanding} payload buffer(s) not returned after the connection ended");
        }
    }
}
