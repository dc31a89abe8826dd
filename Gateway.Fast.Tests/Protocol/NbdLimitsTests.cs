using Gateway.Actors.Nbd;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>
/// The server's own limits, and how they sit against the spec's (whose golden test is
/// Gateway.Nbd.Tests' NbdConstantsTests).
/// </summary>
public sealed class NbdLimitsTests
{
    [Fact]
    public void Limits_hold_a_full_string_and_the_advertised_block_sizes()
    {
        Assert.Equal(64 * 1024 * 1024, NbdLimits.MaxPayload);
        Assert.Equal(1, NbdLimits.MinBlockSize);
        Assert.Equal(4096, NbdLimits.PreferredBlockSize);
        Assert.True(NbdLimits.MaxOptionLength >= NbdLimits.MaxString + 8, "an option must hold a full-length string and its framing");
        Assert.True(NbdLimits.MaxOptionDiscard >= NbdLimits.MaxOptionLength);
    }

    [Fact]
    public void Backends_report_allocation_with_the_spec_bits()
    {
        // The server forwards the backends' extent flags as base:allocation status bits unchanged.
        Assert.Equal((uint)AllocationState.Hole, (uint)Gateway.Backends.ExtentFlags.Hole);
        Assert.Equal((uint)AllocationState.Zero, (uint)Gateway.Backends.ExtentFlags.Zero);
    }
}
