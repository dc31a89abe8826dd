namespace Gateway.Nbd;

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
// The values are checked against the spec by NbdConstantsTests: never renumber.

public static class NbdMagic
{
    /// <summary>"NBDMAGIC", the first 8 bytes the server sends.</summary>
    public const ulong InitPassword = 0x4e42444d41474943;

    /// <summary>"IHAVEOPT": newstyle negotiation, and the prefix of every client option.</summary>
    public const ulong IHaveOpt = 0x49484156454F5054;

    /// <summary>Prefix of every option reply.</summary>
    public const ulong OptionReply = 0x0003e889045565a9;

    public const uint Request = 0x25609513;
    public const uint SimpleReply = 0x67446698;
    public const uint StructuredReply = 0x668e33ef;

    /// <summary>NBD_EXTENDED_REQUEST_MAGIC: the 32-byte request header of extended headers.</summary>
    public const uint ExtendedRequest = 0x21e41c71;

    /// <summary>NBD_EXTENDED_REPLY_MAGIC: the 32-byte reply chunk header of extended headers.</summary>
    public const uint ExtendedReply = 0x6e8a278c;
}

[Flags]
public enum HandshakeFlags : ushort
{
    FixedNewstyle = 1 << 0,
    NoZeroes = 1 << 1,
}

[Flags]
public enum ClientFlags : uint
{
    FixedNewstyle = 1 << 0,
    NoZeroes = 1 << 1,
}

[Flags]
public enum TransmissionFlags : ushort
{
    HasFlags = 1 << 0,
    ReadOnly = 1 << 1,
    SendFlush = 1 << 2,
    SendFua = 1 << 3,
    Rotational = 1 << 4,
    SendTrim = 1 << 5,
    SendWriteZeroes = 1 << 6,
    SendDf = 1 << 7,
    CanMultiConn = 1 << 8,
    SendResize = 1 << 9,
    SendCache = 1 << 10,
    SendFastZero = 1 << 11,
    BlockStatusPayload = 1 << 12,
}

public enum NbdOption : uint
{
    ExportName = 1,
    Abort = 2,
    List = 3,
    PeekExport = 4,
    StartTls = 5,
    Info = 6,
    Go = 7,
    StructuredReply = 8,
    ListMetaContext = 9,
    SetMetaContext = 10,
    ExtendedHeaders = 11,
}

public enum OptionReplyType : uint
{
    Ack = 1,
    Server = 2,
    Info = 3,
    MetaContext = 4,

    ErrUnsup = (1u << 31) + 1,
    ErrPolicy = (1u << 31) + 2,
    ErrInvalid = (1u << 31) + 3,
    ErrPlatform = (1u << 31) + 4,
    ErrTlsReqd = (1u << 31) + 5,
    ErrUnknown = (1u << 31) + 6,
    ErrShutdown = (1u << 31) + 7,
    ErrBlockSizeReqd = (1u << 31) + 8,
    ErrTooBig = (1u << 31) + 9,
    ErrExtHeaderReqd = (1u << 31) + 10,
}

public enum InfoType : ushort
{
    Export = 0,
    Name = 1,
    Description = 2,
    BlockSize = 3,
}

public enum NbdCommand : ushort
{
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
    Resize = 8,
}

[Flags]
public enum CommandFlags : ushort
{
    None = 0,
    Fua = 1 << 0,
    NoHole = 1 << 1,
    DontFragment = 1 << 2,
    ReqOne = 1 << 3,
    FastZero = 1 << 4,
    PayloadLen = 1 << 5,
}

[Flags]
public enum ReplyFlags : ushort
{
    None = 0,
    Done = 1 << 0,
}

public enum ReplyType : ushort
{
    None = 0,
    OffsetData = 1,
    OffsetHole = 2,
    BlockStatus = 5,
    BlockStatusExt = 6,
    Error = (1 << 15) + 1,
    ErrorOffset = (1 << 15) + 2,
}

/// <summary>The error values the spec allows on the wire (section "Error values").</summary>
public enum NbdError : uint
{
    None = 0,
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// <summary>Status bits of the <c>base:allocation</c> metadata context.</summary>
[Flags]
public enum AllocationState : uint
{
    Hole = 1 << 0,
    Zero = 1 << 1,
}

/// <summary>Sizes and names the spec fixes; the server's own limits are Gateway.Actors' NbdLimits.</summary>
public static class NbdWire
{
    /// <summary>"Strings ... MUST be no longer than 4096 bytes" (section "Conventions").</summary>
    public const int MaxString = 4096;

    public const int RequestHeaderSize = 28;
    public const int ExtendedRequestHeaderSize = 32;
    public const int SimpleReplyHeaderSize = 16;
    public const int StructuredReplyHeaderSize = 20;
    public const int ExtendedReplyHeaderSize = 32;

    /// <summary>NBDMAGIC, IHAVEOPT, 16 bits of handshake flags.</summary>
    public const int GreetingSize = 18;

    /// <summary>The client's 32 bits of flags after the greeting.</summary>
    public const int ClientFlagsSize = 4;

    /// <summary>IHAVEOPT, 32 bits option, 32 bits length.</summary>
    public const int OptionHeaderSize = 16;

    /// <summary>0x3e889045565a9, 32 bits option, 32 bits reply type, 32 bits length.</summary>
    public const int OptionReplyHeaderSize = 20;

    public const string BaseAllocation = "base:allocation";
}
