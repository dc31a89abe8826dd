using System.Diagnostics;
using Akka.Actor;
using Akka.Event;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;

namespace Gateway.Actors.Cluster;

/// <summary>
/// One export as a cluster-sharded entity: sharding starts it on exactly one node, which opens
/// the export there (an <see cref="ExportActor"/> child, as on a single node) and lists it in
/// <see cref="LocalExports"/>. Other nodes learn where it is with <see cref="LocateExport"/> and
/// send their clients' requests over a peer data stream, never through this mailbox.
/// </summary>
public sealed class ExportEntity : ReceiveActor, IWithTimers, IWithUnboundedStash
{
    private static readonly TimeSpan OpenTimeout = TimeSpan.FromSeconds(30);
    private static readonly TimeSpan FailedBackoff = TimeSpan.FromSeconds(10);
    private readonly BackendFactory _backends;
    private readonly LocalExports _local;
    private readonly ClusterNode _node;
    private readonly IActorRef? _registry;
    private readonly IExportLeases? _leases;
    private readonly LeaseTiming _timing;
    private ExportSpec? _spec;
    private OwnershipFence? _fence;
    private bool _renewing;
    private bool _renewFailing;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    /// <summary>How long a handoff waits for the journal to record that the term ended cleanly.</summary>
    private static readonly TimeSpan EndTermTimeout = TimeSpan.FromSeconds(5);
    /// <summary>Stopped (Terminated) may overtake the export's last message, its <see cref="ExportClosed"/>.</summary>
    private static readonly TimeSpan CloseReportGrace = TimeSpan.FromSeconds(1);
    private IActorRef? _export;
    private IActorRef? _terms;
    private Task<TermBegun>? _beginning;
    private TermBegun? _term;
    private ExportHandle? _handle;
    private ExportHandle? _grownHandle;
    private IActorRef? _retiredBy;
    private bool _handingOff;
    private bool _closeReported;
    private bool _failed;

    public ExportEntity(BackendFactory backends, LocalExports local, ClusterNode node, IActorRef? registry, IExportLeases? leases, LeaseTiming? timing)
    {
        _backends = backends;
        _local = local;
        _node = node;
        _registry = registry;
        _leases = leases;
        _timing = timing ?? LeaseTiming.Default;

        Receive<ExportEnvelope>(Handle);
        // Sharding's hand-off stop message (GatewayActorsHosting): the export closes in order
        // (requests in flight, flush, then bitmaps) before this entity stops and the shard moves.
        Receive<CloseExport>(_ =>
        {
            if (_export is null)
            {
                Context.Stop(Self);
                return;
            }
            if (!_handingOff)
            {
                _handingOff = true;
                _log.Info("Export {0} handing over from node {1}: finishing requests in flight, then flushing", Self.Path.Name, _node.Name);
                _export.Tell(CloseExport.Instance);
            }
        });
        // The export closed in order: if it was clean, the journal records that this term ended
        // cleanly before the shard moves, so the next owner keeps the durability epoch.
        Receive<ExportClosed>(closed =>
        {
            _closeReported = true;
            if (closed.Clean && _term is { } term && _terms is not null)
            {
                _terms.Ask<TermEnded>(new EndTerm(term.Term), EndTermTimeout).PipeTo(Self,
                    success: ended => ended,
                    failure: e => new TermEndFailed(e));
            }
            else
            {
                _log.Warning("Export {0} did not close cleanly on node {1}: the next owner starts a new durability epoch", Self.Path.Name, _node.Name);
                Context.Stop(Self);
            }
        });
        Receive<TermEnded>(_ =>
        {
            // Nothing more is written here: close the fence, then let the next owner in at once.
            _fence?.Revoke("the export was handed over");
            if (_leases is not null && _term is { } term)
            {
                _leases.ReleaseAsync(Self.Path.Name, _node.Name, term.Term, CancellationToken.None)
                    .PipeTo(Self, success: () => LeaseReleased.Instance, failure: _ => LeaseReleased.Instance);
                return;
            }
            Context.Stop(Self);
        });
        Receive<LeaseReleased>(_ => Context.Stop(Self));
        Receive<Grown>(OnGrown);
        Receive<RenewLease>(_ =>
        {
            if (_renewing || _leases is null || _term is not { } term || _fence is null)
            {
                return;
            }
            _renewing = true;
            long sentAt = System.Diagnostics.Stopwatch.GetTimestamp();
            _leases.RenewAsync(Self.Path.Name, _node.Name, term.Term, _timing.TimeToLive, CancellationToken.None)
                .PipeTo(Self, success: ok => new LeaseRenewed(ok, sentAt, null), failure: e => new LeaseRenewed(false, sentAt, e));
        });
        Receive<LeaseRenewed>(OnLeaseRenewed);
        Receive<TermEndFailed>(failed =>
        {
            _log.Warning("Export {0}: the clean end of its term could not be recorded ({1}); the next owner starts a new durability epoch",
                Self.Path.Name, failed.Cause.Message);
            Context.Stop(Self);
        });
        Receive<CloseReportMissing>(_ => Context.Stop(Self));
        Receive<Opened>(opened =>
        {
            if (opened.Handle is { } handle && opened.Term is { } term && _export is not null)
            {
                if (_grownHandle is { } grown && grown.Info.Size > handle.Info.Size)
                {
                    // Opened before a grow that finished first: the same device, at its new size.
                    handle = grown;
                }
                _handle = handle;
                _term = term;
                _local.Add(handle);
                if (_leases is not null)
                {
                    Timers.StartPeriodicTimer("renew", RenewLease.Instance, _timing.RenewEvery);
                }
                opened.ReplyTo.Tell(Located(handle, term));
            }
            else
            {
                opened.ReplyTo.Tell(new Status.Failure(new InvalidOperationException($"export could not be opened on {_node.Name}")));
            }
        });
        Receive<Terminated>(t =>
        {
            if (t.ActorRef.Equals(_terms) && !_handingOff && _retiredBy is null)
            {
                // The journal refused a term (ExportTerms stops on a persist failure): close the
                // export here in order; the next request opens it again in a new term.
                _log.Warning("Export {0}: its ownership terms stopped (journal failure); closing it on node {1}", Self.Path.Name, _node.Name);
                _terms = null;
                Self.Tell(CloseExport.Instance);
                return;
            }
            if (!t.ActorRef.Equals(_export))
            {
                return;
            }
            if (_retiredBy is not null)
            {
                _retiredBy.Tell(new ExportRetired(Self.Path.Name));
                Context.Stop(Self);
                return;
            }
            if (_handingOff)
            {
                if (!_closeReported)
                {
                    // Its ExportClosed may still be in the mailbox behind this; if it never comes
                    // (the export failed while closing), stop without recording a clean end.
                    Timers.StartSingleTimer("close-report", CloseReportMissing.Instance, CloseReportGrace);
                }
                return;
            }
            // Failed to open or broke: answer "not available" for a while, then stop, so that a
            // later message opens it afresh (without a retry, and an error, every wake).
            _export = null;
            _failed = true;
            Timers.StartSingleTimer("backoff", PoisonPill.Instance, FailedBackoff);
        });
    }

    public ITimerScheduler Timers { get; set; } = null!;

    public IStash Stash { get; set; } = null!;

    /// <param name="registry">The export registry, asked whether a link's export still exists
    /// before it is opened; null trusts every envelope (tests of other behaviour).</param>
    /// <param name="leases">The owners' leases: this node touches the export's storage only while
    /// it holds the lease of its term; null on storage no other node can reach (tests).</param>
    public static Props Props(BackendFactory backends, LocalExports local, ClusterNode node, IActorRef? registry = null,
        IExportLeases? leases = null, LeaseTiming? timing = null) =>
        Akka.Actor.Props.Create(() => new ExportEntity(backends, local, node, registry, leases, timing));

    private void Handle(ExportEnvelope envelope)
    {
        if (envelope.Message is LocateExport && IsStale(envelope.Spec))
        {
            // A connection opened on an export since removed (and maybe created again under its
            // name): it must get an error, never this incarnation's data (issue 17, fencing).
            Sender.Tell(Gone(envelope.Spec));
            return;
        }
        if (_spec is null && envelope.Message is LocateExport && _registry is not null && !_handingOff && !_failed)
        {
            // Only the registry starts exports on its own word; a link's spec may be out of date
            // (the export removed since), so ask the registry before opening anything.
            IActorRef replyTo = Sender;
            _registry.Ask<ExportSpecFound>(new GetExportSpec(envelope.Spec.Name), OpenTimeout)
                .PipeTo(Self, success: found => new Verified(envelope, found.Spec, replyTo, null), failure: e => new Verified(envelope, null, replyTo, e));
            BecomeStacked(() =>
            {
                Receive<Verified>(OnVerified);
                ReceiveAny(_ => Stash.Stash());
            });
            return;
        }
        HandleCurrent(envelope);
    }

    private bool IsStale(ExportSpec spec) => _spec is not null && spec.Incarnation != _spec.Incarnation;

    private static ExportGone Gone(ExportSpec spec) => new(spec.Name, $"export '{spec.Name}' was removed after the connection opened");

    private void OnVerified(Verified verified)
    {
        UnbecomeStacked();
        Stash.UnstashAll();
        ExportEnvelope envelope = verified.Envelope;
        if (verified.Failure is { } failure)
        {
            verified.ReplyTo.Tell(new Status.Failure(new InvalidOperationException($"the export registry did not answer for '{envelope.Spec.Name}': {failure.Message}")));
        }
        else if (verified.Current is not { } current || current.Incarnation != envelope.Spec.Incarnation)
        {
            verified.ReplyTo.Tell(Gone(envelope.Spec));
        }
        else
        {
            // Verified (everything else was stashed meanwhile, so nothing has set _spec): this
            // incarnation opens here, from the registry's spec, not the link's (it is the latest:
            // a snapshot may have pushed a layer since the link attached).
            _spec = current;
            Self.Tell(envelope with { Spec = current }, verified.ReplyTo);
        }
    }

    private void HandleCurrent(ExportEnvelope envelope)
    {
        if (_handingOff && envelope.Message is not RetireExport)
        {
            // Closing here: the next owner answers once the shard has moved.
            if (envelope.Message is not WakeExport)
            {
                Sender.Tell(new Status.Failure(new InvalidOperationException($"export '{envelope.Spec.Name}' is being handed over from {_node.Name}")));
            }
            return;
        }
        if (_failed)
        {
            if (envelope.Message is not WakeExport)
            {
                Sender.Tell(new Status.Failure(new InvalidOperationException($"export '{envelope.Spec.Name}' failed to open on {_node.Name}")));
            }
            return;
        }
        if (_export is null)
        {
            _spec ??= envelope.Spec;
            // Closed until this node holds the lease of its term: the backend may open meanwhile,
            // but no request reaches it while the last owner's lease may still run.
            _fence = _leases is null ? null : new OwnershipFence();
            _export = Context.ActorOf(ExportActor.Props(envelope.Spec, _backends, _fence), "export");
            _terms = Context.ActorOf(ExportTerms.Props(envelope.Spec.Name), "terms");
            _beginning = BeginTermAsync(_terms, envelope.Spec.Name, _node.Name, _leases, _timing, _fence, _log);
            Context.Watch(_export);
            Context.Watch(_terms);
            _log.Info("Export {0} homed on node {1}", envelope.Spec.Name, _node.Name);
        }
        switch (envelope.Message)
        {
            case WakeExport:
                break;
            case LocateExport when _handle is { Closed.IsCancellationRequested: false } handle && _term is { } term:
                Sender.Tell(Located(handle, term));
                break;
            case LocateExport:
                IActorRef replyTo = Sender;
                OpenInTermAsync(_export.Ask<ExportOpened>(new OpenExport(envelope.Spec.Name), OpenTimeout), _beginning!)
                    .PipeTo(Self, success: o => o with { ReplyTo = replyTo }, failure: _ => new Opened(null, null, replyTo));
                break;
            case GrowExport grow:
                // What LocateExport answers and the peer listener serves is the owner's handle,
                // which a grow replaces (new size): take the new one once the export has grown.
                IActorRef asker = Sender;
                GrowAndReopenAsync(_export, grow).PipeTo(Self, success: g => g with { ReplyTo = asker },
                    failure: e => new Grown(grow.Spec, CommandResult.Fail(ExportErrorKind.Failed, $"growing '{grow.Spec.Name}' failed: {e.Message}"), null, asker));
                break;
            case RetireExport:
                _retiredBy = Sender;
                _export.Tell(PurgeBitmaps.Instance);
                break;
            default:
                _export.Forward(envelope.Message);
                break;
        }
    }

    /// <summary>
    /// A new term in the journal, then (in a cluster) the lease of that term. The log says how
    /// long each took: on a failover they are most of the time from homed to served.
    /// </summary>
    private static async Task<TermBegun> BeginTermAsync(IActorRef terms, string export, string node, IExportLeases? leases, LeaseTiming timing, OwnershipFence? fence, ILoggingAdapter log)
    {
        long started = Stopwatch.GetTimestamp();
        TermBegun term = await terms.Ask<TermBegun>(BeginTerm.Instance, OpenTimeout).ConfigureAwait(false);
        TimeSpan journaled = Stopwatch.GetElapsedTime(started);
        if (leases is not null && fence is not null)
        {
            await timing.AcquireAsync(leases, export, node, term.Term, fence, CancellationToken.None).ConfigureAwait(false);
        }
        log.Info("Export {0} term {1} (epoch {2}) on node {3}: in the journal after {4:F0} ms, lease held after {5:F0} ms",
            export, term.Term, term.Epoch, node, journaled.TotalMilliseconds, Stopwatch.GetElapsedTime(started).TotalMilliseconds);
        return term;
    }

    private static async Task<Opened> OpenInTermAsync(Task<ExportOpened> opening, Task<TermBegun> beginning)
    {
        ExportOpened opened = await opening.ConfigureAwait(false);
        TermBegun term = await beginning.ConfigureAwait(false);
        return new Opened(opened.Handle, term, ActorRefs.Nobody);
    }

    private static async Task<Grown> GrowAndReopenAsync(IActorRef export, GrowExport grow)
    {
        CommandResult result = await export.Ask<CommandResult>(grow, OpenTimeout).ConfigureAwait(false);
        ExportHandle? handle = result.Error is null
            ? (await export.Ask<ExportOpened>(new OpenExport(grow.Spec.Name), OpenTimeout).ConfigureAwait(false)).Handle
            : null;
        return new Grown(grow.Spec, result, handle, ActorRefs.Nobody);
    }

    private void OnGrown(Grown grown)
    {
        if (grown.Handle is { } handle)
        {
            _grownHandle = handle;
            if (_handle is { } old && !ReferenceEquals(old, handle))
            {
                _local.Remove(old);
                _local.Add(handle);
                _handle = handle;
            }
            if (_spec is not null && _spec.Incarnation == grown.Spec.Incarnation)
            {
                _spec = grown.Spec;
            }
        }
        grown.ReplyTo.Tell(grown.Result);
    }

    /// <summary>A grow's outcome, and the export's handle after it (null when it failed).</summary>
    private sealed record Grown(ExportSpec Spec, CommandResult Result, ExportHandle? Handle, IActorRef ReplyTo);

    private ExportLocated Located(ExportHandle handle, TermBegun term) => new(handle.Info.Name, _node.Name, _node.PeerHost, _node.PeerPort,
        handle.Info.Size, handle.Info.ReadOnly, (int)handle.Info.Capabilities, [.. handle.MetaContexts.Select(c => c.Name)], term.Epoch);

    protected override SupervisorStrategy SupervisorStrategy() =>
        // As on a single node: an export whose backend fails to open is stopped, not restarted in
        // a loop; this entity then stops too, and the registry's next wake tries again.
        new OneForOneStrategy(e =>
        {
            _log.Error(e, "Export actor failed; stopping it");
            return Directive.Stop;
        });

    protected override void PostStop()
    {
        _fence?.Revoke("the export stopped on this node");
        if (_handle is not null)
        {
            _local.Remove(_handle);
        }
    }

    private sealed record Opened(ExportHandle? Handle, TermBegun? Term, IActorRef ReplyTo);

    private sealed record TermEndFailed(Exception Cause);

    private void OnLeaseRenewed(LeaseRenewed renewed)
    {
        _renewing = false;
        if (renewed.Held)
        {
            if (_renewFailing)
            {
                _renewFailing = false;
                _log.Info("Export {0}: the lease on node {1} is renewed again", Self.Path.Name, _node.Name);
            }
            _fence?.ExtendTo(_timing.FenceDeadline(renewed.SentAt));
            return;
        }
        if (renewed.Failure is { } failure)
        {
            // The store did not answer: the fence closes by itself when the lease may have run
            // out; the next renewal may still make it in time.
            if (!_renewFailing)
            {
                _renewFailing = true;
                _log.Warning("Export {0}: renewing its lease on node {1} failed ({2}); requests are refused if it is not renewed within {3} s",
                    Self.Path.Name, _node.Name, failure.Message, (_timing.TimeToLive - _timing.Margin).TotalSeconds);
            }
            return;
        }
        // Another node holds the lease now: this one must not touch the storage again.
        _fence?.Revoke("another node holds the export's lease");
        _log.Error("Export {0}: node {1} lost its lease (another node took the export over); closing it here", Self.Path.Name, _node.Name);
        Self.Tell(CloseExport.Instance);
    }

    private sealed record RenewLease
    {
        public static readonly RenewLease Instance = new();
    }

    private sealed record LeaseRenewed(bool Held, long SentAt, Exception? Failure);

    private sealed record LeaseReleased
    {
        public static readonly LeaseReleased Instance = new();
    }

    /// <summary>The registry's word on a link's export: its current spec (null: removed), or no answer.</summary>
    private sealed record Verified(ExportEnvelope Envelope, ExportSpec? Current, IActorRef ReplyTo, Exception? Failure);

    private sealed record CloseReportMissing
    {
        public static readonly CloseReportMissing Instance = new();
    }
}
