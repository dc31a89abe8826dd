using System.Buffers;
using System.Collections.Concurrent;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Text;
using System.Threading.Tasks.Sources;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Actors.Tls;
using Gateway.Backends;

namespace Gateway.Actors.Cluster;

/// <summary>
/// The NBD client end of the data stream from a node to the node that owns an export: a fixed
/// newstyle handshake (proto.md "Newstyle negotiation"), then the transmission phase with many
/// requests in flight, matched to their replies by cookie (proto.md "Transmission phase").
/// <para>
/// Requests go out through one sender at a time: a caller that finds the sender idle becomes it
/// and writes its header (and a small payload) with the headers queued behind it in one send, so
/// concurrent callers share syscalls instead of queueing on a lock. Replies come in on one reader
/// loop that parses headers from a receive buffer and receives data chunks straight into the
/// caller's memory (bytes that arrived in the same receive as their header are copied, and so is
/// the rest of a small chunk, received with what follows it). The replies it answers in a row go
/// to a forwarding node's clients together, when it receives again (<see cref="DeferredReplies"/>).
/// Every frame is laid out by Gateway.Nbd's readers and writers, the reply readers working on a
/// view of the receive buffer; this class owns the sockets, the pipelining and the buffers.
/// </para>
/// <para>
/// When the connection ends for any reason (EOF, reset, a protocol violation by the server,
/// disposal) every request in flight and every later one fails with
/// <see cref="BlockErrorKind.Shutdown"/>. A caller's cancellation never touches the stream: a
/// request not yet sent is dropped, one already sent has its reply read and thrown away.
/// </para>
/// </summary>
public sealed class PeerNbdClient : IRequestBatch, IAsyncDisposable
{
    private const int ReceiveBufferSize = 64 * 1024;
    private const int SendBufferSize = 64 * 1024;

    /// <summary>Write payloads up to this are copied next to their header (one send); larger ones are sent from the caller's memory.</summary>
    private const int InlinePayloadLimit = 16 * 1024;

    /// <summary>Trim, zero and cache longer than this are split: the length field is 32 bits.</summary>
    private const long MaxCommandLength = 1L << 30;

    /// <summary>Largest option reply accepted during the handshake (strings are at most 4 KiB).</summary>
    private const int MaxOptionReply = 64 * 1024;

    /// <summary>How long disposal waits for NBD_CMD_DISC to go out, and for the reader to stop.</summary>
    private static readonly TimeSpan DisconnectPatience = TimeSpan.FromSeconds(2);

    private readonly Socket _socket;

    /// <summary>The socket's stream, or TLS over it (cluster TLS): every byte goes through it.</summary>
    private readonly Stream _stream;
    private readonly TransmissionFlags _flags;
    private readonly bool _structured;
    /// <summary>Extended headers (proto.md "Extended headers"): 32-byte requests, every reply a 32-byte chunk header.</summary>
    private readonly bool _extended;
    private readonly int _requestHeaderSize;
    private readonly int _chunkHeaderSize;
    private readonly int _maxPayload;
    private readonly string[] _contextNames;
    private readonly uint[] _contextIds;
    private readonly ConcurrentQueue<PendingRequest> _pool = new();
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Task _readLoop;

    // Requests on the wire (or about to be), by cookie. The reader is the only one that removes a
    // sent request; failure is decided under this lock, so no request is added after the drain.
    private readonly Lock _pendingLock = new();
    private readonly Dictionary<ulong, PendingRequest> _pending = [];
    private ulong _nextCookie;
    private bool _closed;
    private string? _failure;
    private Exception? _failureCause;
    private volatile bool _broken;

    // The send queue, and whether some thread is the sender now.
    private readonly Lock _sendLock = new();
    private PendingRequest? _sendHead;
    private PendingRequest? _sendTail;
    private bool _sending;
    private bool _corked;
    private bool _disconnectSent;
    private readonly byte[] _sendBuffer = new byte[SendBufferSize];

    // The reader's receive buffer: bytes [_rxStart, _rxEnd) are received and not yet parsed.
    private readonly byte[] _rx = new byte[ReceiveBufferSize];
    private int _rxStart;
    private int _rxEnd;
    private PendingRequest? _claimed;
    private long _requestsCreated;

    private PeerNbdClient(Socket socket, Stream stream, ExportInfo info, TransmissionFlags flags, bool structured, bool extended, int maxPayload,
        List<(string Name, uint Id)> contexts)
    {
        _socket = socket;
        _stream = stream;
        Info = info;
        _flags = flags;
        _structured = structured;
        _extended = extended;
        _requestHeaderSize = NbdRequest.HeaderSize(extended);
        _chunkHeaderSize = extended ? NbdWire.ExtendedReplyHeaderSize : NbdWire.StructuredReplyHeaderSize;
        _maxPayload = maxPayload;
        _contextNames = [.. contexts.Select(c => c.Name)];
        _contextIds = [.. contexts.Select(c => c.Id)];
        MetaContexts = _contextNames;
        _readLoop = ReadLoopAsync();
    }

    /// <summary>The export as the owner describes it in its NBD_OPT_GO reply.</summary>
    public ExportInfo Info { get; }

    /// <summary>The transmission flags the owner advertised for the export (proto.md "Transmission flags"): the CSI node reads NBD_FLAG_CAN_MULTI_CONN from them.</summary>
    public TransmissionFlags TransmissionFlags => _flags;

    /// <summary>The metadata contexts selected on this connection (all the owner offers under <c>base:</c> and <c>qemu:</c>).</summary>
    public IReadOnlyList<string> MetaContexts { get; }

    /// <summary>The owner accepted NBD_OPT_EXTENDED_HEADERS: requests and replies use the extended headers.</summary>
    public bool ExtendedHeaders => _extended;

    /// <summary>True once the connection failed or was disposed: every request fails with Shutdown.</summary>
    public bool IsBroken => _broken;

    /// <summary>Completes when the connection has ended, for whatever reason, and every request in flight has failed.</summary>
    public Task Completion => _completion.Task;

    /// <summary>Requests waiting for their reply (tests: nothing may be left behind).</summary>
    internal int InFlight
    {
        get
        {
            lock (_pendingLock)
            {
                return _pending.Count;
            }
        }
    }

    /// <summary>Request objects ever created (tests: they are pooled, not made per request).</summary>
    internal long RequestsCreated => Interlocked.Read(ref _requestsCreated);

    /// <summary>OFFSET_HOLE chunks received (tests: sparse reads came back as holes).</summary>
    internal long HoleChunks { get; private set; }

    // ---------------------------------------------------------------- handshake

    /// <summary>Unacknowledged data older than this breaks the stream (TCP_USER_TIMEOUT).</summary>
    // Long enough for an owner whose backend stalls (its window stays shut while it is at its
    // in-flight limit) not to be taken for dead; cluster failover re-homes the export meanwhile.
    private static readonly TimeSpan DeadOwnerTimeout = TimeSpan.FromSeconds(30);

    /// <summary>
    /// An owner whose machine vanished sends no reset: without these the stream would wait for
    /// TCP's own timeouts (minutes) and requests in flight would hang instead of failing, so the
    /// link could look for the new owner. Keepalive probes cover an idle stream.
    /// </summary>
    private static void DetectDeadOwner(Socket socket)
    {
        socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, 5);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, 1);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, 5);
        if (OperatingSystem.IsLinux())
        {
            const int IpProtoTcp = 6, TcpUserTimeout = 18;
            socket.SetRawSocketOption(IpProtoTcp, TcpUserTimeout, BitConverter.GetBytes((int)DeadOwnerTimeout.TotalMilliseconds));
        }
    }

    /// <summary>
    /// Connects and negotiates: fixed newstyle with NO_ZEROES, structured replies, every metadata
    /// context under <c>base:</c> and <c>qemu:</c>, then NBD_OPT_GO.
    /// </summary>
    /// <exception cref="PeerExportUnavailableException">The node does not serve the export (NBD_REP_ERR_UNKNOWN).</exception>
    /// <exception cref="IOException">The peer broke the handshake, refused the export otherwise, or closed.</exception>
    /// <exception cref="SocketException">The connection failed.</exception>
    public static Task<PeerNbdClient> ConnectAsync(EndPoint endpoint, string exportName, CancellationToken cancellationToken) =>
        ConnectAsync(endpoint, exportName, tls: null, cancellationToken);

    /// <summary>
    /// As <see cref="ConnectAsync(EndPoint, string, CancellationToken)"/>; with <paramref name="tls"/>
    /// (cluster TLS), the TLS handshake comes first: this node presents its certificate and the
    /// owner's must chain to the cluster CA.
    /// </summary>
    /// <exception cref="System.Security.Authentication.AuthenticationException">The TLS handshake failed.</exception>
    /// <param name="extendedHeaders">Ask for extended headers (false: structured replies at most; tests of both wire forms).</param>
    public static async Task<PeerNbdClient> ConnectAsync(EndPoint endpoint, string exportName, TlsCredentials? tls, CancellationToken cancellationToken, bool extendedHeaders = true)
    {
        ArgumentNullException.ThrowIfNull(endpoint);
        ArgumentNullException.ThrowIfNull(exportName);
        Socket socket = endpoint switch
        {
            UnixDomainSocketEndPoint => new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified),
            // Dual mode: the name may resolve to IPv4 or IPv6.
            DnsEndPoint => new Socket(SocketType.Stream, ProtocolType.Tcp),
            _ => new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp),
        };
        Stream? stream = null;
        try
        {
            if (socket.ProtocolType == ProtocolType.Tcp)
            {
                socket.NoDelay = true;
                DetectDeadOwner(socket);
            }
            await socket.ConnectAsync(endpoint, cancellationToken).ConfigureAwait(false);
            stream = new NetworkStream(socket, ownsSocket: false);
            if (tls is not null)
            {
                // Many TLS records per receive (ReadAheadStream): replies are mostly bulk read data.
                var secure = new SslStream(new ReadAheadStream(stream), leaveInnerStreamOpen: false);
                stream = secure;
                string host = endpoint is DnsEndPoint dns ? dns.Host : endpoint.ToString() ?? "peer";
                await secure.AuthenticateAsClientAsync(tls.ClientOptions(host), cancellationToken).ConfigureAwait(false);
            }
            return await HandshakeAsync(socket, stream, endpoint, exportName, extendedHeaders, cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            stream?.Dispose();
            socket.Dispose();
            throw;
        }
    }

    private static async Task<PeerNbdClient> HandshakeAsync(Socket socket, Stream stream, EndPoint endpoint, string exportName, bool extendedHeaders, CancellationToken cancellationToken)
    {
        try
        {
            return await NegotiateAsync(socket, stream, endpoint, exportName, extendedHeaders, cancellationToken).ConfigureAwait(false);
        }
        catch (NbdProtocolException e)
        {
            throw new IOException($"{endpoint} broke the NBD handshake: {e.Message}", e);
        }
    }

    private static async Task<PeerNbdClient> NegotiateAsync(Socket socket, Stream stream, EndPoint endpoint, string exportName, bool extendedHeaders, CancellationToken cancellationToken)
    {
        byte[] greeting = new byte[NbdWire.GreetingSize];
        await ReceiveExactlyAsync(stream, greeting, cancellationToken).ConfigureAwait(false);
        var greetingBytes = new ReadOnlySequence<byte>(greeting);
        HandshakeFlags handshake;
        try
        {
            Handshake.TryReadGreeting(ref greetingBytes, out handshake);
        }
        catch (NbdProtocolException e)
        {
            throw new IOException($"{endpoint} is not an NBD server speaking the newstyle handshake", e);
        }
        if (!handshake.HasFlag(HandshakeFlags.FixedNewstyle))
        {
            throw new IOException($"NBD server {endpoint} does not speak fixed newstyle");
        }
        // NO_ZEROES only if offered (proto.md "Client flags").
        ClientFlags clientFlags = ClientFlags.FixedNewstyle | (handshake.HasFlag(HandshakeFlags.NoZeroes) ? ClientFlags.NoZeroes : 0);
        int flagsLength = Handshake.WriteClientFlags(greeting, clientFlags);
        await SendAllAsync(stream, greeting.AsMemory(0, flagsLength), cancellationToken).ConfigureAwait(false);

        // Extended headers first: they include structured replies, and a client that has them must
        // not ask for structured replies as well (proto.md "NBD_OPT_EXTENDED_HEADERS"). A refusal
        // leaves structured replies to ask for; ERR_UNSUP (or any refusal) of those, simple replies
        // and no metadata.
        bool extended = extendedHeaders && await AcceptedAsync(stream, endpoint, NbdOption.ExtendedHeaders, cancellationToken).ConfigureAwait(false);
        bool structured = extended || await AcceptedAsync(stream, endpoint, NbdOption.StructuredReply, cancellationToken).ConfigureAwait(false);

        var contexts = new List<(string Name, uint Id)>();
        if (structured)
        {
            // LIST with namespace queries finds every context; SET takes exact names (as qemu-nbd does).
            List<string> offered = await MetaContextAsync(stream, endpoint, NbdOption.ListMetaContext, exportName, ["base:", "qemu:"], null, cancellationToken).ConfigureAwait(false);
            if (offered.Count > 0)
            {
                await MetaContextAsync(stream, endpoint, NbdOption.SetMetaContext, exportName, [.. offered], contexts, cancellationToken).ConfigureAwait(false);
            }
        }

        var go = new InfoRequest(exportName, [InfoType.Description, InfoType.BlockSize]);
        byte[] goOption = Option(NbdOption.Go, go.Size);
        InfoRequest.Write(goOption.AsSpan(NbdWire.OptionHeaderSize), go);
        await SendAllAsync(stream, goOption, cancellationToken).ConfigureAwait(false);

        InfoExport? export = null;
        string? description = null;
        int maxPayload = NbdLimits.MaxPayload;
        while (true)
        {
            (OptionReplyHeader reply, byte[] data) = await ReadOptionReplyAsync(stream, NbdOption.Go, cancellationToken).ConfigureAwait(false);
            if (reply.Type == OptionReplyType.Ack)
            {
                break;
            }
            if (reply.Type == OptionReplyType.ErrUnknown)
            {
                throw new PeerExportUnavailableException($"{endpoint} does not serve export '{exportName}': {Encoding.UTF8.GetString(data)}");
            }
            if (reply.IsError)
            {
                throw new IOException($"{endpoint} refused export '{exportName}' with {reply.Type}: {Encoding.UTF8.GetString(data)}");
            }
            if (reply.Type != OptionReplyType.Info)
            {
                throw new IOException($"{endpoint} answered GO with {reply.Type} ({data.Length} bytes)");
            }
            switch (InfoReply.ReadType(data))
            {
                case InfoType.Export:
                    export = InfoReply.ReadExport(data);
                    break;
                case InfoType.Description:
                    description = InfoReply.ReadText(data);
                    break;
                case InfoType.BlockSize:
                    // No payload over the maximum (or NbdLimits.MaxPayload).
                    maxPayload = (int)Math.Clamp(InfoReply.ReadBlockSize(data).Maximum, 4096u, (uint)NbdLimits.MaxPayload);
                    break;
            }
        }
        if (export is not { } exported || exported.Size > long.MaxValue)
        {
            throw new IOException($"{endpoint} ended GO for '{exportName}' without NBD_INFO_EXPORT");
        }

        TransmissionFlags flags = exported.Flags;
        var capabilities = BlockCapabilities.None;
        if (flags.HasFlag(TransmissionFlags.SendTrim)) capabilities |= BlockCapabilities.Trim;
        if (flags.HasFlag(TransmissionFlags.SendWriteZeroes)) capabilities |= BlockCapabilities.Zero;
        if (flags.HasFlag(TransmissionFlags.SendFastZero)) capabilities |= BlockCapabilities.FastZero;
        if (flags.HasFlag(TransmissionFlags.SendCache)) capabilities |= BlockCapabilities.Cache;
        if (flags.HasFlag(TransmissionFlags.SendFlush)) capabilities |= BlockCapabilities.Flush;
        var info = new ExportInfo(exportName, description, (long)exported.Size, flags.HasFlag(TransmissionFlags.ReadOnly), capabilities);
        return new PeerNbdClient(socket, stream, info, flags, structured, extended, maxPayload, contexts);
    }

    /// <summary>An option without data that the server acknowledges or refuses (any error reply).</summary>
    private static async Task<bool> AcceptedAsync(Stream stream, EndPoint endpoint, NbdOption option, CancellationToken cancellationToken)
    {
        await SendAllAsync(stream, Option(option, 0), cancellationToken).ConfigureAwait(false);
        (OptionReplyHeader reply, _) = await ReadOptionReplyAsync(stream, option, cancellationToken).ConfigureAwait(false);
        if (reply.Type != OptionReplyType.Ack && !reply.IsError)
        {
            throw new IOException($"NBD server {endpoint} answered {option} with {reply.Type}");
        }
        return reply.Type == OptionReplyType.Ack;
    }

    /// <summary>
    /// LIST_META_CONTEXT (returns the names) or SET_META_CONTEXT (fills <paramref name="selected"/>).
    /// A refusal other than ERR_UNKNOWN just means no metadata on this connection.
    /// </summary>
    private static async Task<List<string>> MetaContextAsync(Stream stream, EndPoint endpoint, NbdOption option, string exportName,
        string[] queries, List<(string Name, uint Id)>? selected, CancellationToken cancellationToken)
    {
        var request = new MetaContextRequest(exportName, queries);
        byte[] message = Option(option, request.Size);
        MetaContextRequest.Write(message.AsSpan(NbdWire.OptionHeaderSize), request);
        await SendAllAsync(stream, message, cancellationToken).ConfigureAwait(false);

        var names = new List<string>();
        while (true)
        {
            (OptionReplyHeader header, byte[] reply) = await ReadOptionReplyAsync(stream, option, cancellationToken).ConfigureAwait(false);
            switch (header.Type)
            {
                case OptionReplyType.Ack:
                    return names;
                case OptionReplyType.ErrUnknown:
                    throw new PeerExportUnavailableException($"{endpoint} does not serve export '{exportName}': {Encoding.UTF8.GetString(reply)}");
                case OptionReplyType.MetaContext:
                    // The id is 0 in answer to LIST.
                    MetaContextReply context = MetaContextReply.Read(reply);
                    if (context.Name.Length == 0)
                    {
                        throw new IOException($"{endpoint} answered {option} with a context without a name");
                    }
                    if (!names.Contains(context.Name))
                    {
                        names.Add(context.Name);
                        selected?.Add((context.Name, context.Id));
                    }
                    break;
                case var _ when header.IsError:
                    selected?.Clear();
                    return [];
                default:
                    throw new IOException($"{endpoint} answered {option} with {header.Type} ({reply.Length} bytes)");
            }
        }
    }

    /// <summary>An option with room for its <paramref name="length"/> bytes of data after the header.</summary>
    private static byte[] Option(NbdOption option, int length)
    {
        byte[] message = new byte[NbdWire.OptionHeaderSize + length];
        OptionHeader.Write(message, new OptionHeader(option, (uint)length));
        return message;
    }

    private static async Task<(OptionReplyHeader Header, byte[] Data)> ReadOptionReplyAsync(Stream stream, NbdOption option, CancellationToken cancellationToken)
    {
        byte[] headerBytes = new byte[NbdWire.OptionReplyHeaderSize];
        await ReceiveExactlyAsync(stream, headerBytes, cancellationToken).ConfigureAwait(false);
        var buffer = new ReadOnlySequence<byte>(headerBytes);
        OptionReplyHeader.TryRead(ref buffer, out OptionReplyHeader header);
        if (header.Option != option)
        {
            throw new IOException($"bad option reply (option {header.Option}) to {option}");
        }
        if (header.Length > MaxOptionReply)
        {
            throw new IOException($"option reply of {header.Length} bytes to {option} is over the limit of {MaxOptionReply}");
        }
        byte[] data = new byte[header.Length];
        await ReceiveExactlyAsync(stream, data, cancellationToken).ConfigureAwait(false);
        return (header, data);
    }

    private static async Task ReceiveExactlyAsync(Stream stream, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        while (!buffer.IsEmpty)
        {
            int received = await stream.ReadAsync(buffer, cancellationToken).ConfigureAwait(false);
            if (received == 0)
            {
                throw new EndOfStreamException("the NBD server closed the connection during the handshake");
            }
            buffer = buffer[received..];
        }
    }

    private static async Task SendAllAsync(Stream stream, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) =>
        await stream.WriteAsync(data, cancellationToken).ConfigureAwait(false);

    // ---------------------------------------------------------------- requests

    /// <summary>Reads <paramref name="destination"/>.Length bytes; holes come back as zeros.</summary>
    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        if (offset < 0)
        {
            return Refuse(BlockErrorKind.InvalidArgument, $"negative offset {offset}");
        }
        if (destination.Length > _maxPayload)
        {
            return ReadSplitAsync(offset, destination, cancellationToken);
        }
        if (destination.IsEmpty)
        {
            return Nothing();
        }
        PendingRequest request = Rent(NbdCommand.Read, CommandFlags.None, offset, (uint)destination.Length);
        request.Destination = destination;
        return Submit(request, cancellationToken);
    }

    /// <summary>
    /// Reads <paramref name="destination"/>.Length bytes and returns the owner's holes with the
    /// data (see <see cref="ISegmentedReads.ReadSegmentsAsync"/>): the OFFSET_HOLE chunks of the
    /// reply become hole segments, their bytes left untouched, so a node that forwards the read
    /// passes them on instead of sending zeros as data. Up to (<paramref name="segments"/>.Length
    /// - 1) / 2 holes are kept (the data between them takes the other entries); later ones are
    /// zero-filled and read as data. A read over the owner's maximum payload is split and comes
    /// back as data.
    /// </summary>
    public ValueTask<int> ReadSegmentsAsync(long offset, Memory<byte> destination, Memory<Extent> segments, CancellationToken cancellationToken = default)
    {
        if (offset < 0 || segments.IsEmpty)
        {
            return ValueTask.FromException<int>(new BlockDeviceException(BlockErrorKind.InvalidArgument, $"negative offset {offset} or no room for a segment"));
        }
        if (destination.Length > _maxPayload || destination.IsEmpty)
        {
            return ReadAllDataAsync(offset, destination, segments, cancellationToken);
        }
        PendingRequest request = Rent(NbdCommand.Read, CommandFlags.None, offset, (uint)destination.Length);
        request.Destination = destination;
        request.Segments = segments;
        return SubmitWithResult(request, cancellationToken);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<int> ReadAllDataAsync(long offset, Memory<byte> destination, Memory<Extent> segments, CancellationToken cancellationToken)
    {
        await ReadAsync(offset, destination, cancellationToken).ConfigureAwait(false);
        if (destination.IsEmpty)
        {
            return 0;
        }
        segments.Span[0] = new Extent(destination.Length, ExtentFlags.Data);
        return 1;
    }

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
    {
        if (offset < 0)
        {
            return Refuse(BlockErrorKind.InvalidArgument, $"negative offset {offset}");
        }
        if (source.Length > _maxPayload || (fua && !_flags.HasFlag(TransmissionFlags.SendFua)))
        {
            return WriteSlowAsync(offset, source, fua, cancellationToken);
        }
        if (source.IsEmpty)
        {
            return Nothing();
        }
        PendingRequest request = Rent(NbdCommand.Write, fua ? CommandFlags.Fua : CommandFlags.None, offset, (uint)source.Length);
        request.Payload = source;
        return Submit(request, cancellationToken);
    }

    /// <summary>NBD_CMD_FLUSH; nothing to do (and not allowed to send) when the owner does not offer it, as on a read-only export.</summary>
    public ValueTask FlushAsync(CancellationToken cancellationToken = default) =>
        _flags.HasFlag(TransmissionFlags.SendFlush) ? Submit(Rent(NbdCommand.Flush, CommandFlags.None, 0, 0), cancellationToken) : Nothing();

    public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default)
    {
        if (Info.ReadOnly)
        {
            return Refuse(BlockErrorKind.ReadOnly, $"export '{Info.Name}' is read-only");
        }
        if (!_flags.HasFlag(TransmissionFlags.SendTrim))
        {
            return Refuse(BlockErrorKind.NotSupported, $"the owner of '{Info.Name}' does not offer NBD_CMD_TRIM");
        }
        return Command(NbdCommand.Trim, fua ? CommandFlags.Fua : CommandFlags.None, offset, length, cancellationToken);
    }

    public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default)
    {
        if (Info.ReadOnly)
        {
            return Refuse(BlockErrorKind.ReadOnly, $"export '{Info.Name}' is read-only");
        }
        if (!_flags.HasFlag(TransmissionFlags.SendWriteZeroes))
        {
            return Refuse(BlockErrorKind.NotSupported, $"the owner of '{Info.Name}' does not offer NBD_CMD_WRITE_ZEROES");
        }
        if (flags.HasFlag(ZeroFlags.FastZero) && !_flags.HasFlag(TransmissionFlags.SendFastZero))
        {
            // What FAST_ZERO asks for when zeroing would be slow (proto.md "NBD_CMD_FLAG_FAST_ZERO").
            return Refuse(BlockErrorKind.NotSupported, $"the owner of '{Info.Name}' does not offer fast zeroing");
        }
        var commandFlags = CommandFlags.None;
        if (flags.HasFlag(ZeroFlags.Fua)) commandFlags |= CommandFlags.Fua;
        if (flags.HasFlag(ZeroFlags.NoHole)) commandFlags |= CommandFlags.NoHole;
        if (flags.HasFlag(ZeroFlags.FastZero)) commandFlags |= CommandFlags.FastZero;
        return Command(NbdCommand.WriteZeroes, commandFlags, offset, length, cancellationToken);
    }

    /// <summary>NBD_CMD_CACHE; a prefetch is only advice, so without SEND_CACHE it does nothing.</summary>
    /// <summary>NBD_CMD_CACHE; advice only, so dropped when the owner does not offer it, but still checked against the export's size as a device would.</summary>
    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
        _flags.HasFlag(TransmissionFlags.SendCache) ? Command(NbdCommand.Cache, CommandFlags.None, offset, length, cancellationToken)
        : offset < 0 || length < 0 || offset > Info.Size - length ? Refuse(BlockErrorKind.InvalidArgument, $"CACHE at {offset}+{length} is outside the export's {Info.Size} bytes")
        : Nothing();

    /// <summary>
    /// Every extent of <paramref name="context"/> over [<paramref name="start"/>, <paramref name="end"/>)
    /// in order, the last one clipped at <paramref name="end"/>: <paramref name="visit"/> gets its
    /// offset, length and status. Asks a window at a time and again from where the owner stopped
    /// (it may answer less than asked); an answer that makes no progress is an IOException.
    /// </summary>
    public async Task WalkExtentsAsync(string context, long start, long end, Action<long, long, uint> visit, CancellationToken cancellationToken = default)
    {
        const uint Window = 1u << 30;
        var extents = new MetaExtent[512];
        long offset = start;
        while (offset < end)
        {
            int count = await GetExtentsAsync(context, offset, (uint)Math.Min(end - offset, Window), extents, reqOne: false, cancellationToken).ConfigureAwait(false);
            long before = offset;
            for (int i = 0; i < count && offset < end; i++)
            {
                long length = (long)Math.Min(extents[i].Length, (ulong)(end - offset));
                visit(offset, length, extents[i].Status);
                offset += length;
            }
            if (offset == before)
            {
                throw new IOException($"the owner answered BLOCK_STATUS for '{context}' at {offset} with no progress");
            }
        }
    }

    /// <summary>
    /// NBD_CMD_BLOCK_STATUS for <paramref name="context"/>: fills <paramref name="extents"/> with that
    /// context's descriptors (the owner answers for every selected context; the others are skipped)
    /// and returns how many (at least one).
    /// </summary>
    public ValueTask<int> GetExtentsAsync(string context, long offset, uint length, Memory<MetaExtent> extents, bool reqOne, CancellationToken cancellationToken = default)
    {
        int index = Array.IndexOf(_contextNames, context);
        if (index < 0)
        {
            return ValueTask.FromException<int>(new BlockDeviceException(BlockErrorKind.NotSupported, $"the owner of '{Info.Name}' does not offer metadata context '{context}'"));
        }
        if (offset < 0 || extents.IsEmpty)
        {
            return ValueTask.FromException<int>(new BlockDeviceException(BlockErrorKind.InvalidArgument, "negative offset or no room for an extent"));
        }
        PendingRequest request = Rent(NbdCommand.BlockStatus, reqOne ? CommandFlags.ReqOne : CommandFlags.None, offset, length);
        request.ContextId = _contextIds[index];
        request.Extents = reqOne ? extents[..1] : extents;
        return SubmitWithResult(request, cancellationToken);
    }

    private ValueTask Command(NbdCommand command, CommandFlags flags, long offset, long length, CancellationToken cancellationToken)
    {
        if (offset < 0 || length < 0)
        {
            return Refuse(BlockErrorKind.InvalidArgument, $"negative offset {offset} or length {length}");
        }
        if (flags.HasFlag(CommandFlags.Fua) && !_flags.HasFlag(TransmissionFlags.SendFua))
        {
            return CommandThenFlushAsync(command, flags & ~CommandFlags.Fua, offset, length, cancellationToken);
        }
        if (length > MaxCommandLength)
        {
            return CommandSplitAsync(command, flags, offset, length, cancellationToken);
        }
        return length == 0 ? Nothing() : Submit(Rent(command, flags, offset, (uint)length), cancellationToken);
    }

    private async ValueTask CommandSplitAsync(NbdCommand command, CommandFlags flags, long offset, long length, CancellationToken cancellationToken)
    {
        while (length > 0)
        {
            long piece = Math.Min(length, MaxCommandLength);
            await Submit(Rent(command, flags, offset, (uint)piece), cancellationToken).ConfigureAwait(false);
            offset += piece;
            length -= piece;
        }
    }

    private async ValueTask CommandThenFlushAsync(NbdCommand command, CommandFlags flags, long offset, long length, CancellationToken cancellationToken)
    {
        // FUA not offered: the same durability from a flush after the command.
        await Command(command, flags, offset, length, cancellationToken).ConfigureAwait(false);
        await FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Reads over the owner's maximum payload, one piece at a time.</summary>
    private async ValueTask ReadSplitAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        while (!destination.IsEmpty)
        {
            int piece = Math.Min(destination.Length, _maxPayload);
            await ReadAsync(offset, destination[..piece], cancellationToken).ConfigureAwait(false);
            offset += piece;
            destination = destination[piece..];
        }
    }

    private async ValueTask WriteSlowAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        bool nativeFua = fua && _flags.HasFlag(TransmissionFlags.SendFua);
        while (!source.IsEmpty)
        {
            int piece = Math.Min(source.Length, _maxPayload);
            await WriteAsync(offset, source[..piece], nativeFua, cancellationToken).ConfigureAwait(false);
            offset += piece;
            source = source[piece..];
        }
        if (fua && !nativeFua)
        {
            await FlushAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    private ValueTask Nothing() => _broken ? ValueTask.FromException(Lost()) : ValueTask.CompletedTask;

    private static ValueTask Refuse(BlockErrorKind kind, string message) => ValueTask.FromException(new BlockDeviceException(kind, message));

    private PendingRequest Rent(NbdCommand command, CommandFlags flags, long offset, uint length)
    {
        if (!_pool.TryDequeue(out PendingRequest? request))
        {
            Interlocked.Increment(ref _requestsCreated);
            request = new PendingRequest(this);
        }
        request.Prepare(command, flags, (ulong)offset, length);
        return request;
    }

    private ValueTask Submit(PendingRequest request, CancellationToken cancellationToken)
    {
        Exception? refused = Start(request, cancellationToken, out short version);
        return refused is null ? new ValueTask(request, version) : ValueTask.FromException(refused);
    }

    private ValueTask<int> SubmitWithResult(PendingRequest request, CancellationToken cancellationToken)
    {
        Exception? refused = Start(request, cancellationToken, out short version);
        return refused is null ? new ValueTask<int>(request, version) : ValueTask.FromException<int>(refused);
    }

    /// <summary>Gives the request a cookie and queues it for sending; or says why it cannot go.</summary>
    private Exception? Start(PendingRequest request, CancellationToken cancellationToken, out short version)
    {
        version = request.Version;
        if (cancellationToken.IsCancellationRequested)
        {
            request.Recycle();
            return new OperationCanceledException(cancellationToken);
        }
        lock (_pendingLock)
        {
            if (_closed || _failure is not null)
            {
                request.Recycle();
                return Lost();
            }
            request.Cookie = ++_nextCookie;
            _pending.Add(request.Cookie, request);
        }
        request.Arm(cancellationToken);
        Enqueue(request);
        return null;
    }

    /// <summary>A request cancelled before it was sent leaves the table: the server never sees its cookie.</summary>
    private void ForgetUnsent(PendingRequest request)
    {
        bool removed;
        lock (_pendingLock)
        {
            removed = _pending.Remove(request.Cookie);
        }
        if (removed)
        {
            request.Release();
        }
    }

    private BlockDeviceException Lost()
    {
        string reason;
        Exception? cause;
        lock (_pendingLock)
        {
            // After disposal the owner may close first; the caller still learns why.
            reason = _closed ? "the client was closed" : _failure ?? "unknown";
            cause = _failureCause;
        }
        return new BlockDeviceException(BlockErrorKind.Shutdown, $"connection to the export's owner lost: {reason}", cause);
    }

    private static BlockDeviceException ToException(PendingRequest request, NbdError error, string? message, ulong? offset = null)
    {
        // proto.md "Error values", mapped back to what a local device would have thrown.
        BlockErrorKind kind = error switch
        {
            NbdError.Perm => BlockErrorKind.ReadOnly,
            NbdError.Inval or NbdError.Overflow => BlockErrorKind.InvalidArgument,
            NbdError.NoSpc => BlockErrorKind.NoSpace,
            NbdError.NotSup => BlockErrorKind.NotSupported,
            NbdError.Shutdown => BlockErrorKind.Shutdown,
            _ => BlockErrorKind.Io,
        };
        string name = Enum.IsDefined(error) ? error.ToString() : ((uint)error).ToString(System.Globalization.CultureInfo.InvariantCulture);
        string detail = string.IsNullOrEmpty(message) ? "" : $": {message}";
        string at = offset is { } failedAt ? $" (at {failedAt})" : "";
        return new BlockDeviceException(kind, $"{request.Command} at {request.Offset}+{request.Length} failed on the export's owner with {name}{detail}{at}")
        {
            Offset = offset is { } o && o <= long.MaxValue ? (long)o : null,
        };
    }

    // ---------------------------------------------------------------- sending

    private void Enqueue(PendingRequest request)
    {
        lock (_sendLock)
        {
            if (_sendTail is null)
            {
                _sendHead = request;
            }
            else
            {
                _sendTail.NextToSend = request;
            }
            _sendTail = request;
            if (_sending || _corked)
            {
                return;
            }
            _sending = true;
        }
        // Runs on this thread until a send would block; the caller does not wait for it.
        _ = SendLoopAsync();
    }

    /// <summary>
    /// Holds requests back until <see cref="Uncork"/>, which sends them together: a proxy that
    /// parsed a batch of its client's requests forwards them with one write, not one each.
    /// Only the thread that corked may uncork; any request it starts in between must not wait
    /// for its reply before uncorking.
    /// </summary>
    public void Cork()
    {
        lock (_sendLock)
        {
            _corked = true;
        }
    }

    public void Uncork()
    {
        lock (_sendLock)
        {
            _corked = false;
            if (_sending || _sendHead is null)
            {
                return;
            }
            _sending = true;
        }
        _ = SendLoopAsync();
    }

    private async Task SendLoopAsync()
    {
        bool yielded = false;
        while (true)
        {
            PendingRequest? batch;
            lock (_sendLock)
            {
                batch = _sendHead;
                _sendHead = _sendTail = null;
                if (batch is null)
                {
                    _sending = false;
                    return;
                }
            }
            await SendBatchAsync(batch).ConfigureAwait(false);
            if (!yielded && Volatile.Read(ref _sendHead) is not null)
            {
                // The caller that became the sender has sent its own request: more work goes to the pool.
                yielded = true;
                await Task.Yield();
            }
        }
    }

    /// <summary>
    /// Writes a batch of requests: headers and small payloads gathered in the send buffer, large
    /// payloads straight from the caller's memory. Never throws: a failed send breaks the connection.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask SendBatchAsync(PendingRequest? request)
    {
        int fill = 0;
        PendingRequest? current = null;
        PendingRequest? next = null;
        try
        {
            while (request is not null)
            {
                next = request.NextToSend;
                request.NextToSend = null;
                if (_failure is not null || _disconnectSent || !request.TryStartSend())
                {
                    request.SkipSend();
                    request = next;
                    continue;
                }
                current = request;
                if (fill + _requestHeaderSize > _sendBuffer.Length)
                {
                    await SendAllAsync(_sendBuffer.AsMemory(0, fill)).ConfigureAwait(false);
                    fill = 0;
                }
                fill += new NbdRequest(request.Flags, request.Command, request.Cookie, request.Offset, request.Length).WriteTo(_sendBuffer.AsSpan(fill), _extended);
                ReadOnlyMemory<byte> payload = request.Payload;
                if (request.Command == NbdCommand.Disconnect)
                {
                    // proto.md: nothing may follow NBD_CMD_DISC. Disposal waits for it to be out.
                    _disconnectSent = true;
                    await SendAllAsync(_sendBuffer.AsMemory(0, fill)).ConfigureAwait(false);
                    fill = 0;
                }
                else if (payload.Length > InlinePayloadLimit)
                {
                    await SendAllAsync(_sendBuffer.AsMemory(0, fill)).ConfigureAwait(false);
                    fill = 0;
                    await SendAllAsync(payload).ConfigureAwait(false);
                }
                else if (!payload.IsEmpty)
                {
                    if (fill + payload.Length > _sendBuffer.Length)
                    {
                        // Header already in: send it, the payload follows in the emptied buffer.
                        await SendAllAsync(_sendBuffer.AsMemory(0, fill)).ConfigureAwait(false);
                        fill = 0;
                    }
                    payload.Span.CopyTo(_sendBuffer.AsSpan(fill));
                    fill += payload.Length;
                }
                current = null;
                request.SendDone();
                request = next;
            }
            if (fill > 0)
            {
                await SendAllAsync(_sendBuffer.AsMemory(0, fill)).ConfigureAwait(false);
            }
        }
        catch (Exception e)
        {
            Abort($"sending to the owner failed: {e.Message}", e);
            // Every await in the loop happens with `current` taken from the batch; the rest follows `next`.
            if (current is not null)
            {
                current.SendDone();
                request = next;
            }
            while (request is not null)
            {
                PendingRequest? following = request.NextToSend;
                request.NextToSend = null;
                request.SkipSend();
                request = following;
            }
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask SendAllAsync(ReadOnlyMemory<byte> data) => await _stream.WriteAsync(data).ConfigureAwait(false);

    // ---------------------------------------------------------------- receiving

    private int Buffered => _rxEnd - _rxStart;

    /// <summary>What is received and not yet parsed, for the codec's readers (a view of the receive buffer, no copy).</summary>
    private ReadOnlySequence<byte> Received => new(_rx, _rxStart, Buffered);

    /// <summary>A reader of the codec took what lies before <paramref name="rest"/>.</summary>
    private void Consumed(in ReadOnlySequence<byte> rest) => _rxStart = _rxEnd - (int)rest.Length;

    private async Task ReadLoopAsync()
    {
        string reason = "the owner closed the connection";
        Exception? cause = null;
        try
        {
            while (true)
            {
                // The 32-bit magic tells a simple reply from a chunk.
                if (Buffered < sizeof(uint) && !await FillAsync(sizeof(uint), endAllowed: true).ConfigureAwait(false))
                {
                    break;
                }
                // A server that negotiated structured replies still MAY send simple ones; with
                // extended headers every reply is an extended chunk (the codec checks the magic).
                SimpleReply.TryPeekMagic(Received, out uint magic);
                if (_extended || magic == NbdMagic.StructuredReply)
                {
                    await ChunkAsync().ConfigureAwait(false);
                }
                else if (magic == NbdMagic.SimpleReply)
                {
                    await SimpleReplyAsync().ConfigureAwait(false);
                }
                else
                {
                    throw new NbdProtocolException($"bad reply magic 0x{magic:x8}");
                }
            }
        }
        catch (NbdProtocolException e)
        {
            reason = $"protocol violation: {e.Message}";
            cause = e;
        }
        catch (Exception e)
        {
            reason = e.Message;
            cause = e;
        }
        finally
        {
            DeferredReplies.Flush();
            Abort(reason, cause);
            Drain();
            _completion.TrySetResult();
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask SimpleReplyAsync()
    {
        if (Buffered < NbdWire.SimpleReplyHeaderSize)
        {
            await FillAsync(NbdWire.SimpleReplyHeaderSize).ConfigureAwait(false);
        }
        ReadOnlySequence<byte> buffer = Received;
        SimpleReply.TryRead(ref buffer, out SimpleReply reply);
        Consumed(buffer);
        PendingRequest request = Lookup(reply.Cookie);
        if (reply.Error != NbdError.None)
        {
            request.RecordError(ToException(request, reply.Error, null));
        }
        else if (request.Command == NbdCommand.Read)
        {
            // The read's data follows the header.
            await ReceiveDataAsync(request, 0, (int)request.Length).ConfigureAwait(false);
        }
        else if (request.Command == NbdCommand.BlockStatus)
        {
            throw new NbdProtocolException($"simple reply to BLOCK_STATUS (cookie {reply.Cookie})");
        }
        Finish(request);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ChunkAsync()
    {
        if (Buffered < _chunkHeaderSize)
        {
            await FillAsync(_chunkHeaderSize).ConfigureAwait(false);
        }
        ReadOnlySequence<byte> buffer = Received;
        ChunkHeader.TryRead(ref buffer, _extended, out ChunkHeader chunk);
        Consumed(buffer);
        PendingRequest request = Lookup(chunk.To.Cookie);

        switch (chunk.Type)
        {
            case ReplyType.OffsetData:
                {
                    if (request.Command != NbdCommand.Read)
                    {
                        throw new NbdProtocolException($"OFFSET_DATA of {chunk.Length} bytes in reply to {request.Command}");
                    }
                    DataChunk data = await ReadPayloadAsync<DataChunk>(chunk, ChunkPayload.TryReadOffsetData).ConfigureAwait(false);
                    int at = Place(request, data.Offset, (uint)data.DataLength);
                    // The data stays in the receive buffer for ReceiveDataAsync: received into the caller's memory.
                    await ReceiveDataAsync(request, at, (int)data.DataLength).ConfigureAwait(false);
                    break;
                }
            case ReplyType.OffsetHole:
                {
                    if (request.Command != NbdCommand.Read)
                    {
                        throw new NbdProtocolException($"OFFSET_HOLE of {chunk.Length} bytes in reply to {request.Command}");
                    }
                    HoleChunk hole = await ReadPayloadAsync<HoleChunk>(chunk, ChunkPayload.TryReadOffsetHole).ConfigureAwait(false);
                    int at = Place(request, hole.Offset, hole.Length);
                    // Kept as a hole for a segmented read while there is room; else zeros, as data.
                    if (!request.TryKeepHole(at, hole.Length) && Claim(request))
                    {
                        request.Destination.Span.Slice(at, (int)hole.Length).Clear();
                        Unclaim(request);
                    }
                    request.Covered += hole.Length;
                    HoleChunks++;
                    break;
                }
            // 64-bit descriptors come only with extended headers, and with them only those (proto.md).
            case ReplyType.BlockStatus when !_extended:
            case ReplyType.BlockStatusExt when _extended:
                await BlockStatusChunkAsync(request, chunk).ConfigureAwait(false);
                break;
            case ReplyType.None:
                if (chunk.Length != 0 || !chunk.Done)
                {
                    throw new NbdProtocolException($"NONE chunk of {chunk.Length} bytes without DONE (flags {chunk.Flags})");
                }
                break;
            case var type when ChunkPayload.IsError(type):
                ErrorChunk error = await ReadPayloadAsync<ErrorChunk>(chunk, ChunkPayload.TryReadError).ConfigureAwait(false);
                request.RecordError(ToException(request, error.Error, error.Message, error.Offset));
                break;
            default:
                throw new NbdProtocolException($"unexpected reply chunk type {(ushort)chunk.Type} to {request.Command}");
        }
        if (chunk.Done)
        {
            Finish(request);
        }
    }

    /// <summary>
    /// Receives until <paramref name="read"/> takes the chunk's payload (what it needs of it) from
    /// the receive buffer. The codec checks the chunk's length against its type first, so a length
    /// that does not fit fails here before anything is awaited.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<T> ReadPayloadAsync<T>(ChunkHeader chunk, ChunkPayloadReader<T> read)
    {
        while (true)
        {
            ReadOnlySequence<byte> buffer = Received;
            if (read(ref buffer, chunk, out T payload))
            {
                Consumed(buffer);
                return payload;
            }
            if (Buffered == _rx.Length)
            {
                throw new NbdProtocolException($"{chunk.Type} chunk of {chunk.Length} bytes, more than the receive buffer holds");
            }
            await FillAsync(Buffered + 1).ConfigureAwait(false);
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask BlockStatusChunkAsync(PendingRequest request, ChunkHeader chunk)
    {
        if (request.Command != NbdCommand.BlockStatus)
        {
            throw new NbdProtocolException($"BLOCK_STATUS of {chunk.Length} bytes in reply to {request.Command}");
        }
        // The whole chunk is taken at once: the owner sends at most NbdLimits.MaxExtentsPerReply
        // descriptors in one (8 KiB, 16 KiB with extended headers), well within the receive buffer.
        BlockStatusChunk status = await ReadPayloadAsync<BlockStatusChunk>(chunk, ChunkPayload.TryReadBlockStatus).ConfigureAwait(false);
        // The descriptors are read from the receive buffer, which nothing refills before this returns.
        TakeExtents(request, status);
    }

    private void TakeExtents(PendingRequest request, in BlockStatusChunk status)
    {
        bool mine = status.ContextId == request.ContextId;
        if (mine && request.ContextSeen)
        {
            throw new NbdProtocolException($"two BLOCK_STATUS chunks for context {status.ContextId}");
        }
        if (!mine)
        {
            return;
        }
        int written = 0;
        if (Claim(request))
        {
            Span<MetaExtent> extents = request.Extents.Span;
            foreach (MetaExtent extent in status)
            {
                if (written == extents.Length)
                {
                    break;
                }
                extents[written++] = extent;
            }
            Unclaim(request);
        }
        request.ContextSeen = true;
        request.ExtentCount = written;
    }

    /// <summary>
    /// The segments of a read that kept its holes: the holes in offset order (the owner may send
    /// its chunks in any order, proto.md "Structured reply chunk message"), the data between them.
    /// The chunks covered the read exactly once in all (<see cref="Place"/>); holes that overlap
    /// each other would leave some range both unsent and reported as data, so they break the stream.
    /// </summary>
    private void TakeSegments(PendingRequest request)
    {
        Span<PendingRequest.Hole> holes = request.Holes;
        // Insertion sort: a handful of holes, nearly always in order already.
        for (int i = 1; i < holes.Length; i++)
        {
            PendingRequest.Hole hole = holes[i];
            int j = i - 1;
            for (; j >= 0 && holes[j].At > hole.At; j--)
            {
                holes[j + 1] = holes[j];
            }
            holes[j + 1] = hole;
        }
        int count = 0;
        if (Claim(request))
        {
            Span<Extent> segments = request.Segments.Span;
            long at = 0;
            foreach (PendingRequest.Hole hole in holes)
            {
                if (hole.At < at)
                {
                    Unclaim(request);
                    throw new NbdProtocolException($"hole chunks of the read {request.Offset}+{request.Length} overlap");
                }
                if (hole.At > at)
                {
                    segments[count++] = new Extent(hole.At - at, ExtentFlags.Data);
                }
                if (count > 0 && at == hole.At && segments[count - 1].Flags == ExtentFlags.Hole)
                {
                    segments[count - 1] = new Extent(segments[count - 1].Length + hole.Length, ExtentFlags.Hole);
                }
                else
                {
                    segments[count++] = new Extent(hole.Length, ExtentFlags.Hole);
                }
                at = (long)hole.At + hole.Length;
            }
            if (at < request.Length)
            {
                segments[count++] = new Extent(request.Length - at, ExtentFlags.Data);
            }
            Unclaim(request);
        }
        request.ExtentCount = count;
    }

    /// <summary>Where a read chunk lands in the request's buffer; a chunk outside the request breaks the stream.</summary>
    private static int Place(PendingRequest request, ulong offset, uint length)
    {
        if (offset < request.Offset || offset - request.Offset > request.Length || length > request.Length - (offset - request.Offset))
        {
            throw new NbdProtocolException($"chunk {offset}+{length} outside the read {request.Offset}+{request.Length}");
        }
        if (request.Covered + length > request.Length)
        {
            throw new NbdProtocolException($"chunks of the read {request.Offset}+{request.Length} overlap");
        }
        return (int)(offset - request.Offset);
    }

    /// <summary>Read data into the caller's buffer (or away, if the caller has gone).</summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReceiveDataAsync(PendingRequest request, int at, int length)
    {
        if (Claim(request))
        {
            await ReceiveIntoAsync(request.Destination.Slice(at, length)).ConfigureAwait(false);
            Unclaim(request);
        }
        else
        {
            await DiscardAsync(length).ConfigureAwait(false);
        }
        request.Covered += (uint)length;
    }

    /// <summary>
    /// Takes the right to write into the caller's memory. Fails once the caller has been answered
    /// (cancelled): the data is then thrown away.
    /// </summary>
    private bool Claim(PendingRequest request)
    {
        if (Interlocked.CompareExchange(ref request.ReplyState, PendingRequest.Receiving, PendingRequest.Waiting) != PendingRequest.Waiting)
        {
            return false;
        }
        _claimed = request;
        return true;
    }

    private void Unclaim(PendingRequest request)
    {
        _claimed = null;
        if (Interlocked.CompareExchange(ref request.ReplyState, PendingRequest.Waiting, PendingRequest.Receiving) != PendingRequest.Receiving)
        {
            // Cancelled while we wrote: the caller is answered now that its memory is left alone.
            Volatile.Write(ref request.ReplyState, PendingRequest.Abandoned);
            request.Resolve(request.AbandonReason ?? Lost());
        }
    }

    private PendingRequest Lookup(ulong cookie)
    {
        PendingRequest? request;
        lock (_pendingLock)
        {
            _pending.TryGetValue(cookie, out request);
        }
        if (request is null || !request.WasSent)
        {
            throw new NbdProtocolException($"reply for unknown cookie {cookie}");
        }
        return request;
    }

    /// <summary>The final reply to a request: it leaves the table and its caller is answered.</summary>
    private void Finish(PendingRequest request)
    {
        if (request.Error is null)
        {
            if (request.Command == NbdCommand.Read && request.Covered != request.Length)
            {
                throw new NbdProtocolException($"reply to the read {request.Offset}+{request.Length} covers {request.Covered} bytes");
            }
            if (request.Command == NbdCommand.BlockStatus && !request.ContextSeen)
            {
                throw new NbdProtocolException($"reply to BLOCK_STATUS without the context {request.ContextId}");
            }
            if (request.Command == NbdCommand.Read && !request.Segments.IsEmpty)
            {
                TakeSegments(request);
            }
        }
        lock (_pendingLock)
        {
            _pending.Remove(request.Cookie);
        }
        if (Interlocked.CompareExchange(ref request.ReplyState, PendingRequest.Finished, PendingRequest.Waiting) == PendingRequest.Waiting)
        {
            // The caller's continuation runs here, on the read loop (no thread hop per reply). A
            // forwarded request's reply is held until this loop receives again (ReceiveAsync), so
            // the replies from one receive go to the client together.
            t_resolving = this;
            DeferredReplies.Begin();
            try
            {
                request.Resolve(request.Error);
            }
            finally
            {
                DeferredReplies.End();
                t_resolving = null;
            }
        }
        request.Release();
    }

    /// <summary>
    /// The client whose read loop is answering a request on this thread: a caller that disposes
    /// the client from its continuation (a link closed right after its last reply) must not wait
    /// for the read loop, which goes on only once that continuation returns.
    /// </summary>
    [ThreadStatic]
    private static PeerNbdClient? t_resolving;

    /// <summary>
    /// Every receive of the read loop: the replies answered since the last one go to their
    /// connections' writers first (<see cref="DeferredReplies"/>), so none waits for the owner
    /// and none is held across the await.
    /// </summary>
    private ValueTask<int> ReceiveAsync(Memory<byte> destination)
    {
        DeferredReplies.Flush();
        return _stream.ReadAsync(destination);
    }

    /// <summary>
    /// Makes sure <paramref name="count"/> bytes are buffered. False only when
    /// <paramref name="endAllowed"/> and the stream ended cleanly between replies.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<bool> FillAsync(int count, bool endAllowed = false)
    {
        if (_rxStart > 0)
        {
            // Less than count is buffered (a header, rarely more): moved to the front, the receive
            // gets the whole buffer. Left where it was, replies without data (writes) would walk
            // the buffer to its end and each receive take only what fits behind them.
            Buffer.BlockCopy(_rx, _rxStart, _rx, 0, Buffered);
            _rxEnd = Buffered;
            _rxStart = 0;
        }
        while (Buffered < count)
        {
            int received = await ReceiveAsync(_rx.AsMemory(_rxEnd)).ConfigureAwait(false);
            if (received == 0)
            {
                if (endAllowed && Buffered == 0)
                {
                    return false;
                }
                throw new EndOfStreamException("the owner closed the connection in the middle of a reply");
            }
            _rxEnd += received;
        }
        return true;
    }

    /// <summary>What is buffered is copied; the rest is received straight into <paramref name="destination"/>.</summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReceiveIntoAsync(Memory<byte> destination)
    {
        int take = Math.Min(Buffered, destination.Length);
        _rx.AsSpan(_rxStart, take).CopyTo(destination.Span);
        _rxStart += take;
        destination = destination[take..];
        if (Buffered == 0)
        {
            _rxStart = _rxEnd = 0;
        }
        while (!destination.IsEmpty)
        {
            if (destination.Length <= SmallDataLimit)
            {
                // The rest of a small read's data: received into the buffer with what follows it
                // (the next replies, as a rule), not on its own, one receive for both.
                await FillAsync(destination.Length).ConfigureAwait(false);
                _rx.AsSpan(_rxStart, destination.Length).CopyTo(destination.Span);
                _rxStart += destination.Length;
                return;
            }
            int received = await ReceiveAsync(destination).ConfigureAwait(false);
            if (received == 0)
            {
                throw new EndOfStreamException("the owner closed the connection in the middle of read data");
            }
            destination = destination[received..];
        }
    }

    /// <summary>Read data up to this, not already buffered, goes through the receive buffer (see <see cref="ReceiveIntoAsync"/>).</summary>
    private const int SmallDataLimit = 16 * 1024;

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask DiscardAsync(long count)
    {
        while (true)
        {
            int take = (int)Math.Min(Buffered, count);
            _rxStart += take;
            count -= take;
            if (count == 0)
            {
                return;
            }
            _rxStart = _rxEnd = 0;
            int received = await ReceiveAsync(_rx.AsMemory()).ConfigureAwait(false);
            if (received == 0)
            {
                throw new EndOfStreamException("the owner closed the connection in the middle of read data");
            }
            _rxEnd = received;
        }
    }

    // ---------------------------------------------------------------- ending

    /// <summary>Breaks the connection (first reason wins): no new request starts, the socket closes, the reader drains.</summary>
    private void Abort(string reason, Exception? cause)
    {
        lock (_pendingLock)
        {
            if (_failure is null)
            {
                _failure = reason;
                _failureCause = cause;
            }
        }
        _broken = true;
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            // Already reset or closed.
        }
        _socket.Dispose();
    }

    /// <summary>Fails every request still waiting for a reply; runs on the reader as it stops.</summary>
    private void Drain()
    {
        if (_claimed is PendingRequest claimed)
        {
            // The reader stopped while writing into this caller's memory: it is done with it now.
            _claimed = null;
            Volatile.Write(ref claimed.ReplyState, PendingRequest.Abandoned);
            claimed.Resolve(claimed.AbandonReason ?? Lost());
        }
        PendingRequest[] left;
        lock (_pendingLock)
        {
            left = [.. _pending.Values];
            _pending.Clear();
        }
        foreach (PendingRequest request in left)
        {
            request.Abandon(Lost());
            request.Release();
        }
    }

    /// <summary>
    /// Sends NBD_CMD_DISC after what is already queued (bounded wait), closes the socket and fails
    /// whatever is still waiting for a reply.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        // Read before any await: a caller on the read loop may block on this disposal (sync Dispose).
        bool onReadLoop = t_resolving == this;
        bool first;
        lock (_pendingLock)
        {
            first = !_closed;
            _closed = true;
        }
        _broken = true;
        if (first && Volatile.Read(ref _failure) is null)
        {
            PendingRequest disconnect = Rent(NbdCommand.Disconnect, CommandFlags.None, 0, 0);
            disconnect.PrepareWithoutReply();
            var sent = new ValueTask(disconnect, disconnect.Version);
            Enqueue(disconnect);
            try
            {
                await sent.AsTask().WaitAsync(DisconnectPatience).ConfigureAwait(false);
            }
            catch (TimeoutException)
            {
                // The owner does not take our bytes: close regardless.
            }
        }
        Abort("the client was closed", null);
        try
        {
            if (!onReadLoop)
            {
                await _readLoop.WaitAsync(DisconnectPatience).ConfigureAwait(false);
            }
        }
        catch (TimeoutException)
        {
            // Cannot happen with the socket closed; never hang a disposal on it.
        }
        // The TLS session's native state; the socket under it is already closed.
        await _stream.DisposeAsync().ConfigureAwait(false);
    }

    /// <summary>
    /// One request from submission to the caller's GetResult; pooled per client. Three parties hold
    /// it (the caller, the sender, the pending table) and it returns to the pool when all let go.
    /// The caller is answered when two things are over: the reply (or its abandonment) and the
    /// sender's use of the caller's payload memory.
    /// </summary>
    private sealed class PendingRequest(PeerNbdClient owner) : IValueTaskSource, IValueTaskSource<int>
    {
        // Reply side: who may write into the caller's memory.
        public const int Waiting = 0;
        public const int Receiving = 1;
        public const int ReceivingAbandoned = 2;
        public const int Abandoned = 3;
        public const int Finished = 4;

        // Send side.
        private const int Queued = 0;
        private const int Sending = 1;
        private const int Sent = 2;
        private const int Skipped = 3;

        // Continuations run on the reader: a forwarded request's continuation only hands its
        // reply to the connection's writer, and a thread-pool hop per reply costs the proxy path
        // throughput (ops/bench-cluster). Callers must not block in their continuations.
        private ManualResetValueTaskSourceCore<int> _core = new() { RunContinuationsAsynchronously = false };
        private CancellationTokenRegistration _registration;
        private CancellationToken _token;
        private Exception? _outcome;
        private Exception? _abandonReason;
        private int _holds;
        private int _references;
        private int _sendState;

        public int ReplyState;

        public NbdCommand Command { get; private set; }
        public CommandFlags Flags { get; private set; }
        public ulong Offset { get; private set; }
        public uint Length { get; private set; }
        public ulong Cookie { get; set; }
        public Memory<byte> Destination { get; set; }
        public ReadOnlyMemory<byte> Payload { get; set; }
        public Memory<MetaExtent> Extents { get; set; }

        /// <summary>A segmented read's segments, in the caller's memory; empty for a read whose holes are zeros.</summary>
        public Memory<Extent> Segments { get; set; }
        public uint ContextId { get; set; }
        public int ExtentCount { get; set; }
        public bool ContextSeen { get; set; }
        public long Covered { get; set; }

        /// <summary>The first error the owner reported for this request.</summary>
        public Exception? Error { get; private set; }

        public PendingRequest? NextToSend { get; set; }

        /// <summary>A hole of a segmented read: where it starts in the read, and its length.</summary>
        public readonly record struct Hole(uint At, uint Length);

        // Kept for the life of the pooled request: reused, so a read allocates nothing.
        private Hole[]? _holes;
        private int _holeCount;

        /// <summary>The holes kept so far, in the order they came.</summary>
        public Span<Hole> Holes => _holes.AsSpan(0, _holeCount);

        /// <summary>
        /// Keeps a hole of a segmented read; false when this read's holes are zeros (a plain read,
        /// or no room left in the caller's segments: each hole may need a data segment before it,
        /// and the data after the last one needs one more).
        /// </summary>
        public bool TryKeepHole(int at, uint length)
        {
            if (_holeCount >= (Segments.Length - 1) / 2)
            {
                return false;
            }
            _holes ??= new Hole[MaxKeptHoles];
            if (_holeCount == _holes.Length)
            {
                return false;
            }
            _holes[_holeCount++] = new Hole((uint)at, length);
            return true;
        }

        /// <summary>Holes a segmented read keeps at most; a gateway owner's reply has at most 33 chunks, so at most 17 holes.</summary>
        private const int MaxKeptHoles = 32;

        public short Version => _core.Version;

        /// <summary>Why the caller stopped waiting while the reader was writing into its memory.</summary>
        public Exception? AbandonReason => Volatile.Read(ref _abandonReason);

        public bool WasSent => Volatile.Read(ref _sendState) is Sending or Sent;

        public void Prepare(NbdCommand command, CommandFlags flags, ulong offset, uint length)
        {
            Command = command;
            Flags = flags;
            Offset = offset;
            Length = length;
            ReplyState = Waiting;
            _sendState = Queued;
            _holds = 2;
            _references = 3;
        }

        /// <summary>NBD_CMD_DISC: no reply and no table entry; done once it is sent.</summary>
        public void PrepareWithoutReply()
        {
            _holds = 1;
            _references = 2;
        }

        public void Arm(CancellationToken cancellationToken)
        {
            _token = cancellationToken;
            if (cancellationToken.CanBeCanceled)
            {
                _registration = cancellationToken.UnsafeRegister(static state => ((PendingRequest)state!).Abandon(null), this);
            }
        }

        public void RecordError(Exception error) => Error ??= error;

        public bool TryStartSend() => Interlocked.CompareExchange(ref _sendState, Sending, Queued) == Queued;

        /// <summary>The sender has finished with the caller's payload.</summary>
        public void SendDone()
        {
            Volatile.Write(ref _sendState, Sent);
            ReleaseHold();
            Release();
        }

        /// <summary>The sender drops the request unsent (cancelled, or the connection is gone).</summary>
        public void SkipSend()
        {
            if (Interlocked.CompareExchange(ref _sendState, Skipped, Queued) == Queued)
            {
                ReleaseHold();
            }
            Release();
        }

        /// <summary>
        /// The caller stops waiting (cancellation, or connection loss with <paramref name="reason"/>).
        /// Unsent, the request is dropped; sent, its reply will be read and thrown away. If the
        /// reader is writing into the caller's memory right now, the answer waits until it is done.
        /// </summary>
        public void Abandon(Exception? reason)
        {
            reason ??= new OperationCanceledException(_token);
            if (Interlocked.CompareExchange(ref _sendState, Skipped, Queued) == Queued)
            {
                owner.ForgetUnsent(this);
                ReleaseHold();
            }
            while (true)
            {
                int state = Volatile.Read(ref ReplyState);
                if (state == Waiting)
                {
                    if (Interlocked.CompareExchange(ref ReplyState, Abandoned, Waiting) == Waiting)
                    {
                        Resolve(reason);
                        return;
                    }
                }
                else if (state == Receiving)
                {
                    Interlocked.CompareExchange(ref _abandonReason, reason, null);
                    if (Interlocked.CompareExchange(ref ReplyState, ReceivingAbandoned, Receiving) == Receiving)
                    {
                        return;
                    }
                }
                else
                {
                    return;
                }
            }
        }

        /// <summary>The reply side is over, with <paramref name="error"/> or success.</summary>
        public void Resolve(Exception? error)
        {
            _outcome = error;
            ReleaseHold();
        }

        private void ReleaseHold()
        {
            if (Interlocked.Decrement(ref _holds) == 0)
            {
                if (_outcome is Exception error)
                {
                    _core.SetException(error);
                }
                else
                {
                    _core.SetResult(ExtentCount);
                }
            }
        }

        public void Release()
        {
            if (Interlocked.Decrement(ref _references) == 0)
            {
                Recycle();
            }
        }

        /// <summary>Back to the pool, holding on to no caller memory.</summary>
        public void Recycle()
        {
            _core.Reset();
            _registration = default;
            _token = default;
            _outcome = null;
            _abandonReason = null;
            Error = null;
            Destination = default;
            Payload = default;
            Extents = default;
            Segments = default;
            _holeCount = 0;
            ExtentCount = 0;
            ContextSeen = false;
            Covered = 0;
            NextToSend = null;
            owner._pool.Enqueue(this);
        }

        public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

        public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
            _core.OnCompleted(continuation, state, token, flags);

        public int GetResult(short token)
        {
            bool current = token == _core.Version;
            try
            {
                return _core.GetResult(token);
            }
            finally
            {
                if (current)
                {
                    // Waits for a cancellation callback that is running, so none fires on a recycled request.
                    _registration.Dispose();
                    Release();
                }
            }
        }

        void IValueTaskSource.GetResult(short token) => GetResult(token);
    }
}

/// <summary>The node asked does not serve the export (any more): find its owner again.</summary>
public sealed class PeerExportUnavailableException(string message) : Exception(message);
