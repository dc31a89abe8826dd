using System.Net.Sockets;
using Gateway.Backends;

namespace Gateway.Actors.Nbd;

/// <summary>
/// Sends a range of an export's file straight to the connection's socket: <c>sendfile(2)</c>,
/// through <see cref="Socket.SendPacketsAsync"/> with one file element (on Linux the runtime calls
/// sendfile with the offset, and waits for a full socket in its own event loop). The page-cache
/// pages go to the socket by reference: the gateway does not copy the data at all, where a
/// <c>pread</c> into a buffer and a <c>send</c> from it copy it twice. Plain-text sockets only
/// (TLS encrypts in user space). One per connection, used by its one writer, one send at a time.
/// </summary>
internal sealed class FileSender : IDisposable
{
    private readonly Socket _socket;
    private readonly SocketAsyncEventArgs _args = new();
    private readonly SendPacketsElement[] _elements = new SendPacketsElement[1];
    private TaskCompletionSource<SocketError>? _pending;

    public FileSender(Socket socket)
    {
        _socket = socket;
        _args.Completed += (_, args) => _pending?.TrySetResult(args.SocketError);
    }

    /// <summary>Replies whose data went out this way, process-wide (tests read it).</summary>
    internal static long Sends;

    public async ValueTask SendAsync(FileRegion region, int length)
    {
        _elements[0] = new SendPacketsElement(region.File, region.Offset, length, endOfPacket: true);
        _args.SendPacketsElements = _elements;
        var pending = new TaskCompletionSource<SocketError>();
        _pending = pending;
        SocketError error;
        try
        {
            error = _socket.SendPacketsAsync(_args) ? await pending.Task.ConfigureAwait(false) : _args.SocketError;
        }
        catch (ArgumentException e)
        {
            // The file is shorter than the region (someone truncated it under the export): the
            // reply cannot be completed, so the connection ends like a broken socket.
            throw new IOException($"sendfile of {length} bytes at {region.Offset} refused: {e.Message}", e);
        }
        _pending = null;
        _elements[0] = null!;
        if (error != SocketError.Success)
        {
            throw new IOException($"sendfile of {length} bytes failed: {error}", new SocketException((int)error));
        }
        if (_args.BytesTransferred != length)
        {
            throw new IOException($"sendfile sent {_args.BytesTransferred} of {length} bytes");
        }
        Interlocked.Increment(ref Sends);
    }

    public void Dispose() => _args.Dispose();
}
