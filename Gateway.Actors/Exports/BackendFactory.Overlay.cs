using Gateway.Backends;
using Gateway.Backends.Overlay;

namespace Gateway.Actors.Exports;

/// <summary>Overlay exports: layers as files under data/layers (see <see cref="LayerFiles"/>).</summary>
public sealed partial class BackendFactory
{
    public string LayerDirectory => Path.Combine(DataDirectory, "layers");

    /// <summary>Where a raw base image is: an absolute path, or relative to the data folder.</summary>
    public string BaseImagePath(string path) => Path.GetFullPath(path, DataDirectory);

    /// <summary>Creates an overlay's top layer (the lower layers exist already and are shared).</summary>
    private async Task CreateOverlayAsync(ExportSpec spec, CancellationToken cancellationToken)
    {
        string[] layers = spec.Backend.Layers ?? throw new InvalidOperationException($"overlay export '{spec.Name}' has no layers");
        if (spec.Backend.BaseImage is { } image)
        {
            if (!File.Exists(BaseImagePath(image)))
            {
                throw new InvalidOperationException($"base image '{BaseImagePath(image)}' does not exist");
            }
            RefuseNonRaw(BaseImagePath(image));
        }
        foreach (string lower in layers.Skip(1))
        {
            if (!File.Exists(LayerFiles.MapPath(LayerDirectory, lower)))
            {
                throw new InvalidOperationException($"layer '{lower}' does not exist");
            }
        }
        await CreateLayerAsync(layers[0], spec.Size, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// Base images are served as raw bytes: an image in another format (qcow2, vmdk...) would hand
    /// the guest its header and tables as data, so it is refused with the conversion to run.
    /// </summary>
    private static void RefuseNonRaw(string path)
    {
        if (ImageFormat.DetectNonRaw(path) is { } format)
        {
            throw new InvalidOperationException(
                $"base image '{path}' is a {format} image, not raw: only raw base images are served; convert it with `qemu-img convert -O raw {path} IMAGE.raw`");
        }
    }

    /// <summary>Creates an empty layer, durable once the task completes.</summary>
    public async Task CreateLayerAsync(string id, long size, CancellationToken cancellationToken) =>
        await LayerFiles.CreateAsync(LayerDirectory, id, size, cancellationToken: cancellationToken).ConfigureAwait(false);

    /// <summary>Opens a layer made by <see cref="CreateLayerAsync"/> as a writable top.</summary>
    public async Task<Layer> OpenTopLayerAsync(string id, CancellationToken cancellationToken) =>
        await LayerFiles.OpenAsync(LayerDirectory, id, writable: true, cancellationToken).ConfigureAwait(false);

    /// <summary>Opens the chain: the top writable (unless the export is read-only), the rest read-only.</summary>
    private async Task<OverlayBackend> OpenOverlayAsync(ExportSpec spec, CancellationToken cancellationToken)
    {
        string[] ids = spec.Backend.Layers ?? throw new InvalidOperationException($"overlay export '{spec.Name}' has no layers");
        var layers = new List<Layer>();
        OverlayBackend? overlay = null;
        try
        {
            for (int i = 0; i < ids.Length; i++)
            {
                layers.Add(await LayerFiles.OpenAsync(LayerDirectory, ids[i], writable: i == 0 && !spec.ReadOnly, cancellationToken).ConfigureAwait(false));
            }
            if (spec.Backend.BaseImage is { } image)
            {
                // Checked again at every open: the file may have been replaced since the export was made.
                RefuseNonRaw(BaseImagePath(image));
                layers.Add(LayerFiles.OpenRaw(BaseImagePath(image)));
            }
            if (spec.ReadOnly || layers[0].Map!.LayerSize >= spec.Size)
            {
                return new OverlayBackend(layers, spec.Size, spec.ReadOnly);
            }
            // Resized, and stopped before the top grew (the new size is recorded first): open at
            // the size the top's map records and finish the grow, masking as the grow does.
            overlay = new OverlayBackend(layers, layers[0].Map!.LayerSize, readOnly: false);
            await overlay.GrowAsync(spec.Size, cancellationToken).ConfigureAwait(false);
            return overlay;
        }
        catch
        {
            if (overlay is not null)
            {
                overlay.Dispose();
                throw;
            }
            foreach (Layer layer in layers)
            {
                layer.Dispose();
            }
            throw;
        }
    }

    /// <summary>Deletes layers no export uses any more (frozen layers are shared by exports made on them).</summary>
    public void DeleteLayers(IEnumerable<string> ids)
    {
        foreach (string id in ids)
        {
            LayerFiles.Delete(LayerDirectory, id);
        }
    }
}
