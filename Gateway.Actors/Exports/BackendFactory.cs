using Gateway.Backends;

namespace Gateway.Actors.Exports;

/// <summary>Creates, opens and deletes the data of exports under the data folder.</summary>
public sealed partial class BackendFactory(string dataDirectory)
{
    public string DataDirectory { get; } = Path.GetFullPath(dataDirectory);

    /// <summary>Where an export's file lives: its own path if it names one, else data/exports/NAME.img.</summary>
    public string FilePath(ExportSpec spec) =>
        spec.Backend.Path is { Length: > 0 } path
            ? Path.GetFullPath(path, DataDirectory)
            : Path.Combine(DataDirectory, "exports", spec.Name + ".img");

    /// <summary>
    /// Creates the export's storage. An existing file at an explicit path is adopted (its size must
    /// fit); the default path must be free, so a new export never inherits old data. Asynchronous
    /// because an S3 bucket check or a layer's creation may wait on I/O: the registry must not
    /// block its thread meanwhile. A file is made synchronously (a quick local call).
    /// </summary>
    public async Task CreateAsync(ExportSpec spec, CancellationToken cancellationToken)
    {
        if (spec.IsOverlay())
        {
            await CreateOverlayAsync(spec, cancellationToken).ConfigureAwait(false);
            return;
        }
        if (IsS3(spec))
        {
            await CreateS3Async(spec, cancellationToken).ConfigureAwait(false);
            return;
        }
        CreateFile(spec);
    }

    private void CreateFile(ExportSpec spec)
    {
        string path = FilePath(spec);
        if (spec.Backend.Path is { Length: > 0 } && File.Exists(path))
        {
            long length = new FileInfo(path).Length;
            if (length < spec.Size)
            {
                throw new InvalidOperationException($"file '{path}' holds {length} bytes, less than the export size {spec.Size}");
            }
            return;
        }
        string? madeDirectory = FirstMissingAncestor(Path.GetDirectoryName(path)!);
        try
        {
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            FileBackend.Create(path, spec.Size).Dispose();
        }
        catch when (madeDirectory is not null)
        {
            // A failed create leaves nothing behind, folders included.
            try
            {
                Directory.Delete(madeDirectory, recursive: true);
            }
            catch (IOException)
            {
            }
            throw;
        }
    }

    private static string? FirstMissingAncestor(string directory)
    {
        string? missing = null;
        for (string? d = directory; d is not null && !Directory.Exists(d) && !File.Exists(d); d = Path.GetDirectoryName(d))
        {
            missing = d;
        }
        return missing;
    }

    /// <summary>Opens the export's device; the caller owns (and disposes) it.</summary>
    public async Task<IBlockDevice> OpenAsync(ExportSpec spec, CancellationToken cancellationToken)
    {
        if (spec.IsOverlay())
        {
            return await OpenOverlayAsync(spec, cancellationToken).ConfigureAwait(false);
        }
        if (IsS3(spec))
        {
            return await OpenS3Async(spec, cancellationToken).ConfigureAwait(false);
        }
        FileBackend file = FileBackend.Open(FilePath(spec), spec.ReadOnly);
        if (!spec.ReadOnly && file.Size < spec.Size)
        {
            // Resized, and stopped before the file grew (the new size is recorded first): grow it now.
            try
            {
                await file.GrowAsync(spec.Size, cancellationToken).ConfigureAwait(false);
            }
            catch
            {
                file.Dispose();
                throw;
            }
        }
        return file;
    }

    /// <summary>Deletes storage the gateway made itself; a file the user named is left in place.</summary>
    public void Delete(ExportSpec spec)
    {
        // An s3 export's objects stay in the bucket: the prefix was the user's to name.
        if (spec.Backend.Path is not { Length: > 0 } && !spec.IsOverlay() && !IsS3(spec))
        {
            File.Delete(FilePath(spec));
        }
    }
}
