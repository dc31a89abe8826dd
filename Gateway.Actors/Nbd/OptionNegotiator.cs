using System.Buffers;
using System.Diagnostics;
using System.IO.Pipelines;
using System.Net;
using System.Text;
using Gateway.Actors.Tls;
using Microsoft.Extensions.Logging;

namespace Gateway.Actors.Nbd;

/// <summary>What the handshake settled: the export and the mode of the transmission phase.</summary>
/// <param name="ExtendedHeaders">NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte headers, 64-bit lengths, chunked replies only.</param>
public sealed record NegotiatedSession(ExportHandle Export, bool StructuredReplies, IReadOnlyList<SelectedContext> Contexts, bool ExtendedHeaders = false);

/// <summary>A metadata context selected with SET_META_CONTEXT, under the id the client was given.</summary>
public sealed record SelectedContext(uint Id, MetaContext Context);

/// <summary>How option haggling ended: the client left, attached to an export, or asked for TLS.</summary>
public enum NegotiationEnd
{
    Closed,
    Attached,
    StartTls,
}

/// <summary>The end of a negotiation, with the session when attached.</summary>
public sealed record NegotiationOutcome(NegotiationEnd End, NegotiatedSession? Session = null)
{
    public static readonly NegotiationOutcome Closed = new(NegotiationEnd.Closed);
    public static readonly NegotiationOutcome StartTls = new(NegotiationEnd.StartTls);
}

/// <summary>
/// The fixed newstyle handshake and option haggling (proto.md "Newstyle negotiation",
/// "Option types", "TLS support"). Ends attached to an export, closed (ABORT, or a clean close),
/// or with STARTTLS acknowledged: the connection then wraps the stream in TLS and calls
/// <see cref="ResumeAfterTlsAsync"/> with pipes over the encrypted stream. Disposing it gives
/// back the attached export's connection slot (<see cref="ExportAccess.MaxConnections"/>), so
/// the connection disposes it when it ends.
/// </summary>
public sealed class OptionNegotiator(PipeReader input, PipeWriter output, IExportDirectory exports, ILogger logger,
    NbdServerSettings? settings = null, EndPoint? client = null, HandshakeDeadline? deadline = null) : IDisposable
{
    /// <summary>The handshake flags the server sends (as <see cref="ConnectionRefusal"/> does): fixed newstyle, and no zeroes if the client agrees.</summary>
    internal const HandshakeFlags ServerFlags = HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes;

    private readonly NbdServerSettings _settings = settings ?? NbdServerSettings.Default;
    private bool _structured;
    private bool _extended;
    private bool _noZeroes;
    private string? _contextExport;
    private List<(uint Id, string Name)> _selected = [];
    private bool _tls;
    private ClientIdentity? _identity;
    private IDisposable? _lease;

    /// <summary>Whether the options are being haggled over TLS.</summary>
    public bool Tls => _tls;

    public void Dispose() => _lease?.Dispose();

    /// <summary>Opens an export for the client with the handshake's clock stopped (<see cref="HandshakeDeadline"/>).</summary>
    private ValueTask<ExportHandle?> OpenAsync(string name, CancellationToken cancellationToken) =>
        deadline is null ? exports.OpenAsync(name, cancellationToken) : deadline.ExcludingAsync(token => exports.OpenAsync(name, token));

    public async Task<NegotiationOutcome> NegotiateAsync(CancellationToken cancellationToken)
    {
        output.Advance(Handshake.WriteGreeting(output.GetSpan(NbdWire.GreetingSize), ServerFlags));
        await output.FlushAsync(cancellationToken).ConfigureAwait(false);

        ClientFlags clientFlags = await ReadFrameAsync<ClientFlags>(NbdWire.ClientFlagsSize, Handshake.TryReadClientFlags, cancellationToken).ConfigureAwait(false);
        if ((clientFlags & ~(ClientFlags.FixedNewstyle | ClientFlags.NoZeroes)) != 0)
        {
            // "If the client sets any flag the server does not know, the server MUST close."
            throw new NbdProtocolException($"unknown client flags 0x{(uint)clientFlags:x}");
        }
        _noZeroes = clientFlags.HasFlag(ClientFlags.NoZeroes);
        return await OptionsAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// Continues after the TLS handshake, over pipes on the encrypted stream. proto.md "TLS
    /// support": state negotiated before the upgrade is forgotten (structured replies, metadata
    /// contexts); the handshake flags stay.
    /// </summary>
    public Task<NegotiationOutcome> ResumeAfterTlsAsync(PipeReader tlsInput, PipeWriter tlsOutput, ClientIdentity? identity, CancellationToken cancellationToken)
    {
        input = tlsInput;
        output = tlsOutput;
        _tls = true;
        _identity = identity;
        _structured = false;
        _extended = false;
        _contextExport = null;
        _selected = [];
        return OptionsAsync(cancellationToken);
    }

    private async Task<NegotiationOutcome> OptionsAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            ReadResult peek = await input.ReadAsync(cancellationToken).ConfigureAwait(false);
            if (peek.Buffer.IsEmpty && peek.IsCompleted)
            {
                return NegotiationOutcome.Closed;
            }
            input.AdvanceTo(peek.Buffer.Start);

            // The whole header is awaited before its magic is checked (the reader would check it at 8 bytes).
            (NbdOption option, uint length) = await ReadFrameAsync<OptionHeader>(NbdWire.OptionHeaderSize, OptionHeader.TryRead, cancellationToken).ConfigureAwait(false);
            if (length > NbdLimits.MaxOptionLength)
            {
                if (length > NbdLimits.MaxOptionDiscard || option == NbdOption.ExportName)
                {
                    throw new NbdProtocolException($"option {option} length {length} too large");
                }
                await DiscardAsync(length, cancellationToken).ConfigureAwait(false);
                await ReplyErrorAsync(option, OptionReplyType.ErrTooBig, $"option data of {length} bytes is over the limit of {NbdLimits.MaxOptionLength}", cancellationToken).ConfigureAwait(false);
                continue;
            }

            byte[] data = new byte[length];
            if (length > 0)
            {
                ReadOnlySequence<byte> body = await ReadExactlyAsync((int)length, cancellationToken).ConfigureAwait(false);
                body.Slice(0, length).CopyTo(data);
                input.AdvanceTo(body.GetPosition(length));
            }

            logger.LogDebug("NBD option {Option} ({Length} bytes)", option, length);
            if (!_tls && _settings.TlsMode == TlsMode.Required && option is not (NbdOption.StartTls or NbdOption.Abort))
            {
                // proto.md "Forced TLS": EXPORT_NAME cannot be answered with an error, so the server closes.
                if (option == NbdOption.ExportName)
                {
                    throw new NbdProtocolException($"EXPORT_NAME from {client} before STARTTLS; TLS is required");
                }
                await ReplyErrorAsync(option, OptionReplyType.ErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first", cancellationToken).ConfigureAwait(false);
                continue;
            }
            switch (option)
            {
                case NbdOption.ExportName:
                    if (_extended)
                    {
                        // proto.md: "a client that has used NBD_OPT_EXTENDED_HEADERS ... MUST NOT use this option",
                        // and EXPORT_NAME has no error reply.
                        throw new NbdProtocolException("EXPORT_NAME after extended headers were negotiated");
                    }
                    return await ExportNameAsync(data, cancellationToken).ConfigureAwait(false);
                case NbdOption.Abort:
                    // The spec lets the server answer ACK before closing; clients tolerate either.
                    await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken).ConfigureAwait(false);
                    return NegotiationOutcome.Closed;
                case NbdOption.List:
                    await ListAsync(data, cancellationToken).ConfigureAwait(false);
                    break;
                case NbdOption.Info:
                case NbdOption.Go:
                    NegotiatedSession? session = await InfoOrGoAsync(option, data, cancellationToken).ConfigureAwait(false);
                    if (session is not null)
                    {
                        return new NegotiationOutcome(NegotiationEnd.Attached, session);
                    }
                    break;
                case NbdOption.StructuredReply:
                    if (length != 0)
                    {
                        await ReplyErrorAsync(option, OptionReplyType.ErrInvalid, "STRUCTURED_REPLY takes no data", cancellationToken).ConfigureAwait(false);
                    }
                    else if (_extended)
                    {
                        // Extended headers take precedence and cannot be downgraded.
                        await ReplyErrorAsync(option, OptionReplyType.ErrExtHeaderReqd, "extended headers are already negotiated", cancellationToken).ConfigureAwait(false);
                    }
                    else if (_structured)
                    {
                        await ReplyErrorAsync(option, OptionReplyType.ErrInvalid, "structured replies already negotiated", cancellationToken).ConfigureAwait(false);
                    }
                    else
                    {
                        _structured = true;
                        await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken).ConfigureAwait(false);
                    }
                    break;
                case NbdOption.ExtendedHeaders:
                    if (length != 0)
                    {
                        await ReplyErrorAsync(option, OptionReplyType.ErrInvalid, "EXTENDED_HEADERS takes no data", cancellationToken).ConfigureAwait(false);
                    }
                    else if (_extended)
                    {
                        await ReplyErrorAsync(option, OptionReplyType.ErrInvalid, "extended headers already negotiated", cancellationToken).ConfigureAwait(false);
                    }
                    else
                    {
                        // Extended headers imply chunked replies: everything structured replies allow.
                        _extended = true;
                        _structured = true;
                        await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken).ConfigureAwait(false);
                    }
                    break;
                case NbdOption.ListMetaContext:
                case NbdOption.SetMetaContext:
                    await MetaContextAsync(option, data, cancellationToken).ConfigureAwait(false);
                    break;
                case NbdOption.StartTls:
                    if (await StartTlsAsync(length, cancellationToken).ConfigureAwait(false))
                    {
                        return NegotiationOutcome.StartTls;
                    }
                    break;
                default:
                    await ReplyErrorAsync(option, OptionReplyType.ErrUnsup, $"option {(uint)option} is not supported", cancellationToken).ConfigureAwait(false);
                    break;
            }
        }
    }

    // proto.md "Transmission flags": SEND_DF "MUST [be left] clear if structured replies have not been
    // negotiated"; BLOCK_STATUS_PAYLOAD MUST NOT be set without extended headers, and SHOULD NOT be
    // without metadata contexts selected.
    private TransmissionFlags AdvertisedFlags(ExportInfo info)
    {
        TransmissionFlags flags = info.TransmissionFlags & ~TransmissionFlags.BlockStatusPayload;
        if (!_structured)
        {
            flags &= ~TransmissionFlags.SendDf;
        }
        if (_extended && _selected.Count > 0 && _contextExport == info.Name)
        {
            flags |= TransmissionFlags.BlockStatusPayload;
        }
        return flags;
    }

    /// <summary>
    /// NBD_OPT_STARTTLS (proto.md "TLS support"). True once ACKed: the caller must then start the
    /// TLS handshake on the raw stream. The client may send nothing between the option and the
    /// handshake, so any byte already buffered behind it is a protocol violation (it would be
    /// plaintext the TLS layer never sees).
    /// </summary>
    private async Task<bool> StartTlsAsync(uint length, CancellationToken cancellationToken)
    {
        if (length != 0)
        {
            await ReplyErrorAsync(NbdOption.StartTls, OptionReplyType.ErrInvalid, "STARTTLS takes no data", cancellationToken).ConfigureAwait(false);
            return false;
        }
        if (_settings.TlsMode == TlsMode.Off || _settings.Tls is null)
        {
            await ReplyErrorAsync(NbdOption.StartTls, OptionReplyType.ErrPolicy, "TLS is not configured on this server", cancellationToken).ConfigureAwait(false);
            return false;
        }
        if (_tls)
        {
            await ReplyErrorAsync(NbdOption.StartTls, OptionReplyType.ErrInvalid, "TLS is already in use", cancellationToken).ConfigureAwait(false);
            return false;
        }
        if (input.TryRead(out ReadResult pending))
        {
            bool early = !pending.Buffer.IsEmpty;
            input.AdvanceTo(pending.Buffer.Start);
            if (early)
            {
                throw new NbdProtocolException($"client {client} sent {pending.Buffer.Length} bytes after STARTTLS before the TLS handshake");
            }
        }
        await ReplyAsync(NbdOption.StartTls, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken).ConfigureAwait(false);
        return true;
    }

    /// <summary>Whether LIST shows the export to this client: not before TLS if it needs TLS, not to a certificate it does not allow.</summary>
    private bool Visible(ExportInfo info) => (_tls || !info.Access.NeedsTls) && info.Access.Allows(_identity);

    /// <summary>
    /// Why this client may not use the export (null when it may). With <paramref name="attach"/>
    /// (GO, EXPORT_NAME) the export's connection slot is taken too, held in <see cref="_lease"/>;
    /// in a cluster that asks the shared store, with the handshake's clock stopped as for the open.
    /// </summary>
    private async ValueTask<(OptionReplyType Type, string Message)?> RefusalAsync(ExportInfo info, bool attach, CancellationToken cancellationToken)
    {
        ExportAccess access = info.Access;
        if (access.NeedsTls && !_tls)
        {
            // With TLS off the export is never served: it must not leak in plaintext.
            return _settings.TlsMode == TlsMode.Off
                ? (OptionReplyType.ErrPolicy, $"export '{info.Name}' requires TLS, which this server does not offer")
                : (OptionReplyType.ErrTlsReqd, $"export '{info.Name}' requires TLS: send NBD_OPT_STARTTLS first");
        }
        if (!access.Allows(_identity))
        {
            logger.LogWarning("NBD client {Client} refused export {Export}: certificate {Identity} is not among its allowed clients",
                client, info.Name, _identity?.ToString() ?? "(none)");
            return (OptionReplyType.ErrPolicy, $"export '{info.Name}' is not available to this client certificate");
        }
        if (attach)
        {
            _lease?.Dispose();
            _lease = null;
            try
            {
                _lease = deadline is null
                    ? await _settings.ExportConnections.TryAcquireAsync(info.Name, access.MaxConnections, cancellationToken).ConfigureAwait(false)
                    : await deadline.ExcludingAsync(token => _settings.ExportConnections.TryAcquireAsync(info.Name, access.MaxConnections, token)).ConfigureAwait(false);
            }
            catch (ConnectionSlotsUnavailableException e)
            {
                // Refused, not let past a limit nobody could check; the client may try again.
                logger.LogWarning("NBD client {Client} refused export {Export}: its connections cannot be counted now: {Reason}", client, info.Name, e.Message);
                return (OptionReplyType.ErrPolicy, $"export '{info.Name}' cannot take a connection now: its limit of {access.MaxConnections} connections cannot be checked ({e.Message}); try again");
            }
            if (_lease is null)
            {
                logger.LogWarning("NBD client {Client} refused export {Export}: its limit of {Limit} connections is reached", client, info.Name, access.MaxConnections);
                return (OptionReplyType.ErrPolicy, $"export '{info.Name}' has reached its limit of {access.MaxConnections} connections");
            }
        }
        return null;
    }

    private async Task<NegotiationOutcome> ExportNameAsync(byte[] data, CancellationToken cancellationToken)
    {
        // Over 4096 bytes it throws: EXPORT_NAME has no error reply, so the connection is closed.
        string name = ExportNameOption.Read(data);
        ExportHandle? export = await OpenAsync(name, cancellationToken).ConfigureAwait(false);
        if (export is null)
        {
            // EXPORT_NAME has no way to report an error: the spec says to close.
            throw new NbdProtocolException($"unknown export '{name}' in EXPORT_NAME");
        }
        if (await RefusalAsync(export.Info, attach: true, cancellationToken).ConfigureAwait(false) is (_, string refusal))
        {
            throw new NbdProtocolException($"EXPORT_NAME '{name}' refused: {refusal}");
        }

        var reply = new ExportNameReply((ulong)export.Info.Size, AdvertisedFlags(export.Info));
        output.Advance(ExportNameReply.Write(output.GetSpan(ExportNameReply.Size(_noZeroes)), reply, _noZeroes));
        await output.FlushAsync(cancellationToken).ConfigureAwait(false);
        return new NegotiationOutcome(NegotiationEnd.Attached, new NegotiatedSession(export, _structured, ResolveContexts(export), _extended));
    }

    private async Task ListAsync(byte[] data, CancellationToken cancellationToken)
    {
        if (data.Length != 0)
        {
            await ReplyErrorAsync(NbdOption.List, OptionReplyType.ErrInvalid, "LIST takes no data", cancellationToken).ConfigureAwait(false);
            return;
        }
        foreach (ExportInfo info in await exports.ListAsync(cancellationToken).ConfigureAwait(false))
        {
            if (!Visible(info))
            {
                continue;
            }
            // The name, then implementation-specific details: the description.
            var entry = new ServerEntry(info.Name, info.Description ?? "");
            WriteReply(NbdOption.List, OptionReplyType.Server, entry.Size, d => ServerEntry.Write(d, entry));
        }
        await ReplyAsync(NbdOption.List, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken).ConfigureAwait(false);
    }

    private async Task<NegotiatedSession?> InfoOrGoAsync(NbdOption option, byte[] data, CancellationToken cancellationToken)
    {
        if (!InfoRequest.TryRead(data, out InfoRequest request, out OptionDataFault fault))
        {
            (OptionReplyType type, string problem) = fault switch
            {
                OptionDataFault.TooShort => (OptionReplyType.ErrInvalid, "option data too short"),
                OptionDataFault.NameLength => (OptionReplyType.ErrInvalid, "name length inconsistent with option length"),
                OptionDataFault.NameTooLong => (OptionReplyType.ErrTooBig, "export name over 4096 bytes"),
                _ => (OptionReplyType.ErrInvalid, "information request count inconsistent with option length"),
            };
            await ReplyErrorAsync(option, type, problem, cancellationToken).ConfigureAwait(false);
            return null;
        }
        string name = request.ExportName;
        bool wantName = request.Requests.Contains(InfoType.Name);
        bool wantDescription = request.Requests.Contains(InfoType.Description);

        ExportHandle? export = await OpenAsync(name, cancellationToken).ConfigureAwait(false);
        if (export is null)
        {
            await ReplyErrorAsync(option, OptionReplyType.ErrUnknown, $"export '{name}' not present", cancellationToken).ConfigureAwait(false);
            return null;
        }
        ExportInfo info = export.Info;
        if (await RefusalAsync(info, attach: option == NbdOption.Go, cancellationToken).ConfigureAwait(false) is (OptionReplyType refusalType, string refusal))
        {
            await ReplyErrorAsync(option, refusalType, refusal, cancellationToken).ConfigureAwait(false);
            return null;
        }

        var exportInfo = new InfoExport((ulong)info.Size, AdvertisedFlags(info));
        WriteReply(option, OptionReplyType.Info, InfoReply.ExportSize, d => InfoReply.WriteExport(d, exportInfo));
        if (wantName)
        {
            WriteReply(option, OptionReplyType.Info, InfoReply.TextSize(info.Name), d => InfoReply.WriteText(d, InfoType.Name, info.Name));
        }
        if (wantDescription && info.Description is { Length: > 0 } description)
        {
            WriteReply(option, OptionReplyType.Info, InfoReply.TextSize(description), d => InfoReply.WriteText(d, InfoType.Description, description));
        }
        // Sent whether asked for or not: the client learns the limits it must keep to.
        var blockSize = new InfoBlockSize(NbdLimits.MinBlockSize, NbdLimits.PreferredBlockSize, NbdLimits.MaxPayload);
        WriteReply(option, OptionReplyType.Info, InfoReply.BlockSizeSize, d => InfoReply.WriteBlockSize(d, blockSize));

        await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken).ConfigureAwait(false);
        if (option == NbdOption.Info)
        {
            return null;
        }

        // Contexts chosen for another export do not carry over to this one (as in qemu).
        if (_contextExport is not null && _contextExport != name)
        {
            _selected = [];
        }
        return new NegotiatedSession(export, _structured, ResolveContexts(export), _extended);
    }

    private IReadOnlyList<SelectedContext> ResolveContexts(ExportHandle export)
    {
        var contexts = new List<SelectedContext>();
        foreach ((uint id, string contextName) in _selected)
        {
            MetaContext? context = export.MetaContexts.FirstOrDefault(c => c.Name == contextName);
            if (context is not null)
            {
                contexts.Add(new SelectedContext(id, context));
            }
        }
        return contexts;
    }

    private async Task MetaContextAsync(NbdOption option, byte[] data, CancellationToken cancellationToken)
    {
        bool list = option == NbdOption.ListMetaContext;
        if (!_structured)
        {
            await ReplyErrorAsync(option, OptionReplyType.ErrInvalid, "structured replies must be negotiated first", cancellationToken).ConfigureAwait(false);
            return;
        }
        if (!MetaContextRequest.TryRead(data, out MetaContextRequest request, out OptionDataFault fault))
        {
            string problem = fault switch
            {
                OptionDataFault.Query => "query inconsistent with option length",
                OptionDataFault.Trailing => "trailing bytes after the queries",
                _ => "export name inconsistent with option length",
            };
            await ReplyErrorAsync(option, OptionReplyType.ErrInvalid, problem, cancellationToken).ConfigureAwait(false);
            return;
        }
        (string name, string[] queries) = request;
        ExportHandle? export = await OpenAsync(name, cancellationToken).ConfigureAwait(false);
        if (export is null)
        {
            await ReplyErrorAsync(option, OptionReplyType.ErrUnknown, $"export '{name}' not present", cancellationToken).ConfigureAwait(false);
            return;
        }
        if (await RefusalAsync(export.Info, attach: false, cancellationToken).ConfigureAwait(false) is (OptionReplyType refusalType, string refusal))
        {
            await ReplyErrorAsync(option, refusalType, refusal, cancellationToken).ConfigureAwait(false);
            return;
        }

        var matched = new List<(uint Id, string Name)>();
        for (int id = 0; id < export.MetaContexts.Count; id++)
        {
            string contextName = export.MetaContexts[id].Name;
            bool match = list && queries.Length == 0;
            foreach (string query in queries)
            {
                match |= MetaContextMatches(query, contextName, list);
            }
            if (match)
            {
                matched.Add(((uint)id, contextName));
            }
        }
        foreach ((uint id, string contextName) in matched)
        {
            var reply = new MetaContextReply(list ? 0 : id, contextName);
            WriteReply(option, OptionReplyType.MetaContext, reply.Size, d => MetaContextReply.Write(d, reply));
        }
        if (!list)
        {
            _contextExport = name;
            _selected = matched;
        }
        await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// An exact name selects its context. In LIST only, a namespace prefix ending in ':'
    /// ("base:", "qemu:", "qemu:dirty-bitmap:") lists every context under it, as qemu does.
    /// </summary>
    public static bool MetaContextMatches(string query, string contextName, bool list) =>
        query == contextName || (list && query.EndsWith(':') && contextName.StartsWith(query, StringComparison.Ordinal));

    private void WriteReply(NbdOption option, OptionReplyType type, ReadOnlySpan<byte> data)
    {
        output.Advance(OptionReplyHeader.Write(output.GetSpan(NbdWire.OptionReplyHeaderSize), new OptionReplyHeader(option, type, (uint)data.Length)));
        output.Write(data);
    }

    /// <summary>An option reply of <paramref name="length"/> bytes of data, which <paramref name="write"/> writes with the codec.</summary>
    private void WriteReply(NbdOption option, OptionReplyType type, int length, Func<Span<byte>, int> write)
    {
        Span<byte> span = output.GetSpan(NbdWire.OptionReplyHeaderSize + length);
        int header = OptionReplyHeader.Write(span, new OptionReplyHeader(option, type, (uint)length));
        int written = write(span.Slice(header, length));
        Debug.Assert(written == length, $"{type} data of {written} bytes announced as {length}");
        output.Advance(header + length);
    }

    private async Task ReplyAsync(NbdOption option, OptionReplyType type, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        WriteReply(option, type, data.Span);
        await output.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    private Task ReplyErrorAsync(NbdOption option, OptionReplyType type, string message, CancellationToken cancellationToken)
    {
        logger.LogDebug("NBD option {Option} refused with {Reply}: {Message}", option, type, message);
        return ReplyAsync(option, type, Encoding.UTF8.GetBytes(message), cancellationToken);
    }

    private async Task<ReadOnlySequence<byte>> ReadExactlyAsync(int count, CancellationToken cancellationToken)
    {
        ReadResult result = await input.ReadAtLeastAsync(count, cancellationToken).ConfigureAwait(false);
        if (result.Buffer.Length < count)
        {
            throw new EndOfStreamException("client closed the connection during the handshake");
        }
        return result.Buffer;
    }

    /// <summary>
    /// Reads one frame of <paramref name="size"/> bytes with the codec's reader. The whole frame is
    /// awaited first; a bad magic then throws, which ends the handshake.
    /// </summary>
    private async Task<T> ReadFrameAsync<T>(int size, FrameReader<T> read, CancellationToken cancellationToken)
    {
        ReadOnlySequence<byte> buffer = await ReadExactlyAsync(size, cancellationToken).ConfigureAwait(false);
        try
        {
            return read(ref buffer, out T frame) ? frame : throw new UnreachableException($"{size} bytes do not hold a {typeof(T).Name}");
        }
        finally
        {
            input.AdvanceTo(buffer.Start);
        }
    }

    private async Task DiscardAsync(long count, CancellationToken cancellationToken)
    {
        while (count > 0)
        {
            ReadResult result = await input.ReadAsync(cancellationToken).ConfigureAwait(false);
            long take = Math.Min(count, result.Buffer.Length);
            input.AdvanceTo(result.Buffer.GetPosition(take));
            count -= take;
            if (count > 0 && result.IsCompleted)
            {
                throw new EndOfStreamException("client closed the connection during the handshake");
            }
        }
    }
}
