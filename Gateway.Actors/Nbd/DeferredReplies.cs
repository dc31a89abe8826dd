namespace Gateway.Actors.Nbd;

/// <summary>
/// Replies finished by a loop that answers many requests in a row on one thread (the read loop of
/// the peer stream, <c>PeerNbdClient</c>, answering forwarded requests from one receive), held
/// back until that loop is about to receive again. Handed to each connection's writer as one
/// batch, they go to the client in one send instead of one send per reply: the writer runs on
/// the thread that hands it work and flushes whenever it finds nothing more queued.
/// <para>
/// Thread-static, and only between <see cref="Begin"/> and <see cref="End"/> on one thread: the
/// loop must call <see cref="Flush"/> before anything it awaits, so no reply is held across a
/// wait (and none ever moves to another thread).
/// </para>
/// </summary>
internal static class DeferredReplies
{
    [ThreadStatic]
    private static bool t_deferring;

    // The connections with replies held back on this thread, each with its chain (head, tail).
    [ThreadStatic]
    private static List<(Transmission Connection, RequestWork Head, RequestWork Tail)>? t_held;

    /// <summary>Replies finished from here until <see cref="End"/> are held back (not nested).</summary>
    public static void Begin() => t_deferring = true;

    public static void End() => t_deferring = false;

    /// <summary>Requests held back on this thread (tests).</summary>
    internal static int Held
    {
        get
        {
            int count = 0;
            foreach ((_, RequestWork head, _) in t_held ?? [])
            {
                for (RequestWork? work = head; work is not null; work = work.Next)
                {
                    count++;
                }
            }
            return count;
        }
    }

    /// <summary>Holds <paramref name="work"/> back if this thread defers replies now; false: hand it over at once.</summary>
    public static bool TryHold(Transmission connection, RequestWork work)
    {
        if (!t_deferring)
        {
            return false;
        }
        List<(Transmission Connection, RequestWork Head, RequestWork Tail)> held = t_held ??= [];
        for (int i = 0; i < held.Count; i++)
        {
            if (ReferenceEquals(held[i].Connection, connection))
            {
                held[i].Tail.Next = work;
                held[i] = (connection, held[i].Head, work);
                return true;
            }
        }
        held.Add((connection, work, work));
        return true;
    }

    /// <summary>Hands every reply held back on this thread to its connection's writer, one batch per connection.</summary>
    public static void Flush()
    {
        List<(Transmission Connection, RequestWork Head, RequestWork Tail)>? held = t_held;
        if (held is null || held.Count == 0)
        {
            return;
        }
        // A writer that runs inline here may end a request whose continuation holds a reply
        // again: that one goes into the other list, for the next flush.
        t_held = t_spare ?? [];
        t_spare = null;
        foreach ((Transmission connection, RequestWork head, _) in held)
        {
            connection.EnqueueNow(head);
        }
        held.Clear();
        t_spare = held;
    }

    [ThreadStatic]
    private static List<(Transmission Connection, RequestWork Head, RequestWork Tail)>? t_spare;
}
