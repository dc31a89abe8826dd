using Akka.Actor;
using Akka.Event;
using Akka.Persistence;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Actors.Telemetry;
using Gateway.Backends;

namespace Gateway.Actors.Bitmaps;

/// <summary>Gives the bitmaps actor the export's handle, whose contexts it keeps up to date.</summary>
public sealed record AttachExportHandle(ExportHandle Handle);

/// <summary>
/// The dirty bitmaps of one export (a child of its <see cref="ExportActor"/>): persists bitmap
/// operations, and group-commits the first touches of writes.
/// <para>
/// Group commit: at most one <see cref="GranulesDirtied"/> is being persisted at a time
/// (PersistAsync, so commands keep arriving meanwhile). First touches wait in the
/// <see cref="DirtyTracker"/>; every one that arrives while a batch is in flight joins the next:
/// one event, one journal write, one completion for all of them. Bits are set, and the writers
/// released, only in the persist handler, i.e. once the event is durable.
/// </para>
/// <para>
/// Admin operations use Persist, which holds later messages back until it is applied, so
/// <see cref="BitmapState.Decide"/> always sees the definitions every earlier operation made.
/// Journal order is apply order is replay order, so a batch applies on replay to exactly the
/// bitmaps it applied to when it was made.
/// </para>
/// </summary>
public sealed class BitmapsActor : ReceivePersistentActor
{
    public const int DefaultSnapshotEvery = 1000;

    private readonly string _exportName;
    private readonly DirtyTracker _tracker;
    private readonly int _snapshotEvery;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private BitmapState _state;
    private ExportHandle? _handle;
    private TaskCompletionSource? _committing;
    private long _lastSnapshot;
    private bool _restarting;
    private int _purgeSteps = -1;

    public BitmapsActor(string exportName, long exportSize, DirtyTracker tracker, int snapshotEvery = DefaultSnapshotEvery)
    {
        _exportName = exportName;
        _tracker = tracker;
        _snapshotEvery = snapshotEvery;
        _state = BitmapState.Empty(exportSize);

        Recover<SnapshotOffer>(offer =>
        {
            if (offer.Snapshot is BitmapsSnapshot snapshot)
            {
                _state = BitmapState.FromSnapshot(exportSize, snapshot);
                _lastSnapshot = offer.Metadata.SequenceNr;
            }
        });
        Recover<IBitmapEvent>(e => _state = _state.Apply(e));
        Recover<RecoveryCompleted>(_ =>
        {
            Publish();
            _log.Info("Export {0}: {1} dirty bitmap(s) recovered at event {2}", _exportName, _state.Bitmaps.Count, LastSequenceNr);
        });

        Command<CommitMarks>(_ =>
        {
            // In flight: its handler takes whatever is pending when it ends.
            if (_committing is null)
            {
                Commit();
            }
        });
        Command<AttachExportHandle>(attach =>
        {
            _handle = attach.Handle;
            PublishContexts();
        });
        Command<OpenExport>(_ => Sender.Tell(new ExportOpened(_handle)));
        Command<ListBitmaps>(_ => Sender.Tell(BitmapResult.Ok([.. _state.Bitmaps.Values.Select(b => b.Info)])));
        Command<IBitmapCommand>(OnCommand);
        Command<GrowBitmaps>(grow =>
        {
            // In place: connections that selected a bitmap keep reading it. Nothing to persist
            // (BitmapState.Grow): a restart makes the bitmaps the size of the grown spec.
            _state = _state.Grow(grow.ExportSize);
            Sender.Tell(BitmapResult.Ok());
        });
        Command<PurgeBitmaps>(_ => Purge());
        Command<SaveSnapshotSuccess>(s =>
        {
            DeleteMessages(s.Metadata.SequenceNr);
            DeleteSnapshots(new SnapshotSelectionCriteria(s.Metadata.SequenceNr - 1));
        });
        Command<SaveSnapshotFailure>(f => _log.Warning("Snapshot of the bitmaps of {0} failed: {1}", _exportName, f.Cause.Message));
        Command<DeleteMessagesSuccess>(_ => PurgeStepDone());
        Command<DeleteMessagesFailure>(f =>
        {
            _log.Warning("Deleting old bitmap events of {0} failed: {1}", _exportName, f.Cause.Message);
            PurgeStepDone();
        });
        Command<DeleteSnapshotsSuccess>(_ => PurgeStepDone());
        Command<DeleteSnapshotsFailure>(f =>
        {
            _log.Warning("Deleting old bitmap snapshots of {0} failed: {1}", _exportName, f.Cause.Message);
            PurgeStepDone();
        });
    }

    public override string PersistenceId => "bitmaps-" + _exportName;

    public static Props Props(string exportName, long exportSize, DirtyTracker tracker, int snapshotEvery = DefaultSnapshotEvery) =>
        Akka.Actor.Props.Create(() => new BitmapsActor(exportName, exportSize, tracker, snapshotEvery));

    public BitmapState State => _state;

    private bool IsDirtyInEveryEnabled(long offset, long length)
    {
        foreach (BitmapEntry entry in _state.Bitmaps.Values)
        {
            if (entry.Enabled && !entry.Bits.IsDirty(offset, length))
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>Persists every first touch pending now as one event; the writers go on once it is durable.</summary>
    private void Commit()
    {
        while (_tracker.TryTakePending(out List<(long Offset, long Length)>? ranges, out TaskCompletionSource? done))
        {
            int batchSize = ranges.Count;
            // Writers that saw a stale view, or whose granules an earlier batch covered.
            ranges.RemoveAll(r => IsDirtyInEveryEnabled(r.Offset, r.Length));
            if (ranges.Count > 0)
            {
                PersistBatch(ranges, done, batchSize);
                return;
            }
            done.TrySetResult();
        }
    }

    private void PersistBatch(List<(long Offset, long Length)> ranges, TaskCompletionSource done, int batchSize)
    {
        var @event = new GranulesDirtied(BitmapState.Coalesce(ranges));
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        _committing = done;
        PersistAsync(@event, e =>
        {
            GatewayTelemetry.BitmapPersisted(_exportName, System.Diagnostics.Stopwatch.GetElapsedTime(started), batchSize);
            _state = _state.Apply(e);
            _committing = null;
            done.TrySetResult();
            if (!_tracker.ReleaseIfIdle())
            {
                _tracker.CallActorSoon();
            }
            MaybeSnapshot();
        });
    }

    private void OnCommand(IBitmapCommand command)
    {
        System.Diagnostics.Activity? activity = GatewayTelemetry.ActivitySource.StartActivity("bitmap." + command.GetType().Name);
        activity?.SetTag("export", _exportName);
        (IBitmapEvent? @event, BitmapResult? error) = _state.Decide(command);
        if (error is not null)
        {
            activity?.SetStatus(System.Diagnostics.ActivityStatusCode.Error, error.ToString());
            activity?.Dispose();
            Sender.Tell(error);
            return;
        }
        string name = command switch
        {
            AddBitmap a => a.Name,
            RemoveBitmap r => r.Name,
            ClearBitmap c => c.Name,
            SetBitmapEnabled s => s.Name,
            MergeBitmaps m => m.Target,
            _ => "",
        };
        activity?.SetTag("bitmap", name);
        if (@event is null)
        {
            activity?.Dispose();
            Sender.Tell(Reply(name));
            return;
        }
        IActorRef sender = Sender;
        Persist(@event, e =>
        {
            _state = _state.Apply(e);
            Publish();
            JournalDurability.Sync(); // the reply promises the operation survives a power cut
            activity?.Dispose();
            sender.Tell(Reply(name));
            _log.Info("Export {0}: {1}", _exportName, e);
            MaybeSnapshot();
        });
    }

    private BitmapResult Reply(string name) =>
        _state.Bitmaps.TryGetValue(name, out BitmapEntry? entry) ? BitmapResult.Ok(entry.Info) : BitmapResult.Ok();

    /// <summary>A new view for the data path and new contexts for new connections.</summary>
    private void Publish()
    {
        _tracker.View = new BitmapView(_state.EnabledBits(), ready: true);
        PublishContexts();
    }

    private void PublishContexts()
    {
        if (_handle is null)
        {
            return;
        }
        // Other contexts (base:allocation first, then whatever else the export offers) keep their place.
        _handle.MetaContexts =
        [
            .. _handle.MetaContexts.Where(c => c is not DirtyBitmapContext),
            .. _state.Bitmaps.Values.Select(b => new DirtyBitmapContext(b.Name, b.Bits)),
        ];
    }

    private void MaybeSnapshot()
    {
        if (LastSequenceNr - _lastSnapshot >= _snapshotEvery)
        {
            _lastSnapshot = LastSequenceNr;
            SaveSnapshot(_state.ToSnapshot());
        }
    }

    private void Purge()
    {
        _purgeSteps = 2;
        DeleteMessages(long.MaxValue);
        DeleteSnapshots(SnapshotSelectionCriteria.Latest);
    }

    private void PurgeStepDone()
    {
        if (_purgeSteps > 0 && --_purgeSteps == 0)
        {
            Context.Stop(Self);
        }
    }

    protected override void PreRestart(Exception reason, object message)
    {
        _restarting = true;
        base.PreRestart(reason, message);
    }

    protected override void PostStop()
    {
        var failure = new BlockDeviceException(BlockErrorKind.Io, $"the dirty bitmaps of export '{_exportName}' stopped before the change was recorded");
        _committing?.TrySetException(failure);
        _tracker.FailPending(failure, refusal: _restarting ? null : DirtyTrackingDevice.Unavailable());
        // Restarting: writes wait for the recovery; stopped for good: writes fail rather than go unrecorded.
        _tracker.View = _restarting ? BitmapView.Recovering : new BitmapView([], ready: true) { Stopped = true };
        base.PostStop();
    }
}
