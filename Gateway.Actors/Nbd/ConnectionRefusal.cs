using System.Buffers.Binary;
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
    private const int HeaderSize = 16;

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
            // S: NBDMAGIC, IHAVEOPT, handshake flags (as the negotiator sends them).
            BinaryPrimitives.WriteUInt64BigEndian(buffer, NbdMagic.InitPassword);
            BinaryPrimitives.WriteUInt64BigEndian(buffer.AsSpan(8), NbdMagic.IHaveOpt);
            BinaryPrimitives.WriteUInt16BigEndian(buffer.AsSpan(16), (ushort)(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes));
            await stream.WriteAsync(buffer.AsMemory(0, 18), token).ConfigureAwait(false);

            // C: 32 bits, client flags. Without fixed newstyle there is no way to send an error.
            await stream.ReadExactlyAsync(buffer.AsMemory(0, 4), token).ConfigureAwait(false);
            if (((ClientFlags)BinaryPrimitives.ReadUInt32BigEndian(buffer) & ClientFlags.FixedNewstyle) == 0)
            {
                return;
            }
            for (int i = 0; i < MaxOptions; i++)
            {
                // C: IHAVEOPT, 32 bits option, 32 bits length, data.
                await stream.ReadExactlyAsync(buffer.AsMemory(0, HeaderSize), token).ConfigureAwait(false);
                ulong magic = BinaryPrimitives.ReadUInt64BigEndian(buffer);
                var option = (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(buffer.AsSpan(8));
                uint length = BinaryPrimitives.ReadUInt32BigEndian(buffer.AsSpan(12));
                if (magic != NbdMagic.IHaveOpt || length > NbdLimits.MaxOptionLength || option == NbdOption.ExportName)
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
        catch (Exception e) when (e is IOException or EndOfStreamException or OperationCanceledException or ObjectDisposedException or System.Net.Sockets.SocketException)
        {
            // The client left, stalled past the deadline, or the node is stopping: it is refused either way.
        }
        finally
        {
            await stream.DisposeAsync().ConfigureAwait(false);
        }
    }

    // S: 64 bits, 0x3e889045565a9 (reply magic), 32 bits option, 32 bits reply type, 32 bits length, data.
    private static async Task ReplyAsync(Stream stream, byte[] buffer, NbdOption option, OptionReplyType type, byte[] data, CancellationToken token)
    {
        int length = Math.Min(data.Length, buffer.Length - 20);
        BinaryPrimitives.WriteUInt64BigEndian(buffer, NbdMagic.OptionReply);
        BinaryPrimitives.WriteUInt32BigEndian(buffer.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(buffer.AsSpan(12), (uint)type);
        BinaryPrimitives.WriteUInt32BigEndian(buffer.AsSpan(16), (uint)length);
        data.AsSpan(0, length).CopyTo(buffer.AsSpan(20));
        await stream.WriteAsync(buffer.AsMemory(0, 20 + length), token).ConfigureAwait(false);
    }
}
