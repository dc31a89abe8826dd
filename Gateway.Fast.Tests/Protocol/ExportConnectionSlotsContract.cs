using Gateway.Actors.Nbd;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// What every <see cref="IExportConnectionSlots"/> does, run against each implementation: the
/// node's own counter and the cluster's slots in PostgreSQL
/// (<c>Cluster.PostgresClusterConnectionSlotsTests</c>).
/// </summary>
public abstract class ExportConnectionSlotsContract
{
    protected string Export { get; } = "slots-" + Guid.NewGuid().ToString("N");

    /// <summary>A fresh implementation, holding no slot of <see cref="Export"/>.</summary>
    protected abstract IExportConnectionSlots Slots { get; }

    [Fact]
    public async Task Slots_up_to_the_limit_are_taken_and_the_next_is_refused()
    {
        IDisposable? first = await Slots.TryAcquireAsync(Export, 2, default);
        IDisposable? second = await Slots.TryAcquireAsync(Export, 2, default);
        Assert.NotNull(first);
        Assert.NotNull(second);
        Assert.Null(await Slots.TryAcquireAsync(Export, 2, default));
        // Another export's slots are its own.
        using IDisposable? other = await Slots.TryAcquireAsync(Export + "-other", 1, default);
        Assert.NotNull(other);
        first.Dispose();
        second.Dispose();
    }

    [Fact]
    public async Task A_released_slot_is_taken_again_and_a_second_release_frees_nothing_more()
    {
        IDisposable? first = await Slots.TryAcquireAsync(Export, 1, default);
        Assert.NotNull(first);
        Assert.Null(await Slots.TryAcquireAsync(Export, 1, default));
        first.Dispose();
        IDisposable? second = await Slots.TryAcquireAsync(Export, 1, default);
        Assert.NotNull(second);
        first.Dispose();
        Assert.Null(await Slots.TryAcquireAsync(Export, 1, default));
        second.Dispose();
    }

    [Fact]
    public async Task An_export_without_a_limit_always_gets_a_slot()
    {
        IDisposable?[] slots = await Task.WhenAll(Enumerable.Range(0, 5).Select(_ => Slots.TryAcquireAsync(Export, null, default).AsTask()));
        Assert.All(slots, Assert.NotNull);
        foreach (IDisposable? slot in slots)
        {
            slot!.Dispose();
        }
    }

    [Fact]
    public async Task Concurrent_claims_for_the_last_slot_let_exactly_one_in()
    {
        using IDisposable? held = await Slots.TryAcquireAsync(Export, 2, default);
        Assert.NotNull(held);
        for (int round = 0; round < 5; round++)
        {
            using var start = new ManualResetEventSlim();
            Task<IDisposable?>[] claims = [.. Enumerable.Range(0, 16).Select(_ => Task.Run(async () =>
            {
                start.Wait();
                return await Slots.TryAcquireAsync(Export, 2, default);
            }))];
            start.Set();
            IDisposable?[] results = await Task.WhenAll(claims);
            IDisposable[] won = [.. results.OfType<IDisposable>()];
            Assert.True(won.Length == 1, $"round {round}: {won.Length} of 16 concurrent claims for the last slot won");
            won[0].Dispose();
        }
    }
}

public sealed class ExportConnectionCounterTests : ExportConnectionSlotsContract
{
    protected override IExportConnectionSlots Slots { get; } = new ExportConnectionCounter();
}
