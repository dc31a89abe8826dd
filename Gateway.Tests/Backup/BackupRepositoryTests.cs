using System.Text;
using Gateway.Backup;
using Gateway.Tests.Interop;
using Xunit;

namespace Gateway.Tests.Backup;

/// <summary>The repository's rules without a gateway: format version, manifests, chunks, put-if-absent.</summary>
public sealed class BackupRepositoryTests : IDisposable
{
    private const int ChunkSize = 64 * 1024;
    private readonly DirectoryInfo _folder = Directory.CreateTempSubdirectory("backup-repo-");

    public void Dispose() => _folder.Delete(recursive: true);

    private Task<BackupRepository> NewRepositoryAsync() =>
        BackupRepository.OpenOrCreateAsync(new FolderStore(_folder.FullName), ChunkSize, CancellationToken.None);

    private static byte[] Filled(byte value, int length = ChunkSize) => Enumerable.Repeat(value, length).ToArray();

    [Fact]
    public async Task A_repository_of_another_format_version_is_refused_by_name()
    {
        await NewRepositoryAsync();
        string info = Path.Combine(_folder.FullName, BackupRepository.InfoKey);
        Assert.Contains("\"version\":1", File.ReadAllText(info));
        File.WriteAllText(info, $"{{\"format\":\"nbd-gateway-backup\",\"version\":2,\"chunkSize\":{ChunkSize}}}");
        BackupFormatException e = await Assert.ThrowsAsync<BackupFormatException>(() => BackupRepository.OpenAsync(new FolderStore(_folder.FullName), CancellationToken.None));
        Assert.Contains("format version 2", e.Message);
        Assert.Contains("reads version 1", e.Message);

        File.WriteAllText(info, "{\"format\":\"something-else\",\"version\":1,\"chunkSize\":65536}");
        await Assert.ThrowsAsync<BackupFormatException>(() => BackupRepository.OpenAsync(new FolderStore(_folder.FullName), CancellationToken.None));
    }

    [Fact]
    public async Task A_folder_that_is_neither_empty_nor_a_repository_is_not_made_one()
    {
        File.WriteAllText(Path.Combine(_folder.FullName, "precious.txt"), "keep me");
        BackupFormatException e = await Assert.ThrowsAsync<BackupFormatException>(() => BackupRepository.OpenFolderAsync(_folder.FullName, create: true, CancellationToken.None));
        Assert.Contains("neither empty nor a backup repository", e.Message);
        Assert.False(File.Exists(Path.Combine(_folder.FullName, BackupRepository.InfoKey)));
    }

    [Fact]
    public async Task Put_if_absent_keeps_the_first_object_and_leaves_no_temporary_file()
    {
        var store = new FolderStore(_folder.FullName);
        Assert.True(await store.PutIfAbsentAsync("backups/a.json", Encoding.UTF8.GetBytes("first"), CancellationToken.None));
        Assert.False(await store.PutIfAbsentAsync("backups/a.json", Encoding.UTF8.GetBytes("second"), CancellationToken.None));
        Assert.Equal("first", Encoding.UTF8.GetString((await store.GetAsync("backups/a.json", CancellationToken.None))!));
        Assert.Null(await store.GetAsync("backups/b.json", CancellationToken.None));
        Assert.Equal(["a.json"], Directory.EnumerateFiles(Path.Combine(_folder.FullName, "backups")).Select(Path.GetFileName));
        await Assert.ThrowsAsync<ArgumentException>(() => store.GetAsync("../outside", CancellationToken.None));
    }

    [Fact]
    public async Task A_chunk_is_stored_once_under_its_hash_and_read_back_only_if_it_hashes_to_its_name()
    {
        BackupRepository repository = await NewRepositoryAsync();
        byte[] data = Filled(0x5a);
        string sha = BackupRepository.Hash(data);
        long stored = await repository.PutChunkAsync(sha, data, CancellationToken.None);
        Assert.True(stored is > 0 and < ChunkSize, $"{stored} compressed bytes");
        Assert.Equal(0, await repository.PutChunkAsync(sha, data, CancellationToken.None));
        string file = Path.Combine(_folder.FullName, "chunks", sha[..2], sha);
        Assert.True(File.Exists(file));

        byte[] back = new byte[ChunkSize];
        await repository.ReadChunkAsync(sha, back, CancellationToken.None);
        Assert.Equal(data, back);

        // A chunk stored under a name that is not its hash (a corrupt or swapped file) is refused.
        byte[] other = Filled(0x11);
        string otherSha = BackupRepository.Hash(other);
        await repository.PutChunkAsync(otherSha, other, CancellationToken.None);
        File.Copy(Path.Combine(_folder.FullName, "chunks", otherSha[..2], otherSha), file, overwrite: true);
        BackupCorruptException e = await Assert.ThrowsAsync<BackupCorruptException>(() => repository.ReadChunkAsync(sha, back, CancellationToken.None));
        Assert.Contains($"hashes to {otherSha}", e.Message);
        // And one of the wrong length.
        await Assert.ThrowsAsync<BackupCorruptException>(() => repository.ReadChunkAsync(otherSha, new byte[ChunkSize / 2], CancellationToken.None));
    }

    [Fact]
    public async Task A_torn_chunk_object_left_by_an_interrupted_upload_is_stored_again_and_a_whole_one_is_kept()
    {
        BackupRepository repository = await NewRepositoryAsync();
        byte[] data = new byte[ChunkSize];
        var random = new Random(5);
        for (int i = 0; i < data.Length; i++)
        {
            data[i] = (byte)random.Next(16); // compressible, so compression levels differ in length
        }
        string sha = BackupRepository.Hash(data);
        StoredChunk first = await repository.StoreChunkAsync(sha, data, CancellationToken.None);
        Assert.True(first.Uploaded > 0 && !first.Replaced);
        Assert.Equal(new StoredChunk(0, false), await repository.StoreChunkAsync(sha, data, CancellationToken.None));
        string file = Directory.EnumerateFiles(Path.Combine(_folder.FullName, "chunks"), sha, SearchOption.AllDirectories).Single();
        byte[] whole = await File.ReadAllBytesAsync(file);

        // Torn: the first half of the object, as a store without atomic writes leaves it when killed mid-PUT.
        await File.WriteAllBytesAsync(file, whole[..(whole.Length / 2)]);
        StoredChunk again = await repository.StoreChunkAsync(sha, data, CancellationToken.None);
        Assert.True(again.Replaced);
        Assert.Equal(whole.Length, again.Uploaded);
        byte[] back = new byte[ChunkSize];
        await repository.ReadChunkAsync(sha, back, CancellationToken.None);
        Assert.Equal(data, back);

        // Whole but of another length (another compressor): kept, not rewritten.
        byte[] stored = new byte[whole.Length + 16];
        whole.CopyTo(stored, 0);
        int otherLength;
        using (var compressor = new ZstdSharp.Compressor(1))
        {
            otherLength = compressor.Wrap(data, stored);
        }
        Assert.NotEqual(whole.Length, otherLength);
        await File.WriteAllBytesAsync(file, stored[..otherLength]);
        Assert.Equal(new StoredChunk(0, false), await repository.StoreChunkAsync(sha, data, CancellationToken.None));
        Assert.Equal(otherLength, new FileInfo(file).Length);
    }

    [Fact]
    public async Task Verify_reports_a_manifest_that_points_at_a_missing_chunk_with_every_offset_that_needs_it()
    {
        BackupRepository repository = await NewRepositoryAsync();
        byte[] present = Filled(0x01);
        string presentSha = BackupRepository.Hash(present);
        await repository.PutChunkAsync(presentSha, present, CancellationToken.None);
        string missingSha = BackupRepository.Hash(Filled(0x02));
        const long diskSize = 4L * ChunkSize + 1000; // the last chunk is short
        var manifest = new Manifest(Manifest.CurrentVersion, "20261206T120000Z-0000abcd", "vm", diskSize, ChunkSize, DateTimeOffset.UtcNow,
        [
            new ChunkEntry(ChunkKind.Data, missingSha),
            ChunkEntry.Hole,
            new ChunkEntry(ChunkKind.Data, presentSha),
            new ChunkEntry(ChunkKind.Data, missingSha),
            ChunkEntry.Zero,
        ]);
        await repository.PutManifestAsync(manifest, CancellationToken.None);
        Assert.Equal([manifest.Id], await repository.ListIdsAsync(CancellationToken.None));
        Manifest read = await repository.GetManifestAsync(manifest.Id, CancellationToken.None);
        Assert.Equal(manifest.Chunks, read.Chunks);
        Assert.Equal((4L * ChunkSize, 1000), read.Range(4));

        IReadOnlyList<ChunkProblem> problems = await new BackupVerifier(repository).VerifyAsync(manifest.Id, CancellationToken.None);
        ChunkProblem problem = Assert.Single(problems);
        Assert.Equal(missingSha, problem.Sha256);
        Assert.Contains("missing", problem.Problem);
        Assert.Equal([(0L, (long)ChunkSize), (3L * ChunkSize, (long)ChunkSize)], problem.Ranges);

        string file = Path.Combine(_folder.FullName, "restored.img");
        BackupCorruptException e = await Assert.ThrowsAsync<BackupCorruptException>(() => new BackupRestore(repository).ToFileAsync(manifest.Id, file, RestoreFormat.Raw, CancellationToken.None));
        // Chunks are restored in parallel, so either chunk that needs the missing hash may be the one that fails first.
        Assert.Matches($@"disk offset (0|{3L * ChunkSize}) \(length {ChunkSize}\)", e.Message);
        Assert.False(File.Exists(file));
        // A file that was there keeps its bytes: the restore writes beside it and renames only when whole.
        await File.WriteAllTextAsync(file, "the image before");
        await Assert.ThrowsAsync<BackupCorruptException>(() => new BackupRestore(repository).ToFileAsync(manifest.Id, file, RestoreFormat.Raw, CancellationToken.None));
        Assert.Equal("the image before", await File.ReadAllTextAsync(file));
        Assert.Empty(Directory.EnumerateFiles(_folder.FullName, ".restore-*"));
    }

    [Fact]
    public async Task A_file_restore_refuses_a_device_or_folder_target_and_writes_through_a_link_to_its_file()
    {
        BackupRepository repository = await NewRepositoryAsync();
        byte[] data = Filled(0x5A);
        string sha = BackupRepository.Hash(data);
        await repository.PutChunkAsync(sha, data, CancellationToken.None);
        var manifest = new Manifest(Manifest.CurrentVersion, "20261206T120000Z-0000beef", "vm", 2L * ChunkSize, ChunkSize, DateTimeOffset.UtcNow,
            [new ChunkEntry(ChunkKind.Data, sha), ChunkEntry.Hole]);
        await repository.PutManifestAsync(manifest, CancellationToken.None);
        var restore = new BackupRestore(repository);

        // Renamed over, a device node would be replaced by a file in /dev (RAM): refused before a byte is written.
        string[] devBefore = [.. Directory.EnumerateFileSystemEntries("/dev", ".restore-*")];
        ArgumentException device = await Assert.ThrowsAsync<ArgumentException>(() => restore.ToFileAsync(manifest.Id, "/dev/null", RestoreFormat.Raw, CancellationToken.None));
        Assert.Contains("'/dev/null' is a character device", device.Message);
        Assert.Contains("--to-export", device.Message);
        Assert.Equal(devBefore, Directory.EnumerateFileSystemEntries("/dev", ".restore-*"));
        // The CLI says so in one line, as a bad argument (exit 2).
        var stderr = new StringWriter();
        Assert.Equal(2, await new Gateway.Host.BackupCli(TextWriter.Null, stderr).RestoreAsync(manifest.Id, _folder.FullName, "/dev/null", null, json: false, CancellationToken.None));
        Assert.StartsWith("error: '/dev/null' is a character device, not a regular file", stderr.ToString());
        Assert.Single(stderr.ToString().Trim().Split('\n'));

        string fifo = Path.Combine(_folder.FullName, "pipe");
        Assert.Equal(0, (await Tool.RunAsync("mkfifo", [fifo])).ExitCode);
        Assert.Contains("is a FIFO", (await Assert.ThrowsAsync<ArgumentException>(() => restore.ToFileAsync(manifest.Id, fifo, RestoreFormat.Raw, CancellationToken.None))).Message);
        Assert.Contains("is a directory", (await Assert.ThrowsAsync<ArgumentException>(() => restore.ToFileAsync(manifest.Id, _folder.FullName, RestoreFormat.Raw, CancellationToken.None))).Message);

        // A link to the device names both.
        string toDevice = Path.Combine(_folder.FullName, "disk");
        File.CreateSymbolicLink(toDevice, "/dev/null");
        Assert.Contains($"'{toDevice}' (a link to '/dev/null') is a character device",
            (await Assert.ThrowsAsync<ArgumentException>(() => restore.ToFileAsync(manifest.Id, toDevice, RestoreFormat.Raw, CancellationToken.None))).Message);

        // A link to an image file: the file it names gets the disk, and the link stays a link to it.
        Directory.CreateDirectory(Path.Combine(_folder.FullName, "images"));
        string image = Path.Combine(_folder.FullName, "images", "vm.img");
        await File.WriteAllTextAsync(image, "the image before");
        string link = Path.Combine(_folder.FullName, "vm.img");
        File.CreateSymbolicLink(link, image);
        await restore.ToFileAsync(manifest.Id, link, RestoreFormat.Raw, CancellationToken.None);
        Assert.Equal(image, new FileInfo(link).LinkTarget);
        byte[] restored = await File.ReadAllBytesAsync(image);
        Assert.Equal(2 * ChunkSize, restored.Length);
        Assert.Equal(data, restored[..ChunkSize]);
        Assert.All(restored[ChunkSize..], b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Manifests_that_break_the_rules_are_neither_written_nor_trusted()
    {
        BackupRepository repository = await NewRepositoryAsync();
        DateTimeOffset now = DateTimeOffset.UtcNow;
        // Too few entries for the disk, data without a hash, a hash on a hole.
        Manifest[] bad =
        [
            new(Manifest.CurrentVersion, "a", "vm", 3L * ChunkSize, ChunkSize, now, [ChunkEntry.Hole, ChunkEntry.Hole]),
            new(Manifest.CurrentVersion, "b", "vm", ChunkSize, ChunkSize, now, [new ChunkEntry(ChunkKind.Data)]),
            new(Manifest.CurrentVersion, "c", "vm", ChunkSize, ChunkSize, now, [new ChunkEntry(ChunkKind.Hole, new string('a', 64))]),
            new(Manifest.CurrentVersion + 1, "d", "vm", ChunkSize, ChunkSize, now, [ChunkEntry.Hole]),
        ];
        foreach (Manifest manifest in bad)
        {
            await Assert.ThrowsAsync<BackupFormatException>(() => repository.PutManifestAsync(manifest, CancellationToken.None));
        }
        Assert.Empty(await repository.ListIdsAsync(CancellationToken.None));

        // One edited on disk to another version is refused when read.
        var good = new Manifest(Manifest.CurrentVersion, "e", "vm", ChunkSize, ChunkSize, now, [ChunkEntry.Zero]);
        await repository.PutManifestAsync(good, CancellationToken.None);
        string path = Path.Combine(_folder.FullName, "backups", "e.json");
        File.WriteAllText(path, File.ReadAllText(path).Replace("\"version\":1", "\"version\":9", StringComparison.Ordinal));
        BackupFormatException e = await Assert.ThrowsAsync<BackupFormatException>(() => repository.GetManifestAsync("e", CancellationToken.None));
        Assert.Contains("manifest version 9", e.Message);
        await Assert.ThrowsAsync<BackupFormatException>(() => repository.GetManifestAsync("../repository", CancellationToken.None));
    }

    [Fact]
    public void Backup_ids_sort_by_time()
    {
        string earlier = Manifest.NewId(new DateTimeOffset(2026, 12, 6, 12, 27, 0, TimeSpan.Zero));
        string later = Manifest.NewId(new DateTimeOffset(2026, 12, 6, 12, 27, 1, TimeSpan.Zero));
        Assert.StartsWith("20261206T122700Z-", earlier);
        Assert.Equal("20261206T122700Z-".Length + 8, earlier.Length);
        Assert.True(string.CompareOrdinal(earlier, later) < 0);
        Assert.True(Manifest.IsValidId(earlier));
    }
}
