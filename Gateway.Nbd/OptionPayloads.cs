using System.Buffers.Binary;

namespace Gateway.Nbd;

// The data of options and option replies. The negotiator reads an option's whole data (bounded by
// its length limit) before parsing it, so these read a complete span: a payload whose lengths do
// not add up throws NbdProtocolException, which a server answers NBD_REP_ERR_INVALID (the stream is
// still in step); a server that words its answer by what is wrong uses TryRead and its
// OptionDataFault. Writers return the bytes written; Size says how many that will be.

/// <summary>
/// What is wrong with an option's data, for a server to choose the NBD_REP_ERR_* it answers and
/// its words (proto.md, "Option reply types": INVALID for data that does not add up, TOO_BIG for
/// a string over the limit). The stream is still in step: the next option follows.
/// </summary>
public enum OptionDataFault
{
    None,

    /// <summary>Shorter than the option's fixed fields.</summary>
    TooShort,

    /// <summary>The export name's length runs past the data.</summary>
    NameLength,

    /// <summary>The export name is longer than the 4096 bytes the spec allows.</summary>
    NameTooLong,

    /// <summary>The information requests do not fill the rest of the data exactly.</summary>
    RequestCount,

    /// <summary>A query, or the query count, runs past the data; or a query is over 4096 bytes.</summary>
    Query,

    /// <summary>Bytes after the last query.</summary>
    Trailing,
}

/// <summary>The exception of a Read whose TryRead found <see cref="OptionDataFault"/>.</summary>
internal static class OptionData
{
    public static NbdProtocolException Invalid(OptionDataFault fault, int length) => new($"option data of {length} bytes: {Describe(fault)}");

    private static string Describe(OptionDataFault fault) => fault switch
    {
        OptionDataFault.TooShort => "shorter than its fixed fields",
        OptionDataFault.NameLength => "the export name's length runs past the data",
        OptionDataFault.NameTooLong => $"the export name is over {NbdWire.MaxString} bytes",
        OptionDataFault.RequestCount => "the information requests do not match their count",
        OptionDataFault.Query => $"a query runs past the data or is over {NbdWire.MaxString} bytes",
        OptionDataFault.Trailing => "bytes after the last query",
        _ => fault.ToString(),
    };
}

/// <summary>The data of NBD_OPT_EXPORT_NAME: the export's name, all of it (proto.md, "Option types").</summary>
public static class ExportNameOption
{
    public static int Size(string name) => NbdString.ByteCount(name);

    // C: String: name of the export (the whole option data)
    /// <exception cref="NbdProtocolException">The name is over 4096 bytes: EXPORT_NAME has no error reply, the server closes.</exception>
    public static string Read(ReadOnlySpan<byte> data) => NbdString.Decode(data);

    public static int Write(Span<byte> destination, string name) => NbdString.Write(destination, name);
}

/// <summary>The data of NBD_OPT_INFO and NBD_OPT_GO (proto.md, "Option types").</summary>
public readonly record struct InfoRequest(string ExportName, InfoType[] Requests)
{
    public int Size => 4 + NbdString.ByteCount(ExportName) + 2 + 2 * Requests.Length;

    // C: 32 bits, length of name (unsigned); MUST be no larger than the option data length - 6
    // C: String: name of the export
    // C: 16 bits, number of information requests
    // C: 16 bits x n - list of NBD_INFO information requests
    public static InfoRequest Read(ReadOnlySpan<byte> data) =>
        TryRead(data, out InfoRequest request, out OptionDataFault fault) ? request : throw OptionData.Invalid(fault, data.Length);

    /// <summary>
    /// Checks in the order the spec gives the limits: the name's length against the data's (less
    /// the 6 bytes of fixed fields), then against 4096 (<see cref="OptionDataFault.NameTooLong"/>),
    /// then the request count.
    /// </summary>
    public static bool TryRead(ReadOnlySpan<byte> data, out InfoRequest request, out OptionDataFault fault)
    {
        request = default;
        if (data.Length < 6)
        {
            fault = OptionDataFault.TooShort;
            return false;
        }
        // The count's 2 bytes are set aside: the name must leave room for them.
        ReadOnlySpan<byte> named = data[..^2];
        if (!NbdString.TryTakePrefixed(ref named, out string? name, out bool tooLong))
        {
            fault = tooLong ? OptionDataFault.NameTooLong : OptionDataFault.NameLength;
            return false;
        }
        data = data[^(named.Length + 2)..];
        if (data.Length != 2 + 2 * BinaryPrimitives.ReadUInt16BigEndian(data))
        {
            fault = OptionDataFault.RequestCount;
            return false;
        }
        var requests = new InfoType[(data.Length - 2) / 2];
        for (int i = 0; i < requests.Length; i++)
        {
            requests[i] = (InfoType)BinaryPrimitives.ReadUInt16BigEndian(data[(2 + 2 * i)..]);
        }
        request = new InfoRequest(name, requests);
        fault = OptionDataFault.None;
        return true;
    }

    public static int Write(Span<byte> destination, in InfoRequest request)
    {
        int at = NbdString.WritePrefixed(destination, request.ExportName);
        BinaryPrimitives.WriteUInt16BigEndian(destination[at..], checked((ushort)request.Requests.Length));
        at += 2;
        foreach (InfoType type in request.Requests)
        {
            BinaryPrimitives.WriteUInt16BigEndian(destination[at..], (ushort)type);
            at += 2;
        }
        return at;
    }
}

/// <summary>NBD_INFO_EXPORT: the size and transmission flags of the export.</summary>
public readonly record struct InfoExport(ulong Size, TransmissionFlags Flags);

/// <summary>NBD_INFO_BLOCK_SIZE: the block size constraints.</summary>
public readonly record struct InfoBlockSize(uint Minimum, uint Preferred, uint Maximum);

/// <summary>
/// The data of an NBD_REP_INFO reply (proto.md, "Option types", NBD_OPT_INFO): a 16-bit
/// information type, then its fields. Read the type first, then the matching reader.
/// </summary>
public static class InfoReply
{
    public const int ExportSize = 2 + 8 + 2;
    public const int BlockSizeSize = 2 + 4 + 4 + 4;

    public static int TextSize(string text) => 2 + NbdString.ByteCount(text);

    public static InfoType ReadType(ReadOnlySpan<byte> data) => data.Length >= 2
        ? (InfoType)BinaryPrimitives.ReadUInt16BigEndian(data)
        : throw new NbdProtocolException($"NBD_REP_INFO of {data.Length} bytes");

    // S: 16 bits, NBD_INFO_EXPORT (0)
    // S: 64 bits, size of the export in bytes (unsigned)
    // S: 16 bits, transmission flags
    public static InfoExport ReadExport(ReadOnlySpan<byte> data)
    {
        Expect(data, InfoType.Export, ExportSize);
        return new InfoExport(BinaryPrimitives.ReadUInt64BigEndian(data[2..]), (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(data[10..]));
    }

    public static int WriteExport(Span<byte> destination, in InfoExport info)
    {
        BinaryPrimitives.WriteUInt16BigEndian(destination, (ushort)InfoType.Export);
        BinaryPrimitives.WriteUInt64BigEndian(destination[2..], info.Size);
        BinaryPrimitives.WriteUInt16BigEndian(destination[10..], (ushort)info.Flags);
        return ExportSize;
    }

    // S: 16 bits, NBD_INFO_NAME (1) or NBD_INFO_DESCRIPTION (2)
    // S: String: the name or description (rest of the reply)
    public static string ReadText(ReadOnlySpan<byte> data)
    {
        InfoType type = ReadType(data);
        if (type is not (InfoType.Name or InfoType.Description))
        {
            throw new NbdProtocolException($"{type} is not a text information type");
        }
        return NbdString.Decode(data[2..]);
    }

    public static int WriteText(Span<byte> destination, InfoType type, string text)
    {
        if (type is not (InfoType.Name or InfoType.Description))
        {
            throw new ArgumentOutOfRangeException(nameof(type), type, "only NAME and DESCRIPTION carry text");
        }
        BinaryPrimitives.WriteUInt16BigEndian(destination, (ushort)type);
        return 2 + NbdString.Write(destination[2..], text);
    }

    // S: 16 bits, NBD_INFO_BLOCK_SIZE (3)
    // S: 32 bits, minimum block size
    // S: 32 bits, preferred block size
    // S: 32 bits, maximum block size
    public static InfoBlockSize ReadBlockSize(ReadOnlySpan<byte> data)
    {
        Expect(data, InfoType.BlockSize, BlockSizeSize);
        return new InfoBlockSize(
            BinaryPrimitives.ReadUInt32BigEndian(data[2..]),
            BinaryPrimitives.ReadUInt32BigEndian(data[6..]),
            BinaryPrimitives.ReadUInt32BigEndian(data[10..]));
    }

    public static int WriteBlockSize(Span<byte> destination, in InfoBlockSize sizes)
    {
        BinaryPrimitives.WriteUInt16BigEndian(destination, (ushort)InfoType.BlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(destination[2..], sizes.Minimum);
        BinaryPrimitives.WriteUInt32BigEndian(destination[6..], sizes.Preferred);
        BinaryPrimitives.WriteUInt32BigEndian(destination[10..], sizes.Maximum);
        return BlockSizeSize;
    }

    private static void Expect(ReadOnlySpan<byte> data, InfoType type, int size)
    {
        if (ReadType(data) != type || data.Length != size)
        {
            throw new NbdProtocolException($"{ReadType(data)} information of {data.Length} bytes read as {type} ({size} bytes)");
        }
    }
}

/// <summary>The data of an NBD_REP_SERVER reply to NBD_OPT_LIST: one export.</summary>
public readonly record struct ServerEntry(string Name, string Description)
{
    public int Size => 4 + NbdString.ByteCount(Name) + NbdString.ByteCount(Description);

    // S: 32 bits, length of name (unsigned); MUST be no larger than the reply packet header length - 4
    // S: String, name of the export, as expected by NBD_OPT_EXPORT_NAME, NBD_OPT_INFO, or NBD_OPT_GO
    // S: [remaining bytes], description (optional)
    public static ServerEntry Read(ReadOnlySpan<byte> data)
    {
        string name = NbdString.TakePrefixed(ref data, "export name");
        return new ServerEntry(name, NbdString.Decode(data));
    }

    public static int Write(Span<byte> destination, in ServerEntry entry)
    {
        int at = NbdString.WritePrefixed(destination, entry.Name);
        return at + NbdString.Write(destination[at..], entry.Description);
    }
}

/// <summary>The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.</summary>
public readonly record struct MetaContextRequest(string ExportName, string[] Queries)
{
    public int Size => 4 + NbdString.ByteCount(ExportName) + 4 + Queries.Sum(q => 4 + NbdString.ByteCount(q));

    // C: 32 bits, length of export name
    // C: String, name of export for which we wish to list metadata contexts
    // C: 32 bits, number of queries
    // C: (number of queries times:)
    //    32 bits, length of query
    //    String, query to select metadata contexts
    public static MetaContextRequest Read(ReadOnlySpan<byte> data) =>
        TryRead(data, out MetaContextRequest request, out OptionDataFault fault) ? request : throw OptionData.Invalid(fault, data.Length);

    public static bool TryRead(ReadOnlySpan<byte> data, out MetaContextRequest request, out OptionDataFault fault)
    {
        request = default;
        if (!NbdString.TryTakePrefixed(ref data, out string? name, out bool tooLong))
        {
            fault = tooLong ? OptionDataFault.NameTooLong : data.Length < 4 ? OptionDataFault.TooShort : OptionDataFault.NameLength;
            return false;
        }
        if (data.Length < 4)
        {
            fault = OptionDataFault.TooShort;
            return false;
        }
        uint count = BinaryPrimitives.ReadUInt32BigEndian(data);
        data = data[4..];
        // Each query takes at least its 4-byte length: a count that cannot fit is refused before allocating for it.
        if (count > data.Length / 4)
        {
            fault = OptionDataFault.Query;
            return false;
        }
        var queries = new string[count];
        for (int i = 0; i < queries.Length; i++)
        {
            if (!NbdString.TryTakePrefixed(ref data, out string? query, out _))
            {
                fault = OptionDataFault.Query;
                return false;
            }
            queries[i] = query;
        }
        if (!data.IsEmpty)
        {
            fault = OptionDataFault.Trailing;
            return false;
        }
        request = new MetaContextRequest(name, queries);
        fault = OptionDataFault.None;
        return true;
    }

    public static int Write(Span<byte> destination, in MetaContextRequest request)
    {
        int at = NbdString.WritePrefixed(destination, request.ExportName);
        BinaryPrimitives.WriteUInt32BigEndian(destination[at..], (uint)request.Queries.Length);
        at += 4;
        foreach (string query in request.Queries)
        {
            at += NbdString.WritePrefixed(destination[at..], query);
        }
        return at;
    }
}

/// <summary>The data of an NBD_REP_META_CONTEXT reply: one context and the id it goes by.</summary>
public readonly record struct MetaContextReply(uint Id, string Name)
{
    public int Size => 4 + NbdString.ByteCount(Name);

    // S: 32 bits, NBD metadata context ID
    // S: String, name of the metadata context
    public static MetaContextReply Read(ReadOnlySpan<byte> data)
    {
        uint id = NbdString.TakeUInt32(ref data, "context id");
        return new MetaContextReply(id, NbdString.Decode(data));
    }

    public static int Write(Span<byte> destination, in MetaContextReply reply)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, reply.Id);
        return 4 + NbdString.Write(destination[4..], reply.Name);
    }
}
