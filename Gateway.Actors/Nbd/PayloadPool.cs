using System.Buffers;

namespace Gateway.Actors.Nbd;

/// <summary>
/// Payload buffers for reads and writes. Wraps the shared array pool and counts rentals, so a
/// buffer that is never returned (or returned twice) shows up in <see cref="Outstanding"/>.
/// </summary>
public static class PayloadPool
{
    private static long s_outstanding;

    /// <summary>Buffers rented and not yet returned, over the whole process.</summary>
    public static long Outstanding => Interlocked.Read(ref s_outstanding);

    public static byte[] Rent(int length)
    {
        Interlocked.Increment(ref s_outstanding);
        return ArrayPool<byte>.Shared.Rent(length);
    }

    public static void Return(byte[] buffer)
    {
        Interlocked.Decrement(ref s_outstanding);
        ArrayPool<byte>.Shared.Return(buffer);
    }
}
