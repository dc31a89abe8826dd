namespace Gateway.Host;

/// <summary>JSON of <c>GET /v1/capacity</c>.</summary>
public sealed record CapacityDto(long AvailableBytes, long TotalBytes);

[System.Text.Json.Serialization.JsonSourceGenerationOptions(System.Text.Json.JsonSerializerDefaults.Web, WriteIndented = true)]
[System.Text.Json.Serialization.JsonSerializable(typeof(CapacityDto))]
public sealed partial class CapacityJson : System.Text.Json.Serialization.JsonSerializerContext;

/// <summary>
/// <c>GET /v1/capacity</c>: free and total bytes of the file system that holds this node's data
/// folder (file exports and overlay layers), for the CSI driver's GetCapacity. Files are sparse,
/// so an export may be larger than this; what can be written into it is bounded by it.
/// </summary>
public static class AdminCapacityApi
{
    public static WebApplication MapCapacityApi(this WebApplication app)
    {
        app.MapGet("/v1/capacity", (GatewayOptions options) =>
        {
            var drive = new DriveInfo(options.DataDirectory);
            return Results.Json(new CapacityDto(drive.AvailableFreeSpace, drive.TotalSize), CapacityJson.Default.CapacityDto);
        });
        return app;
    }
}
