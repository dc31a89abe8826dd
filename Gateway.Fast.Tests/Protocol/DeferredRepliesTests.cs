using Gateway.Actors.Nbd;
using Gateway.Backends;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// Forwarded requests answered one after another on one thread (the peer stream's read loop,
/// between <see cref="DeferredReplies.Begin"/> and <see cref="DeferredReplies.End"/>): their
/// replies wait until <see cref="DeferredReplies.Flush"/> and then reach the client in one write,
/// not one write each (issue 19, item 4).
/// </summary>
[Collection(NbdServerCollection.Name)]
public sealed class DeferredRepliesTests : IAsyncLifetime
{
    private const int KiB = 1024;
    private const string Export = "held";

    private readonly HeldReadsDevice _device = new(new MemoryBackend(1024 * KiB));
    private readonly NbdTestServer _server;
    private CountingStream? _served;

    public DeferredRepliesTests()
    {
        var exports = new TestExportDirectory();
        exports.AddAsIs(Export, _device);
        _server = new NbdTestServer(exports) { WrapConnection = stream => _served = new CountingStream(stream) };
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _server.DisposeAsync();

    [Fact]
    public async Task Replies_answered_together_on_one_thread_go_to_the_client_in_one_write()
    {
        const int Reads = 8;
        byte[] data = RawClient.Pattern(Reads * 4 * KiB, 31);
        await _device.Inner.WriteAsync(0, data, fua: false);
        await using RawClient client = await _server.OpenAsync(Export);
        var batch = new List<byte>();
        for (int i = 0; i < Reads; i++)
        {
            client.Expect(NbdCommand.Read, (ulong)i + 1, 4 * KiB, (ulong)i * 4 * KiB);
            batch.AddRange(RawClient.Request(NbdCommand.Read, CommandFlags.None, (ulong)i + 1, (ulong)i * 4 * KiB, 4 * KiB));
        }
        await client.SendAsync(batch.ToArray());
        Assert.True(await NbdTestServer.EventuallyAsync(() => _device.Waiting == Reads));

        long writesBefore = _served!.Writes;
        int held = await Task.Run(() =>
        {
            // As the peer stream's read loop does: the reads are answered inline, their replies held.
            DeferredReplies.Begin();
            try
            {
                _device.AnswerAll();
            }
            finally
            {
                DeferredReplies.End();
            }
            int count = DeferredReplies.Held;
            DeferredReplies.Flush();
            return count;
        });

        Assert.Equal(Reads, held);
        var replies = new List<NbdReply>();
        for (int i = 0; i < Reads; i++)
        {
            replies.Add(await client.ReadReplyAsync());
        }
        Assert.Equal(Enumerable.Range(1, Reads).Select(i => (ulong)i), replies.Select(r => r.Cookie).Order());
        foreach (NbdReply reply in replies)
        {
            ulong offset = (reply.Cookie - 1) * 4 * KiB;
            Assert.Equal(NbdError.None, reply.Error);
            Assert.Equal(data.AsSpan((int)offset, 4 * KiB).ToArray(), reply.Data(offset, 4 * KiB));
        }
        Assert.Equal(1, _served.Writes - writesBefore);
    }

    [Fact]
    public async Task Replies_answered_outside_a_deferral_are_not_held()
    {
        await using RawClient client = await _server.OpenAsync(Export);
        client.Expect(NbdCommand.Read, 1, 4 * KiB);
        await client.SendAsync(RawClient.Request(NbdCommand.Read, CommandFlags.None, 1, 0, 4 * KiB));
        Assert.True(await NbdTestServer.EventuallyAsync(() => _device.Waiting == 1));

        int held = await Task.Run(() =>
        {
            _device.AnswerAll();
            return DeferredReplies.Held;
        });

        Assert.Equal(0, held);
        Assert.Equal(1ul, (await client.ReadReplyAsync()).Cookie);
    }

    /// <summary>Stands for a link to the owner: reads wait until <see cref="AnswerAll"/> answers them, on the calling thread.</summary>
    private sealed class HeldReadsDevice(IBlockDevice inner) : IBlockDevice, IForwardingDevice, ISegmentedReads, IRequestBatch
    {
        private readonly Lock _lock = new();
        private readonly List<(long Offset, Memory<byte> Destination, Memory<Extent> Segments, TaskCompletionSource<int> Reply)> _waiting = [];

        public IBlockDevice Inner { get; } = inner;

        public int Waiting
        {
            get
            {
                lock (_lock)
                {
                    return _waiting.Count;
                }
            }
        }

        public long Size => Inner.Size;

        public bool IsReadOnly => Inner.IsReadOnly;

        public BlockCapabilities Capabilities => Inner.Capabilities;

        public bool IsRemote => true;

        public bool ReadsSegments => true;

        public IRequestBatch? Cork() => this;

        public void Uncork()
        {
        }

        public void AnswerAll()
        {
            List<(long Offset, Memory<byte> Destination, Memory<Extent> Segments, TaskCompletionSource<int> Reply)> waiting;
            lock (_lock)
            {
                waiting = [.. _waiting];
                _waiting.Clear();
            }
            foreach ((long offset, Memory<byte> destination, Memory<Extent> segments, TaskCompletionSource<int> reply) in waiting)
            {
                // The memory backend answers at once; the caller's continuation runs here, as on the peer stream's reader.
                Inner.ReadAsync(offset, destination).AsTask().GetAwaiter().GetResult();
                segments.Span[0] = new Extent(destination.Length, ExtentFlags.Data);
                reply.SetResult(1);
            }
        }

        public ValueTask<int> ReadSegmentsAsync(long offset, Memory<byte> destination, Memory<Extent> segments, CancellationToken cancellationToken = default)
        {
            var reply = new TaskCompletionSource<int>();
            lock (_lock)
            {
                _waiting.Add((offset, destination, segments, reply));
            }
            return new ValueTask<int>(reply.Task);
        }

        public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
            Inner.GetAllocationAsync(offset, length, extents, cancellationToken);

        public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) => Inner.ReadAsync(offset, destination, cancellationToken);

        public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) => Inner.WriteAsync(offset, source, fua, cancellationToken);

        public ValueTask FlushAsync(CancellationToken cancellationToken = default) => Inner.FlushAsync(cancellationToken);

        public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) => Inner.TrimAsync(offset, length, fua, cancellationToken);

        public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) => Inner.ZeroAsync(offset, length, flags, cancellationToken);

        public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) => Inner.CacheAsync(offset, length, cancellationToken);

        public void Dispose() => Inner.Dispose();
    }

    /// <summary>Counts the writes the server makes to its client's stream.</summary>
    private sealed class CountingStream(Stream inner) : Stream
    {
        private long _writes;

        public long Writes => Interlocked.Read(ref _writes);

        public override bool CanRead => inner.CanRead;

        public override bool CanSeek => false;

        public override bool CanWrite => inner.CanWrite;

        public override long Length => throw new NotSupportedException();

        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

        public override void Flush() => inner.Flush();

        public override Task FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);

        public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, count);

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => inner.ReadAsync(buffer, cancellationToken);

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => inner.ReadAsync(buffer, offset, count, cancellationToken);

        public override void Write(byte[] buffer, int offset, int count)
        {
            Interlocked.Increment(ref _writes);
            inner.Write(buffer, offset, count);
        }

        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            Interlocked.Increment(ref _writes);
            return inner.WriteAsync(buffer, cancellationToken);
        }

        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

        public override void SetLength(long value) => throw new NotSupportedException();

        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                inner.Dispose();
            }
            base.Dispose(disposing);
        }

        public override ValueTask DisposeAsync() => inner.DisposeAsync();
    }
}
