namespace Gateway.Backends.Overlay;

/// <summary>
/// Layers kept as files in one folder: <c>ID.img</c>, a sparse raw data file, and <c>ID.map</c>,
/// its allocation map. Frozen layers are opened read-only, so many exports can share one.
/// </summary>
public static class LayerFiles
{
    public static string DataPath(string directory, string id) => Path.Combine(directory, id + ".img");

    public static string MapPath(string directory, string id) => Path.Combine(directory, id + ".map");

    /// <summary>Creates an empty layer (every cluster absent), durable on return; fails if the files exist.</summary>
    public static async ValueTask CreateAsync(string directory, string id, long size, int clusterSize = LayerMap.DefaultClusterSize, CancellationToken cancellationToken = default)
    {
        Directory.CreateDirectory(directory);
        string data = DataPath(directory, id);
        string map = MapPath(directory, id);
        bool madeData = false;
        try
        {
            FileBackend.Create(data, size).Dispose();
            madeData = true;
            using FileBackend store = FileBackend.Create(map, LayerMap.StoreSize(size, clusterSize));
            using LayerMap created = await LayerMap.CreateAsync(store, size, clusterSize, cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            if (madeData)
            {
                // A failed create leaves nothing behind.
                File.Delete(data);
                File.Delete(map);
            }
            throw;
        }
    }

    /// <summary>Opens a layer; <paramref name="writable"/> only for the top.</summary>
    public static async ValueTask<Layer> OpenAsync(string directory, string id, bool writable, CancellationToken cancellationToken = default)
    {
        FileBackend data = FileBackend.Open(DataPath(directory, id), readOnly: !writable);
        try
        {
            FileBackend store = FileBackend.Open(MapPath(directory, id), readOnly: !writable);
            try
            {
                LayerMap map = await LayerMap.OpenAsync(store, cancellationToken).ConfigureAwait(false);
                return new Layer(id, data, map);
            }
            catch
            {
                store.Dispose();
                throw;
            }
        }
        catch
        {
            data.Dispose();
            throw;
        }
    }

    /// <summary>A raw image as a read-only bottom layer.</summary>
    public static Layer OpenRaw(string path) => new(path, FileBackend.Open(path, readOnly: true), map: null);

    public static void Delete(string directory, string id)
    {
        File.Delete(DataPath(directory, id));
        File.Delete(MapPath(directory, id));
    }
}
