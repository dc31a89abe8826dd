using Akka.Actor;
using Akka.Event;
using Gateway.Backends.Overlay;

namespace Gateway.Actors.Exports;

/// <summary>Overlay exports: creating one (on a base export or image) and snapshots.</summary>
public sealed partial class ExportRegistryActor
{
    private static readonly TimeSpan PushTimeout = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Fills in an overlay's chain: a new top over nothing, over a raw image, or over another
    /// export's frozen data. A read-only file export is shared as a raw base image; a read-only
    /// overlay shares its whole chain; a writable overlay is snapshotted first (its top frozen
    /// and a new top pushed, without stopping its clients), and the new export shares every
    /// layer below that new top.
    /// </summary>
    private void CreateOverlay(CreateExport create)
    {
        if (_catalog.Decide(create).Error is { } error)
        {
            Sender.Tell(error);
            return;
        }
        ExportSpec spec = create.Spec;
        BackendSpec backend = spec.Backend;
        string top = OverlayRules.NewLayerId(spec.Name);
        if (backend.Base is not { } baseName)
        {
            string? image = backend.BaseImage is { } path ? _backends.BaseImagePath(path) : null;
            Create(create with { Spec = spec with { Backend = backend with { Layers = [top], BaseImage = image } } });
            return;
        }
        if (!_catalog.Exports.TryGetValue(baseName, out ExportSpec? source))
        {
            Sender.Tell(CommandResult.Fail(ExportErrorKind.Invalid, $"base export '{baseName}' not found"));
            return;
        }
        if (!source.IsOverlay())
        {
            if (!source.ReadOnly)
            {
                Sender.Tell(CommandResult.Fail(ExportErrorKind.Conflict,
                    $"base export '{baseName}' is a writable file export: make it read-only to share it as a base image, or use an overlay export as the base"));
                return;
            }
            // Raw, never detected: the guest wrote this file, and a qcow2 header it wrote at offset 0
            // must not make the gateway follow tables (and backing file names) the guest chose.
            Create(create with { Spec = spec with { Backend = backend with { Layers = [top], BaseImage = _backends.FilePath(source), BaseFormat = ImageFormat.Raw } } });
            return;
        }
        if (source.ReadOnly)
        {
            Create(create with { Spec = spec with { Backend = backend with { Layers = [top, .. source.Backend.Layers ?? []], BaseImage = source.Backend.BaseImage, BaseFormat = source.Backend.BaseFormat, S3 = source.Backend.S3 } } });
            return;
        }
        CreateExport withTop = create with { Spec = spec with { Backend = backend with { Layers = [top] } } };
        if (source.Backend.Layers is { Length: > 1 } && TryAskExport(baseName, QueryTopEmpty.Instance, PushTimeout, out Task<bool> topEmpty))
        {
            // A base whose top is still empty needs no snapshot: its frozen layers are already all
            // it holds. Without this check every clone of a golden image would freeze one more
            // empty layer and see the golden data one level deeper than the clone before it.
            IActorRef replyTo = Sender;
            topEmpty
                .PipeTo(Self, success: empty => new CreateOnOverlayBase(withTop, replyTo, empty),
                    failure: _ => new CreateOnOverlayBase(withTop, replyTo, false));
            return;
        }
        Snapshot(new SnapshotExport(baseName), Sender, withTop);
    }

    private void CreateOnOverlayBase(CreateOnOverlayBase next)
    {
        ExportSpec spec = next.Create.Spec;
        if (!next.BaseTopEmpty || !_catalog.Exports.TryGetValue(spec.Backend.Base!, out ExportSpec? source) || source.ReadOnly
            || source.Backend.Layers is not { Length: > 1 } layers)
        {
            Snapshot(new SnapshotExport(spec.Backend.Base!), next.ReplyTo, next.Create);
            return;
        }
        // Create replies to Sender: make it the original asker.
        Self.Tell(new CreateExport(spec with { Backend = spec.Backend with { Layers = [spec.Backend.Layers![0], .. layers[1..]], BaseImage = source.Backend.BaseImage, BaseFormat = source.Backend.BaseFormat, S3 = source.Backend.S3 } }), next.ReplyTo);
    }

    /// <summary>The base's snapshot is done: share the layers below its new top.</summary>
    private void CreateOnSnapshot(SnapshotThenCreate done)
    {
        if (done.Result.Error is not null)
        {
            Sender.Tell(done.Result);
            return;
        }
        ExportSpec spec = done.Create.Spec;
        if (!_catalog.Exports.TryGetValue(spec.Backend.Base!, out ExportSpec? source) || source.Backend.Layers is not { Length: > 1 } layers)
        {
            Sender.Tell(CommandResult.Fail(ExportErrorKind.Conflict, $"base export '{spec.Backend.Base}' went away while it was being snapshotted"));
            return;
        }
        Create(done.Create with { Spec = spec with { Backend = spec.Backend with { Layers = [spec.Backend.Layers![0], .. layers[1..]], BaseImage = source.Backend.BaseImage, BaseFormat = source.Backend.BaseFormat, S3 = source.Backend.S3 } } });
    }

    /// <summary>
    /// Makes the new top layer, records the new chain, then has the export actor switch to it. The
    /// record comes first: a crash before the switch reopens the new chain, whose second layer (the
    /// old top) holds every write made until then.
    /// </summary>
    private void Snapshot(SnapshotExport snapshot, IActorRef replyTo, CreateExport? thenCreate)
    {
        // The span covers deciding, making the layer and recording the new chain; the switch itself is the export actor's.
        System.Diagnostics.Activity? activity = Telemetry.GatewayTelemetry.ActivitySource.StartActivity("export.snapshot");
        activity?.SetTag("export", snapshot.ExportName);
        string layerId = OverlayRules.NewLayerId(snapshot.ExportName);
        snapshot = snapshot with { LayerId = layerId };
        (IExportEvent? @event, CommandResult? error) = _catalog.Decide(snapshot);
        if (error is not null)
        {
            activity?.Dispose();
            replyTo.Tell(error);
            return;
        }
        ExportSpec spec = _catalog.Exports[snapshot.ExportName];
        // Off the actor: the layer is made durable (fsync) before it is recorded.
        Task made = _backends.CreateLayerAsync(layerId, spec.Size, CancellationToken.None);
        BeginStorageStep(made, success: () => new LayerCreated(spec, layerId, @event!, replyTo, thenCreate, activity, null),
            failure: e => new LayerCreated(spec, layerId, @event!, replyTo, thenCreate, activity, e), holdQueries: false);
    }

    private void OnLayerCreated(LayerCreated made)
    {
        EndStorageStep();
        (ExportSpec spec, string layerId, IActorRef replyTo, CreateExport? thenCreate) = (made.Spec, made.LayerId, made.ReplyTo, made.ThenCreate);
        if (made.Failure is { } failure)
        {
            _log.Warning("Creating a layer for export {0} failed: {1}", spec.Name, failure.Message);
            replyTo.Tell(CommandResult.Fail(ExportErrorKind.Failed, $"creating a layer for '{spec.Name}' failed: {failure.Message}"));
            made.Activity?.SetStatus(System.Diagnostics.ActivityStatusCode.Error, failure.Message);
            made.Activity?.Dispose();
            Stash.UnstashAll();
            return;
        }
        Persist(made.Event, e =>
        {
            _catalog = _catalog.Apply(e);
            JournalDurability.Sync();
            ExportSpec updated = _catalog.Exports[spec.Name];
            _log.Info("Export {0} snapshotted: chain {1}", spec.Name, string.Join(" > ", updated.Backend.Layers!));
            made.Activity?.Dispose();
            MaybeSnapshot();
            Task<CommandResult> pushed = TryAskExport(spec.Name, new PushLayer(updated, layerId), PushTimeout, out Task<CommandResult> answer)
                ? answer
                : Task.FromResult(CommandResult.Ok(new ExportStatus(updated, null)));
            if (thenCreate is null)
            {
                pushed.PipeTo(replyTo, failure: f => CommandResult.Fail(ExportErrorKind.Failed, $"switching '{spec.Name}' to its new layer failed: {f.Message}"));
            }
            else
            {
                pushed.PipeTo(Self, replyTo,
                    success: r => new SnapshotThenCreate(r, thenCreate),
                    failure: f => new SnapshotThenCreate(CommandResult.Fail(ExportErrorKind.Failed, $"snapshotting base '{spec.Name}' failed: {f.Message}"), thenCreate));
            }
            Stash.UnstashAll();
        });
    }

    /// <summary>A snapshot's new layer was made (<paramref name="Failure"/> null) or could not be.</summary>
    private sealed record LayerCreated(ExportSpec Spec, string LayerId, IExportEvent Event, IActorRef ReplyTo, CreateExport? ThenCreate,
        System.Diagnostics.Activity? Activity, Exception? Failure);

    private sealed record SnapshotThenCreate(CommandResult Result, CreateExport Create);
}
