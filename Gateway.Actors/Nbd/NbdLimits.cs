namespace Gateway.Actors.Nbd;

/// <summary>
/// The server's limits. The sizes the spec fixes live in the codec (<see cref="NbdWire"/>) and are
/// repeated here by reference only, so that code written against <c>NbdLimits</c> keeps compiling.
/// </summary>
public static class NbdLimits
{
    /// <summary>Strings (export names, queries, messages) MUST be no longer than this.</summary>
    public const int MaxString = NbdWire.MaxString;

    /// <summary>Largest option payload accepted; larger ones are answered ERR_TOO_BIG.</summary>
    public const int MaxOptionLength = 64 * 1024;

    /// <summary>Largest option payload skipped to answer ERR_TOO_BIG; beyond it the connection is closed.</summary>
    public const int MaxOptionDiscard = 1024 * 1024;

    public const int MinBlockSize = 1;
    public const int PreferredBlockSize = 4096;
    /// <summary>
    /// Largest READ or WRITE served, and the maximum block size advertised: 64 MiB, as nbdkit
    /// and libnbd (whose own requests stop there); nbd-tester-client's integrityhuge log sends
    /// up to 47.6 MiB.
    /// </summary>
    public const int MaxPayload = 64 * 1024 * 1024;

    /// <summary>
    /// Largest refused WRITE payload read and skipped to answer the error and go on; beyond it
    /// the server answers the error and closes the connection (reading gigabytes to stay in
    /// step is worse than a reconnect).
    /// </summary>
    public const uint MaxDiscard = 1024 * 1024 * 1024;

    /// <summary>Descriptors per BLOCK_STATUS chunk; the client asks again for the rest.</summary>
    public const int MaxExtentsPerReply = 1024;

    public const int RequestHeaderSize = NbdWire.RequestHeaderSize;
    public const int SimpleReplyHeaderSize = NbdWire.SimpleReplyHeaderSize;
    public const int StructuredReplyHeaderSize = NbdWire.StructuredReplyHeaderSize;
    public const int ExtendedRequestHeaderSize = NbdWire.ExtendedRequestHeaderSize;
    public const int ExtendedReplyHeaderSize = NbdWire.ExtendedReplyHeaderSize;

    public const string BaseAllocation = NbdWire.BaseAllocation;
}
