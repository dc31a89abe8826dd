using Gateway.Actors;
using Akka.Actor;
using Gateway.Actors.Bitmaps;
using Gateway.Actors.Exports;
using Xunit;

namespace Gateway.Tests.Bitmaps;

public sealed class DirtyBitmapTests
{
    private const int K64 = 64 * 1024;

    [Fact]
    public void A_write_inside_a_granule_dirties_that_whole_granule_only()
    {
        var bits = new DirtyBitmap(1 << 20, K64);
        bits.SetRange(K64 + 100, 10);
        Assert.Equal(K64, bits.DirtyBytes);
        Assert.True(bits.IsDirty(K64, K64));
        Assert.False(bits.IsDirty(0, K64));
        Assert.False(bits.IsDirty(K64, K64 + 1));
    }

    [Fact]
    public void A_write_across_a_boundary_dirties_both_granules()
    {
        var bits = new DirtyBitmap(1 << 20, K64);
        bits.SetRange(K64 - 1, 2);
        Assert.Equal([(0L, 2L)], bits.DirtyRuns());
    }

    [Fact]
    public void Ranges_spanning_many_words_set_and_check_every_granule()
    {
        var bits = new DirtyBitmap(1L << 30, 512);
        bits.SetRange(512 * 60, 512 * 200);
        Assert.Equal([(60L, 200L)], bits.DirtyRuns());
        Assert.True(bits.IsDirty(512 * 60, 512 * 200));
        Assert.False(bits.IsDirty(512 * 59, 512 * 2));
        Assert.False(bits.IsDirty(512 * 259, 512 * 2));
    }

    [Fact]
    public void Dirty_bytes_of_a_partial_last_granule_stop_at_the_export_end()
    {
        var bits = new DirtyBitmap(K64 + 4096, K64);
        bits.SetRange(K64, 10);
        Assert.Equal(4096, bits.DirtyBytes);
        bits.SetRange(0, 1);
        Assert.Equal(K64 + 4096, bits.DirtyBytes);
    }

    [Fact]
    public void Clear_makes_every_granule_clean()
    {
        var bits = new DirtyBitmap(1 << 20, 4096);
        bits.SetRange(0, 1 << 20);
        bits.Clear();
        Assert.Equal(0, bits.DirtyBytes);
        Assert.Empty(bits.DirtyRuns());
    }

    [Fact]
    public void Merge_from_a_coarser_bitmap_marks_every_finer_granule_it_covers()
    {
        var coarse = new DirtyBitmap(8 << 20, 1 << 20);
        coarse.SetRange((3 << 20) + 5, 1);
        var fine = new DirtyBitmap(8 << 20, K64);
        fine.MergeFrom(coarse);
        Assert.Equal([(48L, 16L)], fine.DirtyRuns());
    }

    [Fact]
    public void Merge_from_a_finer_bitmap_marks_the_coarser_granule_that_contains_it()
    {
        var fine = new DirtyBitmap(8 << 20, 512);
        fine.SetRange((2 << 20) + 1024, 512);
        fine.SetRange((5 << 20) - 512, 1024); // straddles the 5 MiB boundary
        var coarse = new DirtyBitmap(8 << 20, 1 << 20);
        coarse.MergeFrom(fine);
        Assert.Equal([(2L, 1L), (4L, 2L)], coarse.DirtyRuns());
    }

    [Fact]
    public void Extents_alternate_clean_and_dirty_and_are_clipped_to_the_request()
    {
        var bits = new DirtyBitmap(1 << 20, K64);
        bits.SetRange(K64, K64 * 2);
        Span<long> lengths = stackalloc long[8];
        Span<bool> dirty = stackalloc bool[8];
        int n = bits.GetExtents(1000, 3 * K64, lengths, dirty);
        Assert.Equal(3, n);
        Assert.Equal([K64 - 1000, 2 * K64, 1000], lengths[..n].ToArray());
        Assert.Equal([false, true, false], dirty[..n].ToArray());
    }

    [Theory]
    [InlineData(256, false)]
    [InlineData(512, true)]
    [InlineData(3000, false)]
    [InlineData(65536, true)]
    [InlineData(16 << 20, true)]
    [InlineData(32 << 20, false)]
    public void Granularity_must_be_a_power_of_two_from_512_bytes_to_16_MiB(long granularity, bool valid) =>
        Assert.Equal(valid, DirtyBitmap.IsValidGranularity(granularity));
}

public sealed class BitmapStateTests
{
    private const long Size = 16 << 20;

    private static BitmapState Run(BitmapState state, IBitmapCommand command)
    {
        (IBitmapEvent? e, BitmapResult? error) = state.Decide(command);
        Assert.Null(error);
        return e is null ? state : state.Apply(e);
    }

    [Fact]
    public void Duplicate_name_is_a_conflict_and_bad_granularity_is_invalid()
    {
        BitmapState state = Run(BitmapState.Empty(Size), new AddBitmap("d", "b", 65536, true));
        Assert.Equal(ExportErrorKind.Conflict, state.Decide(new AddBitmap("d", "b", 65536, true)).Error?.Error);
        BitmapResult? bad = state.Decide(new AddBitmap("d", "c", 1000, true)).Error;
        Assert.Equal(ExportErrorKind.Invalid, bad?.Error);
        Assert.Contains("granularity 1000", bad?.Message);
        Assert.Equal(ExportErrorKind.NotFound, state.Decide(new ClearBitmap("d", "zz")).Error?.Error);
        Assert.Contains("'zz'", state.Decide(new MergeBitmaps("d", "b", ["zz"])).Error?.Message);
    }

    [Fact]
    public void Dirtied_ranges_mark_enabled_bitmaps_only()
    {
        BitmapState state = Run(BitmapState.Empty(Size), new AddBitmap("d", "on", 65536, true));
        state = Run(state, new AddBitmap("d", "off", 65536, false));
        state = state.Apply(new GranulesDirtied([0, 4096]));
        Assert.Equal(65536, state.Bitmaps["on"].Bits.DirtyBytes);
        Assert.Equal(0, state.Bitmaps["off"].Bits.DirtyBytes);
    }

    [Fact]
    public void Enable_of_an_enabled_bitmap_records_nothing()
    {
        BitmapState state = Run(BitmapState.Empty(Size), new AddBitmap("d", "b", 65536, true));
        Assert.Equal((null, null), state.Decide(new SetBitmapEnabled("d", "b", true)));
    }

    [Fact]
    public void Snapshot_round_trips_definitions_and_bits()
    {
        BitmapState state = Run(BitmapState.Empty(Size), new AddBitmap("d", "a", 4096, true));
        state = Run(state, new AddBitmap("d", "b", 1 << 20, false));
        state = state.Apply(new GranulesDirtied([0, 1, 8192, 100_000, 15 << 20, 1 << 20]));
        BitmapState back = BitmapState.FromSnapshot(Size, state.ToSnapshot());
        Assert.Equal(state.Bitmaps.Keys, back.Bitmaps.Keys);
        foreach (BitmapEntry entry in state.Bitmaps.Values)
        {
            Assert.Equal(entry.Enabled, back.Bitmaps[entry.Name].Enabled);
            Assert.Equal(entry.Granularity, back.Bitmaps[entry.Name].Granularity);
            Assert.Equal(entry.Bits.DirtyRuns(), back.Bitmaps[entry.Name].Bits.DirtyRuns());
        }
    }

    [Fact]
    public void Coalesce_sorts_and_joins_overlapping_and_adjacent_ranges()
    {
        Assert.Equal([0L, 300, 1000, 10], BitmapState.Coalesce([(200, 100), (0, 100), (1000, 10), (100, 150)]));
    }
}

public sealed class BitmapSerializerTests : Akka.TestKit.Xunit2.TestKit
{
    public static TheoryData<IBitmapPersisted> Persisted => new()
    {
        new BitmapAdded("b", 65536, true),
        new BitmapRemoved("b"),
        new BitmapCleared("b"),
        new BitmapEnabledChanged("b", false),
        new BitmapsMerged("t", ["a", "b"]),
        new GranulesDirtied([4096, 4096, 1L << 40, 65536]),
        new BitmapsSnapshot([new BitmapSnapshotEntry("b", 512, true, [0, 3, 100, 1]), new BitmapSnapshotEntry("c", 1 << 24, false, [])]),
    };

    [Theory]
    [MemberData(nameof(Persisted))]
    public void Events_and_snapshots_round_trip_through_the_binary_serializer(IBitmapPersisted value)
    {
        var serializer = new BitmapSerializer((ExtendedActorSystem)Sys);
        object back = serializer.FromBinary(serializer.ToBinary(value), serializer.Manifest(value));
        Assert.Equal(Describe(value), Describe(back));
    }

    private static string Describe(object o) => o switch
    {
        BitmapsMerged m => $"merge {m.Target} <- {string.Join(',', m.Sources)}",
        GranulesDirtied d => $"dirtied {string.Join(',', d.Ranges)}",
        BitmapsSnapshot s => "snapshot " + string.Join(';', s.Bitmaps.Select(b => $"{b.Name}/{b.Granularity}/{b.Enabled}/{string.Join(',', b.Runs)}")),
        _ => o.ToString()!,
    };
}
