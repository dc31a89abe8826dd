using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Gateway.Actors.Nbd;
using Nerdbank.Streams;

namespace Gateway.Tests.Protocol;

/// <summary>One option reply (proto.md "Option reply types").</summary>
public sealed record OptionReply(NbdOption Option, OptionReplyType Type, byte[] Data)
{
    public bool IsError => new OptionReplyHeader(Option, Type, (uint)Data.Length).IsError;

    public override string ToString() => $"{Option} -> {Type} ({Data.Length} bytes{(IsError ? ": " + Encoding.UTF8.GetString(Data) : "")})";
}

/// <summary>One structured reply chunk, checked for the shape the spec gives its type; its payload read by the codec.</summary>
public sealed record ReplyChunk(ChunkHeader Header, byte[] Payload)
{
    public ReplyFlags Flags => Header.Flags;

    public ReplyType Type => Header.Type;

    public ulong Cookie => Header.To.Cookie;

    public bool Done => Header.Done;

    // Read once, by the codec (which checks the length against the type): NbdReply.Data asks for them byte by byte.
    private readonly (ulong Offset, uint Length) _extent = ExtentOf(Header, Payload);

    /// <summary>Offset of an OFFSET_DATA or OFFSET_HOLE chunk.</summary>
    public ulong Offset => _extent.Offset;

    /// <summary>Bytes covered by an OFFSET_DATA or OFFSET_HOLE chunk.</summary>
    public uint Length => _extent.Length;

    /// <summary>The data of an OFFSET_DATA chunk: what follows its offset.</summary>
    public ReadOnlyMemory<byte> Data => Payload.AsMemory(Payload.Length - (int)Length);

    public NbdError Error => Read<ErrorChunk>(Header, Payload, ChunkPayload.TryReadError).Error;

    /// <summary>The offset of an ERROR_OFFSET chunk; null for a plain ERROR chunk.</summary>
    public ulong? ErrorOffset => Read<ErrorChunk>(Header, Payload, ChunkPayload.TryReadError).Offset;

    public uint ContextId => Status.ContextId;

    /// <summary>The (length, status) descriptors of a BLOCK_STATUS chunk.</summary>
    public IReadOnlyList<(uint Length, uint Status)> Descriptors => [.. Extents().Select(e => ((uint)e.Length, e.Status))];

    /// <summary>NBD_REPLY_TYPE_BLOCK_STATUS_EXT: 64-bit lengths, after the id and the descriptor count.</summary>
    public IReadOnlyList<(ulong Length, uint Status)> ExtendedDescriptors => [.. Extents().Select(e => (e.Length, e.Status))];

    private BlockStatusChunk Status => Read<BlockStatusChunk>(Header, Payload, ChunkPayload.TryReadBlockStatus);

    private List<MetaExtent> Extents()
    {
        var extents = new List<MetaExtent>();
        foreach (MetaExtent extent in Status)
        {
            extents.Add(extent);
        }
        return extents;
    }

    private static (ulong Offset, uint Length) ExtentOf(ChunkHeader header, byte[] payload)
    {
        if (header.Type == ReplyType.OffsetHole)
        {
            HoleChunk hole = Read<HoleChunk>(header, payload, ChunkPayload.TryReadOffsetHole);
            return (hole.Offset, hole.Length);
        }
        if (header.Type == ReplyType.OffsetData)
        {
            DataChunk data = Read<DataChunk>(header, payload, ChunkPayload.TryReadOffsetData);
            return (data.Offset, (uint)data.DataLength);
        }
        return default;
    }

    /// <summary>Reads the payload with the codec, which checks its length against the chunk type's layout.</summary>
    private static T Read<T>(ChunkHeader header, byte[] payload, ChunkPayloadReader<T> read)
    {
        var buffer = new ReadOnlySequence<byte>(payload);
        return read(ref buffer, header, out T value)
            ? value
            : throw new InvalidDataException($"{header.Type} chunk of {payload.Length} bytes cut short for its {header.Length}");
    }

    public override string ToString() => Type switch
    {
        ReplyType.OffsetData or ReplyType.OffsetHole => $"{Type}({Offset}, {Length}){(Done ? " done" : "")}",
        _ => $"{Type} {Payload.Length} bytes{(Done ? " done" : "")}",
    };
}

/// <summary>The whole reply to one request: a simple reply, or structured chunks up to DONE.</summary>
public sealed record NbdReply(ulong Cookie, bool Structured, NbdError Error, byte[]? SimpleData, IReadOnlyList<ReplyChunk> Chunks)
{
    /// <summary>
    /// The bytes a successful read returned: the simple reply's data, or the structured chunks put
    /// together, each byte covered by exactly one chunk (proto.md "Structured reply chunk message").
    /// </summary>
    public byte[] Data(ulong offset, uint length)
    {
        if (Error != NbdError.None)
        {
            throw new InvalidDataException($"reply to cookie {Cookie} is an error: {Error}");
        }
        if (!Structured)
        {
            return SimpleData ?? throw new InvalidDataException("simple reply carries no data");
        }
        byte[] data = new byte[length];
        bool[] covered = new bool[length];
        foreach (ReplyChunk chunk in Chunks.Where(c => c.Type is ReplyType.OffsetData or ReplyType.OffsetHole))
        {
            if (chunk.Offset < offset || chunk.Offset + chunk.Length > offset + length)
            {
                throw new InvalidDataException($"{chunk} lies outside the request {offset}+{length}");
            }
            int at = (int)(chunk.Offset - offset);
            for (int i = at; i < at + chunk.Length; i++)
            {
                if (covered[i])
                {
                    throw new InvalidDataException($"{chunk} overlaps another chunk");
                }
                covered[i] = true;
            }
            if (chunk.Type == ReplyType.OffsetData)
            {
                chunk.Data.Span.CopyTo(data.AsSpan(at));
            }
        }
        int gap = Array.IndexOf(covered, false);
        if (gap >= 0)
        {
            throw new InvalidDataException($"byte {offset + (ulong)gap} of the read is covered by no chunk");
        }
        return data;
    }
}

/// <summary>
/// A deliberately small NBD client over a raw socket: it sends exactly what a test asks (including
/// garbage) and parses exactly what the server says, checking the framing as it goes. Every read
/// from the socket is bounded by <see cref="Timeout"/> so a silent server fails the test rather
/// than hanging it.
/// </summary>
public sealed class RawClient : IAsyncDisposable
{
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(15);

    // One of the two: a socket, or an in-memory connection (a pair of pipes, no kernel in between).
    private readonly Socket? _socket;
    private readonly IDuplexPipe? _pipe;
    private Stream _stream;
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    private readonly Dictionary<ulong, (NbdCommand Command, ulong Offset, ulong Length)> _pending = [];
    private readonly Dictionary<ulong, List<ReplyChunk>> _partial = [];

    public RawClient(Socket socket)
    {
        _socket = socket;
        _socket.NoDelay = true;
        _stream = new NetworkStream(socket, ownsSocket: true);
    }

    /// <summary>Over the client's end of an in-memory connection (<c>FullDuplexStream.CreatePipePair</c>).</summary>
    public RawClient(IDuplexPipe pipe)
    {
        _pipe = pipe;
        _stream = pipe.AsStream();
    }

    public static async Task<RawClient> ConnectAsync(IPEndPoint endPoint)
    {
        var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        using var cts = new CancellationTokenSource(Timeout);
        await socket.ConnectAsync(endPoint, cts.Token);
        return new RawClient(socket);
    }

    /// <summary>Connects, negotiates (optionally structured replies and metadata contexts) and GOes.</summary>
    public static async Task<RawClient> OpenAsync(IPEndPoint endPoint, string export, bool structured = true, params string[] contexts) =>
        await NegotiateAsync(await ConnectAsync(endPoint), export, structured, contexts);

    /// <summary>Negotiates on a new connection (optionally structured replies and metadata contexts) and GOes.</summary>
    public static async Task<RawClient> NegotiateAsync(RawClient client, string export, bool structured = true, params string[] contexts)
    {
        await client.StartAsync();
        if (structured)
        {
            await client.ExpectAckAsync(NbdOption.StructuredReply, ReadOnlyMemory<byte>.Empty);
        }
        if (contexts.Length > 0)
        {
            IReadOnlyList<OptionReply> replies = await client.MetaContextAsync(NbdOption.SetMetaContext, export, contexts);
            if (replies[^1].Type != OptionReplyType.Ack)
            {
                throw new InvalidDataException($"SET_META_CONTEXT refused: {replies[^1]}");
            }
        }
        IReadOnlyList<OptionReply> go = await client.InfoOrGoAsync(NbdOption.Go, export);
        if (go[^1].Type != OptionReplyType.Ack)
        {
            throw new InvalidDataException($"GO refused: {go[^1]}");
        }
        return client;
    }

    /// <summary>Whether structured replies (or extended headers) were acknowledged.</summary>
    public bool Structured { get; private set; }

    /// <summary>Whether extended headers were acknowledged: 32-byte requests and replies.</summary>
    public bool Extended { get; private set; }

    /// <summary>Export size from NBD_INFO_EXPORT (GO/INFO) or the EXPORT_NAME reply.</summary>
    public ulong ExportSize { get; private set; }

    public TransmissionFlags ExportFlags { get; private set; }

    /// <summary>Context ids given by the last SET_META_CONTEXT, by name.</summary>
    public Dictionary<string, uint> ContextIds { get; } = [];

    // ---- Handshake -------------------------------------------------------------------------

    /// <summary>Reads NBDMAGIC, IHAVEOPT and the handshake flags.</summary>
    public Task<HandshakeFlags> ReadGreetingAsync() => ReadFrameAsync<HandshakeFlags>(NbdWire.GreetingSize, Handshake.TryReadGreeting);

    /// <summary>Sends the client flags as given: unknown bits too.</summary>
    public Task SendClientFlagsAsync(uint flags) => SendAsync(Written(NbdWire.ClientFlagsSize, d => Handshake.WriteClientFlags(d, (ClientFlags)flags)));

    /// <summary>Greeting, then the client flags (fixed newstyle and no zeroes by default).</summary>
    public async Task StartAsync(uint flags = (uint)(ClientFlags.FixedNewstyle | ClientFlags.NoZeroes))
    {
        HandshakeFlags handshake = await ReadGreetingAsync();
        if (handshake != (HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes))
        {
            throw new InvalidDataException($"unexpected handshake flags {handshake}");
        }
        await SendClientFlagsAsync(flags);
    }

    /// <summary>
    /// An option header announcing <paramref name="declaredLength"/> bytes, then <paramref name="data"/>
    /// as given: the raw escape hatch for options the codec would not write (a wrong length, a wrong
    /// <paramref name="magic"/>, malformed data).
    /// </summary>
    public Task SendOptionAsync(NbdOption option, ReadOnlyMemory<byte> data, uint? declaredLength = null, ulong magic = NbdMagic.IHaveOpt)
    {
        byte[] bytes = new byte[NbdWire.OptionHeaderSize + data.Length];
        OptionHeader.Write(bytes, new OptionHeader(option, declaredLength ?? (uint)data.Length));
        if (magic != NbdMagic.IHaveOpt)
        {
            // The codec writes only the right magic: a client out of step is written over it.
            BinaryPrimitives.WriteUInt64BigEndian(bytes, magic);
        }
        data.CopyTo(bytes.AsMemory(NbdWire.OptionHeaderSize));
        return SendAsync(bytes);
    }

    public async Task<OptionReply> ReadOptionReplyAsync()
    {
        (NbdOption option, OptionReplyType type, uint length) = await ReadFrameAsync<OptionReplyHeader>(NbdWire.OptionReplyHeaderSize, OptionReplyHeader.TryRead);
        if (length > 16 * 1024 * 1024)
        {
            throw new InvalidDataException($"option reply of {length} bytes");
        }
        return new OptionReply(option, type, await ReadExactAsync((int)length));
    }

    /// <summary>Sends an option and reads its replies up to the final one (ACK or an error).</summary>
    public async Task<IReadOnlyList<OptionReply>> OptionAsync(NbdOption option, ReadOnlyMemory<byte> data)
    {
        await SendOptionAsync(option, data);
        return await ReadOptionRepliesAsync(option);
    }

    public async Task<IReadOnlyList<OptionReply>> ReadOptionRepliesAsync(NbdOption option)
    {
        var replies = new List<OptionReply>();
        while (true)
        {
            OptionReply reply = await ReadOptionReplyAsync();
            if (reply.Option != option)
            {
                throw new InvalidDataException($"reply {reply} to an option that was not asked ({option})");
            }
            replies.Add(reply);
            if (reply.Type == OptionReplyType.Ack || reply.IsError)
            {
                if (option == NbdOption.StructuredReply && reply.Type == OptionReplyType.Ack)
                {
                    Structured = true;
                }
                if (option == NbdOption.ExtendedHeaders && reply.Type == OptionReplyType.Ack)
                {
                    Structured = Extended = true;
                }
                return replies;
            }
        }
    }

    public async Task ExpectAckAsync(NbdOption option, ReadOnlyMemory<byte> data)
    {
        IReadOnlyList<OptionReply> replies = await OptionAsync(option, data);
        if (replies.Count != 1 || replies[0].Type != OptionReplyType.Ack)
        {
            throw new InvalidDataException($"expected a lone ACK to {option}, got {string.Join(", ", replies)}");
        }
    }

    /// <summary>INFO or GO: name, then the information requests (proto.md "NBD_OPT_INFO and NBD_OPT_GO").</summary>
    public async Task<IReadOnlyList<OptionReply>> InfoOrGoAsync(NbdOption option, string export, params InfoType[] requests)
    {
        IReadOnlyList<OptionReply> replies = await OptionAsync(option, InfoRequest(export, requests));
        foreach (OptionReply reply in replies.Where(r => r.Type == OptionReplyType.Info))
        {
            if (Parse(() => InfoReply.ReadType(reply.Data)) == InfoType.Export)
            {
                (ExportSize, ExportFlags) = Parse(() => InfoReply.ReadExport(reply.Data));
            }
        }
        return replies;
    }

    /// <summary>The data of INFO or GO; the codec refuses a name over 4096 bytes (a test of that writes the bytes itself).</summary>
    public static byte[] InfoRequest(string export, params InfoType[] requests)
    {
        var request = new Gateway.Nbd.InfoRequest(export, requests);
        return Written(request.Size, d => Gateway.Nbd.InfoRequest.Write(d, request));
    }

    /// <summary>LIST_META_CONTEXT or SET_META_CONTEXT with the given queries.</summary>
    public async Task<IReadOnlyList<OptionReply>> MetaContextAsync(NbdOption option, string export, params string[] queries)
    {
        IReadOnlyList<OptionReply> replies = await OptionAsync(option, MetaContextRequest(export, queries));
        if (option == NbdOption.SetMetaContext && replies[^1].Type == OptionReplyType.Ack)
        {
            ContextIds.Clear();
            foreach (OptionReply reply in replies.Where(r => r.Type == OptionReplyType.MetaContext))
            {
                (uint id, string name) = Parse(() => MetaContextReply.Read(reply.Data));
                ContextIds[name] = id;
            }
        }
        return replies;
    }

    public static byte[] MetaContextRequest(string export, params string[] queries)
    {
        var request = new Gateway.Nbd.MetaContextRequest(export, queries);
        return Written(request.Size, d => Gateway.Nbd.MetaContextRequest.Write(d, request));
    }

    /// <summary>NBD_OPT_EXPORT_NAME: on success the server answers size, flags (and zeroes unless NO_ZEROES, checked by the codec).</summary>
    public async Task ExportNameAsync(string export, bool noZeroes = true)
    {
        await SendOptionAsync(NbdOption.ExportName, Written(ExportNameOption.Size(export), d => ExportNameOption.Write(d, export)));
        (ExportSize, ExportFlags) = await ReadFrameAsync<ExportNameReply>(ExportNameReply.Size(noZeroes),
            (ref ReadOnlySequence<byte> buffer, out ExportNameReply reply) => ExportNameReply.TryRead(ref buffer, noZeroes, out reply));
    }

    // ---- Transmission ----------------------------------------------------------------------

    /// <summary>The bytes of one request, compact or extended: header, then <paramref name="payload"/> if any.</summary>
    public static byte[] Request(NbdCommand command, CommandFlags flags, ulong cookie, ulong offset, ulong length, ReadOnlySpan<byte> payload = default, bool extended = false)
    {
        int header = NbdRequest.HeaderSize(extended);
        byte[] bytes = new byte[header + payload.Length];
        new NbdRequest(flags, command, cookie, offset, length).WriteTo(bytes, extended);
        payload.CopyTo(bytes.AsSpan(header));
        return bytes;
    }

    /// <summary>Records a request about to be sent, so its simple reply can be parsed (a READ's carries data).</summary>
    public void Expect(NbdCommand command, ulong cookie, ulong length, ulong offset = 0)
    {
        lock (_pending)
        {
            if (!_pending.TryAdd(cookie, (command, offset, length)))
            {
                throw new InvalidOperationException($"cookie {cookie} is already in flight");
            }
        }
    }

    /// <summary>Sends a request in the negotiated header style; with extended headers a WRITE gets NBD_CMD_FLAG_PAYLOAD_LEN.</summary>
    public async Task SendRequestAsync(NbdCommand command, CommandFlags flags, ulong cookie, ulong offset, ulong length, ReadOnlyMemory<byte> payload = default)
    {
        if (Extended && command == NbdCommand.Write)
        {
            flags |= CommandFlags.PayloadLen;
        }
        Expect(command, cookie, length, offset);
        await SendAsync(Request(command, flags, cookie, offset, length, payload.Span, Extended));
    }

    /// <summary>Sends one request and reads the reply, which must be to that request.</summary>
    public async Task<NbdReply> RequestAsync(NbdCommand command, CommandFlags flags, ulong cookie, ulong offset, ulong length, ReadOnlyMemory<byte> payload = default)
    {
        await SendRequestAsync(command, flags, cookie, offset, length, payload);
        NbdReply reply = await ReadReplyAsync();
        if (reply.Cookie != cookie)
        {
            throw new InvalidDataException($"expected the reply to cookie {cookie}, got one to {reply.Cookie}");
        }
        return reply;
    }

    private ulong _nextCookie = 1_000_000;

    public Task<NbdReply> ReadAsync(ulong offset, uint length, CommandFlags flags = CommandFlags.None) =>
        RequestAsync(NbdCommand.Read, flags, Interlocked.Increment(ref _nextCookie), offset, length);

    public Task<NbdReply> WriteAsync(ulong offset, byte[] data, CommandFlags flags = CommandFlags.None) =>
        RequestAsync(NbdCommand.Write, flags, Interlocked.Increment(ref _nextCookie), offset, (uint)data.Length, data);

    /// <summary>A write then a read of the same bytes, both succeeding: the connection is in step and working.</summary>
    public async Task AssertWorksAsync(ulong offset = 4096, int length = 4096, byte seed = 7)
    {
        byte[] data = Pattern(length, seed);
        NbdReply write = await WriteAsync(offset, data);
        if (write.Error != NbdError.None)
        {
            throw new InvalidDataException($"write failed with {write.Error}");
        }
        NbdReply read = await ReadAsync(offset, (uint)length);
        if (!read.Data(offset, (uint)length).AsSpan().SequenceEqual(data))
        {
            throw new InvalidDataException("read did not return what was written");
        }
    }

    /// <summary>
    /// Reads one complete reply: a simple reply, or structured chunks up to the one flagged DONE
    /// (chunks of other cookies read on the way are kept for their own turn).
    /// </summary>
    public async Task<NbdReply> ReadReplyAsync()
    {
        while (true)
        {
            byte[] magicBytes = await ReadExactAsync(4);
            SimpleReply.TryPeekMagic(new ReadOnlySequence<byte>(magicBytes), out uint magic);
            if (magic == NbdMagic.SimpleReply)
            {
                if (Extended)
                {
                    throw new InvalidDataException("simple reply although extended headers were negotiated");
                }
                (NbdError error, ulong cookie) = await ReadFrameAsync<SimpleReply>(NbdWire.SimpleReplyHeaderSize, SimpleReply.TryRead, magicBytes);
                (NbdCommand command, _, ulong length) = Complete(cookie);
                byte[]? data = error == NbdError.None && command == NbdCommand.Read ? await ReadExactAsync((int)length) : null;
                return new NbdReply(cookie, false, error, data, []);
            }
            if (magic != (Extended ? NbdMagic.ExtendedReply : NbdMagic.StructuredReply))
            {
                throw new InvalidDataException($"bad reply magic 0x{magic:x8} (extended headers: {Extended})");
            }
            if (!Structured)
            {
                throw new InvalidDataException("structured reply without STRUCTURED_REPLY negotiated");
            }

            bool extended = Extended;
            ChunkHeader header = await ReadFrameAsync<ChunkHeader>(extended ? NbdWire.ExtendedReplyHeaderSize : NbdWire.StructuredReplyHeaderSize,
                (ref ReadOnlySequence<byte> buffer, out ChunkHeader chunk) => ChunkHeader.TryRead(ref buffer, extended, out chunk), magicBytes);
            ulong chunkCookie = header.To.Cookie;
            if (header.Length > NbdLimits.MaxPayload + 64)
            {
                throw new InvalidDataException($"chunk payload of {header.Length} bytes");
            }
            if (extended)
            {
                // proto.md "Extended reply chunk message": the offset MUST match the request's.
                lock (_pending)
                {
                    if (_pending.TryGetValue(chunkCookie, out var pending) && pending.Offset != header.To.Offset)
                    {
                        throw new InvalidDataException($"extended reply to cookie {chunkCookie} echoes offset {header.To.Offset}, the request's was {pending.Offset}");
                    }
                }
            }
            byte[] payload = await ReadExactAsync((int)header.Length);
            ReplyChunk chunk = Parse(() => new ReplyChunk(header, payload));
            CheckChunk(chunk);

            List<ReplyChunk> chunks;
            lock (_pending)
            {
                if (!_pending.ContainsKey(chunkCookie))
                {
                    throw new InvalidDataException($"chunk {chunk} for cookie {chunkCookie}, which is not in flight");
                }
                if (!_partial.TryGetValue(chunkCookie, out chunks!))
                {
                    _partial[chunkCookie] = chunks = [];
                }
            }
            chunks.Add(chunk);
            if (!chunk.Done)
            {
                continue;
            }
            lock (_pending)
            {
                _partial.Remove(chunkCookie);
            }
            Complete(chunkCookie);
            ReplyChunk? errorChunk = chunks.FirstOrDefault(c => c.Type is ReplyType.Error or ReplyType.ErrorOffset);
            return new NbdReply(chunkCookie, true, errorChunk?.Error ?? NbdError.None, null, chunks);
        }
    }

    private (NbdCommand Command, ulong Offset, ulong Length) Complete(ulong cookie)
    {
        lock (_pending)
        {
            if (!_pending.Remove(cookie, out (NbdCommand, ulong, ulong) request))
            {
                throw new InvalidDataException($"reply to cookie {cookie}, which is not in flight (answered twice?)");
            }
            return request;
        }
    }

    private static void CheckChunk(ReplyChunk chunk)
    {
        // Each payload is read by the codec, which throws when its length does not fit its type;
        // what the codec leaves to the reader (nonzero lengths, DONE on NONE) is checked here.
        bool ok = Parse(() => chunk.Type switch
        {
            ReplyType.None => chunk.Payload.Length == 0 && chunk.Done,
            ReplyType.OffsetData or ReplyType.OffsetHole => chunk.Length > 0,
            ReplyType.BlockStatus => chunk.Descriptors.Count > 0,
            ReplyType.BlockStatusExt => chunk.ExtendedDescriptors.Count > 0,
            ReplyType.Error or ReplyType.ErrorOffset => chunk.Error != NbdError.None,
            _ => false,
        });
        if (!ok)
        {
            throw new InvalidDataException($"malformed chunk {chunk}: {Convert.ToHexString(chunk.Payload.AsSpan(0, Math.Min(chunk.Payload.Length, 32)))}");
        }
    }

    // ---- TLS -------------------------------------------------------------------------------

    /// <summary>
    /// STARTTLS: on ACK, the TLS handshake over the same socket (trusting any server certificate,
    /// presenting <paramref name="clientCertificate"/> if given). Returns the reply when refused.
    /// </summary>
    public async Task<OptionReply?> StartTlsAsync(System.Security.Cryptography.X509Certificates.X509Certificate2? clientCertificate = null)
    {
        await SendOptionAsync(NbdOption.StartTls, ReadOnlyMemory<byte>.Empty);
        OptionReply reply = await ReadOptionReplyAsync();
        if (reply.Type != OptionReplyType.Ack)
        {
            return reply;
        }
        var tls = new System.Net.Security.SslStream(_stream, leaveInnerStreamOpen: false);
        using var cts = new CancellationTokenSource(Timeout);
        await tls.AuthenticateAsClientAsync(new System.Net.Security.SslClientAuthenticationOptions
        {
            TargetHost = "localhost",
            RemoteCertificateValidationCallback = (_, _, _, _) => true,
            ClientCertificates = clientCertificate is null ? null : [clientCertificate],
        }, cts.Token);
        _stream = tls;
        return null;
    }

    // ---- Socket ----------------------------------------------------------------------------

    public async Task SendAsync(ReadOnlyMemory<byte> bytes)
    {
        await _sendLock.WaitAsync();
        try
        {
            await _stream.WriteAsync(bytes);
        }
        finally
        {
            _sendLock.Release();
        }
    }

    /// <summary>
    /// Reads one frame of <paramref name="size"/> bytes (<paramref name="already"/> read) and
    /// takes it with the codec's reader; what the codec refuses is an <see cref="InvalidDataException"/>.
    /// </summary>
    private async Task<T> ReadFrameAsync<T>(int size, FrameReader<T> read, byte[]? already = null)
    {
        already ??= [];
        byte[] frame = [.. already, .. await ReadExactAsync(size - already.Length)];
        var buffer = new ReadOnlySequence<byte>(frame);
        return Parse(() => read(ref buffer, out T value) ? value : throw new InvalidDataException($"{size} bytes do not hold a {typeof(T).Name}"));
    }

    /// <summary>Runs a codec reader: a frame it refuses is the <see cref="InvalidDataException"/> every check of this client throws.</summary>
    private static T Parse<T>(Func<T> read)
    {
        try
        {
            return read();
        }
        catch (NbdProtocolException e)
        {
            throw new InvalidDataException(e.Message, e);
        }
    }

    private static byte[] Written(int size, Func<Span<byte>, int> write)
    {
        byte[] bytes = new byte[size];
        int written = write(bytes);
        return written == size ? bytes : throw new InvalidOperationException($"{written} bytes written of {size}");
    }

    private async Task<byte[]> ReadExactAsync(int count)
    {
        byte[] buffer = new byte[count];
        using var cts = new CancellationTokenSource(Timeout);
        try
        {
            await _stream.ReadExactlyAsync(buffer, cts.Token);
        }
        catch (OperationCanceledException) when (cts.IsCancellationRequested)
        {
            throw new TimeoutException($"the server sent nothing for {Timeout.TotalSeconds} s (waiting for {count} bytes)");
        }
        return buffer;
    }

    /// <summary>
    /// Waits for the server to close the connection, failing if it sends anything first.
    /// True when closed (FIN or reset), false when still open after <paramref name="timeout"/>.
    /// </summary>
    public async Task<bool> ServerClosedAsync(TimeSpan? timeout = null)
    {
        byte[] buffer = new byte[256];
        using var cts = new CancellationTokenSource(timeout ?? Timeout);
        try
        {
            int n = await _stream.ReadAsync(buffer, cts.Token);
            if (n > 0)
            {
                throw new InvalidDataException("expected the server to close, but it sent " + Convert.ToHexString(buffer, 0, n));
            }
            return true;
        }
        catch (OperationCanceledException) when (cts.IsCancellationRequested)
        {
            return false;
        }
        catch (IOException e) when (e.InnerException is SocketException { SocketErrorCode: SocketError.ConnectionReset })
        {
            return true;
        }
    }

    /// <summary>True when the server sends nothing (and does not close) for <paramref name="period"/>.</summary>
    public bool SilentFor(TimeSpan period)
    {
        if (_socket is not null)
        {
            return !_socket.Poll(period, SelectMode.SelectRead);
        }
        // Looks without taking: the next read gets the same bytes (or the end) again.
        using var cts = new CancellationTokenSource(period);
        try
        {
            ReadResult result = _pipe!.Input.ReadAsync(cts.Token).AsTask().GetAwaiter().GetResult();
            _pipe.Input.AdvanceTo(result.Buffer.Start);
            return false;
        }
        catch (OperationCanceledException) when (cts.IsCancellationRequested)
        {
            return true;
        }
    }

    /// <summary>Closes the connection abortively: the server sees a reset rather than an orderly close.</summary>
    public void Reset()
    {
        if (_socket is not null)
        {
            _socket.LingerState = new LingerOption(true, 0);
            _socket.Close();
            return;
        }
        // What a reset is to the server's reads: an error, not an orderly end.
        _pipe!.Output.Complete(new IOException("connection reset by the client (in-memory)", new SocketException((int)SocketError.ConnectionReset)));
        _pipe.Input.Complete();
    }

    /// <summary>Half-closes: the server sees end of stream, the client can still read.</summary>
    public void ShutdownSend()
    {
        if (_socket is not null)
        {
            _socket.Shutdown(SocketShutdown.Send);
        }
        else
        {
            _pipe!.Output.Complete();
        }
    }

    public static byte[] Pattern(int length, byte seed)
    {
        byte[] data = new byte[length];
        for (int i = 0; i < length; i++)
        {
            data[i] = (byte)(seed + i * 31 + (i >> 8));
        }
        return data;
    }

    public ValueTask DisposeAsync()
    {
        _stream.Dispose();
        _sendLock.Dispose();
        return ValueTask.CompletedTask;
    }
}
