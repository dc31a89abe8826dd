using Gateway.Actors.Exports;

namespace Gateway.Actors.Bitmaps;

// Commands and queries: routed by export name to the export's bitmaps actor, answered with BitmapResult.
public interface IBitmapCommand : IWithExportName;

public sealed record ListBitmaps(string ExportName) : IBitmapCommand;

public sealed record AddBitmap(string ExportName, string Name, long Granularity, bool Enabled) : IBitmapCommand;

public sealed record RemoveBitmap(string ExportName, string Name) : IBitmapCommand;

public sealed record ClearBitmap(string ExportName, string Name) : IBitmapCommand;

public sealed record SetBitmapEnabled(string ExportName, string Name, bool Enabled) : IBitmapCommand;

public sealed record MergeBitmaps(string ExportName, string Target, string[] Sources) : IBitmapCommand;

public sealed record BitmapInfo(string Name, int Granularity, bool Enabled, long DirtyBytes);

/// <summary>The outcome of a bitmap command: the bitmaps it concerns, or the problem.</summary>
public sealed record BitmapResult(ExportErrorKind? Error, string? Message, IReadOnlyList<BitmapInfo> Bitmaps)
{
    // Arrays, not whatever a collection expression makes: results cross nodes through the JSON
    // serializer, which cannot rebuild the compiler's own list types.
    public static BitmapResult Ok(params IReadOnlyList<BitmapInfo> bitmaps) => new(null, null, bitmaps.ToArray());

    public static BitmapResult Fail(ExportErrorKind kind, string message) => new(kind, message, Array.Empty<BitmapInfo>());
}

/// <summary>Asks the bitmaps actor to delete its events and snapshots and stop (the export was removed).</summary>
public sealed record PurgeBitmaps
{
    public static readonly PurgeBitmaps Instance = new();
}

/// <summary>
/// From the export actor: the export grew to <paramref name="ExportSize"/> bytes; grow every bitmap
/// (new granules clean) before the new size is shown. Answered with an empty <see cref="BitmapResult"/>.
/// </summary>
public sealed record GrowBitmaps(long ExportSize);

/// <summary>
/// From the data path: first touches are waiting in the export's <see cref="DirtyTracker"/>.
/// Sent by the first mark of a batch only; the actor commits what it finds pending.
/// </summary>
public sealed record CommitMarks
{
    public static readonly CommitMarks Instance = new();
}

/// <summary>Everything the bitmaps actor persists; bound to <see cref="BitmapSerializer"/> (binary).</summary>
public interface IBitmapPersisted;

// Events (persisted): never change their shape without a migration; BitmapSerializer writes them.
public interface IBitmapEvent : IBitmapPersisted;

public sealed record BitmapAdded(string Name, int Granularity, bool Enabled) : IBitmapEvent;

public sealed record BitmapRemoved(string Name) : IBitmapEvent;

public sealed record BitmapCleared(string Name) : IBitmapEvent;

public sealed record BitmapEnabledChanged(string Name, bool Enabled) : IBitmapEvent;

public sealed record BitmapsMerged(string Target, IReadOnlyList<string> Sources) : IBitmapEvent;

/// <summary>
/// One group commit: byte ranges (offset, length pairs, sorted and coalesced) first touched by
/// writes, applied to every bitmap enabled at this point of the event stream. Byte ranges, not
/// granules, so one event serves bitmaps of any granularity.
/// </summary>
public sealed record GranulesDirtied(long[] Ranges) : IBitmapEvent;

/// <summary>Snapshot: every bitmap with its dirty granules as runs (first granule, count).</summary>
public sealed record BitmapsSnapshot(IReadOnlyList<BitmapSnapshotEntry> Bitmaps) : IBitmapPersisted;

public sealed record BitmapSnapshotEntry(string Name, int Granularity, bool Enabled, long[] Runs);
