using Gateway.Actors.Nbd;
using Gateway.Backends.Overlay;

namespace Gateway.Actors.Exports;

/// <summary>
/// <c>qemu:allocation-depth</c> (qemu's docs/interop/nbd.rst): per extent, the layer of the chain
/// that provides it, 1 = top, n = n-th, 0 = unallocated in every layer.
/// </summary>
public sealed class AllocationDepthContext(OverlayBackend overlay) : MetaContext(Name)
{
    public new const string Name = "qemu:allocation-depth";
    private const int Batch = 64;

    public override ValueTask<int> GetExtentsAsync(long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken)
    {
        Span<DepthExtent> depths = stackalloc DepthExtent[Math.Min(Batch, extents.Length)];
        int n = overlay.GetDepth(offset, length, depths);
        Span<MetaExtent> span = extents.Span;
        for (int i = 0; i < n; i++)
        {
            span[i] = new MetaExtent((ulong)depths[i].Length, depths[i].Depth);
        }
        return ValueTask.FromResult(n);
    }
}
