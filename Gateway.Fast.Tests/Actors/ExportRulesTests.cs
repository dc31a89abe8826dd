using Gateway.Actors.Exports;
using Gateway.Backends.S3;
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
    private static ExportSpec S3(S3Spec s3) => new("vm1", 1 << 30, new BackendSpec(BackendSpec.S3Type, S3: s3), ReadOnly: false, null);

    private static S3Spec Log(long? readCache = null, long? readAhead = null, bool? writeLog = true) =>
        new("http://127.0.0.1:4568", "disks", "vm1", WriteLog: writeLog, ReadCacheBytes: readCache, ReadAheadBytes: readAhead);

    [Fact]
    public void A_write_log_exports_read_cache_and_read_ahead_reach_its_device_and_default_when_absent()
    {
        Assert.Null(ExportRules.Validate(S3(Log(readCache: 32 << 20, readAhead: 1 << 20))));
        S3DeviceOptions set = Log(readCache: 32 << 20, readAhead: 1 << 20).ToDeviceOptions();
        Assert.Equal(32 << 20, set.ReadCacheBytes);
        Assert.Equal(1 << 20, set.ReadAheadBytes);
        S3DeviceOptions unset = Log().ToDeviceOptions();
        Assert.Equal(new S3DeviceOptions().ReadCacheBytes, unset.ReadCacheBytes);
        Assert.Equal(new S3DeviceOptions().ReadAheadBytes, unset.ReadAheadBytes);
        // 0 turns either off.
        Assert.Null(ExportRules.Validate(S3(Log(readCache: 0, readAhead: 0))));
    }

    [Theory]
    [InlineData(4096L, null, true, "readCacheBytes 4096 is invalid")]
    [InlineData(-1L, null, true, "readCacheBytes -1 is invalid")]
    [InlineData(null, -1L, true, "readAheadBytes -1 is invalid")]
    [InlineData(1048576L, 2097152L, true, "readAheadBytes 2097152 is invalid")]
    [InlineData(1048576L, null, null, "are for writeLog exports")]
    [InlineData(null, 0L, false, "are for writeLog exports")]
    public void Bad_read_cache_settings_are_refused_with_what_is_wrong(long? readCache, long? readAhead, bool? writeLog, string expected) =>
        Assert.Contains(expected, ExportRules.Validate(S3(Log(readCache, readAhead, writeLog))) ?? "accepted");

    [Fact]
    public void A_write_log_exports_disk_cache_reaches_its_device_with_a_default_bound()
    {
        S3Spec set = Log() with { ReadDiskCachePath = "/var/cache/gateway/vm1", ReadDiskCacheBytes = 8L << 30 };
        Assert.Null(ExportRules.Validate(S3(set)));
        Assert.Equal("/var/cache/gateway/vm1", set.ToDeviceOptions().ReadDiskCachePath);
        Assert.Equal(8L << 30, set.ToDeviceOptions().ReadDiskCacheBytes);
        S3Spec folderOnly = Log() with { ReadDiskCachePath = "/var/cache/gateway/vm1" };
        Assert.Null(ExportRules.Validate(S3(folderOnly)));
        Assert.Equal(S3DeviceOptions.DefaultReadDiskCacheBytes, folderOnly.ToDeviceOptions().ReadDiskCacheBytes);
        Assert.Null(Log().ToDeviceOptions().ReadDiskCachePath);
    }

    [Theory]
    [InlineData(null, 1048576L, true, null, "readDiskCacheBytes needs readDiskCachePath")]
    [InlineData("/var/cache/vm1", null, null, null, "readDiskCachePath is for writeLog exports")]
    [InlineData("/var/cache/vm1", null, true, 0L, "needs the read cache")]
    [InlineData("cache/vm1", null, true, null, "readDiskCachePath 'cache/vm1' is invalid")]
    [InlineData("", null, true, null, "readDiskCachePath '' is invalid")]
    [InlineData("/var/cache/vm1", 4096L, true, null, "readDiskCacheBytes 4096 is invalid")]
    [InlineData("/var/cache/vm1", -1L, true, null, "readDiskCacheBytes -1 is invalid")]
    public void Bad_disk_cache_settings_are_refused_with_what_is_wrong(string? folder, long? bytes, bool? writeLog, long? readCache, string expected) =>
        Assert.Contains(expected, ExportRules.Validate(S3(Log(readCache, writeLog: writeLog) with { ReadDiskCachePath = folder, ReadDiskCacheBytes = bytes })) ?? "accepted");

    [Fact]
    public void An_s3_base_image_takes_no_disk_cache() =>
        Assert.Contains("takes s3 endpoint, region and credentials only",
            ExportRules.Validate(new ExportSpec("vm1", 1 << 30, new BackendSpec(BackendSpec.Overlay, BaseImage: "s3://images/debian.raw",
                S3: new S3Spec("http://127.0.0.1:4568", null, null, ReadDiskCachePath: "/var/cache/vm1")), ReadOnly: false, null)) ?? "accepted");
}
