using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using Gateway.Actors.Tls;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// <see cref="ReadAheadStream"/>, the receive buffer under cluster TLS's SslStream: every byte
/// comes out once and in order whatever the read sizes, a zero-byte read with data buffered takes
/// nothing from the socket, SslStream's record-at-a-time reads share one receive, and TLS over it
/// carries data both ways at once.
/// </summary>
public sealed class ReadAheadStreamTests
{
    private const int KiB = 1024;

    /// <summary>What a socket gives: at most <paramref name="piece"/> bytes per read, counted.</summary>
    private sealed class ChunkySource(byte[] data, int piece) : Stream
    {
        private int _at;

        public int Reads { get; private set; }

        public int ZeroByteReads { get; private set; }

        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

        public override int Read(Span<byte> buffer)
        {
            if (buffer.IsEmpty)
            {
                ZeroByteReads++;
                return 0;
            }
            Reads++;
            int count = Math.Min(Math.Min(piece, buffer.Length), data.Length - _at);
            data.AsSpan(_at, count).CopyTo(buffer);
            _at += count;
            return count;
        }

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
            new(Read(buffer.Span));

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    [Theory]
    [InlineData(1)]
    [InlineData(1000)]
    [InlineData(300 * 1024)]
    public async Task Every_byte_comes_out_once_and_in_order_whatever_the_read_sizes(int piece)
    {
        byte[] data = new byte[1024 * KiB + 17];
        new Random(piece).NextBytes(data);
        var stream = new ReadAheadStream(new ChunkySource(data, piece), bufferSize: 64 * KiB);
        var sizes = new[] { 0, 1, 5, 16 * KiB + 5, 0, 64 * KiB, 100 * KiB, 3, 0, 200 * KiB };
        using var read = new MemoryStream();
        byte[] buffer = new byte[256 * KiB];
        for (int i = 0; ; i++)
        {
            int size = sizes[i % sizes.Length];
            int n = i % 2 == 0 ? await stream.ReadAsync(buffer.AsMemory(0, size)) : stream.Read(buffer, 0, size);
            if (n == 0 && size > 0)
            {
                break;
            }
            read.Write(buffer, 0, n);
        }
        Assert.Equal(data, read.ToArray());
    }

    [Fact]
    public async Task Record_sized_reads_share_one_receive_and_a_zero_byte_read_takes_nothing_while_data_is_buffered()
    {
        byte[] data = new byte[1024 * KiB];
        new Random(5).NextBytes(data);
        var source = new ChunkySource(data, int.MaxValue);
        var stream = new ReadAheadStream(source);
        byte[] record = new byte[16 * KiB + 22];
        int total = 0;
        while (true)
        {
            // SslStream's way: a zero-byte read (wait for data), then a record.
            Assert.Equal(0, await stream.ReadAsync(Memory<byte>.Empty));
            int n = await stream.ReadAsync(record);
            if (n == 0)
            {
                break;
            }
            Assert.Equal(data.AsSpan(total, n).ToArray(), record.AsSpan(0, n).ToArray());
            total += n;
        }
        Assert.Equal(data.Length, total);
        // 1 MiB in buffers of 256 KiB, and the read that finds the end: not one receive per record.
        Assert.Equal(5, source.Reads);
        Assert.Equal(5, stream.InnerReads);
        // Only the zero-byte reads made with nothing buffered reach the source.
        Assert.Equal(5, source.ZeroByteReads);
    }

    [Fact]
    public async Task Tls_over_it_carries_data_both_ways_at_once_unchanged()
    {
        using var pki = new TestCertificates();
        using X509Certificate2 certificate = X509Certificate2.CreateFromPemFile(pki.CertPath, pki.KeyPath);
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        using var clientSocket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        Task<Socket> accepting = listener.AcceptAsync();
        await clientSocket.ConnectAsync(listener.LocalEndPoint!);
        using Socket serverSocket = await accepting;

        await using var client = new SslStream(new ReadAheadStream(new NetworkStream(clientSocket)));
        await using var server = new SslStream(new ReadAheadStream(new NetworkStream(serverSocket), 64 * KiB));
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await Task.WhenAll(
            client.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
            {
                TargetHost = "localhost",
                RemoteCertificateValidationCallback = (_, _, _, _) => true,
            }, timeout.Token),
            server.AuthenticateAsServerAsync(new SslServerAuthenticationOptions { ServerCertificate = certificate }, timeout.Token));

        byte[] up = new byte[4 * 1024 * KiB];
        byte[] down = new byte[3 * 1024 * KiB + 3];
        new Random(1).NextBytes(up);
        new Random(2).NextBytes(down);
        byte[] gotUp = new byte[up.Length];
        byte[] gotDown = new byte[down.Length];
        await Task.WhenAll(
            WriteInPiecesAsync(client, up, timeout.Token),
            WriteInPiecesAsync(server, down, timeout.Token),
            server.ReadExactlyAsync(gotUp, timeout.Token).AsTask(),
            client.ReadExactlyAsync(gotDown, timeout.Token).AsTask());
        Assert.Equal(up, gotUp);
        Assert.Equal(down, gotDown);
    }

    private static async Task WriteInPiecesAsync(Stream stream, byte[] data, CancellationToken cancellationToken)
    {
        // Small writes and large ones, as a request stream and read replies mix them.
        int[] pieces = [32, 1024 * KiB, 4096, 7, 300 * KiB];
        for (int at = 0, i = 0; at < data.Length; i++)
        {
            int n = Math.Min(pieces[i % pieces.Length], data.Length - at);
            await stream.WriteAsync(data.AsMemory(at, n), cancellationToken);
            at += n;
        }
        await stream.FlushAsync(cancellationToken);
    }
}
