using System.CommandLine;
using System.Globalization;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;

namespace Gateway.Host;

/// <summary><c>gateway bitmap ...</c>: the bitmap endpoints of the admin API from the command line.</summary>
public sealed class BitmapCli(Uri admin, TextWriter stdout, TextWriter stderr) : AdminClient(admin, stdout, stderr)
{
    /// <summary>The <c>bitmap</c> command tree; <paramref name="adminUrl"/> is the shared <c>--admin URL</c> option.</summary>
    public static Command Build(Option<string> adminUrl)
    {
        var export = new Argument<string>("export") { Description = "Export name" };
        var name = new Argument<string>("name") { Description = "Bitmap name" };
        var bitmap = new Command("bitmap", "Manage the dirty bitmaps of an export through the admin API");
        bitmap.Options.Add(adminUrl);
        bitmap.Options.Add(CliAuth.TokenFile);

        var list = new Command("list", "List an export's bitmaps: name, granularity, enabled, dirty bytes");
        list.Arguments.Add(export);
        list.SetAction((p, ct) => Cli(p, adminUrl).ListAsync(p.GetValue(export)!, ct));
        bitmap.Subcommands.Add(list);

        var granularity = new Option<string>("--granularity") { Description = "Granule size: a power of two from 512 to 16M (default 64K)" };
        var disabled = new Option<bool>("--disabled") { Description = "Create it disabled (records nothing until enabled)" };
        var add = new Command("add", "Add a bitmap (enabled unless --disabled)");
        add.Arguments.Add(export);
        add.Arguments.Add(name);
        add.Options.Add(granularity);
        add.Options.Add(disabled);
        add.SetAction((p, ct) => Cli(p, adminUrl).AddAsync(p.GetValue(export)!, p.GetValue(name)!, p.GetValue(granularity), !p.GetValue(disabled), ct));
        bitmap.Subcommands.Add(add);

        foreach ((string verb, string description) in new[]
                 {
                     ("remove", "Remove a bitmap"),
                     ("clear", "Mark every granule clean"),
                     ("enable", "Record changes again"),
                     ("disable", "Stop recording changes (the bits are kept)"),
                 })
        {
            var command = new Command(verb, description);
            command.Arguments.Add(export);
            command.Arguments.Add(name);
            command.SetAction((p, ct) => Cli(p, adminUrl).ActAsync(verb, p.GetValue(export)!, p.GetValue(name)!, ct));
            bitmap.Subcommands.Add(command);
        }

        var target = new Argument<string>("target") { Description = "Bitmap to merge into" };
        var sources = new Argument<string[]>("source") { Description = "Bitmaps whose dirty granules are added to the target", Arity = ArgumentArity.OneOrMore };
        var merge = new Command("merge", "Add the dirty granules of the sources to the target (granularities may differ)");
        merge.Arguments.Add(export);
        merge.Arguments.Add(target);
        merge.Arguments.Add(sources);
        merge.SetAction((p, ct) => Cli(p, adminUrl).MergeAsync(p.GetValue(export)!, p.GetValue(target)!, p.GetValue(sources)!, ct));
        bitmap.Subcommands.Add(merge);
        return bitmap;
    }

    private static BitmapCli Cli(ParseResult parse, Option<string> adminUrl)
    {
        CliAuth.Configure(parse);
        return new BitmapCli(BaseUri(parse.GetValue(adminUrl)!), Console.Out, Console.Error);
    }

    private static string Path(string export, string? bitmap = null, string? verb = null) =>
        $"v1/exports/{Uri.EscapeDataString(export)}/bitmaps" + (bitmap is null ? "" : "/" + Uri.EscapeDataString(bitmap)) + (verb is null ? "" : "/" + verb);

    public async Task<int> ListAsync(string export, CancellationToken ct)
    {
        using HttpResponseMessage response = await SendAsync(HttpMethod.Get, Path(export), null, ct);
        if (!response.IsSuccessStatusCode)
        {
            return await FailAsync(response, ct);
        }
        BitmapDto[] bitmaps = await response.Content.ReadFromJsonAsync(BitmapJson.Default.BitmapDtoArray, ct) ?? [];
        var table = new StringBuilder();
        table.AppendLine(CultureInfo.InvariantCulture, $"{"NAME",-24} {"GRANULARITY",11} {"STATE",-8} {"DIRTY BYTES",14}");
        foreach (BitmapDto b in bitmaps)
        {
            table.AppendLine(CultureInfo.InvariantCulture, $"{b.Name,-24} {Sizes.Format(b.Granularity),11} {(b.Enabled ? "enabled" : "disabled"),-8} {b.DirtyBytes,14}");
        }
        await Stdout.WriteAsync(table.ToString());
        return 0;
    }

    public async Task<int> AddAsync(string export, string name, string? granularity, bool enabled, CancellationToken ct)
    {
        JsonElement? size = null;
        if (granularity is not null)
        {
            if (!Sizes.TryParse(granularity, out long bytes))
            {
                await Stderr.WriteLineAsync($"error: granularity '{granularity}' is invalid: give bytes, or a number with K or M (e.g. 64K)");
                return 2;
            }
            size = JsonSerializer.SerializeToElement(bytes);
        }
        using var content = JsonContent.Create(new CreateBitmapRequest(name, size, enabled), BitmapJson.Default.CreateBitmapRequest);
        using HttpResponseMessage response = await SendAsync(HttpMethod.Post, Path(export), content, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }

    public async Task<int> ActAsync(string verb, string export, string name, CancellationToken ct)
    {
        using HttpResponseMessage response = verb == "remove"
            ? await SendAsync(HttpMethod.Delete, Path(export, name), null, ct)
            : await SendAsync(HttpMethod.Post, Path(export, name, verb), null, ct);
        if (!response.IsSuccessStatusCode)
        {
            return await FailAsync(response, ct);
        }
        if (verb == "remove")
        {
            await Stdout.WriteLineAsync($"bitmap '{name}' removed from export '{export}'");
            return 0;
        }
        return await PrintBodyAsync(response, ct);
    }

    public async Task<int> MergeAsync(string export, string target, string[] sources, CancellationToken ct)
    {
        using var content = JsonContent.Create(new MergeBitmapsRequest(sources), BitmapJson.Default.MergeBitmapsRequest);
        using HttpResponseMessage response = await SendAsync(HttpMethod.Post, Path(export, target, "merge"), content, ct);
        return response.IsSuccessStatusCode ? await PrintBodyAsync(response, ct) : await FailAsync(response, ct);
    }
}
