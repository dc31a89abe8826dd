using System.CommandLine;
using Gateway.Host;
using Gateway.Backends.Qcow2;

var configOption = new Option<string?>("--config") { Description = "JSON configuration file (keys Gateway:Data, Gateway:Nbd, Gateway:Admin)" };
var dataOption = new Option<string?>("--data") { Description = $"Data folder: SQLite state and export files (default {GatewayOptions.DefaultData})" };
var nbdOption = new Option<string[]>("--nbd") { Description = $"NBD listen address HOST:PORT or unix:PATH, repeatable (default {GatewayOptions.DefaultNbd})" };
var adminOption = new Option<string?>("--admin") { Description = $"Admin HTTP listen address HOST:PORT (default {GatewayOptions.DefaultAdmin})" };

var serve = new Command("serve", "Run the gateway: NBD server and admin API");
serve.Options.Add(configOption);
serve.Options.Add(dataOption);
serve.Options.Add(nbdOption);
serve.Options.Add(adminOption);
SecurityCli.AddTo(serve);
ClusterCli.AddTo(serve);
serve.Options.Add(Health.Option);
serve.SetAction(async (parse, ct) =>
{
    bool inlineCompletions = SocketCompletions.Configure(out string completionsSource);
    string? configFile = parse.GetValue(configOption);
    IConfiguration config = new ConfigurationBuilder()
        .AddJsonFile(configFile is null ? "/nonexistent/gateway.json" : Path.GetFullPath(configFile), optional: configFile is null)
        .AddEnvironmentVariables()
        .Build();
    GatewayOptions options;
    try
    {
        string[] nbd = parse.GetValue(nbdOption) is { Length: > 0 } given ? given : [config["Gateway:Nbd"] ?? GatewayOptions.DefaultNbd];
        System.Net.EndPoint[] nbdEndpoints = [.. nbd.Select(GatewayOptions.ParseNbdEndpoint)];
        options = new GatewayOptions(
            Path.GetFullPath(parse.GetValue(dataOption) ?? config["Gateway:Data"] ?? GatewayOptions.DefaultData),
            nbdEndpoints.OfType<System.Net.IPEndPoint>().FirstOrDefault() ?? GatewayOptions.ParseEndpoint(GatewayOptions.DefaultNbd, "--nbd"),
            GatewayOptions.ParseEndpoint(parse.GetValue(adminOption) ?? config["Gateway:Admin"] ?? GatewayOptions.DefaultAdmin, "--admin"))
        {
            NbdEndpoints = nbdEndpoints,
        };
        options = SecurityCli.Apply(options, parse, config);
        options = ClusterCli.Apply(options, parse, config);
        ClusterCli.LoadTls(options);
        options = Health.Apply(options, parse, config);
    }
    catch (ArgumentException e)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 2;
    }
    WebApplication app = ServeCommand.Build(options, configFile is null ? null : [configFile]);
    app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("Gateway.Host.SocketCompletions").LogInformation(
        "Socket completions run {Where} ({Source})", inlineCompletions ? "inline on the epoll threads" : "on the thread pool", completionsSource);
    app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("Gateway.Host.PoolSpin").LogInformation(
        "Idle thread-pool workers' spin limit: {Spin}", PoolSpin.Describe());
    // Taken before the run, which disposes the services when it ends.
    ShutdownOutcome outcome = app.Services.GetRequiredService<ShutdownOutcome>();
    await app.RunAsync();
    return outcome.ExitCode;
});

var adminUrlOption = new Option<string>("--admin")
{
    Description = "Admin API URL of the gateway",
    DefaultValueFactory = _ => Environment.GetEnvironmentVariable("GATEWAY_ADMIN") ?? $"http://{GatewayOptions.DefaultAdmin}/",
    Recursive = true,
};
var nameArgument = new Argument<string>("name") { Description = "Export name" };

var list = new Command("list", "List exports");
list.SetAction((parse, ct) => Cli(parse).ListAsync(ct));

var show = new Command("show", "Show one export as JSON");
show.Arguments.Add(nameArgument);
show.SetAction((parse, ct) => Cli(parse).ShowAsync(parse.GetValue(nameArgument)!, ct));

var sizeOption = new Option<string>("--size") { Description = "Size in bytes, or with K, M, G, T (e.g. 10G)", Required = true };
var readOnlyOption = new Option<bool>("--read-only") { Description = "Export read-only" };
var descriptionOption = new Option<string?>("--description") { Description = "Description shown to NBD clients" };
var pathOption = new Option<string?>("--path") { Description = "Raw image file to serve (default: a new sparse file in the data folder)" };
var add = new Command("add", "Create an export");
add.Arguments.Add(nameArgument);
add.Options.Add(sizeOption);
add.Options.Add(readOnlyOption);
add.Options.Add(descriptionOption);
add.Options.Add(pathOption);
OverlayCli.AddOptions(add);
S3Cli.AddOptions(add);
add.SetAction((parse, ct) => OverlayCli.BaseImage(parse) is { } baseImage && S3ImageLocation.IsS3Name(baseImage)
    ? Cli(parse).AddOverlayAsync(parse.GetValue(nameArgument)!, parse.GetValue(sizeOption)!, parse.GetValue(readOnlyOption), parse.GetValue(descriptionOption), null, baseImage, ct, OverlayCli.BaseFormat(parse), S3Cli.IsS3(parse) ? S3Cli.Spec(parse) : null)
    : S3Cli.IsS3(parse)
    ? Cli(parse).AddS3Async(parse.GetValue(nameArgument)!, parse.GetValue(sizeOption)!, parse.GetValue(readOnlyOption), parse.GetValue(descriptionOption), S3Cli.Spec(parse), ct)
    : OverlayCli.IsOverlay(parse)
    ? Cli(parse).AddOverlayAsync(parse.GetValue(nameArgument)!, parse.GetValue(sizeOption)!, parse.GetValue(readOnlyOption), parse.GetValue(descriptionOption), OverlayCli.Base(parse), OverlayCli.BaseImage(parse), ct, OverlayCli.BaseFormat(parse))
    : Cli(parse).AddAsync(parse.GetValue(nameArgument)!, parse.GetValue(sizeOption)!, parse.GetValue(readOnlyOption),
    parse.GetValue(descriptionOption), parse.GetValue(pathOption), ct));

var remove = new Command("remove", "Remove an export (and the file the gateway made for it)");
remove.Arguments.Add(nameArgument);
remove.SetAction((parse, ct) => Cli(parse).RemoveAsync(parse.GetValue(nameArgument)!, ct));

var export = new Command("export", "Manage exports through the admin API");
export.Options.Add(adminUrlOption);
export.Options.Add(CliAuth.TokenFile);
export.Subcommands.Add(list);
export.Subcommands.Add(show);
export.Subcommands.Add(add);
export.Subcommands.Add(remove);
export.Subcommands.Add(OverlayCli.SnapshotCommand(nameArgument, Cli));
export.Subcommands.Add(ResizeCli.ResizeCommand(nameArgument, Cli));

var root = new RootCommand("NBD storage gateway");
root.Subcommands.Add(serve);
root.Subcommands.Add(export);
root.Subcommands.Add(BitmapCli.Build(adminUrlOption));
root.Subcommands.Add(CsiCli.Build(adminUrlOption));
root.Subcommands.Add(BackupCli.Build(adminUrlOption));
root.Subcommands.Add(ImageCli.Build());
root.Subcommands.Add(ClusterCliCommands.Build(adminUrlOption, p => AdminClient.BaseUri(p.GetValue(adminUrlOption)!)));
root.Subcommands.Add(NodeCliCommands.Build(adminUrlOption, p => AdminClient.BaseUri(p.GetValue(adminUrlOption)!)));

try
{
    // The host handles SIGTERM itself (graceful drain); System.CommandLine must not cut it short.
    // Our own handler below prints CLI errors as one line, not a stack trace.
    return await root.Parse(args).InvokeAsync(new InvocationConfiguration { ProcessTerminationTimeout = null, EnableDefaultExceptionHandler = false });
}
catch (CliException e)
{
    Console.Error.WriteLine($"error: {e.Message}");
    return 1;
}

ExportCli Cli(ParseResult parse)
{
    CliAuth.Configure(parse);
    return new ExportCli(AdminClient.BaseUri(parse.GetValue(adminUrlOption)!), Console.Out, Console.Error);
}
