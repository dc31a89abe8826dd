using System.Buffers;
using System.IO.Pipelines;
using Gateway.Backends;

namespace Gateway.Actors.Nbd;

/// <summary>
/// One request from the moment it is parsed until its reply is written. Pooled per
/// connection and run as a thread-pool work item, so a request allocates nothing.
/// </summary>
internal sealed class RequestWork(Transmission owner) : IThreadPoolWorkItem
{
    private const int MaxReadSegments = 32;

    private Extent[]? _segments;
    private int _segmentCount;
    private MetaExtent[]? _statusExtents;
    private int[]? _statusCounts;

    /// <summary>A read's data, when it is sent from the export's file (sendfile) instead of <see cref="Buffer"/>.</summary>
    private FileRegion? _region;

    public NbdRequest Request { get; private set; }

    /// <summary>Links requests finished on the reader's thread into one batch for the writer.</summary>
    public RequestWork? Next { get; set; }

    public NbdError Error { get; private set; }

    /// <summary>Offset of the failure when a read fails part way (ERROR_OFFSET).</summary>
    public ulong? ErrorOffset { get; private set; }

    /// <summary>Payload bytes this request holds against the connection's budget.</summary>
    public long Bytes { get; private set; }

    /// <summary>The write payload, or the data read; rented from <see cref="PayloadPool"/>.</summary>
    public byte[]? Buffer { get; set; }

    /// <summary>When the request was parsed (<see cref="System.Diagnostics.Stopwatch"/> ticks).</summary>
    public long StartTimestamp { get; private set; }

    public void Reset(in NbdRequest request, NbdError error, long bytes)
    {
        StartTimestamp = System.Diagnostics.Stopwatch.GetTimestamp();
        Request = request;
        Error = error;
        ErrorOffset = null;
        Bytes = bytes;
        _segmentCount = 0;
        _skipContext = null;
        _region = null;
    }

    public void Execute() => _ = ExecuteAsync();

    /// <summary>
    /// Serves a plain read or write on the calling (reader) thread when the device can do it
    /// without blocking: a page-cache hit costs no thread-pool hop. False leaves the request to
    /// <see cref="Execute"/>; a read keeps its buffer for that.
    /// </summary>
    public bool TryCompleteInline(INonBlockingIo io)
    {
        NbdRequest request = Request;
        int length = (int)request.Length;
        switch (request.Command)
        {
            case NbdCommand.Read:
                // A range all in the page cache is sent from the file as one data chunk, in any reply
                // form: the holes a check would find are not in the cache (a hole found is never
                // read), short of a client reading them as data before (NBD_CMD_FLAG_DF, simple
                // replies), and then zeros as data are still the right bytes.
                if (!TryReadFromFile((long)request.Offset, length))
                {
                    if (owner.Structured && length >= Transmission.SparseReadThreshold && !request.Flags.HasFlag(CommandFlags.DontFragment)
                        && !owner.IsAllCached((long)request.Offset, length))
                    {
                        return false; // checked for holes on the pool
                    }
                    Buffer = PayloadPool.Rent(length);
                    if (!io.TryReadNoWait((long)request.Offset, Buffer.AsSpan(0, length)))
                    {
                        return false;
                    }
                }
                _segments ??= new Extent[MaxReadSegments + 1];
                _segments[0] = new Extent(length, ExtentFlags.Data);
                _segmentCount = 1;
                return true;
            case NbdCommand.Write when !request.Flags.HasFlag(CommandFlags.Fua):
                return io.TryWriteNoWait((long)request.Offset, Buffer.AsSpan(0, length));
            default:
                return false;
        }
    }

    /// <summary>
    /// A read long enough to be sent from the export's file (sendfile) when all of it is in the
    /// page cache: the writer sends it from there, and no buffer is filled.
    /// </summary>
    private bool TryReadFromFile(long offset, int length)
    {
        if (length < DirectWriteThreshold || owner.FileRegions is not IFileRegions files || !files.TryGetFileRegion(offset, length, out FileRegion region))
        {
            return false;
        }
        ReturnBuffers();
        _region = region;
        return true;
    }

    /// <summary>Hands a finished request to the writer.</summary>
    public void Complete() => owner.Enqueue(this);

    private async Task ExecuteAsync()
    {
        NbdRequest request = Request;
        IBlockDevice device = owner.Device;
        CancellationToken cancel = owner.Aborted;
        long offset = (long)request.Offset;
        try
        {
            switch (request.Command)
            {
                case NbdCommand.Read:
                    await ReadAsync(device, offset, (int)request.Length, cancel).ConfigureAwait(false);
                    break;
                case NbdCommand.Write:
                    await device.WriteAsync(offset, Buffer.AsMemory(0, (int)request.Length), request.Flags.HasFlag(CommandFlags.Fua), cancel).ConfigureAwait(false);
                    break;
                case NbdCommand.Flush:
                    await device.FlushAsync(cancel).ConfigureAwait(false);
                    break;
                case NbdCommand.Trim:
                    await device.TrimAsync(offset, (long)request.Length, request.Flags.HasFlag(CommandFlags.Fua), cancel).ConfigureAwait(false);
                    break;
                case NbdCommand.WriteZeroes:
                    var flags = ZeroFlags.None;
                    if (request.Flags.HasFlag(CommandFlags.Fua)) flags |= ZeroFlags.Fua;
                    if (request.Flags.HasFlag(CommandFlags.NoHole)) flags |= ZeroFlags.NoHole;
                    if (request.Flags.HasFlag(CommandFlags.FastZero)) flags |= ZeroFlags.FastZero;
                    await device.ZeroAsync(offset, (long)request.Length, flags, cancel).ConfigureAwait(false);
                    break;
                case NbdCommand.Cache:
                    await device.CacheAsync(offset, (long)request.Length, cancel).ConfigureAwait(false);
                    break;
                case NbdCommand.BlockStatus:
                    await BlockStatusAsync(offset, cancel).ConfigureAwait(false);
                    break;
            }
        }
        catch (Exception e)
        {
            Error = Transmission.ToNbdError(e);
            if (request.Command == NbdCommand.Read && e is BlockDeviceException { Offset: long failedAt }
                && failedAt >= offset && (ulong)(failedAt - offset) < request.Length)
            {
                // The device knows where the read failed (an owner's ERROR_OFFSET): on any read path.
                ErrorOffset = (ulong)failedAt;
            }
            if (Error == NbdError.Io)
            {
                owner.LogFailure(request, e);
            }
            if (Buffer is not null && request.Command == NbdCommand.Read)
            {
                PayloadPool.Return(Buffer);
                Buffer = null;
            }
        }
        Complete();
    }

    private async ValueTask ReadAsync(IBlockDevice device, long offset, int length, CancellationToken cancel)
    {
        _segments ??= new Extent[MaxReadSegments + 1];
        ReadHoles holes = owner.HolesOf(Request);
        if (holes == ReadHoles.FromSegments)
        {
            Buffer ??= PayloadPool.Rent(length);
            // The holes come with the data: the hole ranges of the buffer are never sent.
            _segmentCount = await owner.SegmentedReads!.ReadSegmentsAsync(offset, Buffer.AsMemory(0, length), _segments, cancel).ConfigureAwait(false);
            return;
        }
        int n = holes == ReadHoles.FromAllocation ? await device.GetAllocationAsync(offset, length, _segments.AsMemory(0, MaxReadSegments), cancel).ConfigureAwait(false) : 0;
        if (n == 0 || (n == 1 && (_segments[0].Flags & ExtentFlags.Hole) == 0))
        {
            // All data, or not worth a hole check: one read, one chunk.
            _segments[0] = new Extent(length, ExtentFlags.Data);
            _segmentCount = 1;
            if (TryReadFromFile(offset, length))
            {
                return;
            }
            Buffer ??= PayloadPool.Rent(length);
            await device.ReadAsync(offset, Buffer.AsMemory(0, length), cancel).ConfigureAwait(false);
            return;
        }

        Buffer ??= PayloadPool.Rent(length);

        long covered = 0;
        for (int i = 0; i < n; i++)
        {
            covered += _segments[i].Length;
        }
        if (covered < length)
        {
            // More extents than we asked for: read the rest as data.
            _segments[n++] = new Extent(length - covered, ExtentFlags.Data);
        }
        _segmentCount = n;
        long at = 0;
        for (int i = 0; i < n; i++)
        {
            Extent segment = _segments[i];
            if ((segment.Flags & ExtentFlags.Hole) == 0)
            {
                try
                {
                    await device.ReadAsync(offset + at, Buffer.AsMemory((int)at, (int)segment.Length), cancel).ConfigureAwait(false);
                }
                catch (Exception) when (owner.Structured)
                {
                    ErrorOffset = (ulong)(offset + at);
                    throw;
                }
            }
            at += segment.Length;
        }
    }

    private async ValueTask BlockStatusAsync(long offset, CancellationToken cancel)
    {
        SelectedContext[] contexts = owner.Contexts;
        int max = Request.Flags.HasFlag(CommandFlags.ReqOne) ? 1 : NbdLimits.MaxExtentsPerReply;
        if (_statusExtents is null || _statusExtents.Length < contexts.Length * NbdLimits.MaxExtentsPerReply)
        {
            _statusExtents = new MetaExtent[contexts.Length * NbdLimits.MaxExtentsPerReply];
            _statusCounts = new int[contexts.Length];
        }
        long length = (long)Request.Length;
        if (Request.Flags.HasFlag(CommandFlags.PayloadLen))
        {
            length = SelectContexts(contexts);
        }
        for (int i = 0; i < contexts.Length; i++)
        {
            _statusCounts![i] = _skipContext?[i] == true ? 0 : await contexts[i].Context.GetExtentsAsync(offset, length,
                _statusExtents.AsMemory(i * NbdLimits.MaxExtentsPerReply, max), cancel).ConfigureAwait(false);
        }
    }

    private bool[]? _skipContext;

    /// <summary>
    /// The payload form of NBD_CMD_BLOCK_STATUS (extended headers, NBD_FLAG_BLOCK_STATUS_PAYLOAD):
    /// 64 bits effect length, then n * 32 bits ids of the contexts to answer for. Marks the others
    /// to skip and returns the effect length; duplicate or unknown ids are EINVAL (proto.md).
    /// </summary>
    private long SelectContexts(SelectedContext[] contexts)
    {
        int payload = (int)Request.Length;
        if (payload < 12 || (payload - 8) % 4 != 0)
        {
            throw new BlockDeviceException(BlockErrorKind.InvalidArgument, $"a BLOCK_STATUS payload of {payload} bytes is not 8 + n*4 with n > 0");
        }
        ReadOnlySpan<byte> data = Buffer.AsSpan(0, payload);
        ulong effect = System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(data);
        if (effect == 0 || Request.Offset > owner.ExportSize || effect > owner.ExportSize - Request.Offset)
        {
            throw new BlockDeviceException(BlockErrorKind.InvalidArgument, $"effect length {effect} at {Request.Offset} is zero or beyond the end");
        }
        _skipContext ??= new bool[contexts.Length];
        _skipContext.AsSpan().Fill(true);
        for (int at = 8; at < payload; at += 4)
        {
            uint id = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(data[at..]);
            int index = Array.FindIndex(contexts, c => c.Id == id);
            if (index < 0 || !_skipContext[index])
            {
                throw new BlockDeviceException(BlockErrorKind.InvalidArgument, $"context id {id} is unknown or named twice");
            }
            _skipContext[index] = false;
        }
        return (long)effect;
    }

    /// <summary>Data chunks at least this long go straight from the payload buffer to the socket
    /// instead of being copied into the output pipe.</summary>
    public const int DirectWriteThreshold = 64 * 1024;

    /// <summary>
    /// Writes this request's reply; runs on the connection's single writer. Completes
    /// synchronously unless the reply carries a large data chunk, which is sent from the
    /// payload buffer directly to <paramref name="direct"/> after flushing what precedes it.
    /// </summary>
    public ValueTask WriteReplyAsync(PipeWriter output, Stream direct)
    {
        ulong cookie = Request.Cookie;
        // Extended headers answer everything with (extended) chunks; never a simple reply.
        bool structured = owner.Structured;
        var to = new ReplyTo(cookie, Request.Offset, owner.Extended);
        if (Error != NbdError.None)
        {
            if (structured)
            {
                Replies.WriteError(output, to, Error, ErrorOffset);
            }
            else
            {
                Replies.WriteSimple(output, cookie, Error);
            }
            return ValueTask.CompletedTask;
        }

        switch (Request.Command)
        {
            case NbdCommand.Read when !structured:
                Replies.WriteSimple(output, cookie, NbdError.None);
                return WriteReadDataAsync(output, direct);
            case NbdCommand.Read:
                return _segmentCount == 1 && (_segments![0].Flags & ExtentFlags.Hole) == 0
                    ? WriteSingleChunkAsync(output, direct, to)
                    : WriteChunksAsync(output, direct, to);
            case NbdCommand.BlockStatus:
                SelectedContext[] contexts = owner.Contexts;
                int last = contexts.Length - 1;
                while (last > 0 && _skipContext?[last] == true)
                {
                    last--;
                }
                for (int i = 0; i <= last; i++)
                {
                    if (_skipContext?[i] != true)
                    {
                        Replies.WriteBlockStatus(output, to, i == last, contexts[i].Id,
                            _statusExtents.AsSpan(i * NbdLimits.MaxExtentsPerReply, _statusCounts![i]));
                    }
                }
                return ValueTask.CompletedTask;
            default:
                if (structured)
                {
                    Replies.WriteDone(output, to);
                }
                else
                {
                    Replies.WriteSimple(output, cookie, NbdError.None);
                }
                return ValueTask.CompletedTask;
        }
    }

    private ValueTask WriteSingleChunkAsync(PipeWriter output, Stream direct, ReplyTo to)
    {
        Replies.WriteOffsetDataHeader(output, to, done: true, Request.Offset, (int)Request.Length);
        return WriteReadDataAsync(output, direct);
    }

    /// <summary>The data of a one-chunk read: from the file (sendfile) or from <see cref="Buffer"/>.</summary>
    private ValueTask WriteReadDataAsync(PipeWriter output, Stream direct)
    {
        int length = (int)Request.Length;
        return _region is FileRegion region
            ? FlushThenSendFileAsync(output, owner.FileSender!, region, length)
            : WriteDataAsync(output, direct, Buffer.AsMemory(0, length));

        static async ValueTask FlushThenSendFileAsync(PipeWriter output, FileSender sender, FileRegion region, int length)
        {
            await output.FlushAsync().ConfigureAwait(false);
            await sender.SendAsync(region, length).ConfigureAwait(false);
        }
    }

    private async ValueTask WriteChunksAsync(PipeWriter output, Stream direct, ReplyTo to)
    {
        long at = 0;
        for (int i = 0; i < _segmentCount; i++)
        {
            Extent segment = _segments![i];
            bool done = i == _segmentCount - 1;
            ulong chunkOffset = Request.Offset + (ulong)at;
            if ((segment.Flags & ExtentFlags.Hole) != 0)
            {
                Replies.WriteOffsetHole(output, to, done, chunkOffset, (uint)segment.Length);
            }
            else
            {
                Replies.WriteOffsetDataHeader(output, to, done, chunkOffset, (int)segment.Length);
                await WriteDataAsync(output, direct, Buffer.AsMemory((int)at, (int)segment.Length)).ConfigureAwait(false);
            }
            at += segment.Length;
        }
    }

    private static ValueTask WriteDataAsync(PipeWriter output, Stream direct, ReadOnlyMemory<byte> data)
    {
        if (data.Length < DirectWriteThreshold)
        {
            output.Write(data.Span);
            return ValueTask.CompletedTask;
        }
        return FlushThenWriteAsync(output, direct, data);

        static async ValueTask FlushThenWriteAsync(PipeWriter output, Stream direct, ReadOnlyMemory<byte> data)
        {
            await output.FlushAsync().ConfigureAwait(false);
            await direct.WriteAsync(data).ConfigureAwait(false);
        }
    }

    public void ReturnBuffers()
    {
        if (_region is FileRegion region)
        {
            _region = null;
            region.Holder.Release();
        }
        if (Buffer is not null)
        {
            PayloadPool.Return(Buffer);
            Buffer = null;
        }
    }
}
