using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Gateway.Backup;

/// <summary>
/// A backup store in a local folder: a key is a relative path. A put writes a temporary file
/// beside the target, fsyncs it, renames it into place and fsyncs the folder, so a crash leaves
/// either the whole object or none (a stray <c>.tmp-*</c> file at worst, never read).
/// </summary>
public sealed partial class FolderStore(string root) : IBackupStore
{
    private const string TempPrefix = ".tmp-";

    public string Root { get; } = Path.GetFullPath(root);

    public async Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        string path = PathOf(key);
        if (File.Exists(path))
        {
            return false;
        }
        string temp = await WriteTempAsync(path, data, cancellationToken).ConfigureAwait(false);
        try
        {
            try
            {
                // Without overwrite: a concurrent writer of the same key (the same content, as keys
                // are content hashes or unique ids) keeps its object.
                File.Move(temp, path, overwrite: false);
            }
            catch (IOException) when (File.Exists(path))
            {
                return false;
            }
            FsyncFolder(Path.GetDirectoryName(path)!);
            return true;
        }
        finally
        {
            File.Delete(temp);
        }
    }

    public async Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        string path = PathOf(key);
        string temp = await WriteTempAsync(path, data, cancellationToken).ConfigureAwait(false);
        try
        {
            File.Move(temp, path, overwrite: true);
            FsyncFolder(Path.GetDirectoryName(path)!);
        }
        finally
        {
            File.Delete(temp);
        }
    }

    public Task<bool> DeleteAsync(string key, CancellationToken cancellationToken)
    {
        string path = PathOf(key);
        if (!File.Exists(path))
        {
            return Task.FromResult(false);
        }
        File.Delete(path);
        FsyncFolder(Path.GetDirectoryName(path)!);
        return Task.FromResult(true);
    }

    /// <summary>A temporary file beside <paramref name="path"/> holding <paramref name="data"/>, fsynced; the caller renames or deletes it.</summary>
    private static async Task<string> WriteTempAsync(string path, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        string folder = Path.GetDirectoryName(path)!;
        Directory.CreateDirectory(folder);
        string temp = Path.Combine(folder, TempPrefix + Guid.NewGuid().ToString("N"));
        try
        {
            using SafeFileHandle handle = File.OpenHandle(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, FileOptions.Asynchronous);
            await RandomAccess.WriteAsync(handle, data, 0, cancellationToken).ConfigureAwait(false);
            RandomAccess.FlushToDisk(handle);
            return temp;
        }
        catch
        {
            File.Delete(temp);
            throw;
        }
    }

    public async Task<byte[]?> GetAsync(string key, CancellationToken cancellationToken)
    {
        try
        {
            return await File.ReadAllBytesAsync(PathOf(key), cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return null;
        }
    }

    public Task<long?> LengthAsync(string key, CancellationToken cancellationToken)
    {
        var file = new FileInfo(PathOf(key));
        return Task.FromResult(file.Exists ? file.Length : (long?)null);
    }

    public async IAsyncEnumerable<string> ListAsync(string prefix, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        string folder = PathOf(prefix);
        if (!Directory.Exists(folder))
        {
            yield break;
        }
        foreach (string file in Directory.EnumerateFiles(folder))
        {
            cancellationToken.ThrowIfCancellationRequested();
            string name = Path.GetFileName(file);
            if (!name.StartsWith(TempPrefix, StringComparison.Ordinal))
            {
                yield return prefix.TrimEnd('/') + "/" + name;
            }
        }
        await Task.CompletedTask.ConfigureAwait(false);
    }

    public async IAsyncEnumerable<StoredObject> ListObjectsAsync(string prefix, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        foreach (StoredObject stored in Walk(prefix, temporary: false))
        {
            cancellationToken.ThrowIfCancellationRequested();
            yield return stored;
        }
        await Task.CompletedTask.ConfigureAwait(false);
    }

    public async IAsyncEnumerable<StoredObject> ListIncompleteAsync([EnumeratorCancellation] CancellationToken cancellationToken)
    {
        foreach (StoredObject stored in Walk("", temporary: true))
        {
            cancellationToken.ThrowIfCancellationRequested();
            yield return stored;
        }
        await Task.CompletedTask.ConfigureAwait(false);
    }

    public Task DeleteIncompleteAsync(string key, CancellationToken cancellationToken)
    {
        if (!Path.GetFileName(key).StartsWith(TempPrefix, StringComparison.Ordinal))
        {
            throw new ArgumentException($"'{key}' is not a leftover of an interrupted write", nameof(key));
        }
        File.Delete(PathOf(key));
        return Task.CompletedTask;
    }

    /// <summary>The files under <paramref name="prefix"/> at any depth: the objects, or (<paramref name="temporary"/>) only the temp files.</summary>
    private IEnumerable<StoredObject> Walk(string prefix, bool temporary)
    {
        string folder = prefix.Length == 0 ? Root : PathOf(prefix);
        if (!Directory.Exists(folder))
        {
            yield break;
        }
        foreach (string file in Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories))
        {
            if (Path.GetFileName(file).StartsWith(TempPrefix, StringComparison.Ordinal) != temporary)
            {
                continue;
            }
            var info = new FileInfo(file);
            if (!info.Exists)
            {
                continue; // deleted or renamed since the folder was read
            }
            string key = Path.GetRelativePath(Root, file).Replace(Path.DirectorySeparatorChar, '/');
            yield return new StoredObject(key, info.Length, new DateTimeOffset(info.LastWriteTimeUtc, TimeSpan.Zero));
        }
    }

    private string PathOf(string key)
    {
        if (key.Contains("..", StringComparison.Ordinal) || Path.IsPathRooted(key))
        {
            throw new ArgumentException($"'{key}' is not a key of this store", nameof(key));
        }
        return Path.Combine(Root, key.Replace('/', Path.DirectorySeparatorChar));
    }

    /// <summary>The rename is durable only once the folder's entry is: fsync the folder (Linux; elsewhere a no-op).</summary>
    private static void FsyncFolder(string folder)
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }
        const int ReadOnly = 0, Directory = 0x10000;
        int fd = Open(folder, ReadOnly | Directory);
        if (fd < 0)
        {
            throw new IOException($"open({folder}) for fsync failed: errno {Marshal.GetLastPInvokeError()}");
        }
        try
        {
            if (Fsync(fd) != 0)
            {
                throw new IOException($"fsync({folder}) failed: errno {Marshal.GetLastPInvokeError()}");
            }
        }
        finally
        {
            _ = Close(fd);
        }
    }

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int Fsync(int fd);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int Close(int fd);
}
