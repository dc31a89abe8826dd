using System.Buffers;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Serialization;
using ZstdSharp;

namespace Gateway.Backup;

/// <summary>The contents of <c>repository.json</c>: what every reader checks before it reads anything else.</summary>
/// <param name="Id">
/// 8 random hex digits, given when the repository is made (absent in repositories made before it
/// was): names this repository's bitmaps apart from another repository's on the same export.
/// </param>
public sealed record RepositoryInfo(
    [property: JsonPropertyName("format")] string Format,
    [property: JsonPropertyName("version")] int Version,
    [property: JsonPropertyName("chunkSize")] int ChunkSize,
    [property: JsonPropertyName("id"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Id = null)
{
    public const string FormatName = "nbd-gateway-backup";
    public const int CurrentVersion = 1;
    public const int DefaultChunkSize = 4 << 20;
}

/// <summary>What storing a chunk did.</summary>
/// <param name="Uploaded">The compressed bytes written; 0 if the repository held the chunk whole already.</param>
/// <param name="Replaced">A damaged object was under the chunk's key and has been overwritten.</param>
public readonly record struct StoredChunk(long Uploaded, bool Replaced);

/// <summary>
/// A backup repository (README "Backup"), over any <see cref="IBackupStore"/>:
/// <code>
/// repository.json              {"format":"nbd-gateway-backup","version":1,"chunkSize":4194304,"id":"3f9a01bc"}
/// chunks/ab/ab12…(64 hex)      one chunk's bytes, zstd-compressed; the name is the SHA-256 of the uncompressed bytes
/// backups/&lt;id&gt;.json            a manifest (<see cref="Manifest"/>), written after all its chunks
/// locks/backup-&lt;id&gt;.json       a running backup's lease marker (<see cref="BackupLease"/>)
/// locks/gc-&lt;id&gt;.json           a running garbage collection's lease marker
/// </code>
/// Chunks are shared by every backup of every export that holds the same bytes at the same
/// chunk size; chunks and manifests are never overwritten, only deleted by prune and garbage
/// collection (<see cref="BackupCollector"/>), under the lease protocol.
/// </summary>
public sealed class BackupRepository
{
    public const string InfoKey = "repository.json";
    public const string BackupsPrefix = "backups/";
    public const string ChunksPrefix = "chunks/";
    private const int CompressionLevel = 3;

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = false };

    private BackupRepository(IBackupStore store, RepositoryInfo info)
    {
        Store = store;
        Info = info;
    }

    public IBackupStore Store { get; }

    public RepositoryInfo Info { get; }

    public int ChunkSize => Info.ChunkSize;

    /// <summary>The lease timings (<see cref="BackupLease"/>) of every backup and collection through this instance.</summary>
    public LeaseOptions Leases { get; set; } = LeaseOptions.Default;

    /// <summary>Opens a repository; it must exist and be of this format version.</summary>
    /// <exception cref="BackupFormatException">No repository.json, or another format or version.</exception>
    public static async Task<BackupRepository> OpenAsync(IBackupStore store, CancellationToken cancellationToken)
    {
        byte[] bytes = await store.GetAsync(InfoKey, cancellationToken).ConfigureAwait(false)
            ?? throw new BackupFormatException($"no backup repository here ({InfoKey} is missing)");
        RepositoryInfo? info;
        try
        {
            info = JsonSerializer.Deserialize<RepositoryInfo>(bytes, Json);
        }
        catch (JsonException e)
        {
            throw new BackupFormatException($"{InfoKey} is not a backup repository's: {e.Message}");
        }
        if (info is null || info.Format != RepositoryInfo.FormatName)
        {
            throw new BackupFormatException($"{InfoKey} is not a backup repository's (format '{info?.Format}')");
        }
        if (info.Version != RepositoryInfo.CurrentVersion)
        {
            throw new BackupFormatException($"the repository has format version {info.Version}; this gateway reads version {RepositoryInfo.CurrentVersion}");
        }
        if (info.ChunkSize is < 4096 or > 64 << 20 || info.ChunkSize % 4096 != 0)
        {
            throw new BackupFormatException($"the repository's chunk size {info.ChunkSize} is not a multiple of 4096 between 4 KiB and 64 MiB");
        }
        return new BackupRepository(store, info);
    }

    /// <summary>Opens the repository, making it first if the store holds nothing (a new folder).</summary>
    public static async Task<BackupRepository> OpenOrCreateAsync(IBackupStore store, int chunkSize, CancellationToken cancellationToken)
    {
        if (!await store.ExistsAsync(InfoKey, cancellationToken).ConfigureAwait(false))
        {
            await foreach (string _ in store.ListAsync(BackupsPrefix, cancellationToken).ConfigureAwait(false))
            {
                throw new BackupFormatException($"the store holds backups but no {InfoKey}");
            }
            var info = new RepositoryInfo(RepositoryInfo.FormatName, RepositoryInfo.CurrentVersion, chunkSize, RandomNumberGenerator.GetHexString(8, lowercase: true));
            // Two creators at once: one wins, and both then read the winner's.
            await store.PutIfAbsentAsync(InfoKey, JsonSerializer.SerializeToUtf8Bytes(info, Json), cancellationToken).ConfigureAwait(false);
        }
        return await OpenAsync(store, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>A folder repository; <paramref name="create"/> makes one in a folder that is missing or empty.</summary>
    public static Task<BackupRepository> OpenFolderAsync(string folder, bool create, CancellationToken cancellationToken)
    {
        bool exists = Directory.Exists(folder);
        if (!create && !exists)
        {
            throw new BackupFormatException($"repository {folder} does not exist");
        }
        if (create && exists && !File.Exists(Path.Combine(folder, InfoKey)) && Directory.EnumerateFileSystemEntries(folder).Any())
        {
            throw new BackupFormatException($"{folder} is neither empty nor a backup repository (no {InfoKey})");
        }
        var store = new FolderStore(folder);
        return create ? OpenOrCreateAsync(store, RepositoryInfo.DefaultChunkSize, cancellationToken) : OpenAsync(store, cancellationToken);
    }

    public static string ChunkKey(string sha256) => $"{ChunksPrefix}{sha256[..2]}/{sha256}";

    /// <summary>The chunk's hash if <paramref name="key"/> is a well-formed chunk key, else null.</summary>
    public static string? ChunkHashOf(string key)
    {
        if (!key.StartsWith(ChunksPrefix, StringComparison.Ordinal))
        {
            return null;
        }
        string rest = key[ChunksPrefix.Length..];
        return rest.Length == 67 && rest[2] == '/' && rest.AsSpan(3).StartsWith(rest.AsSpan(0, 2), StringComparison.Ordinal)
            && !rest.AsSpan(3).ContainsAnyExcept("0123456789abcdef") ? rest[3..] : null;
    }

    public static string ManifestKey(string id) => BackupsPrefix + id + ".json";

    public static string Hash(ReadOnlySpan<byte> data) => Convert.ToHexStringLower(SHA256.HashData(data));

    public Task<bool> HasChunkAsync(string sha256, CancellationToken cancellationToken) =>
        Store.ExistsAsync(ChunkKey(sha256), cancellationToken);

    /// <summary>Compresses and stores a chunk whose hash is <paramref name="sha256"/>.</summary>
    /// <returns>The compressed bytes stored, or 0 if the chunk was already there.</returns>
    public async Task<long> PutChunkAsync(string sha256, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) =>
        (await StoreChunkAsync(sha256, data, cancellationToken).ConfigureAwait(false)).Uploaded;

    /// <summary>
    /// Compresses and stores a chunk whose hash is <paramref name="sha256"/>, unless the repository
    /// holds it whole already. An object of the same length is taken as whole (a store writes an
    /// object all at once, or, as a folder, renames it into place); one of another length is read
    /// and checked, and stored again if it is damaged: a store without atomic writes (s3rver, killed
    /// mid-PUT) can leave a torn object that a resumed backup must not reuse.
    /// </summary>
    public async Task<StoredChunk> StoreChunkAsync(string sha256, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        byte[] compressed = ArrayPool<byte>.Shared.Rent(Compressor.GetCompressBound(data.Length));
        try
        {
            int length;
            using (var compressor = new Compressor(CompressionLevel))
            {
                length = compressor.Wrap(data.Span, compressed);
            }
            string key = ChunkKey(sha256);
            ReadOnlyMemory<byte> bytes = compressed.AsMemory(0, length);
            long? there = await Store.LengthAsync(key, cancellationToken).ConfigureAwait(false);
            if (there == length)
            {
                return new StoredChunk(0, Replaced: false);
            }
            if (there is null)
            {
                return new StoredChunk(await Store.PutIfAbsentAsync(key, bytes, cancellationToken).ConfigureAwait(false) ? length : 0, Replaced: false);
            }
            if (await IsWholeAsync(sha256, data.Length, cancellationToken).ConfigureAwait(false))
            {
                return new StoredChunk(0, Replaced: false); // compressed by another version or level
            }
            await Store.PutAsync(key, bytes, cancellationToken).ConfigureAwait(false);
            return new StoredChunk(length, Replaced: true);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(compressed);
        }
    }

    private async Task<bool> IsWholeAsync(string sha256, int length, CancellationToken cancellationToken)
    {
        byte[] buffer = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            await ReadChunkAsync(sha256, buffer.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
            return true;
        }
        catch (BackupCorruptException)
        {
            return false;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>
    /// Reads chunk <paramref name="sha256"/> into <paramref name="destination"/> (exactly its
    /// length) and checks that the bytes hash to the name.
    /// </summary>
    /// <exception cref="BackupCorruptException">The chunk is missing, does not decompress to that length, or hashes to something else.</exception>
    public async Task ReadChunkAsync(string sha256, Memory<byte> destination, CancellationToken cancellationToken)
    {
        byte[] stored = await Store.GetAsync(ChunkKey(sha256), cancellationToken).ConfigureAwait(false)
            ?? throw new BackupCorruptException($"chunk {sha256} is missing");
        int length;
        try
        {
            using var decompressor = new Decompressor();
            length = decompressor.Unwrap(stored, destination.Span);
        }
        catch (ZstdException e)
        {
            throw new BackupCorruptException($"chunk {sha256} does not decompress: {e.Message}");
        }
        if (length != destination.Length)
        {
            throw new BackupCorruptException($"chunk {sha256} holds {length} bytes, not {destination.Length}");
        }
        string actual = Hash(destination.Span);
        if (actual != sha256)
        {
            throw new BackupCorruptException($"chunk {sha256} hashes to {actual}");
        }
    }

    /// <summary>Stores a manifest, after every chunk it names (the caller's duty): a manifest never points at a missing chunk.</summary>
    public Task PutManifestAsync(Manifest manifest, CancellationToken cancellationToken)
    {
        // Under a lease whose token has been cancelled (it may have lapsed), no manifest: a
        // collection may have deleted chunks it names.
        cancellationToken.ThrowIfCancellationRequested();
        manifest.Validate();
        return Store.PutIfAbsentAsync(ManifestKey(manifest.Id), JsonSerializer.SerializeToUtf8Bytes(manifest, Json), cancellationToken);
    }

    /// <summary>Deletes a backup's manifest (prune); its chunks stay until garbage collection.</summary>
    public Task<bool> DeleteManifestAsync(string id, CancellationToken cancellationToken) =>
        Manifest.IsValidId(id) ? Store.DeleteAsync(ManifestKey(id), cancellationToken) : throw new BackupFormatException($"'{id}' is not a backup id");

    /// <exception cref="BackupFormatException">No such backup, or its manifest breaks the rules.</exception>
    public async Task<Manifest> GetManifestAsync(string id, CancellationToken cancellationToken)
    {
        if (!Manifest.IsValidId(id))
        {
            throw new BackupFormatException($"'{id}' is not a backup id");
        }
        byte[] bytes = await Store.GetAsync(ManifestKey(id), cancellationToken).ConfigureAwait(false)
            ?? throw new BackupFormatException($"no backup {id} in the repository");
        Manifest? manifest;
        try
        {
            manifest = JsonSerializer.Deserialize<Manifest>(bytes, Json);
        }
        catch (JsonException e)
        {
            throw new BackupFormatException($"backup {id}: the manifest does not parse: {e.Message}");
        }
        if (manifest is null || manifest.Id != id)
        {
            throw new BackupFormatException($"backup {id}: the manifest names another id ({manifest?.Id})");
        }
        manifest.Validate();
        if (manifest.ChunkSize != ChunkSize)
        {
            throw new BackupFormatException($"backup {id} has chunks of {manifest.ChunkSize} bytes; the repository's are {ChunkSize}");
        }
        return manifest;
    }

    /// <summary>Every backup's id, oldest first (ids sort by time).</summary>
    public async Task<List<string>> ListIdsAsync(CancellationToken cancellationToken)
    {
        var ids = new List<string>();
        await foreach (string key in Store.ListAsync(BackupsPrefix, cancellationToken).ConfigureAwait(false))
        {
            string name = key[BackupsPrefix.Length..];
            if (name.EndsWith(".json", StringComparison.Ordinal))
            {
                ids.Add(name[..^".json".Length]);
            }
        }
        ids.Sort(StringComparer.Ordinal);
        return ids;
    }
}
