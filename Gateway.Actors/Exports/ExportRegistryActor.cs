using Akka.Actor;
using Akka.Event;
using System.Diagnostics;
using Akka.Persistence;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Telemetry;

namespace Gateway.Actors.Exports;

/// <summary>
/// The durable set of exports: persists <see cref="IExportEvent"/>s and routes export messages.
/// On a single node it keeps one <see cref="ExportActor"/> child per export; in a cluster it is a
/// cluster singleton and the exports run where its <see cref="IExportPlacement"/> puts them (the
/// shard region), which it keeps running by waking them periodically.
/// </summary>
public sealed partial class ExportRegistryActor : ReceivePersistentActor, IWithTimers
{
    private static readonly TimeSpan WakeInterval = TimeSpan.FromSeconds(1);
    private static readonly TimeSpan RetireTimeout = TimeSpan.FromSeconds(60);
    private readonly BackendFactory _backends;
    private readonly IExportPlacement? _placement;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private ExportCatalog _catalog = ExportCatalog.Empty;
    private readonly Dictionary<string, IActorRef> _children = new(StringComparer.Ordinal);

    /// <summary>Removed exports' actors, until they have stopped and their storage can go.</summary>
    private readonly Dictionary<IActorRef, ExportSpec> _stopping = [];
    private ExportSpec? _creating;
    private Activity? _recovery = GatewayTelemetry.ActivitySource.StartActivity("exports.recover");

    public ExportRegistryActor(BackendFactory backends, ExportSpec? initialExport, IExportPlacement? placement = null)
    {
        _backends = backends;
        _placement = placement;

        Recover<IExportEvent>(e => _catalog = _catalog.Apply(e));
        Recover<SnapshotOffer>(offer =>
        {
            if (offer.Snapshot is ExportSpec[] specs)
            {
                _catalog = specs.Aggregate(ExportCatalog.Empty, (c, s) => c.Apply(new ExportCreated(s)));
            }
        });
        Recover<RecoveryCompleted>(_ =>
        {
            _recovery?.SetTag("exports", _catalog.Exports.Count);
            _recovery?.Dispose();
            _recovery = null;
            foreach (ExportSpec spec in _catalog.Exports.Values)
            {
                Start(spec);
            }
            if (_placement is not null)
            {
                // Exports whose node died come back without waiting for a client to ask: at
                // once when the node is removed, and every second in case a wake was lost.
                Timers.StartPeriodicTimer("wake", WakeAll.Instance, WakeInterval);
                _placement.Start(Context, WakeAll.Instance);
            }
            if (_catalog.Exports.Count == 0 && initialExport is not null)
            {
                // First start: make the default export so the server is useful at once. Created
                // here, not by a message to self, and holding back queries too until it is
                // recorded: no client that came during recovery is told disk0 does not exist.
                Create(new CreateExport(initialExport), holdQueries: true);
            }
        });

        CatalogCommands();
        OtherCommands();
    }

    /// <summary>The spec of the export named <paramref name="name"/> ("" names the default export), or null.</summary>
    private ExportSpec? SpecOf(string name) =>
        (name.Length == 0 ? _catalog.DefaultExport : name) is { } found && _catalog.Exports.TryGetValue(found, out ExportSpec? spec) ? spec : null;

    /// <summary>
    /// Commands that Decide against the catalog and change it. While a storage step is pending they
    /// wait in the stash, so each is decided against the catalog its predecessors left.
    /// </summary>
    private void CatalogCommands()
    {
        Command<CreateExport>(create =>
        {
            if (create.Spec.IsOverlay() && create.Spec.Backend.Layers is null)
            {
                CreateOverlay(create);
            }
            else
            {
                Create(create);
            }
        });
        Command<RemoveExport>(Remove);
        Command<ResizeExport>(Resize);
        Command<SnapshotExport>(snapshot => Snapshot(snapshot, Sender, thenCreate: null));
        Command<SnapshotThenCreate>(CreateOnSnapshot);
        Command<CreateOnOverlayBase>(CreateOnOverlayBase);
    }

    /// <summary>Lookups, routing and housekeeping: none of them changes the catalog.</summary>
    private void OtherCommands()
    {
        Command<ListExports>(_ => ListAll());
        Command<WakeAll>(_ =>
        {
            foreach (ExportSpec spec in _catalog.Exports.Values)
            {
                Start(spec);
            }
        });
        Command<GetExport>(get =>
        {
            if (_placement is not null && _catalog.Exports.TryGetValue(get.ExportName, out ExportSpec? placed))
            {
                _placement.Forward(placed, get);
            }
            else if (_children.TryGetValue(get.ExportName, out IActorRef? child))
            {
                child.Forward(get);
            }
            else if (_catalog.Exports.TryGetValue(get.ExportName, out ExportSpec? spec))
            {
                Sender.Tell(new ExportFound(new ExportStatus(spec, null)));
            }
            else
            {
                Sender.Tell(new ExportFound(null));
            }
        });
        Command<IBitmapCommand>(command =>
        {
            if (_placement is not null && _catalog.Exports.TryGetValue(command.ExportName, out ExportSpec? placed))
            {
                _placement.Forward(placed, command);
            }
            else if (_children.TryGetValue(command.ExportName, out IActorRef? child))
            {
                child.Forward(command);
            }
            else
            {
                Sender.Tell(BitmapResult.Fail(ExportErrorKind.NotFound, $"export '{command.ExportName}' not found"));
            }
        });
        Command<OpenExport>(open =>
        {
            string? name = open.ExportName.Length == 0 ? _catalog.DefaultExport : open.ExportName;
            if (name is not null && _children.TryGetValue(name, out IActorRef? child))
            {
                child.Forward(open);
            }
            else
            {
                Sender.Tell(new ExportOpened(null));
            }
        });
        Command<FlushAllExports>(flush =>
        {
            Task<ExportsFlushed>[] flushes = [.. _children.Values.Select(c => c.Ask<ExportsFlushed>(flush, TimeSpan.FromSeconds(60)))];
            Task.WhenAll(flushes).PipeTo(Sender,
                success: all => new ExportsFlushed(all.Sum(f => f.Count), [.. all.SelectMany(f => f.Failures)]),
                failure: e => new ExportsFlushed(0, [e.Message]));
        });
        Command<ExportStopped>(stopped => DeleteStorage(stopped.Spec));
        Command<Terminated>(ChildTerminated);
        Command<RetireFailed>(failed => _log.Warning("Export {0} was removed but its owner did not close it ({1}): its storage is kept", failed.Spec.Name, failed.Reason));
        // The answer to the first-start CreateExport this actor sends itself.
        Command<CommandResult>(result =>
        {
            if (result.Error is not null)
            {
                _log.Error("Creating the initial export failed: {0}", result.Message);
            }
        });
        Command<SaveSnapshotSuccess>(s => DeleteMessages(s.Metadata.SequenceNr));
        Command<SaveSnapshotFailure>(f => _log.Warning("Snapshot of the export catalog failed: {0}", f.Cause.Message));
        Command<DeleteMessagesSuccess>(_ => { });
        Command<DeleteMessagesFailure>(f => _log.Warning("Deleting old catalog events failed: {0}", f.Cause.Message));
        // Last: what only the placement knows (another node asking for a spec, a node lost from the
        // cluster). What it does not take falls through (to the stash, during a storage step).
        Command<object>(message => _placement?.TryHandle(message, SpecOf, Context) == true);
    }

    public override string PersistenceId => "export-registry";

    public ITimerScheduler Timers { get; set; } = null!;

    public static Props Props(BackendFactory backends, ExportSpec? initialExport, IExportPlacement? placement = null) =>
        Akka.Actor.Props.Create(() => new ExportRegistryActor(backends, initialExport, placement));

    protected override SupervisorStrategy SupervisorStrategy() =>
        // An export whose backend fails to open or breaks is stopped, not restarted in a loop;
        // its clients get "unknown export" until the next start.
        new OneForOneStrategy(e =>
        {
            _log.Error(e, "Export actor failed; stopping it");
            return Directive.Stop;
        });

    private void Create(CreateExport create, bool holdQueries = false)
    {
        Activity? activity = GatewayTelemetry.ActivitySource.StartActivity("export.create");
        activity?.SetTag("export", create.Spec.Name);
        // A new incarnation each time, so a connection to an export removed and created again
        // under its name is told it is gone instead of reaching the new one (ExportEntity).
        create = create with { Spec = create.Spec with { Incarnation = Guid.NewGuid().ToString("N") } };
        (IExportEvent? @event, CommandResult? error) = _catalog.Decide(create);
        if (error is not null)
        {
            activity?.SetStatus(ActivityStatusCode.Error, error.Message);
            activity?.Dispose();
            Sender.Tell(error);
            return;
        }
        ExportSpec spec = create.Spec;
        IActorRef sender = Sender;
        // Storage first: if it can't be made, nothing is recorded. Off the actor: an S3 bucket
        // check may wait up to a minute, and this actor is the whole cluster's registry.
        Task made = _backends.CreateAsync(spec, CancellationToken.None);
        BeginStorageStep(made, success: () => new StorageCreated(spec, @event!, sender, activity, null),
            failure: e => new StorageCreated(spec, @event!, sender, activity, e), holdQueries);
    }

    private void OnStorageCreated(StorageCreated made)
    {
        EndStorageStep();
        (ExportSpec spec, IActorRef sender, Activity? activity) = (made.Spec, made.ReplyTo, made.Activity);
        if (made.Failure is { } failure)
        {
            _log.Warning("Creating storage for export {0} failed: {1}", spec.Name, failure.Message);
            // What the request asked for can't be made here (bad path, file too small, too big for
            // the filesystem): the client's to fix, so 4xx; anything else is the server's.
            ExportErrorKind kind = failure is IOException or UnauthorizedAccessException or InvalidOperationException or ArgumentException
                ? ExportErrorKind.Invalid
                : ExportErrorKind.Failed;
            sender.Tell(CommandResult.Fail(kind, $"creating storage for '{spec.Name}' failed: {failure.Message}"));
            activity?.SetStatus(ActivityStatusCode.Error, failure.Message);
            activity?.Dispose();
            Stash.UnstashAll();
            return;
        }
        _creating = spec;
        Persist(made.Event, e =>
        {
            _creating = null;
            _catalog = _catalog.Apply(e);
            Start(spec);
            JournalDurability.Sync();
            sender.Tell(CommandResult.Ok(new ExportStatus(spec, null)));
            _log.Info("Export {0} created ({1} bytes)", spec.Name, spec.Size);
            activity?.Dispose();
            MaybeSnapshot();
            Stash.UnstashAll();
        });
    }

    /// <summary>
    /// Runs a storage step off the actor and pipes its outcome back to it. Until that outcome is
    /// handled, catalog commands are stashed (they are decided in arrival order, as when the step
    /// blocked) while lookups are still answered from the current catalog: a slow store stalls no
    /// list, status or connection. With <paramref name="holdQueries"/> lookups wait too.
    /// </summary>
    private void BeginStorageStep(Task step, Func<object> success, Func<Exception, object> failure, bool holdQueries)
    {
        step.PipeTo(Self, success: success, failure: failure);
        BecomeStacked(() =>
        {
            Command<StorageCreated>(OnStorageCreated);
            Command<LayerCreated>(OnLayerCreated);
            // Never stashed: a stashed Terminated is dropped by Akka when it comes back out.
            Command<Terminated>(ChildTerminated);
            if (!holdQueries)
            {
                OtherCommands();
            }
            // Whatever is left (the catalog commands; with holdQueries, everything) waits its turn:
            // derived, not listed, so a new catalog command cannot be forgotten here.
            CommandAny(_ => Stash.Stash());
        });
    }

    /// <summary>The step's outcome is in: back to the usual behaviour (the caller unstashes once the catalog is settled).</summary>
    private void EndStorageStep() => UnbecomeStacked();

    private void Remove(RemoveExport remove)
    {
        Activity? activity = GatewayTelemetry.ActivitySource.StartActivity("export.remove");
        activity?.SetTag("export", remove.ExportName);
        (IExportEvent? @event, CommandResult? error) = _catalog.Decide(remove);
        if (error is not null)
        {
            activity?.SetStatus(ActivityStatusCode.Error, error.Message);
            activity?.Dispose();
            Sender.Tell(error);
            return;
        }
        IActorRef sender = Sender;
        ExportSpec spec = _catalog.Exports[remove.ExportName];
        Persist(@event!, e =>
        {
            _catalog = _catalog.Apply(e);
            if (_placement is not null)
            {
                // The owner purges the bitmaps and closes the export; the storage goes once it has.
                _placement.RetireAsync(spec, RetireTimeout)
                    .PipeTo(Self, success: () => new ExportStopped(spec), failure: f => new RetireFailed(spec, f.Message));
            }
            else if (_children.Remove(spec.Name, out IActorRef? child))
            {
                // The child purges its bitmaps, closes its device in PostStop and stops; delete the
                // file once it has gone (its Terminated, see ChildTerminated).
                _stopping[child] = spec;
                child.Tell(PurgeBitmaps.Instance);
            }
            else
            {
                DeleteStorage(spec);
            }
            JournalDurability.Sync();
            sender.Tell(CommandResult.Ok(new ExportStatus(spec, null)));
            _log.Info("Export {0} removed", spec.Name);
            activity?.Dispose();
            MaybeSnapshot();
        });
    }

    private void DeleteStorage(ExportSpec spec)
    {
        try
        {
            _backends.Delete(spec);
            _backends.DeleteLayers((spec.Backend.Layers ?? []).Except(_catalog.LayersInUse));
        }
        catch (Exception e)
        {
            _log.Warning("Deleting storage of removed export {0} failed: {1}", spec.Name, e.Message);
        }
    }

    /// <summary>
    /// A child ended: a removed export's storage can go now; one that failed is forgotten (its
    /// clients get "unknown export" until it is started again).
    /// </summary>
    private void ChildTerminated(Terminated terminated)
    {
        if (_stopping.Remove(terminated.ActorRef, out ExportSpec? removed))
        {
            DeleteStorage(removed);
            return;
        }
        foreach ((string name, IActorRef child) in _children)
        {
            if (child.Equals(terminated.ActorRef))
            {
                _children.Remove(name);
                return;
            }
        }
    }

    private void ListAll()
    {
        // Sizes and flags come from the specs; children are not asked, so a list never waits on I/O.
        ExportStatus[] list = [.. _catalog.Exports.Values.Select(s => new ExportStatus(s, null))];
        Sender.Tell(new ExportList(list));
    }

    private void Start(ExportSpec spec)
    {
        if (_placement is not null)
        {
            _placement.Wake(spec);
            return;
        }
        // Unique child names: a removed export's actor may still be stopping when the name is reused.
        IActorRef child = Context.ActorOf(ExportActor.Props(spec, _backends), $"{spec.Name}-{LastSequenceNr}");
        _children[spec.Name] = child;
        // Plain Watch, the registry's own map, and Terminated handled in every behaviour (see
        // ChildTerminated): with WatchWith, a child's end that came while the registry was busy
        // reached it as a bare Terminated, unhandled, and the DeathPactException stopped the
        // registry for good (every admin request then timed out until a restart).
        Context.Watch(child);
    }

    private void MaybeSnapshot()
    {
        if (LastSequenceNr % 100 == 0)
        {
            SaveSnapshot(_catalog.Exports.Values.ToArray());
        }
    }

    protected override void PostStop()
    {
        _placement?.Stop(Context);
        base.PostStop();
    }

    protected override void OnPersistFailure(Exception cause, object @event, long sequenceNr)
    {
        // The export was not recorded: take back the storage made for it.
        if (_creating is not null)
        {
            DeleteStorage(_creating);
            _creating = null;
        }
        base.OnPersistFailure(cause, @event, sequenceNr);
    }

    /// <summary>
    /// Sends a message to a running export and returns its answer; false when the export is not
    /// running on this node (single-node mode) or unknown. In a cluster the message starts it.
    /// </summary>
    private bool TryAskExport<T>(string name, object message, TimeSpan timeout, out Task<T> answer)
    {
        if (_placement is not null && _catalog.Exports.TryGetValue(name, out ExportSpec? spec))
        {
            answer = _placement.Ask<T>(spec, message, timeout);
            return true;
        }
        if (_children.TryGetValue(name, out IActorRef? child))
        {
            answer = child.Ask<T>(message, timeout);
            return true;
        }
        answer = Task.FromException<T>(new InvalidOperationException($"export '{name}' is not running"));
        return false;
    }

    private sealed record ExportStopped(ExportSpec Spec);

    private sealed record RetireFailed(ExportSpec Spec, string Reason);

    private sealed record WakeAll
    {
        public static readonly WakeAll Instance = new();
    }


    /// <summary>A create's storage step ended (<paramref name="Failure"/> null: the storage is there).</summary>
    private sealed record StorageCreated(ExportSpec Spec, IExportEvent Event, IActorRef ReplyTo, Activity? Activity, Exception? Failure);
}
