using Gateway.Backends.Overlay;
using Gateway.Backends.Qcow2;
using System.Text.RegularExpressions;

namespace Gateway.Actors.Exports;

/// <summary>Checks on the overlay parts of an export spec.</summary>
public static partial class OverlayRules
{
    public static bool IsOverlay(this ExportSpec spec) => spec.Backend.Type == BackendSpec.Overlay;

    /// <summary>The problem with a spec's overlay fields, or null.</summary>
    public static string? Validate(ExportSpec spec)
    {
        BackendSpec backend = spec.Backend;
        if (!spec.IsOverlay())
        {
            return backend.Layers is not null || backend.Base is not null || backend.BaseImage is not null || backend.BaseFormat is not null
                ? "base, baseImage, baseFormat and layers apply to backend type overlay only"
                : null;
        }
        if (backend.Path is not null)
        {
            return "an overlay has no path: its layers live under data/layers (use baseImage for a raw or qcow2 image below it)";
        }
        // A request names one or the other; the chain the registry completes from a base that is
        // a file export (or has a raw image) records both, with its layers, and must pass too.
        if (backend.Base is not null && backend.BaseImage is not null && backend.Layers is null)
        {
            return "give base (an export) or baseImage (a raw file), not both";
        }
        if (backend.BaseFormat is { } format && format is not (ImageFormat.Raw or ImageFormat.Qcow2))
        {
            return $"baseFormat '{format}' is not supported: give raw or qcow2, or leave it out to detect the format from the image's header";
        }
        if (backend.BaseFormat is not null && backend.BaseImage is null)
        {
            return "baseFormat applies to a baseImage only (a base export's format is its own)";
        }
        if (backend.BaseImage is { } image && S3ImageLocation.IsS3Name(image))
        {
            if (S3ImageLocation.Split(image) is not (string bucket, _))
            {
                return $"baseImage '{image}' is invalid: give s3://BUCKET/KEY";
            }
            if (bucket.Length is < 3 or > 63 || bucket.Any(c => !(char.IsAsciiLetterLower(c) || char.IsAsciiDigit(c) || c is '-' or '.')))
            {
                return $"baseImage '{image}' is invalid: bucket '{bucket}' must be 3-63 lower-case letters, digits, '-' or '.'";
            }
            if (backend.S3 is null)
            {
                return $"baseImage '{image}' is an S3 object: give s3 settings with its endpoint (and region and credentials if needed)";
            }
        }
        if (backend.Base is { } name && !NamePattern().IsMatch(name))
        {
            return $"base '{name}' is not a valid export name";
        }
        if (backend.Layers is { } layers && (layers.Length == 0 || layers.Any(id => !NamePattern().IsMatch(id))))
        {
            return "layers must be a non-empty list of layer ids";
        }
        return null;
    }

    /// <summary>A new layer id: the export's name and a random suffix, so ids never repeat even when names do.</summary>
    public static string NewLayerId(string exportName) => $"{exportName}.{Guid.NewGuid():N}"[..Math.Min(exportName.Length + 13, 140)];

    [GeneratedRegex("^[A-Za-z0-9_][A-Za-z0-9._-]{0,140}$")]
    private static partial Regex NamePattern();
}
