using System.Text.RegularExpressions;
using Gateway.Actors.Nbd;

namespace Gateway.Actors.Exports;

/// <summary>The durable definition of an export, as created through the admin API.</summary>
/// <remarks><paramref name="Incarnation"/> is given by the registry when the export is created and
/// never reused: an export removed and created again under its name is another incarnation, and
/// a connection opened on the old one is refused by the new one (<c>ExportEntity</c>), never
/// served its data. Exports created before incarnations existed have none.</remarks>
public sealed record ExportSpec(string Name, long Size, BackendSpec Backend, bool ReadOnly, string? Description, ExportAccess? Access = null,
    string? Incarnation = null);

/// <summary>
/// Where an export's data lives. <c>file</c>: a sparse raw file (Path relative to the data folder,
/// or absolute). <c>overlay</c>: a chain of <see cref="Layers"/> (ids under data/layers, top first)
/// over an optional raw or qcow2 <see cref="BaseImage"/> (its format detected from its header, or
/// forced by <see cref="BaseFormat"/>, which the header must then agree with); <see cref="Base"/>
/// names the export it was made on.
/// <c>s3</c>: objects in a bucket, as <see cref="S3"/> says.
/// </summary>
public sealed record BackendSpec(string Type, string? Path = null, string[]? Layers = null, string? Base = null, string? BaseImage = null, S3Spec? S3 = null,
    string? BaseFormat = null)
{
    public const string File = "file";
    public const string Overlay = "overlay";
    public const string S3Type = "s3";

    // Arrays compare by content, so specs read back from the journal equal the ones written.
    public bool Equals(BackendSpec? other) =>
        other is not null && Type == other.Type && Path == other.Path && Base == other.Base && BaseImage == other.BaseImage && BaseFormat == other.BaseFormat &&
        (Layers ?? []).SequenceEqual(other.Layers ?? []) && S3 == other.S3;

    public override int GetHashCode() => HashCode.Combine(Type, Path, Base, BaseImage, BaseFormat, Layers?.Length, S3);
}

public static partial class ExportRules
{
    public const long MaxSize = 1L << 50; // 1 PiB: beyond that a typo, not a disk.

    /// <summary>Checks a spec from a client; returns the problem, or null when it is acceptable.</summary>
    public static string? Validate(ExportSpec spec)
    {
        if (string.IsNullOrEmpty(spec.Name))
        {
            return "name is required";
        }
        if (!NamePattern().IsMatch(spec.Name))
        {
            return $"name '{spec.Name}' is invalid: use 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-'";
        }
        if (spec.Size <= 0)
        {
            return $"size {spec.Size} is invalid: it must be a positive number of bytes";
        }
        if (spec.Size > MaxSize)
        {
            return $"size {spec.Size} is over the limit of {MaxSize} bytes";
        }
        if (spec.Backend.Type is not (BackendSpec.File or BackendSpec.Overlay or BackendSpec.S3Type))
        {
            return $"backend type '{spec.Backend.Type}' is not supported (supported: file, overlay, s3)";
        }
        if (S3Rules.Validate(spec) is string s3Problem)
        {
            return s3Problem;
        }
        if (OverlayRules.Validate(spec) is string overlayProblem)
        {
            return overlayProblem;
        }
        if (spec.Access?.Validate() is string accessProblem)
        {
            return accessProblem;
        }
        // Bytes on the wire (NBD_INFO_DESCRIPTION, NBD_REP_SERVER), not characters.
        if (spec.Description is { } description && System.Text.Encoding.UTF8.GetByteCount(description) > Nbd.NbdLimits.MaxString)
        {
            return $"description is {System.Text.Encoding.UTF8.GetByteCount(description)} bytes in UTF-8, over the limit of {Nbd.NbdLimits.MaxString}";
        }
        return null;
    }

    [GeneratedRegex("^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
    private static partial Regex NamePattern();
}
