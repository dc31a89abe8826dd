using Gateway.Backends;

namespace Gateway.Actors.Nbd;

/// <summary>What a client learns about an export before attaching (LIST, INFO).</summary>
public sealed record ExportInfo(string Name, string? Description, long Size, bool ReadOnly, BlockCapabilities Capabilities)
{
    /// <summary>Who may see and open the export (TLS, client certificates, connection limit).</summary>
    public ExportAccess Access { get; init; } = ExportAccess.Open;

    /// <summary>Transmission flags advertised for this export (proto.md "Transmission flags").</summary>
    public TransmissionFlags TransmissionFlags
    {
        get
        {
            // Every connection shares the export's one device, and FLUSH reaches that device,
            // so a flush on any connection covers writes completed on all of them: multi-conn is true.
            var flags = TransmissionFlags.HasFlags | TransmissionFlags.SendDf | TransmissionFlags.CanMultiConn;
            if (Capabilities.HasFlag(BlockCapabilities.Cache))
            {
                flags |= TransmissionFlags.SendCache;
            }
            if (ReadOnly)
            {
                return flags | TransmissionFlags.ReadOnly;
            }
            flags |= TransmissionFlags.SendFlush | TransmissionFlags.SendFua;
            if (Capabilities.HasFlag(BlockCapabilities.Trim))
            {
                flags |= TransmissionFlags.SendTrim;
            }
            if (Capabilities.HasFlag(BlockCapabilities.Zero))
            {
                flags |= TransmissionFlags.SendWriteZeroes;
                if (Capabilities.HasFlag(BlockCapabilities.FastZero))
                {
                    flags |= TransmissionFlags.SendFastZero;
                }
            }
            return flags;
        }
    }
}

/// <summary>
/// A metadata context an export offers for NBD_CMD_BLOCK_STATUS (e.g. <c>base:allocation</c>).
/// </summary>
public abstract class MetaContext(string name)
{
    public string Name { get; } = name;

    /// <summary>
    /// Fills <paramref name="extents"/> with consecutive descriptors from <paramref name="offset"/>
    /// covering at most <paramref name="length"/> bytes; returns how many (at least one).
    /// </summary>
    public abstract ValueTask<int> GetExtentsAsync(long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken);
}

/// <summary><c>base:allocation</c> read from the device's allocation map.</summary>
public sealed class BaseAllocationContext(IBlockDevice device) : MetaContext(NbdLimits.BaseAllocation)
{
    private const int Batch = 64;

    public override async ValueTask<int> GetExtentsAsync(long offset, long length, Memory<MetaExtent> extents, CancellationToken cancellationToken)
    {
        Extent[] buffer = System.Buffers.ArrayPool<Extent>.Shared.Rent(Math.Min(Batch, extents.Length));
        try
        {
            int n = await device.GetAllocationAsync(offset, length, buffer.AsMemory(0, Math.Min(Batch, extents.Length)), cancellationToken).ConfigureAwait(false);
            Span<MetaExtent> span = extents.Span;
            for (int i = 0; i < n; i++)
            {
                span[i] = new MetaExtent((ulong)buffer[i].Length, (uint)buffer[i].Flags);
            }
            return n;
        }
        finally
        {
            System.Buffers.ArrayPool<Extent>.Shared.Return(buffer);
        }
    }
}

/// <summary>
/// An attached export: the data handle a connection uses directly (no mailbox on the data path),
/// its contexts, and a token cancelled when the export goes away.
/// </summary>
public sealed class ExportHandle(ExportInfo info, IBlockDevice device, IReadOnlyList<MetaContext> metaContexts, CancellationToken closed)
{
    private volatile IReadOnlyList<MetaContext> _metaContexts = metaContexts;

    public ExportInfo Info { get; } = info;

    public IBlockDevice Device { get; } = device;

    /// <summary>
    /// The contexts a new connection can select. The export actor replaces the list when it
    /// changes (a bitmap added or removed); connections keep the contexts they negotiated.
    /// </summary>
    public IReadOnlyList<MetaContext> MetaContexts
    {
        get => _metaContexts;
        set => _metaContexts = value;
    }

    public CancellationToken Closed { get; } = closed;

    /// <summary>
    /// The device belongs to the one connection that attached (a cluster link), not to the export:
    /// the connection disposes it when it ends.
    /// </summary>
    public bool OwnedByConnection { get; init; }
}

/// <summary>How the NBD handshake finds exports. Implemented over the export actors.</summary>
public interface IExportDirectory
{
    ValueTask<IReadOnlyList<ExportInfo>> ListAsync(CancellationToken cancellationToken);

    /// <summary>The export a client names; "" names the default export. Null when unknown.</summary>
    ValueTask<ExportHandle?> OpenAsync(string name, CancellationToken cancellationToken);
}
