using System.Buffers;
using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Cluster;
using Gateway.Actors.Exports;
using Gateway.Actors.Nbd;
using Gateway.Backends;
using Gateway.Backends.Overlay;
using Gateway.Tests.Protocol;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// The node-to-node NBD client against the real in-process server on loopback sockets, and
/// against a scripted owner for what a correct server never does (protocol violations, replies
/// held back until after a cancellation, a connection severed mid-flight).
/// <para>
/// The one test that counts the bytes the process allocates is apart, in
/// <see cref="PeerNbdClientAllocationTests"/>, so these run in parallel with the rest.
/// </para>
/// </summary>
public sealed class PeerNbdClientTests : IDisposable
{
    private const int KiB = 1024;
    private const int MiB = 1024 * 1024;

    /// <summary>Longest any single step may take before the test fails instead of hanging.</summary>
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(10);

    private readonly string _directory = Directory.CreateTempSubdirectory("gateway-peer-").FullName;
    private int _files;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    // ------------------------------------------------------------ handshake and description

    [Fact]
    public async Task Info_and_contexts_describe_the_export()
    {
        var exports = new TestExportDirectory();
        using FileBackend file = NewFile(8 * MiB);
        using FileBackend readOnlyFile = NewReadOnlyFile(3 * MiB + 512);
        exports.Add("disk", file, description: "the disk");
        exports.Add("ro-file", readOnlyFile);
        exports.Add("ro-memory", new MemoryBackend(MiB, readOnly: true));
        await using var server = new NbdTestServer(exports);

        await using (PeerNbdClient disk = await ConnectAsync(server, "disk"))
        {
            Assert.Equal("disk", disk.Info.Name);
            Assert.Equal("the disk", disk.Info.Description);
            Assert.Equal(8 * MiB, disk.Info.Size);
            Assert.False(disk.Info.ReadOnly);
            Assert.Equal(BlockCapabilities.Trim | BlockCapabilities.Zero | BlockCapabilities.FastZero | BlockCapabilities.Cache | BlockCapabilities.Flush, disk.Info.Capabilities);
            Assert.Equal([NbdLimits.BaseAllocation], disk.MetaContexts);
            Assert.False(disk.IsBroken);
            Assert.False(disk.Completion.IsCompleted);
        }
        await using (PeerNbdClient roFile = await ConnectAsync(server, "ro-file"))
        {
            Assert.Null(roFile.Info.Description);
            Assert.Equal(3 * MiB + 512, roFile.Info.Size);
            Assert.True(roFile.Info.ReadOnly);
            // Read-only: no FLUSH, TRIM or WRITE_ZEROES advertised; CACHE still is.
            Assert.Equal(BlockCapabilities.Cache, roFile.Info.Capabilities);
        }
        await using (PeerNbdClient roMemory = await ConnectAsync(server, "ro-memory"))
        {
            Assert.True(roMemory.Info.ReadOnly);
            Assert.Equal(BlockCapabilities.None, roMemory.Info.Capabilities);
        }
    }

    [Fact]
    public async Task Qemu_contexts_are_selected_and_answer_as_on_the_owner()
    {
        await LayerFiles.CreateAsync(_directory, "top", 4 * MiB);
        using var overlay = new OverlayBackend([await LayerFiles.OpenAsync(_directory, "top", writable: true)], 4 * MiB, readOnly: false);
        await overlay.WriteAsync(MiB, Pattern(64 * KiB, seed: 1), fua: false);
        var bitmap = new DirtyBitmap(4 * MiB, 64 * KiB);
        bitmap.SetRange(2 * MiB, 128 * KiB);
        var exports = new TestExportDirectory();
        exports.Add("overlay", overlay);
        ExportHandle handle = (await exports.OpenAsync("overlay", CancellationToken.None))!;
        handle.MetaContexts = [.. handle.MetaContexts, new AllocationDepthContext(overlay), new DirtyBitmapContext("b1", bitmap)];
        await using var server = new NbdTestServer(exports);

        await using PeerNbdClient client = await ConnectAsync(server, "overlay");

        Assert.Equal(["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1"], client.MetaContexts.Order());
        foreach (MetaContext context in handle.MetaContexts)
        {
            MetaExtent[] expected = await ContextExtentsAsync(context, 0, 4 * MiB);
            Assert.Equal(expected, await ExtentsAsync(client, context.Name, 0, 4 * MiB));
            Assert.Equal([expected[0]], await ExtentsAsync(client, context.Name, 0, 4 * MiB, reqOne: true));
        }
        // Not vacuous: the bitmap really has a dirty run and the overlay a depth-1 extent.
        Assert.Contains(new MetaExtent(128 * KiB, DirtyBitmapContext.StateDirty), await ExtentsAsync(client, "qemu:dirty-bitmap:b1", 0, 4 * MiB));
        Assert.Contains(await ExtentsAsync(client, AllocationDepthContext.Name, 0, 4 * MiB), e => e.Status == 1);
    }

    [Fact]
    public async Task Unknown_export_is_unavailable_on_that_node()
    {
        var exports = new TestExportDirectory();
        exports.Add("disk", new MemoryBackend(MiB));
        await using var server = new NbdTestServer(exports);

        await Assert.ThrowsAsync<PeerExportUnavailableException>(() => PeerNbdClient.ConnectAsync(server.EndPoint, "gone", CancellationToken.None).WaitAsync(Bound));
    }

    [Fact]
    public async Task Unknown_export_answered_at_GO_is_unavailable_too()
    {
        // Without structured replies there is no metadata negotiation: GO is the first to name the export.
        await using var owner = new ScriptedOwner(structured: false, servesExport: false);

        await Assert.ThrowsAsync<PeerExportUnavailableException>(() => owner.ConnectAsync());
    }

    [Fact]
    public async Task Connecting_to_a_closed_port_fails_with_a_socket_error()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var endpoint = (IPEndPoint)listener.LocalEndpoint;
        listener.Stop();

        await Assert.ThrowsAsync<SocketException>(() => PeerNbdClient.ConnectAsync(endpoint, "disk", CancellationToken.None).WaitAsync(Bound));
    }

    // ------------------------------------------------------------ data

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Writes_with_and_without_FUA_read_back(bool extended)
    {
        var exports = new TestExportDirectory();
        var memory = new MemoryBackend(4 * MiB);
        exports.Add("disk", memory);
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk", extended);
        (long Offset, byte[] Data, bool Fua)[] writes = [(8 * KiB, Pattern(4 * KiB, 1), false), (MiB, Pattern(64 * KiB, 2), true), (12_345, Pattern(100, 3), true), (4 * MiB - 1, Pattern(1, 4), false)];

        foreach ((long offset, byte[] data, bool fua) in writes)
        {
            await client.WriteAsync(offset, data, fua).AsTask().WaitAsync(Bound);
        }

        foreach ((long offset, byte[] data, _) in writes)
        {
            Assert.Equal(data, await ReadAsync(client, offset, data.Length));
            byte[] onOwner = new byte[data.Length];
            await memory.ReadAsync(offset, onOwner);
            Assert.Equal(data, onOwner);
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Reads_across_holes_of_a_sparse_file_return_zeros(bool extended)
    {
        var exports = new TestExportDirectory();
        using FileBackend file = NewFile(8 * MiB);
        byte[] first = Pattern(64 * KiB, 5);
        byte[] second = Pattern(128 * KiB, 6);
        await file.WriteAsync(0, first, fua: false);
        await file.WriteAsync(MiB + 64 * KiB, second, fua: false);
        exports.Add("disk", file);
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk", extended);
        byte[] buffer = new byte[2 * MiB];
        buffer.AsSpan().Fill(0xCC);

        await client.ReadAsync(0, buffer).AsTask().WaitAsync(Bound);

        byte[] expected = new byte[2 * MiB];
        first.CopyTo(expected, 0);
        second.CopyTo(expected, MiB + 64 * KiB);
        Assert.Equal(expected, buffer);
        // The owner sent the holes as OFFSET_HOLE chunks (reads of 64 KiB and more are checked for holes).
        Assert.True(client.HoleChunks > 0, "no OFFSET_HOLE chunk came back for a read across holes");
    }

    [Theory]
    [InlineData(MiB)]
    [InlineData(32 * MiB)]
    [InlineData(40 * MiB)] // over the maximum payload: split into two requests
    public async Task Large_payloads_roundtrip(int length)
    {
        var exports = new TestExportDirectory();
        exports.Add("disk", new MemoryBackend(64 * MiB));
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk");
        byte[] data = Pattern(length, seed: length);

        await client.WriteAsync(MiB, data, fua: false).AsTask().WaitAsync(Bound);

        byte[] read = await ReadAsync(client, MiB, length);
        Assert.True(data.AsSpan().SequenceEqual(read), "large read differs from what was written");
    }

    [Fact]
    public async Task Concurrent_random_4KiB_writes_then_reads_return_what_was_written()
    {
        const int Workers = 64;
        const int PerWorker = 8;
        var exports = new TestExportDirectory();
        exports.Add("disk", new MemoryBackend(64 * MiB));
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk");
        int[] blocks = [.. Enumerable.Range(0, 16 * 1024)];
        new Random(42).Shuffle(blocks);
        byte[][] data = [.. Enumerable.Range(0, Workers * PerWorker).Select(i => Pattern(4 * KiB, 1000 + i))];

        await Task.WhenAll(Enumerable.Range(0, Workers).Select(w => Task.Run(async () =>
        {
            for (int i = w * PerWorker; i < (w + 1) * PerWorker; i++)
            {
                await client.WriteAsync(blocks[i] * 4L * KiB, data[i], fua: i % 7 == 0);
            }
        }))).WaitAsync(Bound);
        byte[][] read = new byte[Workers * PerWorker][];
        await Task.WhenAll(Enumerable.Range(0, Workers).Select(w => Task.Run(async () =>
        {
            // Reads in the reverse order, so replies and requests interleave differently.
            for (int i = (w + 1) * PerWorker - 1; i >= w * PerWorker; i--)
            {
                read[i] = new byte[4 * KiB];
                await client.ReadAsync(blocks[i] * 4L * KiB, read[i]);
            }
        }))).WaitAsync(Bound);

        for (int i = 0; i < data.Length; i++)
        {
            Assert.True(data[i].AsSpan().SequenceEqual(read[i]), $"block {blocks[i]} (request {i}) reads back wrong");
        }
        Assert.Equal(0, client.InFlight);
        // Request objects are pooled: about one or two per concurrent caller, not one per request.
        Assert.InRange(client.RequestsCreated, 1, 3 * Workers);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Flush_trim_zero_and_cache_act_on_the_owner_device(bool extended)
    {
        var exports = new TestExportDirectory();
        using FileBackend file = NewFile(8 * MiB);
        exports.Add("disk", file);
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk", extended);
        byte[] data = Pattern(MiB, 7);
        await client.WriteAsync(0, data, fua: false).AsTask().WaitAsync(Bound);

        await client.FlushAsync().AsTask().WaitAsync(Bound);
        await client.TrimAsync(0, 256 * KiB, fua: false).AsTask().WaitAsync(Bound);
        await client.ZeroAsync(256 * KiB, 256 * KiB, ZeroFlags.NoHole).AsTask().WaitAsync(Bound);
        await client.ZeroAsync(512 * KiB, 256 * KiB, ZeroFlags.FastZero | ZeroFlags.Fua).AsTask().WaitAsync(Bound);
        await client.CacheAsync(0, MiB).AsTask().WaitAsync(Bound);

        byte[] read = await ReadAsync(client, 0, MiB);
        Assert.True(read.AsSpan(0, 768 * KiB).IndexOfAnyExcept((byte)0) < 0, "trimmed or zeroed range does not read as zeros");
        Assert.True(data.AsSpan(768 * KiB).SequenceEqual(read.AsSpan(768 * KiB)), "data after the zeroed ranges changed");
        // Block status reports the allocation the owner's file has now.
        Extent[] onFile = await AllocationAsync(file, 0, 2 * MiB);
        Assert.True(onFile.Length >= 2, "data and holes should make several extents");
        Assert.Equal(onFile.Select(e => new MetaExtent((uint)e.Length, (uint)e.Flags)), await ExtentsAsync(client, NbdLimits.BaseAllocation, 0, 2 * MiB));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)] // BLOCK_STATUS_EXT replies
    public async Task Block_status_of_base_allocation_matches_the_file(bool extended)
    {
        var exports = new TestExportDirectory();
        using FileBackend file = NewFile(16 * MiB);
        foreach (long at in new long[] { 0, 3 * MiB, 3 * MiB + 512 * KiB, 9 * MiB })
        {
            await file.WriteAsync(at, Pattern(128 * KiB, (int)(at / KiB)), fua: false);
        }
        exports.Add("disk", file);
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk", extended);

        (long Offset, uint Length)[] ranges = [(0, 16 * MiB), (MiB, 10 * MiB), (3L * MiB + 64 * KiB, 64 * KiB)];
        foreach ((long offset, uint length) in ranges)
        {
            MetaExtent[] expected = [.. (await AllocationAsync(file, offset, length)).Select(e => new MetaExtent((uint)e.Length, (uint)e.Flags))];
            Assert.True(expected.Length > 1 || length <= 64 * KiB, "the file should have several extents in this range");
            Assert.Equal(expected, await ExtentsAsync(client, NbdLimits.BaseAllocation, offset, length));
            MetaExtent[] one = await ExtentsAsync(client, NbdLimits.BaseAllocation, offset, length, reqOne: true);
            Assert.Equal([expected[0]], one);
        }
        // A buffer smaller than the answer gets the first descriptors only.
        var two = new MetaExtent[2];
        Assert.Equal(2, await client.GetExtentsAsync(NbdLimits.BaseAllocation, 0, 16 * MiB, two, reqOne: false).AsTask().WaitAsync(Bound));
        Assert.Equal((await ExtentsAsync(client, NbdLimits.BaseAllocation, 0, 16 * MiB))[..2], two);
        BlockDeviceException unknown = await Assert.ThrowsAsync<BlockDeviceException>(() => client.GetExtentsAsync("qemu:dirty-bitmap:nope", 0, MiB, new MetaExtent[4], false).AsTask());
        Assert.Equal(BlockErrorKind.NotSupported, unknown.Kind);
    }

    // ------------------------------------------------------------ errors

    [Theory]
    [InlineData(BlockErrorKind.Io)]
    [InlineData(BlockErrorKind.InvalidArgument)]
    [InlineData(BlockErrorKind.NoSpace)]
    [InlineData(BlockErrorKind.ReadOnly)]
    [InlineData(BlockErrorKind.NotSupported)]
    [InlineData(BlockErrorKind.Shutdown)]
    public async Task Owner_errors_come_back_as_the_same_kind_and_leave_the_connection_usable(BlockErrorKind kind)
    {
        var exports = new TestExportDirectory();
        var device = new ScriptedDevice(new MemoryBackend(MiB));
        exports.Add("disk", device);
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk");
        device.FailNextRead(kind);

        await ThrowsKindAsync(kind, () => client.ReadAsync(0, new byte[4 * KiB]));

        // An NBD error is one request's answer, not the end of the connection.
        Assert.False(client.IsBroken);
        Assert.Equal(new byte[4 * KiB], await ReadAsync(client, 0, 4 * KiB));
    }

    [Fact]
    public async Task Refusals_of_the_owner_map_to_ReadOnly_InvalidArgument_and_NoSpace()
    {
        var exports = new TestExportDirectory();
        exports.Add("ro", new MemoryBackend(MiB, readOnly: true));
        exports.Add("rw", new MemoryBackend(MiB));
        await using var server = new NbdTestServer(exports);
        await using PeerNbdClient readOnly = await ConnectAsync(server, "ro");
        await using PeerNbdClient writable = await ConnectAsync(server, "rw");

        await ThrowsKindAsync(BlockErrorKind.ReadOnly, () => readOnly.WriteAsync(0, new byte[512], fua: false));
        await ThrowsKindAsync(BlockErrorKind.ReadOnly, () => readOnly.TrimAsync(0, 4 * KiB, fua: false));
        await ThrowsKindAsync(BlockErrorKind.ReadOnly, () => readOnly.ZeroAsync(0, 4 * KiB, ZeroFlags.None));
        await ThrowsKindAsync(BlockErrorKind.InvalidArgument, () => writable.ReadAsync(MiB - 100, new byte[4 * KiB]));
        await ThrowsKindAsync(BlockErrorKind.InvalidArgument, async () => await writable.GetExtentsAsync(NbdLimits.BaseAllocation, 2 * MiB, 4 * KiB, new MetaExtent[4], false));
        await ThrowsKindAsync(BlockErrorKind.NoSpace, () => writable.WriteAsync(MiB - 100, new byte[4 * KiB], fua: false));
        await ThrowsKindAsync(BlockErrorKind.NoSpace, () => writable.ZeroAsync(MiB - 100, 4 * KiB, ZeroFlags.None));
        Assert.False(readOnly.IsBroken);
        Assert.False(writable.IsBroken);
    }

    [Fact]
    public async Task Replies_simple_or_structured_in_any_shape_are_understood()
    {
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();

        // A simple error reply to a write, a simple success to a flush.
        ValueTask write = client.WriteAsync(0, Pattern(100, 1), fua: false);
        (NbdRequest request, byte[] payload) = await owner.ReceiveAsync();
        Assert.Equal((NbdCommand.Write, 0ul, 100u), (request.Command, request.Offset, request.Length));
        Assert.Equal(Pattern(100, 1), payload);
        await owner.SendAsync(ScriptedOwner.Simple(request.Cookie, NbdError.NoSpc));
        await ThrowsKindAsync(BlockErrorKind.NoSpace, () => write);

        ValueTask flush = client.FlushAsync();
        (request, _) = await owner.ReceiveAsync();
        await owner.SendAsync(ScriptedOwner.Simple(request.Cookie, NbdError.None));
        await flush.AsTask().WaitAsync(Bound);

        // A read answered by a hole for its second half, then data for its first half.
        byte[] buffer = new byte[8 * KiB];
        buffer.AsSpan().Fill(0xCC);
        ValueTask read = client.ReadAsync(4 * KiB, buffer);
        (request, _) = await owner.ReceiveAsync();
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 8 * KiB, 4 * KiB, done: false));
        await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 4 * KiB, Pattern(4 * KiB, 2), done: true));
        await read.AsTask().WaitAsync(Bound);
        Assert.Equal([.. Pattern(4 * KiB, 2), .. new byte[4 * KiB]], buffer);

        // A read failing part way: ERROR_OFFSET with a message, then DONE.
        read = client.ReadAsync(0, new byte[4 * KiB]);
        (request, _) = await owner.ReceiveAsync();
        await owner.SendAsync(ScriptedOwner.Error(request.Cookie, NbdError.Io, "disk on fire", offset: 512, done: false));
        await owner.SendAsync(ScriptedOwner.Done(request.Cookie));
        BlockDeviceException failed = await ThrowsKindAsync(BlockErrorKind.Io, () => read);
        Assert.Contains("disk on fire", failed.Message, StringComparison.Ordinal);
        Assert.Equal(512, failed.Offset);

        Assert.False(client.IsBroken);
        Assert.Equal(0, client.InFlight);
    }

    [Fact]
    public async Task A_segmented_read_returns_the_owners_holes_in_order_and_leaves_their_bytes_alone()
    {
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();
        byte[] buffer = new byte[16 * KiB];
        buffer.AsSpan().Fill(0xCC);
        var segments = new Extent[9];

        // Out of order: data at the end first, then two adjacent holes, a hole and data in the middle.
        ValueTask<int> read = client.ReadSegmentsAsync(64 * KiB, buffer, segments);
        (NbdRequest request, _) = await owner.ReceiveAsync();
        await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 76 * KiB, Pattern(4 * KiB, 3), done: false));
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 66 * KiB, 2 * KiB, done: false));
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 64 * KiB, 2 * KiB, done: false));
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 72 * KiB, 4 * KiB, done: false));
        await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 68 * KiB, Pattern(4 * KiB, 4), done: true));
        int n = await read.AsTask().WaitAsync(Bound);

        Assert.Equal(
            [new Extent(4 * KiB, ExtentFlags.Hole), new Extent(4 * KiB, ExtentFlags.Data), new Extent(4 * KiB, ExtentFlags.Hole), new Extent(4 * KiB, ExtentFlags.Data)],
            segments.AsSpan(0, n).ToArray());
        Assert.Equal(Pattern(4 * KiB, 4), buffer[(4 * KiB)..(8 * KiB)]);
        Assert.Equal(Pattern(4 * KiB, 3), buffer[(12 * KiB)..]);
        // The holes' bytes are not written: the caller never sends them.
        Assert.True(buffer.AsSpan(0, 4 * KiB).IndexOfAnyExcept((byte)0xCC) < 0);
        Assert.True(buffer.AsSpan(8 * KiB, 4 * KiB).IndexOfAnyExcept((byte)0xCC) < 0);

        // A simple reply, and a read that is all one hole.
        read = client.ReadSegmentsAsync(0, buffer.AsMemory(0, 4 * KiB), segments);
        (request, _) = await owner.ReceiveAsync();
        await owner.SendAsync([.. ScriptedOwner.Simple(request.Cookie, NbdError.None), .. Pattern(4 * KiB, 5)]);
        Assert.Equal(1, await read.AsTask().WaitAsync(Bound));
        Assert.Equal(new Extent(4 * KiB, ExtentFlags.Data), segments[0]);
        Assert.Equal(Pattern(4 * KiB, 5), buffer[..(4 * KiB)]);

        read = client.ReadSegmentsAsync(0, buffer.AsMemory(0, 8 * KiB), segments);
        (request, _) = await owner.ReceiveAsync();
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 0, 8 * KiB, done: true));
        Assert.Equal(1, await read.AsTask().WaitAsync(Bound));
        Assert.Equal(new Extent(8 * KiB, ExtentFlags.Hole), segments[0]);

        // An error chunk fails the read, whatever chunks came before it.
        read = client.ReadSegmentsAsync(0, buffer.AsMemory(0, 8 * KiB), segments);
        (request, _) = await owner.ReceiveAsync();
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 0, 4 * KiB, done: false));
        await owner.SendAsync(ScriptedOwner.Error(request.Cookie, NbdError.Io, "bad sector", offset: 4 * KiB, done: true));
        await ThrowsKindAsync(BlockErrorKind.Io, async () => await read);

        Assert.False(client.IsBroken);
        Assert.Equal(0, client.InFlight);
    }

    [Fact]
    public async Task Holes_past_the_room_for_segments_are_zeros_read_as_data()
    {
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();
        byte[] buffer = new byte[8 * KiB];
        buffer.AsSpan().Fill(0xCC);
        // Room for one hole: the data before it and after it take the other two.
        var segments = new Extent[3];

        ValueTask<int> read = client.ReadSegmentsAsync(0, buffer, segments);
        (NbdRequest request, _) = await owner.ReceiveAsync();
        await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 0, Pattern(2 * KiB, 6), done: false));
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 2 * KiB, 2 * KiB, done: false));
        await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 4 * KiB, Pattern(2 * KiB, 7), done: false));
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 6 * KiB, 2 * KiB, done: true));
        int n = await read.AsTask().WaitAsync(Bound);

        Assert.Equal([new Extent(2 * KiB, ExtentFlags.Data), new Extent(2 * KiB, ExtentFlags.Hole), new Extent(4 * KiB, ExtentFlags.Data)], segments.AsSpan(0, n).ToArray());
        Assert.Equal([.. Pattern(2 * KiB, 7), .. new byte[2 * KiB]], buffer[(4 * KiB)..]);
    }

    [Fact]
    public async Task Overlapping_holes_from_the_owner_are_connection_loss()
    {
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();
        ValueTask<int> read = client.ReadSegmentsAsync(0, new byte[8 * KiB], new Extent[9]);
        (NbdRequest request, _) = await owner.ReceiveAsync();
        // 8 KiB in all, so the total says covered; but [2K, 4K) is in both holes and [6K, 8K) in none.
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 0, 4 * KiB, done: false));
        await owner.SendAsync(ScriptedOwner.Hole(request.Cookie, 2 * KiB, 4 * KiB, done: true));

        await ThrowsKindAsync(BlockErrorKind.Shutdown, async () => await read);
        await client.Completion.WaitAsync(Bound);
        Assert.True(client.IsBroken);
    }

    [Fact]
    public async Task Commands_the_owner_does_not_offer_are_answered_without_sending_them()
    {
        // The scripted owner offers FLUSH and FUA only.
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();

        await ThrowsKindAsync(BlockErrorKind.NotSupported, () => client.TrimAsync(0, 4 * KiB, fua: false));
        await ThrowsKindAsync(BlockErrorKind.NotSupported, () => client.ZeroAsync(0, 4 * KiB, ZeroFlags.None));
        await client.CacheAsync(0, 4 * KiB).AsTask().WaitAsync(Bound); // advice only: nothing to do

        // proto.md: a client MUST NOT send what was not advertised; the next thing on the wire is this flush.
        ValueTask flush = client.FlushAsync();
        (NbdRequest request, _) = await owner.ReceiveAsync();
        Assert.Equal(NbdCommand.Flush, request.Command);
        await owner.SendAsync(ScriptedOwner.Done(request.Cookie));
        await flush.AsTask().WaitAsync(Bound);
    }

    // ------------------------------------------------------------ cancellation

    [Fact]
    public async Task Cancelled_read_gets_OperationCanceled_and_its_late_reply_is_thrown_away()
    {
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();
        byte[] abandoned = new byte[4 * KiB];
        using var cancel = new CancellationTokenSource();
        ValueTask first = client.ReadAsync(0, abandoned, cancel.Token);
        (NbdRequest firstRequest, _) = await owner.ReceiveAsync();

        cancel.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => first.AsTask().WaitAsync(Bound));

        byte[] second = new byte[4 * KiB];
        ValueTask next = client.ReadAsync(4 * KiB, second);
        (NbdRequest secondRequest, _) = await owner.ReceiveAsync();
        // The late reply comes first, in two chunks; then the answer to the second read.
        await owner.SendAsync(ScriptedOwner.Data(firstRequest.Cookie, 0, Pattern(2 * KiB, 8), done: false));
        await owner.SendAsync(ScriptedOwner.Data(firstRequest.Cookie, 2 * KiB, Pattern(2 * KiB, 9), done: true));
        await owner.SendAsync(ScriptedOwner.Data(secondRequest.Cookie, 4 * KiB, Pattern(4 * KiB, 10), done: true));
        await next.AsTask().WaitAsync(Bound);

        Assert.Equal(Pattern(4 * KiB, 10), second);
        Assert.Equal(new byte[4 * KiB], abandoned); // the cancelled caller's buffer was never written
        Assert.False(client.IsBroken);
        Assert.Equal(0, client.InFlight);
    }

    [Fact]
    public async Task Request_cancelled_before_it_starts_never_reaches_the_owner()
    {
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => client.WriteAsync(0, new byte[512], fua: false, new CancellationToken(canceled: true)).AsTask().WaitAsync(Bound));

        ValueTask flush = client.FlushAsync();
        (NbdRequest request, _) = await owner.ReceiveAsync();
        Assert.Equal(NbdCommand.Flush, request.Command);
        await owner.SendAsync(ScriptedOwner.Done(request.Cookie));
        await flush.AsTask().WaitAsync(Bound);
        Assert.Equal(0, client.InFlight);
    }

    // ------------------------------------------------------------ connection loss

    [Fact]
    public async Task Severed_connection_fails_requests_in_flight_with_Shutdown()
    {
        var exports = new TestExportDirectory();
        var device = new ScriptedDevice(new MemoryBackend(MiB)) { Gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously) };
        exports.Add("disk", device);
        await using var server = new NbdTestServer(exports);
        await using var relay = new Relay(server.EndPoint);
        PeerNbdClient client = await PeerNbdClient.ConnectAsync(relay.EndPoint, "disk", CancellationToken.None).WaitAsync(Bound);
        try
        {
            Task[] reads = [.. Enumerable.Range(0, 8).Select(i => client.ReadAsync(i * 4L * KiB, new byte[4 * KiB]).AsTask())];
            Assert.True(await NbdTestServer.EventuallyAsync(() => device.HeldReads == 8, Bound), "the owner did not receive the reads");

            relay.Sever();

            foreach (Task read in reads)
            {
                BlockDeviceException lost = await Assert.ThrowsAsync<BlockDeviceException>(() => read.WaitAsync(Bound));
                Assert.Equal(BlockErrorKind.Shutdown, lost.Kind);
                Assert.Contains("connection to the export's owner lost", lost.Message, StringComparison.Ordinal);
            }
            await client.Completion.WaitAsync(Bound);
            Assert.True(client.IsBroken);
            Assert.Equal(0, client.InFlight);
            await ThrowsKindAsync(BlockErrorKind.Shutdown, () => client.ReadAsync(0, new byte[512]));
            await ThrowsKindAsync(BlockErrorKind.Shutdown, () => client.FlushAsync());
        }
        finally
        {
            device.Gate.TrySetResult();
            await client.DisposeAsync().AsTask().WaitAsync(Bound);
        }
    }

    [Fact]
    public async Task Owner_closing_the_connection_breaks_the_client()
    {
        var exports = new TestExportDirectory();
        exports.Add("disk", new MemoryBackend(MiB));
        var server = new NbdTestServer(exports);
        await using PeerNbdClient client = await ConnectAsync(server, "disk");
        await client.WriteAsync(0, Pattern(512, 1), fua: false).AsTask().WaitAsync(Bound);

        await server.DisposeAsync().AsTask().WaitAsync(Bound);

        await client.Completion.WaitAsync(Bound);
        Assert.True(client.IsBroken);
        await ThrowsKindAsync(BlockErrorKind.Shutdown, () => client.ReadAsync(0, new byte[512]));
    }

    [Theory]
    [InlineData("bad magic")]
    [InlineData("unknown cookie")]
    [InlineData("data for a flush")]
    [InlineData("chunk outside the read")]
    [InlineData("read not covered")]
    [InlineData("end in the middle of data")]
    public async Task Protocol_violation_by_the_owner_is_connection_loss(string violation)
    {
        await using var owner = new ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();
        byte[] buffer = new byte[4 * KiB];
        ValueTask pending = violation == "data for a flush" ? client.FlushAsync() : client.ReadAsync(64 * KiB, buffer);
        (NbdRequest request, _) = await owner.ReceiveAsync();

        switch (violation)
        {
            case "bad magic":
                await owner.SendAsync([0xde, 0xad, 0xbe, 0xef, .. new byte[16]]);
                break;
            case "unknown cookie":
                await owner.SendAsync(ScriptedOwner.Data(request.Cookie + 1000, 64 * KiB, new byte[4 * KiB], done: true));
                break;
            case "data for a flush":
                await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 0, new byte[16], done: true));
                break;
            case "chunk outside the read":
                await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 60 * KiB, new byte[4 * KiB], done: true));
                break;
            case "read not covered":
                await owner.SendAsync(ScriptedOwner.Data(request.Cookie, 64 * KiB, new byte[2 * KiB], done: true));
                break;
            case "end in the middle of data":
                byte[] chunk = ScriptedOwner.Data(request.Cookie, 64 * KiB, new byte[4 * KiB], done: true);
                await owner.SendAsync(chunk[..100]);
                owner.Close();
                break;
        }

        await ThrowsKindAsync(BlockErrorKind.Shutdown, () => pending);
        await client.Completion.WaitAsync(Bound);
        Assert.True(client.IsBroken);
        Assert.Equal(0, client.InFlight);
        await ThrowsKindAsync(BlockErrorKind.Shutdown, () => client.WriteAsync(0, new byte[512], fua: false));
    }

    [Fact]
    public async Task Dispose_sends_NBD_CMD_DISC_and_fails_requests_in_flight()
    {
        await using var owner = new ScriptedOwner();
        PeerNbdClient client = await owner.ConnectAsync();
        ValueTask read = client.ReadAsync(0, new byte[4 * KiB]);
        (NbdRequest request, _) = await owner.ReceiveAsync();
        Assert.Equal(NbdCommand.Read, request.Command);

        await client.DisposeAsync().AsTask().WaitAsync(Bound);

        (NbdRequest disconnect, _) = await owner.ReceiveAsync();
        Assert.Equal(NbdCommand.Disconnect, disconnect.Command);
        await ThrowsKindAsync(BlockErrorKind.Shutdown, () => read);
        Assert.True(client.IsBroken);
        Assert.True(client.Completion.IsCompleted);
        await ThrowsKindAsync(BlockErrorKind.Shutdown, () => client.ReadAsync(0, new byte[512]));
        await client.DisposeAsync().AsTask().WaitAsync(Bound); // twice is harmless
    }

    [Fact]
    public async Task Dispose_against_the_real_server_ends_its_session_cleanly()
    {
        var exports = new TestExportDirectory();
        exports.Add("disk", new MemoryBackend(MiB));
        await using var server = new NbdTestServer(exports);
        PeerNbdClient client = await ConnectAsync(server, "disk");
        await client.WriteAsync(0, Pattern(4 * KiB, 3), fua: true).AsTask().WaitAsync(Bound);

        await client.DisposeAsync().AsTask().WaitAsync(Bound);

        Assert.True(await NbdTestServer.EventuallyAsync(() => server.Ended == 1, Bound), "the server did not end the session");
        Assert.Empty(server.Faults);
    }

    // ------------------------------------------------------------ helpers

    private static Task<PeerNbdClient> ConnectAsync(NbdTestServer server, string export) =>
        PeerNbdClient.ConnectAsync(server.EndPoint, export, CancellationToken.None).WaitAsync(Bound);

    /// <summary>With extended headers (which the in-process server offers) or structured replies only.</summary>
    private static async Task<PeerNbdClient> ConnectAsync(NbdTestServer server, string export, bool extended)
    {
        PeerNbdClient client = await PeerNbdClient.ConnectAsync(server.EndPoint, export, tls: null, CancellationToken.None, extendedHeaders: extended).WaitAsync(Bound);
        Assert.Equal(extended, client.ExtendedHeaders);
        return client;
    }

    private static async Task<byte[]> ReadAsync(PeerNbdClient client, long offset, int length)
    {
        byte[] buffer = new byte[length];
        await client.ReadAsync(offset, buffer).AsTask().WaitAsync(Bound);
        return buffer;
    }

    private static async Task<MetaExtent[]> ExtentsAsync(PeerNbdClient client, string context, long offset, uint length, bool reqOne = false)
    {
        var extents = new MetaExtent[NbdLimits.MaxExtentsPerReply];
        int count = await client.GetExtentsAsync(context, offset, length, extents, reqOne).AsTask().WaitAsync(Bound);
        Assert.InRange(count, 1, reqOne ? 1 : extents.Length);
        return extents[..count];
    }

    /// <summary>What the owner's context answers itself, asked as the server asks it (room for one reply's worth).</summary>
    private static async Task<MetaExtent[]> ContextExtentsAsync(MetaContext context, long offset, uint length)
    {
        var extents = new MetaExtent[NbdLimits.MaxExtentsPerReply];
        int count = await context.GetExtentsAsync(offset, length, extents, CancellationToken.None);
        return extents[..count];
    }

    /// <summary>The file's allocation as <see cref="BaseAllocationContext"/> asks for it (at most 64 extents).</summary>
    private static async Task<Extent[]> AllocationAsync(IBlockDevice device, long offset, long length)
    {
        var extents = new Extent[64];
        int count = await device.GetAllocationAsync(offset, length, extents);
        return extents[..count];
    }

    private static async Task<BlockDeviceException> ThrowsKindAsync(BlockErrorKind kind, Func<ValueTask> action)
    {
        BlockDeviceException e = await Assert.ThrowsAsync<BlockDeviceException>(() => action().AsTask().WaitAsync(Bound));
        Assert.Equal(kind, e.Kind);
        return e;
    }

    internal static byte[] Pattern(int length, int seed)
    {
        byte[] data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }

    private FileBackend NewFile(long size) => FileBackend.Create(Path.Combine(_directory, $"disk{Interlocked.Increment(ref _files)}.img"), size);

    private FileBackend NewReadOnlyFile(long size)
    {
        string path = Path.Combine(_directory, $"disk{Interlocked.Increment(ref _files)}.img");
        FileBackend.Create(path, size).Dispose();
        return FileBackend.Open(path, readOnly: true);
    }

    /// <summary>A device decorator that fails the next read with a chosen kind, or holds reads until its gate opens.</summary>
    private sealed class ScriptedDevice(IBlockDevice inner) : IBlockDevice
    {
        private int _failNext;
        private int _heldReads;

        public TaskCompletionSource? Gate { get; init; }

        public int HeldReads => Volatile.Read(ref _heldReads);

        public long Size => inner.Size;

        public bool IsReadOnly => inner.IsReadOnly;

        public BlockCapabilities Capabilities => inner.Capabilities;

        public void FailNextRead(BlockErrorKind kind) => Volatile.Write(ref _failNext, (int)kind + 1);

        public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken = default)
        {
            int fail = Interlocked.Exchange(ref _failNext, 0);
            if (fail != 0)
            {
                throw new BlockDeviceException((BlockErrorKind)(fail - 1), "injected by the test");
            }
            if (Gate is { } gate)
            {
                Interlocked.Increment(ref _heldReads);
                await gate.Task;
            }
            await inner.ReadAsync(offset, destination, cancellationToken);
        }

        public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken = default) => inner.WriteAsync(offset, source, fua, cancellationToken);

        public ValueTask FlushAsync(CancellationToken cancellationToken = default) => inner.FlushAsync(cancellationToken);

        public ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken = default) => inner.TrimAsync(offset, length, fua, cancellationToken);

        public ValueTask ZeroAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken = default) => inner.ZeroAsync(offset, length, flags, cancellationToken);

        public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) => inner.CacheAsync(offset, length, cancellationToken);

        public ValueTask<int> GetAllocationAsync(long offset, long length, Memory<Extent> extents, CancellationToken cancellationToken = default) =>
            inner.GetAllocationAsync(offset, length, extents, cancellationToken);

        public void Dispose() => inner.Dispose();
    }

    /// <summary>A TCP relay between client and server that can be severed with a reset, as when a node dies.</summary>
    private sealed class Relay : IAsyncDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly IPEndPoint _target;
        private readonly List<Socket> _sockets = [];
        private readonly List<Task> _pumps = [];
        private readonly Task _accepting;

        public Relay(IPEndPoint target)
        {
            _target = target;
            _listener.Start();
            EndPoint = (IPEndPoint)_listener.LocalEndpoint;
            _accepting = AcceptAsync();
        }

        public IPEndPoint EndPoint { get; }

        private async Task AcceptAsync()
        {
            try
            {
                while (true)
                {
                    Socket client = await _listener.AcceptSocketAsync();
                    var upstream = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                    await upstream.ConnectAsync(_target);
                    lock (_sockets)
                    {
                        _sockets.Add(client);
                        _sockets.Add(upstream);
                        _pumps.Add(PumpAsync(client, upstream));
                        _pumps.Add(PumpAsync(upstream, client));
                    }
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                // Stopped.
            }
        }

        private static async Task PumpAsync(Socket from, Socket to)
        {
            byte[] buffer = new byte[64 * KiB];
            try
            {
                while (true)
                {
                    int read = await from.ReceiveAsync(buffer, SocketFlags.None);
                    if (read == 0)
                    {
                        to.Shutdown(SocketShutdown.Send);
                        return;
                    }
                    await to.SendAsync(buffer.AsMemory(0, read), SocketFlags.None);
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                // Severed.
            }
        }

        /// <summary>Resets both sides at once (linger 0: RST, not FIN).</summary>
        public void Sever()
        {
            lock (_sockets)
            {
                foreach (Socket socket in _sockets)
                {
                    try
                    {
                        socket.LingerState = new LingerOption(true, 0);
                    }
                    catch (Exception e) when (e is SocketException or ObjectDisposedException)
                    {
                        // Already gone.
                    }
                    socket.Dispose();
                }
            }
        }

        public async ValueTask DisposeAsync()
        {
            _listener.Stop();
            Sever();
            await _accepting.WaitAsync(Bound);
            Task[] pumps;
            lock (_sockets)
            {
                pumps = [.. _pumps];
            }
            await Task.WhenAll(pumps).WaitAsync(Bound);
        }
    }

    /// <summary>
    /// An NBD owner written out by hand: it negotiates like our server (structured replies,
    /// base:allocation as context 7, FLUSH and FUA offered), then lets the test read each request
    /// and write whatever reply bytes it likes, in any order, right or wrong.
    /// </summary>
    internal sealed class ScriptedOwner(bool structured = true, bool servesExport = true) : IAsyncDisposable
    {
        public const long Size = 4 * MiB;
        public const TransmissionFlags Flags = TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.SendFua;

        private readonly TcpListener _listener = StartListener();
        private Socket? _socket;
        private NetworkStream? _stream;

        private NetworkStream Stream => _stream ?? throw new InvalidOperationException("no client yet");

        private static TcpListener StartListener()
        {
            var listener = new TcpListener(IPAddress.Loopback, 0);
            listener.Start();
            return listener;
        }

        /// <summary>Connects a client and plays the owner's side of the handshake.</summary>
        public async Task<PeerNbdClient> ConnectAsync()
        {
            Task<PeerNbdClient> connecting = PeerNbdClient.ConnectAsync(_listener.LocalEndpoint, "disk", CancellationToken.None);
            _socket = await _listener.AcceptSocketAsync().WaitAsync(Bound);
            _stream = new NetworkStream(_socket, ownsSocket: true);
            await HandshakeAsync().WaitAsync(Bound);
            return await connecting.WaitAsync(Bound);
        }

        private async Task HandshakeAsync()
        {
            byte[] greeting = new byte[NbdWire.GreetingSize];
            Handshake.WriteGreeting(greeting, HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes);
            await Stream.WriteAsync(greeting);
            byte[] clientFlags = new byte[NbdWire.ClientFlagsSize];
            await Stream.ReadExactlyAsync(clientFlags);
            var flagsBuffer = new ReadOnlySequence<byte>(clientFlags);
            Assert.True(Handshake.TryReadClientFlags(ref flagsBuffer, out ClientFlags flags));
            Assert.Equal(ClientFlags.FixedNewstyle | ClientFlags.NoZeroes, flags);
            while (true)
            {
                byte[] headerBytes = new byte[NbdWire.OptionHeaderSize];
                try
                {
                    if (await Stream.ReadAtLeastAsync(headerBytes, headerBytes.Length, throwOnEndOfStream: false) < headerBytes.Length)
                    {
                        return; // the client gave up (unknown export)
                    }
                }
                catch (IOException)
                {
                    return;
                }
                var headerBuffer = new ReadOnlySequence<byte>(headerBytes);
                Assert.True(OptionHeader.TryRead(ref headerBuffer, out OptionHeader header));
                NbdOption option = header.Option;
                byte[] data = new byte[header.Length];
                await Stream.ReadExactlyAsync(data);
                switch (option)
                {
                    case NbdOption.StructuredReply:
                        await ReplyAsync(option, structured ? OptionReplyType.Ack : OptionReplyType.ErrUnsup, structured ? [] : "no"u8.ToArray());
                        break;
                    case NbdOption.ListMetaContext or NbdOption.SetMetaContext when !servesExport:
                        await ReplyAsync(option, OptionReplyType.ErrUnknown, "no such export"u8.ToArray());
                        break;
                    case NbdOption.ListMetaContext or NbdOption.SetMetaContext:
                        Assert.Equal("disk", MetaContextRequest.Read(data).ExportName);
                        var context = new MetaContextReply(option == NbdOption.SetMetaContext ? 7u : 0u, NbdLimits.BaseAllocation);
                        await ReplyAsync(option, OptionReplyType.MetaContext, Payload(context.Size, d => MetaContextReply.Write(d, context)));
                        await ReplyAsync(option, OptionReplyType.Ack, []);
                        break;
                    case NbdOption.Go when !servesExport:
                        await ReplyAsync(option, OptionReplyType.ErrUnknown, "no such export"u8.ToArray());
                        break;
                    case NbdOption.Go:
                        Assert.Equal("disk", InfoRequest.Read(data).ExportName);
                        await ReplyAsync(option, OptionReplyType.Info, Payload(InfoReply.ExportSize, d => InfoReply.WriteExport(d, new InfoExport(Size, Flags))));
                        await ReplyAsync(option, OptionReplyType.Ack, []);
                        return;
                    default:
                        await ReplyAsync(option, OptionReplyType.ErrUnsup, []);
                        break;
                }
            }
        }

        private static byte[] Payload(int size, Func<byte[], int> write)
        {
            byte[] data = new byte[size];
            Assert.Equal(size, write(data));
            return data;
        }

        private async Task ReplyAsync(NbdOption option, OptionReplyType type, byte[] data)
        {
            byte[] reply = new byte[NbdWire.OptionReplyHeaderSize + data.Length];
            OptionReplyHeader.Write(reply, new OptionReplyHeader(option, type, (uint)data.Length));
            data.CopyTo(reply, NbdWire.OptionReplyHeaderSize);
            await Stream.WriteAsync(reply);
        }

        /// <summary>The next request from the client, with its payload if it is a write.</summary>
        public async Task<(NbdRequest Request, byte[] Payload)> ReceiveAsync()
        {
            byte[] header = new byte[NbdLimits.RequestHeaderSize];
            await Stream.ReadExactlyAsync(header).AsTask().WaitAsync(Bound);
            var sequence = new ReadOnlySequence<byte>(header);
            Assert.True(NbdRequest.TryRead(ref sequence, out NbdRequest request));
            byte[] payload = new byte[request.HasPayloadIn(extended: false) ? request.Length : 0];
            await Stream.ReadExactlyAsync(payload).AsTask().WaitAsync(Bound);
            return (request, payload);
        }

        public Task SendAsync(byte[] bytes) => Stream.WriteAsync(bytes).AsTask().WaitAsync(Bound);

        public void Close() => _socket?.Dispose();

        public static byte[] Simple(ulong cookie, NbdError error) => Build(w => Replies.WriteSimple(w, cookie, error));

        public static byte[] Done(ulong cookie) => Build(w => Replies.WriteDone(w, new ReplyTo(cookie)));

        public static byte[] Data(ulong cookie, ulong offset, byte[] data, bool done) => Build(w => Replies.WriteOffsetData(w, new ReplyTo(cookie), done, offset, data));

        public static byte[] Hole(ulong cookie, ulong offset, uint length, bool done) => Build(w => Replies.WriteOffsetHole(w, new ReplyTo(cookie), done, offset, length));

        public static byte[] Error(ulong cookie, NbdError error, string message, ulong offset, bool done)
        {
            // Replies.WriteError always sets DONE; a test also needs an error that is not the last chunk.
            byte[] text = Encoding.UTF8.GetBytes(message);
            byte[] payload = new byte[6 + text.Length + 8];
            BinaryPrimitives.WriteUInt32BigEndian(payload, (uint)error);
            BinaryPrimitives.WriteUInt16BigEndian(payload.AsSpan(4), (ushort)text.Length);
            text.CopyTo(payload, 6);
            BinaryPrimitives.WriteUInt64BigEndian(payload.AsSpan(6 + text.Length), offset);
            return Build(w =>
            {
                Replies.WriteChunkHeader(w, new ReplyTo(cookie), done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.ErrorOffset, (uint)payload.Length);
                w.Write(payload);
            });
        }

        private static byte[] Build(Action<ArrayBufferWriter<byte>> write)
        {
            var writer = new ArrayBufferWriter<byte>();
            write(writer);
            return writer.WrittenSpan.ToArray();
        }

        public ValueTask DisposeAsync()
        {
            _listener.Stop();
            _socket?.Dispose();
            return ValueTask.CompletedTask;
        }
    }
}

/// <summary>
/// Serial (<see cref="Protocol.NbdServerCollection"/>): it counts the bytes the process allocates,
/// which another test running beside it would add to.
/// </summary>
[Collection(Protocol.NbdServerCollection.Name)]
public sealed class PeerNbdClientAllocationTests
{
    private const int KiB = 1024;

    [Theory]
    [InlineData(false)]
    [InlineData(true)] // the holes kept as segments (ReadSegmentsAsync), as a forwarding node reads
    public async Task Read_replies_are_parsed_and_received_without_allocating(bool segmented)
    {
        const int Reads = 1000;
        await using var owner = new PeerNbdClientTests.ScriptedOwner();
        await using PeerNbdClient client = await owner.ConnectAsync();
        byte[][] buffers = [.. Enumerable.Range(0, Reads).Select(_ => new byte[4 * KiB])];
        Extent[][] segments = [.. Enumerable.Range(0, Reads).Select(_ => new Extent[3])];
        byte[] data = PeerNbdClientTests.Pattern(2 * KiB, 11);
        var reads = new ValueTask[Reads];
        var segmentedReads = new ValueTask<int>[Reads];
        var allocated = new List<long>();

        // Round 0 fills the pools (requests, state machines); the others are measured. Another
        // thread of the process (the test runner's) may allocate meanwhile: the least is checked.
        for (int round = 0; round < 4; round++)
        {
            client.Cork();
            for (int i = 0; i < Reads; i++)
            {
                if (segmented)
                {
                    segmentedReads[i] = client.ReadSegmentsAsync(i * 4L * KiB, buffers[i], segments[i]);
                }
                else
                {
                    reads[i] = client.ReadAsync(i * 4L * KiB, buffers[i]);
                }
            }
            client.Uncork();
            var replies = new ArrayBufferWriter<byte>();
            for (int i = 0; i < Reads; i++)
            {
                (NbdRequest request, _) = await owner.ReceiveAsync();
                // Data for the first half, a hole for the second: both chunk paths.
                Replies.WriteOffsetData(replies, new ReplyTo(request.Cookie), done: false, request.Offset, data);
                Replies.WriteOffsetHole(replies, new ReplyTo(request.Cookie), done: true, request.Offset + 2 * KiB, 2 * KiB);
            }
            byte[] bytes = replies.WrittenSpan.ToArray();

            // Off the test's synchronization context, which would allocate to post each continuation.
            allocated.Add(await Task.Run(async () =>
            {
                long before = GC.GetTotalAllocatedBytes(precise: true);
                await owner.SendAsync(bytes);
                for (int i = 0; i < Reads; i++)
                {
                    if (segmented)
                    {
                        await segmentedReads[i];
                    }
                    else
                    {
                        await reads[i];
                    }
                }
                return GC.GetTotalAllocatedBytes(precise: true) - before;
            }));
        }

        // A plain read zero-fills the hole; a segmented one leaves its bytes alone and says where it is.
        Assert.All(buffers, b => Assert.True(b.AsSpan(0, 2 * KiB).SequenceEqual(data) && (segmented || b.AsSpan(2 * KiB).IndexOfAnyExcept((byte)0) < 0)));
        if (segmented)
        {
            Assert.All(segments, s => Assert.Equal([new Extent(2 * KiB, ExtentFlags.Data), new Extent(2 * KiB, ExtentFlags.Hole)], s[..2]));
        }
        // A few hundred bytes in all when nothing regresses; one delegate or box per chunk is 64 KB and more.
        long least = allocated.Skip(1).Min();
        Assert.True(least < Reads * 16, $"{least} bytes allocated for {Reads} read replies (rounds: {string.Join(", ", allocated)})");
    }
}
