using Akka.Actor;
using Akka.Persistence;

namespace Gateway.Actors.Cluster;

/// <summary>Asks <see cref="ExportTerms"/> for a new ownership term; answered with <see cref="TermBegun"/>.</summary>
public sealed record BeginTerm
{
    public static readonly BeginTerm Instance = new();
}

/// <summary>
/// The term this owner holds the export in, and its durability epoch: the epoch stays the same
/// across a term change only when the term before it ended cleanly (drained and flushed, see
/// <see cref="EndTerm"/>). A link that flushed in one epoch and flushes again in another cannot
/// vouch for the writes completed in between: they went through an owner that died.
/// </summary>
public sealed record TermBegun(long Term, long Epoch);

/// <summary>The owner drained and flushed the export before letting it go: record it; answered with <see cref="TermEnded"/>.</summary>
public sealed record EndTerm(long Term);

public sealed record TermEnded(long Term);

/// <summary>Journal event: a term began with this epoch.</summary>
public sealed record TermStarted(long Term, long Epoch);

/// <summary>Journal event: the term ended with every acknowledged write flushed.</summary>
public sealed record TermClosedCleanly(long Term);

/// <summary>
/// The ownership terms of one export, in the cluster's journal (a child of its
/// <see cref="ExportEntity"/>, so one writer at a time, wherever the shard lives). Each time the
/// export is opened on a node it begins a term; a graceful handoff ends it cleanly. The next
/// owner learns from the journal whether the last owner handed over cleanly (same epoch: the
/// next FLUSH through a forwarding node answers success) or died (a new epoch: that FLUSH answers
/// EIO once, see <see cref="ExportLink.FlushAsync"/>).
/// </summary>
public sealed class ExportTerms : ReceivePersistentActor
{
    private readonly string _exportName;
    private long _term;
    private long _epoch;
    private bool _lastEndedCleanly;

    public ExportTerms(string exportName)
    {
        _exportName = exportName;
        Recover<TermStarted>(Apply);
        Recover<TermClosedCleanly>(Apply);
        Command<BeginTerm>(_ =>
        {
            long term = _term + 1;
            // The first term has nothing to vouch for; after a clean end the writes of the last
            // term are on storage, so flushes on either side of the change cover the same writes.
            long epoch = _lastEndedCleanly && _term > 0 ? _epoch : term;
            Persist(new TermStarted(term, epoch), e =>
            {
                Apply(e);
                Sender.Tell(new TermBegun(e.Term, e.Epoch));
            });
        });
        Command<EndTerm>(end =>
        {
            if (end.Term != _term)
            {
                Sender.Tell(new Status.Failure(new InvalidOperationException($"term {end.Term} of export '{_exportName}' is not the current term {_term}")));
                return;
            }
            Persist(new TermClosedCleanly(end.Term), e =>
            {
                Apply(e);
                Sender.Tell(new TermEnded(e.Term));
            });
        });
    }

    public override string PersistenceId => "export-terms-" + _exportName;

    public static Props Props(string exportName) => Akka.Actor.Props.Create(() => new ExportTerms(exportName));

    private void Apply(TermStarted e)
    {
        _term = e.Term;
        _epoch = e.Epoch;
        _lastEndedCleanly = false;
    }

    private void Apply(TermClosedCleanly e)
    {
        if (e.Term == _term)
        {
            _lastEndedCleanly = true;
        }
    }
}
