using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Runtime.CompilerServices;
using BenchmarkDotNet.Attributes;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Microsoft.Extensions.Logging.Abstractions;

namespace Gateway.Benchmarks;

/// <summary>
/// The request codec, and the whole read/write path of a connection (parse, run against the
/// device, write the reply) over in-memory pipes, so what is measured is the gateway's own
/// work and its allocations per 4 KiB request, without the socket.
/// </summary>
[MemoryDiagnoser]
public class DataPathBenchmarks
{
    private const int Batch = 64;
    private const int BlockSize = 4096;

    private readonly byte[] _header = new byte[NbdLimits.RequestHeaderSize];
    private readonly ArrayBufferWriter<byte> _replyBuffer = new(64 * 1024);
    private ReadOnlySequence<byte> _headerSequence;

    private Pipe _toServer = null!;
    private Pipe _toClient = null!;
    private Task _server = null!;
    private CancellationTokenSource _stop = null!;
    private byte[] _readRequests = null!;
    private byte[] _writeRequests = null!;
    private readonly ManualResetEventSlim _replied = new();
    private Action _signalReplied = null!;

    [GlobalSetup]
    public void Setup()
    {
        new NbdRequest(CommandFlags.None, NbdCommand.Read, 42, 4096, BlockSize).WriteTo(_header);
        _headerSequence = new ReadOnlySequence<byte>(_header);

        var device = new MemoryBackend(64L << 20);
        var info = new ExportInfo("bench", null, device.Size, false, device.Capabilities);
        var export = new ExportHandle(info, device, [new BaseAllocationContext(device)], CancellationToken.None);
        // Segments big enough for a whole batch: the harness itself must not allocate per request.
        _toServer = new Pipe(new PipeOptions(pauseWriterThreshold: 0, minimumSegmentSize: 1 << 20));
        // The reader's continuation (setting _replied) runs inline on the server's flush: queued to
        // the pool with an Action, it would allocate a work item per wait.
        _toClient = new Pipe(new PipeOptions(readerScheduler: PipeScheduler.Inline, pauseWriterThreshold: 0, minimumSegmentSize: 1 << 20));
        _signalReplied = _replied.Set;
        _stop = new CancellationTokenSource();
        var session = new NegotiatedSession(export, StructuredReplies: false, []);
        _server = new Transmission(_toServer.Reader, _toClient.Writer, Stream.Null, session, NullLogger.Instance).RunAsync(_stop.Token);

        _readRequests = Requests(NbdCommand.Read, withPayload: false);
        _writeRequests = Requests(NbdCommand.Write, withPayload: true);
    }

    private static byte[] Requests(NbdCommand command, bool withPayload)
    {
        int size = NbdLimits.RequestHeaderSize + (withPayload ? BlockSize : 0);
        byte[] bytes = new byte[Batch * size];
        var random = new Random(7);
        for (int i = 0; i < Batch; i++)
        {
            ulong offset = (ulong)random.Next(0, (64 << 20) / BlockSize) * BlockSize;
            new NbdRequest(CommandFlags.None, command, (ulong)i, offset, BlockSize).WriteTo(bytes.AsSpan(i * size));
        }
        return bytes;
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _stop.Cancel();
        _toServer.Writer.Complete();
        try
        {
            _server.GetAwaiter().GetResult();
        }
        catch (OperationCanceledException)
        {
        }
    }

    [Benchmark(Description = "TryRead request header")]
    public ulong ParseHeader()
    {
        ReadOnlySequence<byte> buffer = _headerSequence;
        NbdRequest.TryRead(ref buffer, out NbdRequest request);
        return request.Cookie;
    }

    [Benchmark(Description = "Write simple reply header")]
    public int WriteReplyHeader()
    {
        _replyBuffer.ResetWrittenCount();
        Replies.WriteSimple(_replyBuffer, 42, NbdError.None);
        return _replyBuffer.WrittenCount;
    }

    [Benchmark(OperationsPerInvoke = Batch, Description = "4 KiB READ, parse to reply")]
    public void ReadPath() => RoundTrip(_readRequests, NbdLimits.SimpleReplyHeaderSize + BlockSize);

    [Benchmark(OperationsPerInvoke = Batch, Description = "4 KiB WRITE, parse to reply")]
    public void WritePath() => RoundTrip(_writeRequests, NbdLimits.SimpleReplyHeaderSize);

    /// <summary>
    /// One batch there and back. Not an async method: an async Task allocates its state machine
    /// box each time it awaits asynchronously (176 B per batch, which read as 3 B per request),
    /// and a pooled ValueTask builder still misses its cache when the box is rented on this thread
    /// and returned on a pool thread. The thread waits on one event instead, as BenchmarkDotNet
    /// itself waits on an awaited benchmark, so what is counted is the data path's own.
    /// </summary>
    private void RoundTrip(byte[] requests, int replySize)
    {
        Sent(_toServer.Writer.WriteAsync(requests));
        long expected = (long)Batch * replySize;
        while (true)
        {
            ReadResult result = Wait(_toClient.Reader.ReadAsync());
            if (result.Buffer.Length >= expected)
            {
                CheckMagic(result.Buffer);
                _toClient.Reader.AdvanceTo(result.Buffer.GetPosition(expected));
                return;
            }
            _toClient.Reader.AdvanceTo(result.Buffer.Start, result.Buffer.End);
        }
    }

    private static void Sent(ValueTask<FlushResult> written)
    {
        // pauseWriterThreshold: 0, so the write never waits for the server.
        if (!written.IsCompletedSuccessfully)
        {
            throw new InvalidOperationException("the request pipe waited");
        }
    }

    private ReadResult Wait(ValueTask<ReadResult> read)
    {
        ConfiguredValueTaskAwaitable<ReadResult>.ConfiguredValueTaskAwaiter reading = read.ConfigureAwait(false).GetAwaiter();
        if (!reading.IsCompleted)
        {
            _replied.Reset();
            reading.UnsafeOnCompleted(_signalReplied);
            _replied.Wait();
        }
        return reading.GetResult();
    }

    private static void CheckMagic(in ReadOnlySequence<byte> replies)
    {
        Span<byte> magic = stackalloc byte[4];
        replies.Slice(0, 4).CopyTo(magic);
        if (BinaryPrimitives.ReadUInt32BigEndian(magic) != NbdMagic.SimpleReply)
        {
            throw new InvalidOperationException("reply stream out of step");
        }
    }
}
