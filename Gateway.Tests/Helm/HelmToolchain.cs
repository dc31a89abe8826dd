using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using System.Text;
using Xunit;

namespace Gateway.Tests.Helm;

/// <summary>What a process did: its command line, exit code and both outputs.</summary>
public sealed record ProcessResult(string CommandLine, int ExitCode, string Stdout, string Stderr)
{
    public bool Succeeded => ExitCode == 0;

    public string Describe() => $"$ {CommandLine}\nexit code {ExitCode}\n--- stdout ---\n{Stdout}\n--- stderr ---\n{Stderr}";
}

/// <summary>
/// The tools that render and check the chart without helm or a cluster: ops/helm-render (built
/// here from its Go source, once per source version), yamllint, node with npm kubernetes-models.
/// A missing tool FAILS the tests (a chart check that silently skips proves nothing):
/// ops/lib/install-helm-tools installs them all.
/// </summary>
/// <remarks>
/// Environment overrides: HELM_RENDER (a built renderer; else built from ops/helm-render with GO,
/// default `go` on PATH, against HELM_RENDER_GOPATH, default /usr/share/gocode), YAMLLINT, NODE,
/// HELM_TOOLS_DIR (holds node_modules/kubernetes-models; default ops/.helm-tools).
/// </remarks>
public sealed class HelmToolchain
{
    public const string InstallHint = "run ops/lib/install-helm-tools (Debian golang-go, sprig, sigs.k8s.io/yaml, gojsonschema, yamllint; npm kubernetes-models into ops/.helm-tools)";

    private static readonly TimeSpan ToolTimeout = TimeSpan.FromMinutes(3);

    private HelmToolchain(string repoRoot, string renderer, string yamllint, string node, string nodeModules)
    {
        RepoRoot = repoRoot;
        Renderer = renderer;
        Yamllint = yamllint;
        Node = node;
        NodeModules = nodeModules;
    }

    public string RepoRoot { get; }

    public string ChartDirectory => Path.Combine(RepoRoot, "helm", "gateway");

    public string Renderer { get; }

    public string Yamllint { get; }

    public string YamllintConfig => Path.Combine(RepoRoot, "ops", "helm-render", "yamllint.yaml");

    public string Node { get; }

    public string NodeModules { get; }

    public string ModelsScript => Path.Combine(RepoRoot, "ops", "helm-render", "validate.mjs");

    /// <summary>Finds every tool (failing the test with <see cref="InstallHint"/> when one is missing) and builds the renderer.</summary>
    public static HelmToolchain Prepare()
    {
        string root = FindRepoRoot();
        string yamllint = Executable(Environment.GetEnvironmentVariable("YAMLLINT") ?? "yamllint");
        string node = Executable(Environment.GetEnvironmentVariable("NODE") ?? "node");
        string tools = Environment.GetEnvironmentVariable("HELM_TOOLS_DIR") ?? Path.Combine(root, "ops", ".helm-tools");
        string modules = Path.Combine(tools, "node_modules");
        foreach (string package in new[] { "kubernetes-models", "yaml" })
        {
            if (!File.Exists(Path.Combine(modules, package, "package.json")))
            {
                Assert.Fail($"npm package {package} is not in {modules}; {InstallHint}");
            }
        }
        string renderer = Environment.GetEnvironmentVariable("HELM_RENDER") is { Length: > 0 } given
            ? Executable(given)
            : BuildRenderer(root);
        return new HelmToolchain(root, renderer, yamllint, node, modules);
    }

    /// <summary>
    /// Builds ops/helm-render into the temp folder, keyed by a hash of its source, so a test run
    /// builds it at most once and an edited renderer is rebuilt. Debian ships the Go libraries
    /// as GOPATH source (/usr/share/gocode) and no module proxy is reachable: GOPATH mode.
    /// </summary>
    private static string BuildRenderer(string root)
    {
        string source = Path.Combine(root, "ops", "helm-render");
        string[] files = [.. Directory.GetFiles(source, "*.go").Order(StringComparer.Ordinal)];
        Assert.True(files.Length > 0, $"no Go source in {source}");
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (string file in files)
        {
            hash.AppendData(Encoding.UTF8.GetBytes(Path.GetFileName(file)));
            hash.AppendData(File.ReadAllBytes(file));
        }
        string cache = Path.Combine(Path.GetTempPath(), "gateway-helm-render");
        string binary = Path.Combine(cache, Convert.ToHexString(hash.GetHashAndReset())[..16].ToLowerInvariant(), "helm-render");
        if (File.Exists(binary))
        {
            return binary;
        }

        string go = Executable(Environment.GetEnvironmentVariable("GO") ?? "go");
        string gopath = Environment.GetEnvironmentVariable("HELM_RENDER_GOPATH") ?? "/usr/share/gocode";
        foreach (string library in new[] { "github.com/Masterminds/sprig", "sigs.k8s.io/yaml", "github.com/xeipuuv/gojsonschema" })
        {
            if (!Directory.Exists(Path.Combine(gopath, "src", library)))
            {
                Assert.Fail($"Go library {library} is not in {gopath}/src; {InstallHint}");
            }
        }
        Directory.CreateDirectory(Path.GetDirectoryName(binary)!);
        string partial = $"{binary}.{Environment.ProcessId}.tmp";
        ProcessResult build = Run(go, ["build", "-o", partial, "."], source, new Dictionary<string, string?>
        {
            ["GO111MODULE"] = "off",
            ["GOPATH"] = gopath,
            ["GOFLAGS"] = "",
            ["GOPROXY"] = "off",
            ["GOCACHE"] = Environment.GetEnvironmentVariable("GOCACHE") ?? Path.Combine(cache, "go-build"),
        });
        Assert.True(build.Succeeded, $"ops/helm-render does not build:\n{build.Describe()}");
        File.Move(partial, binary, overwrite: true);
        return binary;
    }

    /// <summary>The repository: the folder holding Gateway.sln above this source file (the tests run from an artifacts folder elsewhere).</summary>
    internal static string FindRepoRoot([CallerFilePath] string sourceFile = "")
    {
        foreach (string? start in new[] { Path.GetDirectoryName(sourceFile), Environment.CurrentDirectory, AppContext.BaseDirectory })
        {
            for (string? dir = start; dir is not null; dir = Path.GetDirectoryName(dir))
            {
                if (File.Exists(Path.Combine(dir, "Gateway.sln")) && Directory.Exists(Path.Combine(dir, "helm", "gateway")))
                {
                    return dir;
                }
            }
        }
        Assert.Fail($"the repository (Gateway.sln with helm/gateway) is not above {sourceFile} nor {Environment.CurrentDirectory}");
        return null!;
    }

    private static string Executable(string name)
    {
        if (Path.IsPathRooted(name))
        {
            if (File.Exists(name))
            {
                return name;
            }
            Assert.Fail($"required tool '{name}' is missing; {InstallHint}");
        }
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, name);
            if (File.Exists(candidate) && (OperatingSystem.IsWindows() || (File.GetUnixFileMode(candidate) & UnixFileMode.UserExecute) != 0))
            {
                return candidate;
            }
        }
        Assert.Fail($"required tool '{name}' is not on PATH; {InstallHint}");
        return null!;
    }

    /// <summary>Runs a program (no shell), killing it after a few minutes.</summary>
    public static ProcessResult Run(string program, IEnumerable<string> args, string? workingDirectory = null,
        IReadOnlyDictionary<string, string?>? environment = null)
    {
        var start = new ProcessStartInfo(program)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = workingDirectory ?? Path.GetTempPath(),
        };
        foreach (string arg in args)
        {
            start.ArgumentList.Add(arg);
        }
        foreach ((string key, string? value) in environment ?? new Dictionary<string, string?>())
        {
            start.Environment[key] = value;
        }
        string commandLine = string.Join(' ', start.ArgumentList.Prepend(program));
        using Process process = Process.Start(start) ?? throw new InvalidOperationException($"cannot start {program}");
        Task<string> stdout = process.StandardOutput.ReadToEndAsync();
        Task<string> stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(ToolTimeout))
        {
            process.Kill(entireProcessTree: true);
            Assert.Fail($"{commandLine} did not finish within {ToolTimeout.TotalSeconds} s");
        }
        return new ProcessResult(commandLine, process.ExitCode, stdout.GetAwaiter().GetResult(), stderr.GetAwaiter().GetResult());
    }
}
