using Gateway.Actors.Exports;
using Gateway.Backends;
using Gateway.Tests.Protocol;
using Xunit;

namespace Gateway.Tests.Actors;

/// <summary>
/// The flush of a graceful stop tries again while the store fails with EIO (what it does not
/// store is lost once the export closes), within its budget; refusals are not tried again.
/// </summary>
public sealed class FinalFlushTests
{
    private static readonly BlockDeviceException Unreachable = new(BlockErrorKind.Io, "S3 PUT of x failed: Connection refused");

    [Fact]
    public async Task A_store_that_fails_twice_then_answers_is_flushed_at_the_third_attempt_and_the_log_says_so()
    {
        var device = new TestDevice(new MemoryBackend(1 << 20)) { FlushFailure = n => n <= 2 ? Unreachable : null };
        var warnings = new List<string>();

        await FinalFlush.RunAsync(device, "vm", warnings.Add);

        Assert.Equal(3, device.Flushes);
        Assert.Equal(2, warnings.Count);
        Assert.Contains("Final flush of export vm failed (attempt 1): S3 PUT of x failed: Connection refused", warnings[0]);
        Assert.Contains("succeeded at attempt 3", warnings[1]);
    }

    [Fact]
    public async Task A_store_that_keeps_failing_is_given_up_after_the_budget_with_its_last_error()
    {
        var device = new TestDevice(new MemoryBackend(1 << 20)) { FlushFailure = _ => Unreachable };
        var warnings = new List<string>();

        BlockDeviceException e = await Assert.ThrowsAsync<BlockDeviceException>(() => FinalFlush.RunAsync(device, "vm", warnings.Add, TimeSpan.FromSeconds(1)));

        Assert.Same(Unreachable, e);
        // Pauses of 0.25 s and 0.5 s fit in 1 s, the next (1 s) does not: three attempts (two if
        // the machine is slow enough that the first pause overran by 0.25 s).
        Assert.InRange(device.Flushes, 2, 3);
        Assert.Single(warnings);
    }

    [Theory]
    [InlineData(BlockErrorKind.Shutdown)]
    [InlineData(BlockErrorKind.NoSpace)]
    [InlineData(BlockErrorKind.ReadOnly)]
    public async Task A_refusal_or_any_error_but_EIO_is_not_tried_again(BlockErrorKind kind)
    {
        var refused = new BlockDeviceException(kind, "refused");
        var device = new TestDevice(new MemoryBackend(1 << 20)) { FlushFailure = _ => refused };
        var warnings = new List<string>();

        Assert.Same(refused, await Assert.ThrowsAsync<BlockDeviceException>(() => FinalFlush.RunAsync(device, "vm", warnings.Add)));

        Assert.Equal(1, device.Flushes);
        Assert.Empty(warnings);
    }
}
