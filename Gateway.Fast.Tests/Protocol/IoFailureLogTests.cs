using Gateway.Actors.Nbd;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>Each distinct EIO of an export is logged once, then at most once a minute with a count.</summary>
public sealed class IoFailureLogTests
{
    [Fact]
    public void A_repeated_failure_is_logged_once_then_once_a_minute_with_the_repeats_counted()
    {
        string export = $"log-{Guid.NewGuid():N}";
        const string Missing = "S3 object disk/0000000000000003 is missing although it was stored: refusing to read it as zeros";
        long t0 = 1_000_000;
        Assert.True(IoFailureLog.ShouldLog(export, Missing, t0, out long repeats));
        Assert.Equal(0, repeats);
        for (int i = 1; i <= 500; i++)
        {
            Assert.False(IoFailureLog.ShouldLog(export, Missing, t0 + i, out repeats));
        }
        Assert.Equal(500, repeats);
        Assert.True(IoFailureLog.ShouldLog(export, Missing, t0 + (long)IoFailureLog.Interval.TotalMilliseconds + 1, out repeats));
        Assert.Equal(500, repeats);
        Assert.False(IoFailureLog.ShouldLog(export, Missing, t0 + (long)IoFailureLog.Interval.TotalMilliseconds + 2, out repeats));
        Assert.Equal(1, repeats);
    }

    [Fact]
    public void Another_chunk_or_another_export_is_logged_on_its_own()
    {
        string export = $"log-{Guid.NewGuid():N}";
        long t0 = 5_000_000;
        Assert.True(IoFailureLog.ShouldLog(export, "S3 GET of disk/0000000000000001 failed: S3 answered 404 with error code 'NotFound'", t0, out _));
        Assert.True(IoFailureLog.ShouldLog(export, "S3 GET of disk/0000000000000002 failed: S3 answered 404 with error code 'NotFound'", t0, out _));
        Assert.True(IoFailureLog.ShouldLog(export + "-other", "S3 GET of disk/0000000000000001 failed: S3 answered 404 with error code 'NotFound'", t0, out _));
        Assert.False(IoFailureLog.ShouldLog(export, "S3 GET of disk/0000000000000002 failed: S3 answered 404 with error code 'NotFound'", t0 + 10, out _));
    }
}
