using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;

namespace Gateway.Actors.Bitmaps;

/// <summary>
/// <c>qemu:dirty-bitmap:NAME</c>: extents of clean (0) and dirty (NBD_STATE_DIRTY = 1) granules,
/// merged into runs and clipped to the request, as qemu-nbd answers (qemu docs/interop/nbd.txt).
/// </summary>
public sealed class DirtyBitmapContext(string bitmapName, DirtyBitmap bits) : MetaContext(Prefix + bitmapName)
{
    public const string Prefix = "qemu:dirty-bitmap:";

    /// <summary>Bit 0 of the status: the extent is dirty.</summary>
    public const uint StateDirty = 1;

    public string BitmapName { get; } = bitmapName;

    public DirtyBitmap Bits { get; } = bits;

    public override ValueTask<int> GetExtentsAsync(long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken)
    {
        int max = Math.Min(extents.Length, 64);
        Span<long> lengths = stackalloc long[max];
        Span<bool> dirty = stackalloc bool[max];
        int n = Bits.GetExtents(offset, length, lengths, dirty);
        if (n == 0)
        {
            // Beyond what the bitmap covers (cannot happen for checked requests): report clean.
            extents.Span[0] = new MetaExtent((ulong)length, 0);
            return new ValueTask<int>(1);
        }
        Span<MetaExtent> span = extents.Span;
        for (int i = 0; i < n; i++)
        {
            span[i] = new MetaExtent((ulong)lengths[i], dirty[i] ? StateDirty : 0);
        }
        return new ValueTask<int>(n);
    }
}
