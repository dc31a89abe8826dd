using Gateway.Host;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>
/// Issue 17 (fencing): the owners' leases in PostgreSQL. A lease is taken only once its holder
/// released it or let it run out, and a holder whose lease another node took cannot renew it.
/// Needs GATEWAY_TEST_POSTGRES (./ops/test starts a server); fails without it.
/// </summary>
public sealed class PostgresExportLeasesTests : IAsyncLifetime
{
    private static readonly TimeSpan Long = TimeSpan.FromSeconds(30);
    private readonly PostgresExportLeases _leases = new(Environment.GetEnvironmentVariable("GATEWAY_TEST_POSTGRES") is { Length: > 0 } postgres
        ? postgres
        : throw new InvalidOperationException("GATEWAY_TEST_POSTGRES is not set: the lease tests need a PostgreSQL server (./ops/test starts one)"));

    private readonly string _export = "lease-" + Guid.NewGuid().ToString("N");

    [Fact]
    public async Task A_held_lease_is_refused_to_another_node_until_released_and_then_its_old_holder_cannot_renew_it()
    {
        Assert.True(await _leases.TryAcquireAsync(_export, "gw1", 1, Long, default));
        Assert.False(await _leases.TryAcquireAsync(_export, "gw2", 2, Long, default));
        Assert.True(await _leases.RenewAsync(_export, "gw1", 1, Long, default));

        await _leases.ReleaseAsync(_export, "gw1", 1, default);
        Assert.True(await _leases.TryAcquireAsync(_export, "gw2", 2, Long, default));
        Assert.False(await _leases.RenewAsync(_export, "gw1", 1, Long, default));
        Assert.True(await _leases.RenewAsync(_export, "gw2", 2, Long, default));
        // A release by a holder that lost the lease releases nothing.
        await _leases.ReleaseAsync(_export, "gw1", 1, default);
        Assert.False(await _leases.TryAcquireAsync(_export, "gw3", 3, Long, default));
    }

    [Fact]
    public async Task A_lease_left_to_run_out_is_taken_over_and_the_frozen_holder_cannot_renew_it()
    {
        // 2 s: the second acquire must come before it runs out, also on a loaded machine (with
        // 300 ms it once came after, with a build running beside it).
        Assert.True(await _leases.TryAcquireAsync(_export, "gw1", 1, TimeSpan.FromSeconds(2), default));
        Assert.False(await _leases.TryAcquireAsync(_export, "gw2", 2, Long, default));
        await Task.Delay(2500);
        Assert.True(await _leases.TryAcquireAsync(_export, "gw2", 2, Long, default));
        Assert.False(await _leases.RenewAsync(_export, "gw1", 1, Long, default));
    }

    [Fact]
    public async Task Renewing_a_lease_keeps_it_past_its_first_time_to_live()
    {
        TimeSpan ttl = TimeSpan.FromMilliseconds(800);
        Assert.True(await _leases.TryAcquireAsync(_export, "gw1", 1, ttl, default));
        for (int i = 0; i < 4; i++)
        {
            await Task.Delay(300);
            Assert.True(await _leases.RenewAsync(_export, "gw1", 1, ttl, default));
        }
        Assert.False(await _leases.TryAcquireAsync(_export, "gw2", 2, ttl, default));
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _leases.DisposeAsync();
}
