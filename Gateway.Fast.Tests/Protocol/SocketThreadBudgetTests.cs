using System.IO.Pipelines;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// A connection's loop on a socket thread (completions inline, README "gateway serve") gives the
/// thread back while its client keeps it busy (<c>Transmission.SocketThreadBudget</c>): every other
/// connection on that thread waits for it meanwhile. A dedicated thread stands for the socket
/// thread here, as any thread outside the pool does for the loop.
/// </summary>
public sealed class SocketThreadBudgetTests
{
    private const int Writes = 200;
    private const int WriteLength = 4096;

    [Fact]
    public async Task A_loop_holding_a_socket_thread_moves_to_the_pool_within_its_budget_while_requests_keep_coming()
    {
        // Each inline write takes 1 ms (a buffered pwrite in dirty-page throttling), and all 200
        // are already in the input: the loop's reads never wait, so only the budget lets go.
        using var device = new SlowInlineWrites(new MemoryBackend(Writes * WriteLength, readOnly: false), TimeSpan.FromMilliseconds(1));
        var info = new ExportInfo("disk0", null, device.Size, device.IsReadOnly, device.Capabilities);
        var export = new ExportHandle(info, device, [new BaseAllocationContext(device)], CancellationToken.None);
        var session = new NegotiatedSession(export, StructuredReplies: false, []);

        var input = new Pipe(new PipeOptions(pauseWriterThreshold: 0));
        var output = new Pipe(new PipeOptions(pauseWriterThreshold: 0));
        byte[] payload = new byte[WriteLength];
        for (int i = 0; i < Writes; i++)
        {
            payload.AsSpan().Fill((byte)i);
            await input.Writer.WriteAsync(RawClient.Request(NbdCommand.Write, CommandFlags.None, (ulong)i, (ulong)(i * WriteLength), WriteLength, payload));
        }
        await input.Writer.WriteAsync(RawClient.Request(NbdCommand.Disconnect, CommandFlags.None, 0, 0, 0));
        var transmission = new Transmission(input.Reader, output.Writer, Stream.Null, session, NullLogger.Instance);

        Task? run = null;
        var socketThread = new Thread(() => run = transmission.RunAsync(CancellationToken.None)) { IsBackground = true };
        socketThread.Start();
        socketThread.Join();
        await run!.WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal(Writes, device.InlineWrites + device.PooledWrites);
        Assert.True(device.FirstOnDedicatedThread, "the loop did not start on the thread that called it");
        // 5 ms at 1 ms a write: about 5 on the socket thread, then the pool; 40 leaves room for a
        // slow machine and is far below the 200 an unbounded loop holds the thread for.
        Assert.InRange(device.OnDedicatedThread, 1, 40);
        byte[] back = new byte[WriteLength];
        await device.ReadAsync((Writes - 1) * WriteLength, back);
        Assert.All(back, b => Assert.Equal((byte)(Writes - 1), b));
    }

    /// <summary>Inline writes that take their time and count the threads they ran on.</summary>
    private sealed class SlowInlineWrites(MemoryBackend inner, TimeSpan perWrite) : IBlockDevice, INonBlockingIo
    {
        private int _first = -1;

        public int InlineWrites;
        public int PooledWrites;
        public int OnDedicatedThread;

        public bool FirstOnDedicatedThread => _first == 1;

        public long Size => inner.Size;

        public bool IsReadOnly => inner.IsReadOnly;

        public BlockCapabilities Capabilities => inner.Capabilities;

        public bool TryReadNoWait(long offset, Span<byte> destination) => inner.TryReadNoWait(offset, destination);

        public bool TryWriteNoWait(long offset, ReadOnlySpan<byte> source)
        {
            bool dedicated = !Thread.CurrentThread.IsThreadPoolThread;
            Interlocked.CompareExchange(ref _first, dedicated ? 1 : 0, -1);
            if (dedicated)
            {
                Interlocked.Increment(ref OnDedicatedThread);
            }
            Thread.Sleep(perWrite);
            Interlocked.Increment(ref InlineWrites);
            return inner.TryWriteNoWait(offset, source);
        }

        public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default) =>
            inner.ReadAsync(offset, destination, cancellationToken);

        public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default)
        {
            Interlocked.Increment(ref PooledWrites);
            return inner.WriteAsync(offset, source, fua, cancellationToken);
        }

        public ValueTask FlushAsync(CancellationToken cancellationToken = default) => inner.FlushAsync(cancellationToken);

        public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) =>
            inner.TrimAsync(offset, length, fua, cancellationToken);

        public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) =>
            inner.ZeroAsync(offset, length, flags, cancellationToken);

        public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
            inner.CacheAsync(offset, length, cancellationToken);

        public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
            inner.GetAllocationAsync(offset, length, extents, cancellationToken);

        public void Dispose() => inner.Dispose();
    }
}
