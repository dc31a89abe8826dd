using System.Numerics;

namespace Gateway.Actors.Nbd;

/// <summary>
/// Payload buffers for reads and writes, by power-of-two size class (4 KiB to 64 MiB). Unlike
/// the shared array pool, which keeps a few dozen arrays per size and core, a class here keeps
/// up to 8 MiB of arrays, so a connection with hundreds of requests in flight reuses its buffers
/// instead of allocating past the pool. Rentals are counted, so a buffer never returned (or
/// returned twice) shows in <see cref="Outstanding"/>.
/// </summary>
public static class PayloadPool
{
    private const int MinShift = 12;
    private const int MaxShift = 26;
    private const int RetainedBytesPerClass = 8 * 1024 * 1024;

    private static readonly SizeClass[] Classes =
        [.. Enumerable.Range(MinShift, MaxShift - MinShift + 1).Select(shift => new SizeClass(1 << shift, Math.Max(1, RetainedBytesPerClass >> shift)))];

    private static long s_outstanding;

    /// <summary>Buffers rented and not yet returned, over the whole process.</summary>
    public static long Outstanding => Interlocked.Read(ref s_outstanding);

    /// <summary>A buffer of at least <paramref name="length"/> bytes (at most <see cref="NbdLimits.MaxPayload"/>).</summary>
    public static byte[] Rent(int length)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, 1 << MaxShift);
        Interlocked.Increment(ref s_outstanding);
        return Classes[ClassOf(length)].Rent();
    }

    public static void Return(byte[] buffer)
    {
        Interlocked.Decrement(ref s_outstanding);
        int index = ClassOf(buffer.Length);
        if (Classes[index].Size == buffer.Length)
        {
            Classes[index].Return(buffer);
        }
    }

    private static int ClassOf(int length) =>
        length <= 1 << MinShift ? 0 : BitOperations.Log2((uint)length - 1) + 1 - MinShift;

    private sealed class SizeClass(int size, int capacity)
    {
        private readonly byte[]?[] _stack = new byte[capacity][];
        private readonly Lock _lock = new();
        private int _count;

        public int Size { get; } = size;

        public byte[] Rent()
        {
            lock (_lock)
            {
                if (_count > 0)
                {
                    byte[] buffer = _stack[--_count]!;
                    _stack[_count] = null;
                    return buffer;
                }
            }
            return GC.AllocateUninitializedArray<byte>(Size);
        }

        public void Return(byte[] buffer)
        {
            lock (_lock)
            {
                if (_count < _stack.Length)
                {
                    _stack[_count++] = buffer;
                }
            }
        }
    }
}
