namespace Gateway.Actors.Tls;

/// <summary>
/// The socket's stream under an <see cref="System.Net.Security.SslStream"/>, taking from the
/// socket as much as is there (up to the buffer) in one receive. SslStream reads one TLS record
/// at a time, and for each first waits with a zero-byte read (on Linux a one-byte
/// <c>recv(MSG_PEEK)</c>) and then receives the record: two syscalls per 16 KiB of data. A 1 MiB
/// read forwarded over cluster TLS took 130 receives on the non-owner, each sending a window
/// update the owner's pending data then went out under (loopback runs the peer's transmit in the
/// receiver's syscall); here it takes a handful (README "Cluster TLS"). Writes pass through.
/// <para>
/// Reads and writes may run at once (SslStream's own rule: one read and one write at a time);
/// reads touch only the buffer, writes only the inner stream. Bytes are handed out in the order
/// they arrived, none dropped: the buffer holds only what no read has taken yet.
/// </para>
/// </summary>
public sealed class ReadAheadStream(Stream inner, int bufferSize = ReadAheadStream.DefaultBufferSize, bool leaveOpen = false) : Stream
{
    /// <summary>Sixteen TLS records and their overhead: a 1 MiB read in about four receives when the data is there.</summary>
    public const int DefaultBufferSize = 256 * 1024;

    private readonly byte[] _buffer = new byte[bufferSize];

    // Bytes [_start, _end) of _buffer are received and not yet read.
    private int _start;
    private int _end;

    /// <summary>Receives from the inner stream so far (tests: a read of many records takes few).</summary>
    internal long InnerReads { get; private set; }

    public override bool CanRead => inner.CanRead;

    public override bool CanWrite => inner.CanWrite;

    public override bool CanSeek => false;

    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => throw new NotSupportedException();
        set => throw new NotSupportedException();
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> destination)
    {
        if (_start == _end)
        {
            if (destination.IsEmpty)
            {
                // A zero-byte read waits for data; it takes none.
                return inner.Read(destination);
            }
            if (destination.Length >= _buffer.Length)
            {
                InnerReads++;
                return inner.Read(destination);
            }
            InnerReads++;
            _start = 0;
            _end = inner.Read(_buffer);
        }
        return Take(destination);
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override ValueTask<int> ReadAsync(Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        if (_start != _end)
        {
            return new ValueTask<int>(Take(destination.Span));
        }
        if (destination.IsEmpty)
        {
            return inner.ReadAsync(destination, cancellationToken);
        }
        InnerReads++;
        if (destination.Length >= _buffer.Length)
        {
            // Large enough to receive into directly: no copy.
            return inner.ReadAsync(destination, cancellationToken);
        }
        ValueTask<int> filling = inner.ReadAsync(_buffer, cancellationToken);
        if (filling.IsCompletedSuccessfully)
        {
            _start = 0;
            _end = filling.Result;
            return new ValueTask<int>(Take(destination.Span));
        }
        return FillThenTakeAsync(filling, destination);
    }

    private async ValueTask<int> FillThenTakeAsync(ValueTask<int> filling, Memory<byte> destination)
    {
        int received = await filling.ConfigureAwait(false);
        _start = 0;
        _end = received;
        return Take(destination.Span);
    }

    /// <summary>Hands out what is buffered, up to <paramref name="destination"/>'s length (0 at the end of the stream).</summary>
    private int Take(Span<byte> destination)
    {
        int count = Math.Min(_end - _start, destination.Length);
        _buffer.AsSpan(_start, count).CopyTo(destination);
        _start += count;
        return count;
    }

    public override void Write(byte[] buffer, int offset, int count) => inner.Write(buffer, offset, count);

    public override void Write(ReadOnlySpan<byte> buffer) => inner.Write(buffer);

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        inner.WriteAsync(buffer, offset, count, cancellationToken);

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) =>
        inner.WriteAsync(buffer, cancellationToken);

    public override void Flush() => inner.Flush();

    public override Task FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing && !leaveOpen)
        {
            inner.Dispose();
        }
        base.Dispose(disposing);
    }
}
