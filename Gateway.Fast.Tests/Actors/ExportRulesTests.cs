using Gateway.Actors.Exports;
using Xunit;

namespace Gateway.Tests.Actors;

/// <summary>What the admin API refuses before anything is created (<see cref="ExportRules.Validate"/>).</summary>
public sealed class ExportRulesTests
{
    private static ExportSpec Spec(string name = "vm1", long size = 1 << 20, string? description = null) =>
        new(name, size, new BackendSpec(BackendSpec.File), ReadOnly: false, description);

    [Fact]
    public void A_description_is_limited_to_4096_bytes_of_UTF_8_not_4096_characters()
    {
        Assert.Null(ExportRules.Validate(Spec(description: new string('a', 4096))));
        // 2,100 characters of two bytes each: under 4096 characters, over 4096 bytes on the wire.
        string? problem = ExportRules.Validate(Spec(description: new string('é', 2100)));
        Assert.NotNull(problem);
        Assert.Contains("4200 bytes", problem);
    }

    [Theory]
    [InlineData("", "name is required")]
    [InlineData("-vm", "is invalid")]
    [InlineData("vm/1", "is invalid")]
    public void Bad_names_are_refused_with_what_is_wrong(string name, string expected) =>
        Assert.Contains(expected, ExportRules.Validate(Spec(name: name)) ?? "accepted");

    [Theory]
    [InlineData(0)]
    [InlineData(-1)]
    [InlineData((1L << 50) + 1)]
    public void Sizes_out_of_range_are_refused(long size) =>
        Assert.Contains("size", ExportRules.Validate(Spec(size: size)) ?? "accepted");
}
