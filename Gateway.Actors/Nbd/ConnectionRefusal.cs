using System.Buffers;
using System.Text;

namespace Gateway.Actors.Nbd;

/// <summary>
/// Turns away a client the node has no room for, in words the client can show its user. Closing
/// the socket at once (what nbdkit's limit filter does) makes libnbd say "server disconnected
/// unexpectedly" and qemu "Failed to read initial magic"; not accepting (qemu-nbd) leaves the
/// client hanging with no answer. Instead this speaks just enough of the fixed newstyle handshake
/// to answer every option with <c>NBD_REP_ERR_POLICY</c> and the reason (proto.md "Option reply
/// types": the option is not allowed by server policy), which libnbd and qemu both print, then
/// closes. EXPORT_NAME has no error reply, so it is closed on; ABORT is acknowledged. It holds no
/// state beyond a small buffer, never opens an export, and is bounded in time and options.
/// </summary>
public static class ConnectionRefusal
{
    private const int MaxOptions = 16;

    /// <summary>Refuses the client on <paramref name="stream"/> and disposes it. Never throws for a client's doing.</summary>
    public static async Task RefuseAsync(Stream stream, string reason, TimeSpan timeout, CancellationToken stopping)
    {
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(stopping);
        deadline.CancelAfter(timeout);
        CancellationToken token = deadline.Token;
        byte[] buffer = new byte[NbdLimits.MaxString];
        byte[] message = Encoding.UTF8.GetBytes(reason);
        try
        {
            int greeting = Handshake.WriteGreeting(buffer, OptionNegotiator.ServerFlags);
            await stream.WriteAsync(buffer.AsMemory(0, greeting), token).ConfigureAwait(false);

            // Without fixed newstyle there is no way to send an error.
            ClientFlags flags = await ReadFrameAsync<ClientFlags>(stream, buffer, NbdWire.ClientFlagsSize, Handshake.TryReadClientFlags, token).ConfigureAwait(false);
            if ((flags & ClientFlags.FixedNewstyle) == 0)
            {
                return;
            }
            for (int i = 0; i < MaxOptions; i++)
            {
                // A bad magic throws NbdProtocolException: closed on, as below.
                (NbdOption option, uint length) = await ReadFrameAsync<OptionHeader>(stream, buffer, NbdWire.OptionHeaderSize, OptionHeader.TryRead, token).ConfigureAwait(false);
                if (length > NbdLimits.MaxOptionLength || option == NbdOption.ExportName)
                {
                    return;
                }
                for (uint left = length; left > 0;)
                {
                    int chunk = (int)Math.Min(left, (uint)buffer.Length);
                    await stream.ReadExactlyAsync(buffer.AsMemory(0, chunk), token).ConfigureAwait(false);
                    left -= (uint)chunk;
                }
                bool abort = option == NbdOption.Abort;
                await ReplyAsync(stream, buffer, option, abort ? OptionReplyType.Ack : OptionReplyType.ErrPolicy, abort ? [] : message, token).ConfigureAwait(false);
                if (abort)
                {
                    return;
                }
            }
        }
        catch (Exception e) when (e is IOException or EndOfStreamException or OperationCanceledException or ObjectDisposedException
            or System.Net.Sockets.SocketException or NbdProtocolException)
        {
            // The client left, stalled past the deadline, sent garbage, or the node is stopping: it is refused either way.
        }
        finally
        {
            await stream.DisposeAsync().ConfigureAwait(false);
        }
    }

    private static async Task<T> ReadFrameAsync<T>(Stream stream, byte[] buffer, int size, FrameReader<T> read, CancellationToken token)
    {
        await stream.ReadExactlyAsync(buffer.AsMemory(0, size), token).ConfigureAwait(false);
        var frame = new ReadOnlySequence<byte>(buffer, 0, size);
        return read(ref frame, out T value) ? value : throw new System.Diagnostics.UnreachableException($"{size} bytes do not hold a {typeof(T).Name}");
    }

    private static async Task ReplyAsync(Stream stream, byte[] buffer, NbdOption option, OptionReplyType type, byte[] data, CancellationToken token)
    {
        int length = Math.Min(data.Length, buffer.Length - NbdWire.OptionReplyHeaderSize);
        int header = OptionReplyHeader.Write(buffer, new OptionReplyHeader(option, type, (uint)length));
        data.AsSpan(0, length).CopyTo(buffer.AsSpan(header));
        await stream.WriteAsync(buffer.AsMemory(0, header + length), token).ConfigureAwait(false);
    }
}
