using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Gateway.Actors.Nbd;

namespace Gateway.Tests.Protocol;

/// <summary>One option reply (proto.md "Option reply types").</summary>
public sealed record OptionReply(NbdOption Option, OptionReplyType Type, byte[] Data)
{
    public bool IsError => ((uint)Type & 0x8000_0000u) != 0;

    public override string ToString() => $"{Option} -> {Type} ({Data.Length} bytes{(IsError ? ": " + Encoding.UTF8.GetString(Data) : "")})";
}

/// <summary>One structured reply chunk, checked for the shape the spec gives its type.</summary>
public sealed record ReplyChunk(ReplyFlags Flags, ReplyType Type, ulong Cookie, byte[] Payload)
{
    public bool Done => (Flags & ReplyFlags.Done) != 0;

    /// <summary>Offset of an OFFSET_DATA or OFFSET_HOLE chunk.</summary>
    public ulong Offset => BinaryPrimitives.ReadUInt64BigEndian(Payload);

    /// <summary>Bytes covered by an OFFSET_DATA or OFFSET_HOLE chunk.</summary>
    public uint Length => Type == ReplyType.OffsetHole
        ? BinaryPrimitives.ReadUInt32BigEndian(Payload.AsSpan(8))
        : (uint)(Payload.Length - 8);

    public NbdError Error => (NbdError)BinaryPrimitives.ReadUInt32BigEndian(Payload);

    public uint ContextId => BinaryPrimitives.ReadUInt32BigEndian(Payload);

    /// <summary>The (length, status) descriptors of a BLOCK_STATUS chunk.</summary>
    public IReadOnlyList<(uint Length, uint Status)> Descriptors =>
        [.. Enumerable.Range(0, (Payload.Length - 4) / 8).Select(i => (
            BinaryPrimitives.ReadUInt32BigEndian(Payload.AsSpan(4 + 8 * i)),
            BinaryPrimitives.ReadUInt32BigEndian(Payload.AsSpan(8 + 8 * i))))];

    /// <summary>NBD_REPLY_TYPE_BLOCK_STATUS_EXT: 64-bit lengths, after the id and the descriptor count.</summary>
    public IReadOnlyList<(ulong Length, uint Status)> ExtendedDescriptors =>
        [.. Enumerable.Range(0, (Payload.Length - 8) / 16).Select(i => (
            BinaryPrimitives.ReadUInt64BigEndian(Payload.AsSpan(8 + 16 * i)),
            BinaryPrimitives.ReadUInt32BigEndian(Payload.AsSpan(20 + 16 * i))))];

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
                chunk.Payload.AsSpan(8).CopyTo(data.AsSpan(at));
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

    private readonly Socket _socket;
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

    public static async Task<RawClient> ConnectAsync(IPEndPoint endPoint)
    {
        var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        using var cts = new CancellationTokenSource(Timeout);
        await socket.ConnectAsync(endPoint, cts.Token);
        return new RawClient(socket);
    }

    /// <summary>Connects, negotiates (optionally structured replies and metadata contexts) and GOes.</summary>
    public static async Task<RawClient> OpenAsync(IPEndPoint endPoint, string export, bool structured = true, params string[] contexts)
    {
        RawClient client = await ConnectAsync(endPoint);
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
    public async Task<HandshakeFlags> ReadGreetingAsync()
    {
        byte[] greeting = await ReadExactAsync(18);
        if (BinaryPrimitives.ReadUInt64BigEndian(greeting) != NbdMagic.InitPassword
            || BinaryPrimitives.ReadUInt64BigEndian(greeting.AsSpan(8)) != NbdMagic.IHaveOpt)
        {
            throw new InvalidDataException("bad greeting " + Convert.ToHexString(greeting));
        }
        return (HandshakeFlags)BinaryPrimitives.ReadUInt16BigEndian(greeting.AsSpan(16));
    }

    public Task SendClientFlagsAsync(uint flags)
    {
        byte[] bytes = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, flags);
        return SendAsync(bytes);
    }

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

    /// <summary>An option header announcing <paramref name="declaredLength"/> bytes, then <paramref name="data"/>.</summary>
    public Task SendOptionAsync(NbdOption option, ReadOnlyMemory<byte> data, uint? declaredLength = null, ulong magic = NbdMagic.IHaveOpt)
    {
        byte[] bytes = new byte[16 + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(bytes, magic);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(12), declaredLength ?? (uint)data.Length);
        data.CopyTo(bytes.AsMemory(16));
        return SendAsync(bytes);
    }

    public async Task<OptionReply> ReadOptionReplyAsync()
    {
        byte[] header = await ReadExactAsync(20);
        ulong magic = BinaryPrimitives.ReadUInt64BigEndian(header);
        if (magic != NbdMagic.OptionReply)
        {
            throw new InvalidDataException($"bad option reply magic 0x{magic:x16}");
        }
        var option = (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(8));
        var type = (OptionReplyType)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
        uint length = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(16));
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
            if ((InfoType)BinaryPrimitives.ReadUInt16BigEndian(reply.Data) == InfoType.Export)
            {
                if (reply.Data.Length != 12)
                {
                    throw new InvalidDataException($"NBD_INFO_EXPORT of {reply.Data.Length} bytes");
                }
                ExportSize = BinaryPrimitives.ReadUInt64BigEndian(reply.Data.AsSpan(2));
                ExportFlags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(reply.Data.AsSpan(10));
            }
        }
        return replies;
    }

    public static byte[] InfoRequest(string export, params InfoType[] requests)
    {
        byte[] name = Encoding.UTF8.GetBytes(export);
        byte[] data = new byte[4 + name.Length + 2 + 2 * requests.Length];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)name.Length);
        name.CopyTo(data, 4);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(4 + name.Length), (ushort)requests.Length);
        for (int i = 0; i < requests.Length; i++)
        {
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(6 + name.Length + 2 * i), (ushort)requests[i]);
        }
        return data;
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
                ContextIds[Encoding.UTF8.GetString(reply.Data.AsSpan(4))] = BinaryPrimitives.ReadUInt32BigEndian(reply.Data);
            }
        }
        return replies;
    }

    public static byte[] MetaContextRequest(string export, params string[] queries)
    {
        var data = new List<byte>();
        void Add32(uint value)
        {
            byte[] b = new byte[4];
            BinaryPrimitives.WriteUInt32BigEndian(b, value);
            data.AddRange(b);
        }
        byte[] name = Encoding.UTF8.GetBytes(export);
        Add32((uint)name.Length);
        data.AddRange(name);
        Add32((uint)queries.Length);
        foreach (string query in queries)
        {
            byte[] q = Encoding.UTF8.GetBytes(query);
            Add32((uint)q.Length);
            data.AddRange(q);
        }
        return [.. data];
    }

    /// <summary>NBD_OPT_EXPORT_NAME: on success the server answers size, flags (and zeroes unless NO_ZEROES).</summary>
    public async Task ExportNameAsync(string export, bool noZeroes = true)
    {
        await SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes(export));
        byte[] reply = await ReadExactAsync(noZeroes ? 10 : 134);
        ExportSize = BinaryPrimitives.ReadUInt64BigEndian(reply);
        ExportFlags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8));
        if (reply.AsSpan(10).ContainsAnyExcept((byte)0))
        {
            throw new InvalidDataException("the 124 reserved bytes are not zero");
        }
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
            uint magic = BinaryPrimitives.ReadUInt32BigEndian(magicBytes);
            if (magic == NbdMagic.SimpleReply)
            {
                if (Extended)
                {
                    throw new InvalidDataException("simple reply although extended headers were negotiated");
                }
                byte[] rest = await ReadExactAsync(12);
                var error = (NbdError)BinaryPrimitives.ReadUInt32BigEndian(rest);
                ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(rest.AsSpan(4));
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

            byte[] header = await ReadExactAsync(Extended ? 28 : 16);
            var flags = (ReplyFlags)BinaryPrimitives.ReadUInt16BigEndian(header);
            var type = (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(header.AsSpan(2));
            ulong chunkCookie = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(4));
            ulong payloadLength = Extended ? BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(20)) : BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
            if (payloadLength > NbdLimits.MaxPayload + 64)
            {
                throw new InvalidDataException($"chunk payload of {payloadLength} bytes");
            }
            if (Extended)
            {
                // proto.md "Extended reply chunk message": the offset MUST match the request's.
                ulong echoed = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(12));
                lock (_pending)
                {
                    if (_pending.TryGetValue(chunkCookie, out var pending) && pending.Offset != echoed)
                    {
                        throw new InvalidDataException($"extended reply to cookie {chunkCookie} echoes offset {echoed}, the request's was {pending.Offset}");
                    }
                }
            }
            var chunk = new ReplyChunk(flags, type, chunkCookie, await ReadExactAsync((int)payloadLength));
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
        int n = chunk.Payload.Length;
        bool ok = chunk.Type switch
        {
            ReplyType.None => n == 0 && chunk.Done,
            ReplyType.OffsetData => n > 8,
            ReplyType.OffsetHole => n == 12 && chunk.Length > 0,
            ReplyType.BlockStatus => n >= 12 && (n - 4) % 8 == 0,
            ReplyType.BlockStatusExt => n >= 24 && (n - 8) % 16 == 0
                && BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(4)) is uint count && (count == 0 || count == (n - 8) / 16),
            ReplyType.Error => n >= 6 && n == 6 + BinaryPrimitives.ReadUInt16BigEndian(chunk.Payload.AsSpan(4)) && chunk.Error != NbdError.None,
            ReplyType.ErrorOffset => n >= 14 && n == 14 + BinaryPrimitives.ReadUInt16BigEndian(chunk.Payload.AsSpan(4)) && chunk.Error != NbdError.None,
            _ => false,
        };
        if (!ok)
        {
            throw new InvalidDataException($"malformed chunk {chunk}: {Convert.ToHexString(chunk.Payload.AsSpan(0, Math.Min(n, 32)))}");
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
    public bool SilentFor(TimeSpan period) => !_socket.Poll(period, SelectMode.SelectRead);

    /// <summary>Closes the connection abortively: the server sees a reset rather than an orderly close.</summary>
    public void Reset()
    {
        _socket.LingerState = new LingerOption(true, 0);
        _socket.Close();
    }

    /// <summary>Half-closes: the server sees end of stream, the client can still read.</summary>
    public void ShutdownSend() => _socket.Shutdown(SocketShutdown.Send);

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
