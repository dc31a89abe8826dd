using System.Buffers;
using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Threading.Channels;
using Gateway.Actors.Telemetry;
using Gateway.Backends;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Nbd;

/// <summary>
/// The transmission phase of one connection: one loop parses requests and starts each on the
/// thread pool against the export's device; one loop writes replies as they complete, in any
/// order, matched by cookie (proto.md "Transmission phase").
/// </summary>
public sealed class Transmission
{
    /// <summary>Requests in flight per connection before the reader waits.</summary>
    public const int MaxInFlightRequests = 256;

    /// <summary>Payload bytes in flight per connection before the reader waits.</summary>
    public const long MaxInFlightBytes = 64L * 1024 * 1024;

    /// <summary>Largest BLOCK_STATUS payload (8 bytes of effect length, 4 per context id).</summary>
    private const int MaxBlockStatusPayload = 8 + 4 * 1024;

    /// <summary>Reads at least this long are checked for holes and answered with OFFSET_HOLE chunks;
    /// below it a hole check costs more than the zeros it saves.</summary>
    public const int SparseReadThreshold = 64 * 1024;

    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly Stream _direct;
    private readonly ExportHandle _export;
    private readonly IBlockDevice _device;
    private readonly INonBlockingIo? _nonBlocking;
    private readonly SelectedContext[] _contexts;
    private readonly ILogger _logger;
    private readonly ExportMetrics? _metrics;
    // Synchronous continuations: the thread that finishes a request while the writer is idle
    // runs the writer itself, instead of paying a thread-pool hop per reply.
    private readonly Channel<RequestWork> _replies = Channel.CreateUnbounded<RequestWork>(
        new UnboundedChannelOptions { SingleReader = true, SingleWriter = false, AllowSynchronousContinuations = true });
    private readonly ConcurrentQueue<RequestWork> _pool = new();
    private readonly CancellationTokenSource _aborted = new();

    private RequestWork? _batch;
    private readonly IForwardingDevice? _forwarding;
    private readonly ISegmentedReads? _segmentedReads;
    private readonly FileSender? _fileSender;
    private readonly IFileRegions? _fileRegions;
    private readonly IFileRegions? _cachedFiles;
    private IRequestBatch? _corked;
    private int _inFlight;
    private long _inFlightBytes;
    private volatile bool _draining;
    private TaskCompletionSource? _capacityWaiter;
    private readonly TaskCompletionSource _drained = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <param name="direct">The stream under <paramref name="output"/>: large read payloads are written to it directly.</param>
    public Transmission(PipeReader input, PipeWriter output, Stream direct, NegotiatedSession session, ILogger logger)
    {
        _input = input;
        _output = output;
        _direct = direct;
        _export = session.Export;
        _device = session.Export.Device;
        _nonBlocking = _device as INonBlockingIo;
        _forwarding = _device as IForwardingDevice;
        _segmentedReads = _device as ISegmentedReads;
        if (direct is System.Net.Sockets.NetworkStream { Socket: var socket } && _device is IFileRegions regions)
        {
            // A plain-text socket and a device that can say where its data lies in a file.
            _fileSender = new FileSender(socket);
            _fileRegions = regions;
        }
        else
        {
            _cachedFiles = _device as IFileRegions;
        }
        _contexts = [.. session.Contexts];
        Extended = session.ExtendedHeaders;
        Structured = session.StructuredReplies || Extended;
        _logger = logger;
        _metrics = GatewayTelemetry.Enabled ? GatewayTelemetry.For(_export.Info.Name) : null;
    }

    /// <summary>Replies are chunks (structured replies or extended headers), never simple replies.</summary>
    public bool Structured { get; }

    /// <summary>Extended headers: 32-byte requests and replies with 64-bit lengths.</summary>
    public bool Extended { get; }

    internal ulong ExportSize => (ulong)_export.Info.Size;

    /// <summary>
    /// Where a read's holes come from, if it is answered with holes at all: only with structured
    /// replies, never with NBD_CMD_FLAG_DF (one data chunk, proto.md "Request flags"). A device
    /// that reads segments says where the holes are as it reads (a link to the owner passes on the
    /// holes of the owner's reply) while it does (<see cref="ISegmentedReads.ReadsSegments"/>). A
    /// remote forwarding device is never asked for the allocation, which would be a second round
    /// trip for every read. Any other device (a link whose owner is this node included) is asked
    /// when the read is long enough for the zeros saved to pay for the question.
    /// </summary>
    internal ReadHoles HolesOf(in NbdRequest request)
    {
        if (!Structured || request.Flags.HasFlag(CommandFlags.DontFragment))
        {
            return ReadHoles.None;
        }
        if (_segmentedReads is { ReadsSegments: true })
        {
            return ReadHoles.FromSegments;
        }
        return _forwarding is not { IsRemote: true } && request.Length >= SparseReadThreshold ? ReadHoles.FromAllocation : ReadHoles.None;
    }

    internal ISegmentedReads? SegmentedReads => _segmentedReads;

    /// <summary>Where large reads find their data in a file, to be sent with sendfile; null on TLS or other devices.</summary>
    internal IFileRegions? FileRegions => _fileRegions;

    internal FileSender? FileSender => _fileSender;

    /// <summary>
    /// True when a range of the export's file is all in the page cache, on a connection that
    /// cannot send it from there (TLS): the same test as <see cref="FileRegions"/>' sendfile path,
    /// so a long read that passes it is served on the reader's thread as one data chunk
    /// (<c>preadv2(RWF_NOWAIT)</c>) instead of going to the pool for a hole check: the holes a check
    /// would find are not in the cache. Over cluster TLS the hop cost the owner's pool workers
    /// more in spinning than the copy (README "Cluster TLS").
    /// </summary>
    internal bool IsAllCached(long offset, int length)
    {
        if (_cachedFiles is not IFileRegions files || !files.TryGetFileRegion(offset, length, out FileRegion region))
        {
            return false;
        }
        region.Holder.Release();
        return true;
    }

    /// <summary>Requests received on this connection so far.</summary>
    public long Requests { get; private set; }

    internal IBlockDevice Device => _device;

    internal SelectedContext[] Contexts => _contexts;

    internal CancellationToken Aborted => _aborted.Token;

    /// <summary>
    /// Serves requests until the client disconnects (NBD_CMD_DISC or a closed socket), the
    /// protocol is broken, or <paramref name="stopping"/> fires; then finishes every request
    /// already received and sends its reply before returning.
    /// </summary>
    public async Task RunAsync(CancellationToken stopping)
    {
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(stopping, _export.Closed, _aborted.Token);
        Task writer = WriteLoopAsync();
        _metrics?.ConnectionOpened();
        try
        {
            await ReadLoopAsync(linked.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (linked.IsCancellationRequested)
        {
            _logger.LogDebug("Connection to export {Export} stopping: server shutting down or export closed", _export.Info.Name);
        }
        finally
        {
            FlushBatch();
            await DrainAsync().ConfigureAwait(false);
            _replies.Writer.TryComplete();
            await writer.ConfigureAwait(false);
            _fileSender?.Dispose();
            _metrics?.ConnectionClosed();
        }
    }

    private async Task ReadLoopAsync(CancellationToken stopping)
    {
        while (true)
        {
            ValueTask<ReadResult> reading = _input.ReadAsync(stopping);
            if (!reading.IsCompleted)
            {
                // The socket thread is given back while the read waits (SocketThreadBudget).
                _socketThreadSince = 0;
            }
            ReadResult result = await reading.ConfigureAwait(false);
            if (result.IsCanceled)
            {
                return;
            }
            ReadOnlySequence<byte> buffer = result.Buffer;
            RequestWork? partial = null;
            RequestWork? refused = null;
            int filled = 0;
            long discard = 0;
            bool disconnect = false;
            ulong oversized = 0;
            bool leftover;
            try
            {
                while (NbdRequest.TryRead(ref buffer, Extended, out NbdRequest request))
                {
                    if (request.Command == NbdCommand.Disconnect)
                    {
                        disconnect = true;
                        break;
                    }

                    Requests++;
                    if (OnSocketThread && ExceededSocketThreadBudget())
                    {
                        // More requests are already here and this loop has held the socket thread
                        // long enough: the rest of the burst goes on from the pool.
                        await Task.Yield();
                    }
                    NbdError error = Validate(request);
                    bool hasPayload = request.HasPayloadIn(Extended);
                    long bytes = error == NbdError.None && (hasPayload || request.Command == NbdCommand.Read) ? (long)request.Length : 0;
                    if (Volatile.Read(ref _inFlight) >= MaxInFlightRequests || Volatile.Read(ref _inFlightBytes) + bytes > MaxInFlightBytes)
                    {
                        // Capacity comes back as replies are written: hand over what is done first.
                        FlushBatch();
                        await WaitForCapacityAsync(bytes, stopping).ConfigureAwait(false);
                    }

                    RequestWork work = Rent(request, error, bytes);
                    if (!hasPayload)
                    {
                        Start(work);
                        continue;
                    }

                    long available = (long)Math.Min((ulong)buffer.Length, request.Length);
                    if (error != NbdError.None)
                    {
                        if (request.Length > NbdLimits.MaxDiscard)
                        {
                            // More than the server will ever read to stay in step: the error, then
                            // a hard disconnect (proto.md "Block size constraints" allows one).
                            Start(work);
                            oversized = request.Length;
                            break;
                        }
                        // The payload is consumed before the error is answered: a client that
                        // reads replies while it is still sending (libnbd) must never see a
                        // reply in the middle of its own payload.
                        buffer = buffer.Slice(available);
                        if ((ulong)available < request.Length)
                        {
                            refused = work;
                            discard = (long)request.Length - available;
                            break;
                        }
                        Start(work);
                        continue;
                    }

                    work.Buffer = PayloadPool.Rent((int)request.Length);
                    buffer.Slice(0, available).CopyTo(work.Buffer);
                    buffer = buffer.Slice(available);
                    if ((ulong)available < request.Length)
                    {
                        partial = work;
                        filled = (int)available;
                        break;
                    }
                    Start(work);
                }
            }
            finally
            {
                leftover = !buffer.IsEmpty;
                _input.AdvanceTo(buffer.Start, buffer.End);
                FlushBatch();
            }

            if (partial is not null)
            {
                bool filledAll;
                try
                {
                    filledAll = await FillPayloadAsync(partial, filled, stopping).ConfigureAwait(false);
                }
                catch
                {
                    // Not started, so nothing else will release it; DrainAsync would wait on it forever.
                    Release(partial);
                    throw;
                }
                if (!filledAll)
                {
                    _logger.LogInformation("Client of export {Export} disconnected in the middle of a write payload", _export.Info.Name);
                    Release(partial);
                    return;
                }
                Start(partial);
                FlushBatch();
                continue;
            }
            if (refused is not null)
            {
                bool discarded;
                try
                {
                    discarded = await DiscardAsync(discard, stopping).ConfigureAwait(false);
                }
                catch
                {
                    Release(refused);
                    throw;
                }
                if (!discarded)
                {
                    _logger.LogInformation("Client of export {Export} disconnected in the middle of a refused write payload", _export.Info.Name);
                    Release(refused);
                    return;
                }
                Start(refused);
                FlushBatch();
                continue;
            }
            if (oversized > 0)
            {
                _logger.LogWarning("Client of export {Export} sent a {Length}-byte write, more than the {Limit} bytes the server skips: disconnecting",
                    _export.Info.Name, oversized, NbdLimits.MaxDiscard);
                return;
            }
            if (disconnect)
            {
                _logger.LogDebug("Client of export {Export} sent NBD_CMD_DISC", _export.Info.Name);
                return;
            }
            if (result.IsCompleted)
            {
                if (leftover)
                {
                    _logger.LogInformation("Client of export {Export} disconnected in the middle of a request", _export.Info.Name);
                }
                return;
            }
        }
    }

    /// <summary>
    /// True on the runtime's socket (epoll) threads, where socket completions run inline
    /// (<c>DOTNET_SYSTEM_NET_SOCKETS_INLINE_COMPLETIONS</c>): the loop is then running on a
    /// thread every other connection on that thread waits for.
    /// </summary>
    private static bool OnSocketThread => !Thread.CurrentThread.IsThreadPoolThread;

    /// <summary>
    /// How long one connection's loop keeps a socket thread while its client has more requests
    /// waiting. Unbounded, a client that streams (1 MiB writes QD8) never lets the loop's read go
    /// pending, and the other connections on that thread wait for the whole stream: a reader beside
    /// such a writer waited 19.8 s (ops/bench-hol). Each time the budget runs out the loop moves
    /// to the pool, which costs: 4 KiB random I/O QD32 lost 5-16 % at 200 µs and 1 ms
    /// (ops/bench-ab), nothing measurable at 5 ms.
    /// </summary>
    private static readonly long SocketThreadBudget = System.Diagnostics.Stopwatch.Frequency / 200; // 5 ms

    private long _socketThreadSince;

    private bool ExceededSocketThreadBudget()
    {
        long now = System.Diagnostics.Stopwatch.GetTimestamp();
        if (_socketThreadSince == 0)
        {
            _socketThreadSince = now;
            return false;
        }
        if (now - _socketThreadSince < SocketThreadBudget)
        {
            return false;
        }
        _socketThreadSince = 0;
        return true;
    }

    /// <summary>
    /// Checks a request before it runs (proto.md "Request types" and "Error values"):
    /// unknown commands and flags EINVAL, writes to a read-only export EPERM, writes beyond the
    /// end ENOSPC, other requests beyond the end EINVAL, zero or over-limit lengths EINVAL.
    /// With extended headers a WRITE may carry NBD_CMD_FLAG_PAYLOAD_LEN, BLOCK_STATUS may (its
    /// payload form), and any other command with a payload is EINVAL once the payload is skipped.
    /// </summary>
    public NbdError Validate(in NbdRequest request)
    {
        ExportInfo info = _export.Info;
        CommandFlags allowed;
        bool isWrite = false;
        ulong effect = request.Length;
        switch (request.Command)
        {
            case NbdCommand.Read:
                allowed = CommandFlags.Fua | (Structured ? CommandFlags.DontFragment : 0);
                break;
            case NbdCommand.Write:
                allowed = CommandFlags.Fua | (Extended ? CommandFlags.PayloadLen : 0);
                isWrite = true;
                break;
            case NbdCommand.Flush:
                return (request.Flags & ~CommandFlags.Fua) != 0 ? NbdError.Inval : NbdError.None;
            case NbdCommand.Trim:
                allowed = CommandFlags.Fua;
                isWrite = true;
                break;
            case NbdCommand.WriteZeroes:
                allowed = CommandFlags.Fua | CommandFlags.NoHole | CommandFlags.FastZero;
                isWrite = true;
                break;
            case NbdCommand.Cache:
                allowed = CommandFlags.Fua;
                break;
            case NbdCommand.BlockStatus:
                if (!Structured || _contexts.Length == 0)
                {
                    return NbdError.Inval;
                }
                allowed = CommandFlags.ReqOne | CommandFlags.Fua | (Extended ? CommandFlags.PayloadLen : 0);
                if (request.Flags.HasFlag(CommandFlags.PayloadLen))
                {
                    // The effect length is in the payload, checked when the payload is in.
                    return (request.Flags & ~allowed) != 0 || request.Length > MaxBlockStatusPayload ? NbdError.Inval : NbdError.None;
                }
                break;
            default:
                return NbdError.Inval;
        }

        if ((request.Flags & ~allowed) != 0)
        {
            return NbdError.Inval;
        }
        if (isWrite && info.ReadOnly)
        {
            return NbdError.Perm;
        }
        if (request.Length == 0)
        {
            return NbdError.Inval;
        }
        if (request.Command is NbdCommand.Read or NbdCommand.Write && request.Length > NbdLimits.MaxPayload)
        {
            return NbdError.Inval;
        }
        if (request.Offset > (ulong)info.Size || effect > (ulong)info.Size - request.Offset)
        {
            return request.Command is NbdCommand.Write or NbdCommand.WriteZeroes ? NbdError.NoSpc : NbdError.Inval;
        }
        return NbdError.None;
    }

    private RequestWork Rent(in NbdRequest request, NbdError error, long bytes)
    {
        if (!_pool.TryDequeue(out RequestWork? work))
        {
            work = new RequestWork(this);
        }
        work.Reset(request, error, bytes);
        _metrics?.RequestStarted();
        Interlocked.Increment(ref _inFlight);
        Interlocked.Add(ref _inFlightBytes, bytes);
        return work;
    }

    /// <summary>
    /// Runs a request: refused ones and those the device serves without blocking finish here, on
    /// the reader's thread, and go to the writer together when the reader has parsed all it has;
    /// the rest run on the thread pool.
    /// </summary>
    private void Start(RequestWork work)
    {
        if (work.Error != NbdError.None || (_nonBlocking is not null && work.TryCompleteInline(_nonBlocking)))
        {
            work.Next = _batch;
            _batch = work;
        }
        else if (_forwarding is { IsRemote: true } forwarding)
        {
            // Forwarded to the owner: the request only has to be written to the peer stream
            // (no blocking I/O here), and its reply completes it on the stream's reader. The
            // stream is corked until the batch is parsed, so the batch goes in one write.
            _corked ??= forwarding.Cork();
            work.Execute();
        }
        else
        {
            ThreadPool.UnsafeQueueUserWorkItem(work, preferLocal: false);
        }
    }

    private void FlushBatch()
    {
        if (_corked is { } corked)
        {
            _corked = null;
            corked.Uncork();
        }
        if (_batch is RequestWork head)
        {
            _batch = null;
            EnqueueNow(head);
        }
    }

    /// <summary>
    /// Called by a request (or the head of a batch) when its reply is ready. On a loop that
    /// answers many requests in a row (the peer stream's reader) the reply waits for the others
    /// from the same receive (<see cref="DeferredReplies"/>), so the client gets them in one send.
    /// </summary>
    internal void Enqueue(RequestWork work)
    {
        if (!DeferredReplies.TryHold(this, work))
        {
            EnqueueNow(work);
        }
    }

    /// <summary>Hands a request (or a chain linked by <see cref="RequestWork.Next"/>) to the writer.</summary>
    internal void EnqueueNow(RequestWork work)
    {
        if (!_replies.Writer.TryWrite(work))
        {
            // The writer has gone (socket broken): nobody will send these replies.
            ReleaseChain(work);
        }
    }

    private void ReleaseChain(RequestWork? work)
    {
        while (work is not null)
        {
            RequestWork? next = work.Next;
            work.Next = null;
            Release(work);
            work = next;
        }
    }

    private void Release(RequestWork work)
    {
        long bytes = work.Bytes;
        _metrics?.RequestDone(work.Request.Command, work.Error, bytes, work.StartTimestamp);
        work.ReturnBuffers();
        _pool.Enqueue(work);
        Interlocked.Add(ref _inFlightBytes, -bytes);
        if (Interlocked.Decrement(ref _inFlight) == 0 && _draining)
        {
            _drained.TrySetResult();
        }
        Interlocked.Exchange(ref _capacityWaiter, null)?.TrySetResult();
    }

    private async Task WaitForCapacityAsync(long bytes, CancellationToken stopping)
    {
        // A single request larger than the budget still runs once the connection is idle.
        while (Volatile.Read(ref _inFlight) >= MaxInFlightRequests
            || (Volatile.Read(ref _inFlightBytes) > 0 && Volatile.Read(ref _inFlightBytes) + bytes > MaxInFlightBytes))
        {
            var waiter = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            Volatile.Write(ref _capacityWaiter, waiter);
            if (Volatile.Read(ref _inFlight) < MaxInFlightRequests
                && (Volatile.Read(ref _inFlightBytes) == 0 || Volatile.Read(ref _inFlightBytes) + bytes <= MaxInFlightBytes))
            {
                break;
            }
            await waiter.Task.WaitAsync(stopping).ConfigureAwait(false);
        }
    }

    private async Task DrainAsync()
    {
        _draining = true;
        // A full fence between the store and the load: Release decrements, then reads _draining;
        // without it the store can still sit in this core's store buffer while the load runs
        // (x86 reorders a store with a later load), both sides miss and _drained never fires.
        Interlocked.MemoryBarrier();
        if (Volatile.Read(ref _inFlight) != 0)
        {
            await _drained.Task.ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Reads the rest of a write payload straight from the stream into its buffer: the pipe has
    /// nothing unconsumed at this point (the caller took all it held), and it reads from the
    /// stream only when asked, so this skips a copy through the pipe for large writes.
    /// </summary>
    private async Task<bool> FillPayloadAsync(RequestWork work, int filled, CancellationToken stopping)
    {
        int missing = (int)work.Request.Length - filled;
        int read = await _direct.ReadAtLeastAsync(work.Buffer.AsMemory(filled, missing), missing, throwOnEndOfStream: false, stopping).ConfigureAwait(false);
        return read == missing;
    }

    private async Task<bool> DiscardAsync(long count, CancellationToken stopping)
    {
        while (count > 0)
        {
            ReadResult result = await _input.ReadAsync(stopping).ConfigureAwait(false);
            long take = Math.Min(result.Buffer.Length, count);
            _input.AdvanceTo(result.Buffer.GetPosition(take));
            count -= take;
            if (count > 0 && result.IsCompleted)
            {
                return false;
            }
        }
        return true;
    }

    private async Task WriteLoopAsync()
    {
        ChannelReader<RequestWork> reader = _replies.Reader;
        try
        {
            while (await reader.WaitToReadAsync().ConfigureAwait(false))
            {
                while (reader.TryRead(out RequestWork? head))
                {
                    for (RequestWork? work = head; work is not null;)
                    {
                        RequestWork? next = work.Next;
                        work.Next = null;
                        try
                        {
                            ValueTask written = work.WriteReplyAsync(_output, _direct);
                            if (!written.IsCompletedSuccessfully)
                            {
                                await written.ConfigureAwait(false);
                            }
                        }
                        catch
                        {
                            ReleaseChain(next);
                            throw;
                        }
                        finally
                        {
                            Release(work);
                        }
                        work = next;
                    }
                    if (_output.UnflushedBytes >= 1024 * 1024)
                    {
                        await _output.FlushAsync().ConfigureAwait(false);
                    }
                }
                FlushResult flushed = await _output.FlushAsync().ConfigureAwait(false);
                if (flushed.IsCompleted)
                {
                    break;
                }
            }
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or InvalidOperationException)
        {
            _logger.LogInformation("Replies to a client of export {Export} could not be sent: {Reason}", _export.Info.Name, e.Message);
        }
        finally
        {
            // Stop the reader, and release whatever is still queued or still to come.
            _replies.Writer.TryComplete();
            _aborted.Cancel();
            while (reader.TryRead(out RequestWork? work))
            {
                ReleaseChain(work);
            }
        }
    }

    /// <summary>Maps a backend failure to the NBD error the spec names for it.</summary>
    public static NbdError ToNbdError(Exception exception) => exception switch
    {
        BlockDeviceException { Kind: BlockErrorKind.InvalidArgument } => NbdError.Inval,
        BlockDeviceException { Kind: BlockErrorKind.NoSpace } => NbdError.NoSpc,
        BlockDeviceException { Kind: BlockErrorKind.ReadOnly } => NbdError.Perm,
        BlockDeviceException { Kind: BlockErrorKind.NotSupported } => NbdError.NotSup,
        BlockDeviceException { Kind: BlockErrorKind.Shutdown } => NbdError.Shutdown,
        OperationCanceledException or ObjectDisposedException => NbdError.Shutdown,
        _ => NbdError.Io,
    };

    internal void LogFailure(in NbdRequest request, Exception exception)
    {
        // Once per distinct failure and minute (IoFailureLog): a retrying guest must not flood the log.
        if (!IoFailureLog.ShouldLog(_export.Info.Name, exception.Message, out long repeats))
        {
            return;
        }
        if (repeats == 0)
        {
            _logger.LogWarning(exception, "{Command} at {Offset}+{Length} on export {Export} failed", request.Command, request.Offset, request.Length, _export.Info.Name);
        }
        else
        {
            _logger.LogWarning("{Command} at {Offset}+{Length} on export {Export} failed: {Reason} ({Repeats} more requests failed the same way in the last minute)",
                request.Command, request.Offset, request.Length, _export.Info.Name, exception.Message, repeats);
        }
    }
}

/// <summary>Where a read finds its holes (<see cref="Transmission.HolesOf"/>).</summary>
internal enum ReadHoles
{
    /// <summary>Not looked for: the read is one data chunk (or a simple reply).</summary>
    None,

    /// <summary>From the device's allocation, asked before the read.</summary>
    FromAllocation,

    /// <summary>From the read itself (<see cref="ISegmentedReads"/>): the owner's holes, passed on.</summary>
    FromSegments,
}
