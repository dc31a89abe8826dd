using Gateway.Backends.Overlay;

namespace Gateway.Backends.Qcow2;

/// <summary>A run of guest bytes as qemu's <c>qemu:allocation-depth</c> counts it: 1 = the top image, 2 = its backing file, ..., 0 = unallocated in the whole chain; and whether it reads as zeros.</summary>
public readonly record struct ImageExtent(long Length, uint Depth, bool Zero);

/// <summary>One file of a chain as opened: where it is, its format and its virtual size.</summary>
public readonly record struct ChainFile(string Path, string Format, long VirtualSize);

/// <summary>
/// A qcow2 image and its backing chain, read-only (qemu docs/interop/qcow2.txt). Backing files are
/// found as qemu finds them: an absolute name as it is, a relative one from the folder of the image
/// that names it; their format comes from the backing-format extension, or from their header when
/// the image names none (qcow2, else raw; other formats are refused). Bytes past the end of a
/// shorter backing file read as zeros, counted at that file's depth as qemu does. Metadata is
/// checked at open (header, L1) and at the read that meets it (L2): a bad image gives a
/// <see cref="Qcow2Exception"/>. Reads and allocation queries are safe to run concurrently, so one
/// instance serves every export that uses the image.
/// </summary>
public sealed class Qcow2Image : IDisposable
{
    /// <summary>The deepest chain opened, counting the top image (a deeper one is refused).</summary>
    public const int MaxChainLength = 64;

    private readonly ImageLayer[] _layers;

    private Qcow2Image(ImageLayer[] layers) => _layers = layers;

    public string Path => _layers[0].Path;

    public long VirtualSize => _layers[0].VirtualSize;

    /// <summary>The top image's header (an image opened with <see cref="OpenRaw"/> has none).</summary>
    public Qcow2Header Header => _layers[0] is Qcow2Layer top ? top.Header : throw new InvalidOperationException($"'{Path}' is a raw image");

    /// <summary>The chain, top first.</summary>
    public IReadOnlyList<ChainFile> Chain => [.. _layers.Select(l => new ChainFile(l.Path, l.Format, l.VirtualSize))];

    /// <summary>Opens the qcow2 image at <paramref name="path"/> and its whole backing chain.</summary>
    public static Qcow2Image Open(string path) => Open(System.IO.Path.GetFullPath(path), ImageLocation.Files);

    /// <summary>Opens the qcow2 image <paramref name="name"/> (a full name in <paramref name="location"/>) and its whole backing chain, found in the same location.</summary>
    public static Qcow2Image Open(string name, ImageLocation location)
    {
        string path = name;
        var layers = new List<ImageLayer>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        try
        {
            string current = name;
            string format = "qcow2";
            string? referrer = null;
            while (true)
            {
                if (!seen.Add(current))
                {
                    throw new Qcow2Exception(referrer!, $"backing chain loops: '{current}' is already in the chain ({string.Join(" -> ", layers.Select(l => l.Path))})");
                }
                if (layers.Count == MaxChainLength)
                {
                    throw new Qcow2Exception(path, $"backing chain is deeper than {MaxChainLength} images");
                }
                ImageSource file = OpenFile(location, current, referrer);
                bool owned = false;
                try
                {
                    if (format == "raw")
                    {
                        layers.Add(new RawLayer(file) { Path = current });
                        owned = true;
                        break;
                    }
                    Qcow2Header header = Qcow2Header.Read(file);
                    layers.Add(Qcow2Layer.Open(file, header, location));
                    owned = true;
                    if (header.BackingFile is not { } backing)
                    {
                        break;
                    }
                    referrer = current;
                    current = location.Resolve(current, backing);
                    format = header.BackingFormat ?? Probe(location, current, referrer);
                    if (format is not ("raw" or "qcow2"))
                    {
                        throw new Qcow2Exception(referrer, $"backing file '{current}' is a {format} image: only qcow2 and raw backing files are read");
                    }
                }
                catch when (!owned)
                {
                    file.Dispose();
                    throw;
                }
            }
            return new Qcow2Image([.. layers]);
        }
        catch
        {
            foreach (ImageLayer layer in layers)
            {
                layer.Dispose();
            }
            throw;
        }
    }

    /// <summary>A raw image alone (an S3 object read by range, with the same cache as a qcow2 image's).</summary>
    public static Qcow2Image OpenRaw(string name, ImageLocation location) => new([new RawLayer(location.Open(name)) { Path = name }]);

    /// <summary>Reads guest bytes; ranges no layer holds read as zeros.</summary>
    public void Read(long offset, Span<byte> destination)
    {
        CheckRange(offset, destination.Length);
        while (!destination.IsEmpty)
        {
            (LayerRun run, int layer) = Resolve(offset, destination.Length);
            int length = (int)run.Length;
            Span<byte> part = destination[..length];
            if (run.Kind is RunKind.Data or RunKind.Compressed)
            {
                _layers[layer].Read(run, offset, part);
            }
            else
            {
                part.Clear();
            }
            destination = destination[length..];
            offset += length;
        }
    }

    /// <summary>
    /// <see cref="Read"/> from memory and the page cache only: L2 tables already cached, data of
    /// local files already in the page cache. False when any part would wait; the caller then
    /// calls <see cref="Read"/>, which may have been given some of the bytes already.
    /// </summary>
    public bool TryReadNoWait(long offset, Span<byte> destination)
    {
        if (offset < 0 || offset > VirtualSize - destination.Length)
        {
            return false;
        }
        while (!destination.IsEmpty)
        {
            if (!TryResolveNoWait(offset, destination.Length, out LayerRun run, out int layer))
            {
                return false;
            }
            int length = (int)run.Length;
            Span<byte> part = destination[..length];
            if (run.Kind is RunKind.Data or RunKind.Compressed)
            {
                if (!_layers[layer].TryReadNoWait(run, offset, part))
                {
                    return false;
                }
            }
            else
            {
                part.Clear();
            }
            destination = destination[length..];
            offset += length;
        }
        return true;
    }

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }
        try
        {
            Read(offset, destination.Span);
            return ValueTask.CompletedTask;
        }
        catch (Exception e)
        {
            return ValueTask.FromException(e);
        }
    }

    /// <summary>
    /// Describes <paramref name="length"/> bytes from <paramref name="offset"/> in consecutive
    /// extents (adjacent runs of the same depth and zero-ness merged); returns how many were
    /// written, at least one when length &gt; 0. Stops early when <paramref name="extents"/> is full.
    /// </summary>
    public int GetAllocation(long offset, long length, Span<ImageExtent> extents)
    {
        CheckRange(offset, length);
        int count = 0;
        long end = offset + length;
        while (offset < end)
        {
            (LayerRun run, int layer) = Resolve(offset, end - offset);
            var extent = run.Kind == RunKind.Unallocated
                ? new ImageExtent(run.Length, 0, Zero: true)
                : new ImageExtent(run.Length, (uint)layer + 1, Zero: run.Kind == RunKind.Zero);
            if (count > 0 && extents[count - 1].Depth == extent.Depth && extents[count - 1].Zero == extent.Zero)
            {
                extents[count - 1] = extents[count - 1] with { Length = extents[count - 1].Length + extent.Length };
            }
            else if (count == extents.Length)
            {
                break;
            }
            else
            {
                extents[count++] = extent;
            }
            offset += run.Length;
        }
        return count;
    }

    public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<ImageExtent> extents, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled<int>(cancellationToken);
        }
        try
        {
            return ValueTask.FromResult(GetAllocation(offset, length, extents.Span));
        }
        catch (Exception e)
        {
            return ValueTask.FromException<int>(e);
        }
    }

    public void Dispose()
    {
        foreach (ImageLayer layer in _layers)
        {
            layer.Dispose();
        }
    }

    /// <summary>
    /// The run from <paramref name="offset"/> and the layer that decides it: the first layer that
    /// holds it, or the first backing file it lies past the end of (zeros there, at that depth, as
    /// qemu's block-status counts them); <see cref="RunKind.Unallocated"/> with the layer count when none.
    /// </summary>
    private (LayerRun Run, int Layer) Resolve(long offset, long length)
    {
        for (int i = 0; i < _layers.Length; i++)
        {
            ImageLayer layer = _layers[i];
            if (offset >= layer.VirtualSize)
            {
                return (new LayerRun(length, RunKind.Zero), i);
            }
            LayerRun run = layer.Map(offset, Math.Min(length, layer.VirtualSize - offset));
            if (run.Kind != RunKind.Unallocated)
            {
                return (run, i);
            }
            length = run.Length;
        }
        return (new LayerRun(length, RunKind.Unallocated), _layers.Length);
    }

    /// <summary><see cref="Resolve"/> from cached L2 tables only.</summary>
    private bool TryResolveNoWait(long offset, long length, out LayerRun run, out int layerIndex)
    {
        for (int i = 0; i < _layers.Length; i++)
        {
            ImageLayer layer = _layers[i];
            if (offset >= layer.VirtualSize)
            {
                (run, layerIndex) = (new LayerRun(length, RunKind.Zero), i);
                return true;
            }
            if (!layer.TryMapNoWait(offset, Math.Min(length, layer.VirtualSize - offset), out run))
            {
                layerIndex = -1;
                return false;
            }
            if (run.Kind != RunKind.Unallocated)
            {
                layerIndex = i;
                return true;
            }
            length = run.Length;
        }
        (run, layerIndex) = (new LayerRun(length, RunKind.Unallocated), _layers.Length);
        return true;
    }

    private void CheckRange(long offset, long length)
    {
        if (offset < 0 || length < 0 || offset > VirtualSize - length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"range {offset}+{length} is outside the image's {VirtualSize} bytes");
        }
    }

    private static ImageSource OpenFile(ImageLocation location, string path, string? referrer)
    {
        try
        {
            return location.Open(path);
        }
        catch (Exception e) when (referrer is not null && e is IOException or UnauthorizedAccessException)
        {
            throw new Qcow2Exception(referrer, $"backing file '{path}' cannot be opened: {e.Message}", e);
        }
    }

    /// <summary>The format of a backing file the image names without one, from its header.</summary>
    private static string Probe(ImageLocation location, string path, string referrer)
    {
        using ImageSource file = OpenFile(location, path, referrer);
        byte[] head = new byte[512];
        int read = file.Read(head, 0);
        return ImageFormat.Detect(head.AsSpan(0, read)) ?? "raw";
    }
}
