namespace Gateway.Actors;

/// <summary>
/// The event journal commits without an fsync each time (SQLite WAL with synchronous=NORMAL:
/// a commit survives the process being killed, not a power cut), because the bitmaps persist on
/// the write path and one fsync per group commit would cap first touches at a few hundred
/// batches a second. Where a client is promised durability (an NBD FLUSH or FUA, an admin
/// operation's reply) the gateway calls <see cref="Sync"/>, which makes every commit so far durable.
/// </summary>
public static class JournalDurability
{
    private static Action? s_sync;

    /// <summary>Set by the host to fsync the journal (e.g. the SQLite WAL file).</summary>
    public static void Configure(Action? sync) => s_sync = sync;

    public static void Sync() => s_sync?.Invoke();
}
