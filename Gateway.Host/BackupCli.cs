using System.CommandLine;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Gateway.Actors.Cluster;
using Gateway.Backup;

namespace Gateway.Host;

/// <summary>
/// <c>gateway backup create|restore|list|verify</c> (README "Backup"). Exit codes: 0 done,
/// 1 failed (no such export or backup, a corrupt or missing chunk, a repository of another
/// format), 2 bad arguments.
/// </summary>
public sealed partial class BackupCli(TextWriter stdout, TextWriter stderr)
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static Command Build(Option<string> adminUrl)
    {
        var repo = new Option<string>("--repo") { Description = "The backup repository: a folder (made on the first create)", Required = true };
        var json = new Option<bool>("--json") { Description = "Print the result as JSON" };
        var id = new Argument<string>("id") { Description = "Backup id (gateway backup list)" };
        var backup = new Command("backup", "Deduplicated, incremental, always-full backups of exports over NBD (README \"Backup\")");

        var export = new Argument<string>("export") { Description = "Export name" };
        var nbd = new Option<string>("--nbd") { Description = "The gateway's NBD address HOST:PORT or unix:PATH", DefaultValueFactory = _ => GatewayOptions.DefaultNbd };
        var bitmap = new Option<string>("--bitmap")
        {
            Description = "Prefix of the dirty bitmaps that track changes between backups (each backup adds PREFIX.ID and removes its predecessor's)",
            DefaultValueFactory = _ => BackupTracking.DefaultPrefix,
        };
        var noBitmap = new Option<bool>("--no-bitmap") { Description = "Read everything allocated and add no bitmap (any NBD server; no admin API needed)" };
        var create = new Command("create", "Back an export up: reads what changed since the last backup (or everything allocated), stores only chunks the repository lacks, then the manifest");
        create.Arguments.Add(export);
        create.Options.Add(repo);
        create.Options.Add(nbd);
        create.Options.Add(adminUrl);
        create.Options.Add(CliAuth.TokenFile);
        create.Options.Add(bitmap);
        create.Options.Add(noBitmap);
        create.Options.Add(json);
        create.SetAction((p, ct) =>
        {
            Uri? admin = null;
            if (!p.GetValue(noBitmap))
            {
                CliAuth.Configure(p);
                admin = AdminClient.BaseUri(p.GetValue(adminUrl)!);
            }
            return Console().CreateAsync(p.GetValue(export)!, p.GetValue(repo)!, p.GetValue(nbd)!, admin, p.GetValue(bitmap)!, p.GetValue(json), ct);
        });
        backup.Subcommands.Add(create);

        var toFile = new Option<string?>("--to-file") { Description = "Image file to write (made or replaced whole; holes stay sparse)" };
        var format = new Option<string?>("--format")
        {
            Description = "The --to-file image's format: raw or qcow2 (through qemu-img and qemu-nbd); default qcow2 for a name ending in .qcow2, raw otherwise",
        };
        format.AcceptOnlyFromAmong("raw", "qcow2");
        var toExport = new Option<string?>("--to-export") { Description = "A new export to make (the gateway's default backend, or S3 with the --s3-* options) and write the backup into over NBD" };
        var size = new Option<string?>("--size") { Description = "The new export's size (default: the backup's disk size; not smaller), e.g. 20G" };
        var restore = new Command("restore", "Restore a backup into a raw file or a new export, every chunk checked against its hash");
        restore.Arguments.Add(id);
        restore.Options.Add(repo);
        restore.Options.Add(toFile);
        restore.Options.Add(format);
        restore.Options.Add(toExport);
        restore.Options.Add(size);
        restore.Options.Add(nbd);
        restore.Options.Add(adminUrl);
        restore.Options.Add(CliAuth.TokenFile);
        restore.Options.Add(json);
        S3Cli.AddOptions(restore); // --to-export on an S3 backend, as with export add
        restore.SetAction((p, ct) =>
        {
            if (p.GetValue(toExport) is { } target)
            {
                CliAuth.Configure(p);
                BackendDto? backend = S3Cli.IsS3(p) ? new BackendDto("s3", null, S3: S3Cli.Spec(p)) : null;
                return Console().RestoreToExportAsync(p.GetValue(id)!, p.GetValue(repo)!, target, p.GetValue(size), backend,
                    p.GetValue(nbd)!, AdminClient.BaseUri(p.GetValue(adminUrl)!), p.GetValue(toFile), p.GetValue(json), ct);
            }
            return Console().RestoreAsync(p.GetValue(id)!, p.GetValue(repo)!, p.GetValue(toFile), p.GetValue(format), p.GetValue(json), ct);
        });
        backup.Subcommands.Add(restore);

        var list = new Command("list", "List the repository's backups, oldest first");
        list.Options.Add(repo);
        list.Options.Add(json);
        list.SetAction((p, ct) => Console().ListAsync(p.GetValue(repo)!, p.GetValue(json), ct));
        backup.Subcommands.Add(list);

        var against = new Option<string?>("--against-export")
        {
            Description = "Also read the live export where the backup's bitmap says nothing changed since, and compare with the backup (catches a write the change tracking missed)",
        };
        var verify = new Command("verify", "Check that every chunk of a backup is present and hashes to its name, and optionally that the live export still matches it where its bitmap is clean; exit 1 naming the disk offsets of any problem");
        verify.Arguments.Add(id);
        verify.Options.Add(repo);
        verify.Options.Add(against);
        verify.Options.Add(nbd);
        verify.Options.Add(adminUrl);
        verify.Options.Add(CliAuth.TokenFile);
        verify.Options.Add(json);
        verify.SetAction((p, ct) =>
        {
            LiveTarget? live = null;
            if (p.GetValue(against) is { } export)
            {
                CliAuth.Configure(p);
                live = new LiveTarget(export, p.GetValue(nbd)!, AdminClient.BaseUri(p.GetValue(adminUrl)!));
            }
            return Console().VerifyAsync(p.GetValue(id)!, p.GetValue(repo)!, live, p.GetValue(json), ct);
        });
        backup.Subcommands.Add(verify);
        AddMaintenanceCommands(backup, repo, json);
        return backup;
    }

    private static BackupCli Console() => new(System.Console.Out, System.Console.Error);

    /// <param name="admin">The admin API that keeps the bitmaps; null for a full backup without tracking.</param>
    public Task<int> CreateAsync(string export, string repo, string nbd, Uri? admin, string prefix, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        EndPoint endpoint = ParseNbdAddress(nbd);
        if (!BackupTracking.IsValidPrefix(prefix))
        {
            await stderr.WriteLineAsync($"error: --bitmap '{prefix}' is invalid: use up to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'");
            return 2;
        }
        BackupTracking? tracking = admin is null ? null : new BackupTracking(new BackupAdminClient(admin), prefix);
        BackupRepository repository = await OpenRepositoryAsync(repo, create: true, ct);
        using var bar = ProgressBar.OnTerminal(stderr, enabled: !json);
        BackupSummary summary;
        try
        {
            summary = await new BackupCreator(repository) { Progress = bar }.CreateAsync(endpoint, export, tracking, ct);
        }
        catch (PeerExportUnavailableException)
        {
            await stderr.WriteLineAsync($"error: {nbd} serves no export '{export}'");
            return 1;
        }
        catch (SocketException e)
        {
            await stderr.WriteLineAsync($"error: cannot reach the gateway at {nbd}: {e.Message}");
            return 1;
        }
        bar?.Dispose();
        foreach (string warning in summary.Warnings)
        {
            await stderr.WriteLineAsync($"warning: {warning}");
        }
        string kind = summary.Incremental ? $"incremental on {summary.BasedOn}" : summary.FullBecause is { } why ? $"full ({why})" : "full";
        await stdout.WriteLineAsync(json
            ? JsonSerializer.Serialize(summary, Indented)
            : string.Create(CultureInfo.InvariantCulture,
                $"backup {summary.Id} of {export}, {kind}: {summary.BytesTotal} bytes, {summary.BytesDirty} to look at, {summary.BytesRead} read, {summary.ChunksNew} chunks new ({summary.BytesUploaded} bytes stored), {summary.ChunksReused} reused, {summary.ChunksUnchanged} unchanged, {summary.ChunksZero + summary.ChunksHole} zero or hole, {summary.Seconds:F1} s"));
        return 0;
    });

    /// <summary>unix:PATH, an IP address and port, or a host name and port.</summary>
    /// <exception cref="UsageException">None of those (exit 2).</exception>
    private static EndPoint ParseNbdAddress(string value)
    {
        try
        {
            return value.StartsWith("unix:", StringComparison.Ordinal) ? GatewayOptions.ParseNbdEndpoint(value)
                : IPEndPoint.TryParse(value, out IPEndPoint? ip) && ip.Port != 0 ? ip
                : Gateway.Csi.CsiOptions.ParseNbd(value);
        }
        catch (ArgumentException e)
        {
            throw new UsageException(e.Message);
        }
    }

    /// <summary>A bad argument: printed as one line, exit 2.</summary>
    private sealed class UsageException(string message) : Exception(message);

    /// <param name="format">raw or qcow2; null: qcow2 for a name ending in .qcow2, raw otherwise.</param>
    public Task<int> RestoreAsync(string id, string repo, string? file, string? format, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        if (file is null)
        {
            await stderr.WriteLineAsync("error: give --to-file FILE or --to-export NAME");
            return 2;
        }
        RestoreFormat image = (format ?? (file.EndsWith(".qcow2", StringComparison.OrdinalIgnoreCase) ? "qcow2" : "raw")) == "qcow2" ? RestoreFormat.Qcow2 : RestoreFormat.Raw;
        string target;
        try
        {
            target = RestoreTarget.Resolve(Path.GetFullPath(file));
        }
        catch (ArgumentException e)
        {
            throw new UsageException(e.Message);
        }
        BackupRepository repository = await OpenRepositoryAsync(repo, create: false, ct);
        RestoreSummary summary = await new BackupRestore(repository).ToFileAsync(id, target, image, ct);
        await PrintRestoredAsync(summary, $"{file} ({image.ToString().ToLowerInvariant()})", json);
        return 0;
    });

    /// <summary>
    /// Makes <paramref name="export"/> (refused if it exists) on <paramref name="backend"/> (null: the
    /// gateway's default, a sparse file), writes the backup into it, and removes it again if that fails.
    /// </summary>
    public Task<int> RestoreToExportAsync(string id, string repo, string export, string? size, BackendDto? backend, string nbd, Uri admin, string? file, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        if (file is not null)
        {
            await stderr.WriteLineAsync("error: give --to-file or --to-export, not both");
            return 2;
        }
        EndPoint endpoint = ParseNbdAddress(nbd);
        BackupRepository repository = await OpenRepositoryAsync(repo, create: false, ct);
        Manifest manifest = await repository.GetManifestAsync(id, ct);
        long bytes = manifest.DiskSize;
        if (size is not null && (!Sizes.TryParse(size, out bytes) || bytes < manifest.DiskSize))
        {
            await stderr.WriteLineAsync($"error: --size '{size}' must be a size of at least the backup's {manifest.DiskSize} bytes");
            return 2;
        }
        var client = new BackupAdminClient(admin);
        await client.CreateExportAsync(export, bytes, backend, ct);
        RestoreSummary summary;
        try
        {
            // A new file export is a new sparse file; another backend's storage may hold older bytes.
            summary = await new BackupRestore(repository).ToExportAsync(id, endpoint, export, zeroFirst: backend is not null, ct);
        }
        catch
        {
            // Nothing half-written: the export was made for this restore, so it goes with it.
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            try
            {
                await client.RemoveExportAsync(export, timeout.Token);
            }
            catch (Exception e) when (e is BackupSourceException or OperationCanceledException)
            {
                await stderr.WriteLineAsync($"warning: could not remove the half-restored export '{export}': {e.Message}");
            }
            throw;
        }
        await PrintRestoredAsync(summary, $"export '{export}'", json);
        return 0;
    });

    private Task PrintRestoredAsync(RestoreSummary summary, string into, bool json) =>
        stdout.WriteLineAsync(json
            ? JsonSerializer.Serialize(summary, Indented)
            : string.Create(CultureInfo.InvariantCulture, $"restored {summary.Id} into {into}: {summary.DiskSize} bytes, {summary.BytesWritten} written, {summary.Seconds:F1} s"));

    public Task<int> ListAsync(string repo, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        BackupRepository repository = await OpenRepositoryAsync(repo, create: false, ct);
        var rows = new List<object>();
        foreach (string id in await repository.ListIdsAsync(ct))
        {
            Manifest manifest = await repository.GetManifestAsync(id, ct);
            long data = manifest.Chunks.Count(c => c.Kind == ChunkKind.Data);
            if (json)
            {
                rows.Add(new { id, export = manifest.Export, diskSize = manifest.DiskSize, created = manifest.Created, dataChunks = data });
            }
            else
            {
                await stdout.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"{id}\t{manifest.Export}\t{manifest.DiskSize}\t{manifest.Created:O}\t{data} data chunks"));
            }
        }
        if (json)
        {
            await stdout.WriteLineAsync(JsonSerializer.Serialize(rows, Indented));
        }
        return 0;
    });

    /// <summary>The live export <c>verify --against-export</c> compares, and where to reach it.</summary>
    public sealed record LiveTarget(string Export, string Nbd, Uri Admin);

    public Task<int> VerifyAsync(string id, string repo, LiveTarget? live, bool json, CancellationToken ct) => RunAsync(async () =>
    {
        EndPoint? endpoint = live is null ? null : ParseNbdAddress(live.Nbd);
        BackupRepository repository = await OpenRepositoryAsync(repo, create: false, ct);
        IReadOnlyList<ChunkProblem> problems = await new BackupVerifier(repository).VerifyAsync(id, ct);
        LiveVerifyResult? compared = live is null ? null
            : await new LiveVerifier(repository).VerifyAsync(id, endpoint!, live.Export, new BackupAdminClient(live.Admin), ct);
        bool ok = problems.Count == 0 && (compared is null || compared.Mismatches.Count == 0);
        if (json)
        {
            await stdout.WriteLineAsync(JsonSerializer.Serialize(new
            {
                id,
                ok,
                problems = problems.Select(p => new { sha256 = p.Sha256, problem = p.Problem, ranges = p.Ranges.Select(r => new { offset = r.Offset, length = r.Length }) }),
                live = compared is null ? null : new
                {
                    export = live!.Export,
                    bitmap = compared.Bitmap,
                    bytesCompared = compared.BytesCompared,
                    bytesChanged = compared.BytesChanged,
                    mismatches = compared.Mismatches.Select(m => new
                    {
                        offset = m.ChunkOffset,
                        length = m.ChunkLength,
                        firstDifference = m.FirstDifference,
                        bytesDiffering = m.BytesDiffering,
                        expected = m.Expected,
                    }),
                },
            }, Indented));
        }
        else if (ok)
        {
            await stdout.WriteLineAsync(compared is null
                ? $"backup {id}: every chunk present and whole"
                : string.Create(CultureInfo.InvariantCulture, $"backup {id}: every chunk present and whole; export '{live!.Export}' matches it in the {compared.BytesCompared} bytes its bitmap '{compared.Bitmap}' calls unchanged ({compared.BytesChanged} changed since)"));
        }
        foreach (ChunkProblem problem in problems)
        {
            await stderr.WriteLineAsync($"error: backup {id}: {problem}");
        }
        foreach (LiveMismatch mismatch in compared?.Mismatches ?? [])
        {
            await stderr.WriteLineAsync($"error: export '{live!.Export}' against backup {id}: {mismatch}");
        }
        return ok ? 0 : 1;
    });

    /// <summary>ENOSPC, which .NET gives as an IOException's HResult on Linux.</summary>
    private const int NoSpace = 28;

    private async Task<int> RunAsync(Func<Task<int>> action)
    {
        try
        {
            return await action();
        }
        catch (UsageException e)
        {
            await stderr.WriteLineAsync($"error: {e.Message}");
            return 2;
        }
        catch (IOException e) when (e.HResult == NoSpace)
        {
            await stderr.WriteLineAsync($"error: {e.Message}: free space (or run gc) and run it again; what was stored is kept, and a backup reuses it");
            return 1;
        }
        catch (Exception e) when (e is BackupFormatException or BackupCorruptException or BackupSourceException or IOException or UnauthorizedAccessException)
        {
            await stderr.WriteLineAsync($"error: {e.Message}");
            return 1;
        }
    }
}
