using Gateway.Backends;
using Gateway.Backends.Overlay;
using Gateway.Backends.Qcow2;
using Gateway.Backends.S3;

namespace Gateway.Actors.Exports;

/// <summary>Overlay exports: layers as files under data/layers (see <see cref="LayerFiles"/>).</summary>
public sealed partial class BackendFactory
{
    public string LayerDirectory => Path.Combine(DataDirectory, "layers");

    /// <summary>Where a base image (raw or qcow2) is: an absolute path, or relative to the data folder; or an S3 object (<c>s3://BUCKET/KEY</c>).</summary>
    public string BaseImagePath(string path) => S3ImageLocation.IsS3Name(path) ? path : Path.GetFullPath(path, DataDirectory);

    /// <summary>Creates an overlay's top layer (the lower layers exist already and are shared).</summary>
    private async Task CreateOverlayAsync(ExportSpec spec, CancellationToken cancellationToken)
    {
        string[] layers = spec.Backend.Layers ?? throw new InvalidOperationException($"overlay export '{spec.Name}' has no layers");
        if (spec.Backend.BaseImage is { } image)
        {
            if (!S3ImageLocation.IsS3Name(image) && !File.Exists(BaseImagePath(image)))
            {
                throw new InvalidOperationException($"base image '{BaseImagePath(image)}' does not exist");
            }
            // Opened once (and closed) so a qcow2 image the gateway will not read is refused now, not at first use.
            OpenBaseImage(BaseImagePath(image), spec.Backend).Dispose();
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
    /// A base image as the overlay's bottom layer, its format read from its header: qcow2 (with its
    /// backing chain, one reader shared by every export on the file) or raw. Any other format would
    /// hand the guest its header and tables as data, so it is refused with the conversion to run;
    /// so is a qcow2 image the reader refuses (encrypted, dirty, unknown features, bad metadata).
    /// A <paramref name="forced"/> format (the spec's baseFormat) must agree with the header: raw
    /// forced on a qcow2 file would serve its tables as the disk, qcow2 forced on anything else
    /// has no tables to read; either is refused, never served.
    /// </summary>
    private static Layer OpenBaseImage(string path, BackendSpec backend)
    {
        string? forced = backend.BaseFormat;
        if (forced == ImageFormat.Raw && backend.Base is not null)
        {
            // The registry chose raw for an export made on another export (a file export's data, which
            // its guest wrote, or a chain that carries such a choice, already checked when it was made):
            // raw whatever the first bytes say, as qemu reads a disk whose format it was told.
            return S3ImageLocation.IsS3Name(path)
                ? OpenS3BaseImage(path, forced, backend.S3 ?? throw new InvalidOperationException($"base image '{path}' is an S3 object, but the export has no s3 settings"), detect: false)
                : LayerFiles.OpenRaw(path);
        }
        if (S3ImageLocation.IsS3Name(path))
        {
            return OpenS3BaseImage(path, forced, backend.S3 ?? throw new InvalidOperationException($"base image '{path}' is an S3 object, but the export has no s3 settings"));
        }
        string? detected = ImageFormat.DetectNonRaw(path);
        CheckForced(path, forced, detected);
        switch (detected)
        {
            case null:
                return LayerFiles.OpenRaw(path);
            case "qcow2":
                try
                {
                    return new Layer(path, Qcow2Device.Open(path), map: null);
                }
                catch (Qcow2Exception e)
                {
                    throw new InvalidOperationException($"base image '{path}' cannot be served: {e.Message}", e);
                }
            case { } format:
                throw NotServed(path, format);
        }
    }

    /// <summary>
    /// An S3 object as the base, read by range (with its backing chain in the same bucket): its
    /// format from its first bytes, checked against a forced one as a file's is.
    /// </summary>
    private static Layer OpenS3BaseImage(string name, string? forced, S3Spec s3, bool detect = true)
    {
        (string bucket, _) = S3ImageLocation.Split(name) ?? throw new InvalidOperationException($"base image '{name}' is not s3://BUCKET/KEY");
        var location = new S3ImageLocation(new S3ObjectStore(new S3BucketLocation(s3.Endpoint!, bucket, s3.Region, s3.AccessKey, s3.SecretKey)), s3.Endpoint!, bucket);
        try
        {
            string? detected = null;
            if (detect)
            {
                using ImageSource head = location.Open(name);
                byte[] bytes = new byte[512];
                detected = ImageFormat.Detect(bytes.AsSpan(0, head.Read(bytes, 0)));
                CheckForced(name, forced, detected);
            }
            if (detected is not (null or ImageFormat.Qcow2))
            {
                throw NotServed(name, detected);
            }
            S3ImageLocation owned = location;
            location = null!;
            return new Layer(name, Qcow2Device.Open(owned, name, detected ?? ImageFormat.Raw), map: null);
        }
        catch (Exception e) when (e is Qcow2Exception or IOException or NotSupportedException)
        {
            throw new InvalidOperationException($"base image '{name}' cannot be served: {e.Message} ({s3.Endpoint})", e);
        }
        finally
        {
            location?.Dispose();
        }
    }

    private static void CheckForced(string path, string? forced, string? detected)
    {
        switch (forced, detected)
        {
            case (ImageFormat.Raw, ImageFormat.Qcow2):
                throw new InvalidOperationException(
                    $"base image '{path}' is a qcow2 image (its header says so), but baseFormat is raw: served as raw, its header and tables would be the guest's disk; give baseFormat qcow2 or leave it out");
            case (ImageFormat.Qcow2, null):
                throw new InvalidOperationException(
                    $"base image '{path}' is not a qcow2 image (it has no qcow2 header), but baseFormat is qcow2; give baseFormat raw or leave it out");
        }
    }

    private static InvalidOperationException NotServed(string path, string format) => new(
        $"base image '{path}' is a {format} image, not raw or qcow2: only raw and qcow2 base images are served; convert it with `qemu-img convert -O raw {path} IMAGE.raw`");

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
                // Detected again at every open: the file may have been replaced since the export was made.
                layers.Add(OpenBaseImage(BaseImagePath(image), spec.Backend));
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
