using System.Globalization;

namespace Gateway.Host;

/// <summary>Sizes as people write them: bytes, or with a binary suffix (K, M, G, T; KiB, MiB...).</summary>
public static class Sizes
{
    public static bool TryParse(string text, out long bytes)
    {
        bytes = 0;
        text = text.Trim();
        int end = text.Length;
        while (end > 0 && char.IsLetter(text[end - 1]))
        {
            end--;
        }
        string suffix = text[end..].ToUpperInvariant();
        int shift = suffix switch
        {
            "" or "B" => 0,
            "K" or "KB" or "KIB" => 10,
            "M" or "MB" or "MIB" => 20,
            "G" or "GB" or "GIB" => 30,
            "T" or "TB" or "TIB" => 40,
            _ => -1,
        };
        if (shift < 0 || !long.TryParse(text.AsSpan(0, end), NumberStyles.None, CultureInfo.InvariantCulture, out long number))
        {
            return false;
        }
        if (number > long.MaxValue >> shift)
        {
            return false;
        }
        bytes = number << shift;
        return true;
    }

    public static string Format(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        int unit = 0;
        double value = bytes;
        while (value >= 1024 && unit < units.Length - 1 && bytes % (1L << (10 * (unit + 1))) == 0)
        {
            value /= 1024;
            unit++;
        }
        return $"{value.ToString(CultureInfo.InvariantCulture)} {units[unit]}";
    }
}
