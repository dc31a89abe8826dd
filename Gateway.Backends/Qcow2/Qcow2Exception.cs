namespace Gateway.Backends.Qcow2;

/// <summary>
/// An image the gateway will not read: a format feature it does not serve (encryption, an unknown
/// incompatible feature, a dirty or corrupt mark) or metadata that does not hold together (an
/// offset out of the file, a table too large, a loop in the backing chain). Raised at open where
/// the header and L1 table tell, or at the read that meets a bad L2 entry; never a wrong byte.
/// </summary>
public sealed class Qcow2Exception(string path, string reason, Exception? inner = null)
    : Exception($"image '{path}': {reason}", inner)
{
    /// <summary>The file whose metadata was refused (an image of the chain, not always the top).</summary>
    public string ImagePath { get; } = path;

    public string Reason { get; } = reason;
}
