using System.Reflection;
using System.Xml.Linq;
using Gateway.Backends;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.CSharp.Syntax;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests;

/// <summary>
/// The dependency rules of docs/architecture.md ("Arrows that must not exist"): each test fails
/// when someone adds a forbidden arrow. All of them hold since issue 16 removed the three cycles
/// between folders ("Removed (issue 16)" there).
/// <para>
/// Between projects the rules read the built assemblies' references and the project files. Between
/// the folders of Gateway.Actors (one namespace each) they read the sources with a semantic model:
/// every name in a file of folder F that resolves to a type or member declared in folder G (or in
/// an Akka assembly) is an arrow F → G, whether the file names the type, calls a member of it or
/// uses an extension method. Using directives alone do not count.
/// </para>
/// </summary>
public sealed class ArchitectureRulesTests(ITestOutputHelper output)
{
    private const string Akka = "Akka";
    private const string Backends = "Gateway.Backends";
    private const string Codec = "Gateway.Nbd";
    private const string Root = "(root)";

    private static readonly string[] Folders = ["Bitmaps", "Cluster", "Connections", "Exports", "Nbd", "Telemetry", "Tls"];

    // The SDK's implicit usings, and the project's own global using of the codec (Gateway.Actors.csproj).
    private static readonly string[] ImplicitUsings =
        ["System", "System.Collections.Generic", "System.IO", "System.Linq", "System.Net.Http", "System.Threading", "System.Threading.Tasks", Codec];

    private static readonly Lazy<List<Arrow>> s_arrows = new(FindArrows);

    /// <summary>One reference from a file of folder <c>From</c> to <c>To</c>, with where it is.</summary>
    private sealed record Arrow(string From, string To, string Where);

    [Theory]
    [InlineData(Backends)]
    [InlineData(Codec)]
    public void Leaf_project_references_no_Akka_and_no_other_gateway_assembly(string leaf)
    {
        Assembly assembly = leaf == Backends ? typeof(IBlockDevice).Assembly : typeof(Gateway.Nbd.NbdMagic).Assembly;
        string[] references = [.. assembly.GetReferencedAssemblies().Select(a => a.Name ?? "")];
        Assert.DoesNotContain(references, name => name.StartsWith(Akka, StringComparison.Ordinal));
        Assert.DoesNotContain(references, name => name.StartsWith("Gateway.", StringComparison.Ordinal));

        // The project file too: a reference the code does not use yet is still an arrow.
        XDocument project = XDocument.Load(Path.Combine(RepositoryRoot(), leaf, leaf + ".csproj"));
        Assert.Empty(project.Descendants("ProjectReference"));
        Assert.DoesNotContain(
            project.Descendants("PackageReference").Select(p => (string?)p.Attribute("Include") ?? ""),
            name => name.StartsWith(Akka, StringComparison.Ordinal));
    }

    [Fact]
    public void Actors_references_no_gateway_assembly_but_Backends_and_the_codec()
    {
        string[] gateway = [.. typeof(Gateway.Actors.JournalDurability).Assembly.GetReferencedAssemblies()
            .Select(a => a.Name ?? "")
            .Where(name => name.StartsWith("Gateway.", StringComparison.Ordinal))
            .Order(StringComparer.Ordinal)];
        Assert.Equal([Backends, Codec], gateway);
    }

    /// <summary>
    /// Guards the rules below against passing because nothing resolved: arrows that the design
    /// allows and that will stay (the export actor is an actor over a block device) must be found.
    /// Also prints the folder table of docs/architecture.md as the code has it now.
    /// </summary>
    [Fact]
    public void The_analysis_resolves_references_across_folders_and_assemblies()
    {
        List<Arrow> arrows = s_arrows.Value;
        foreach (IGrouping<string, Arrow> group in arrows.GroupBy(a => a.From).OrderBy(g => g.Key, StringComparer.Ordinal))
        {
            output.WriteLine($"{group.Key} -> {string.Join(", ", group.Select(a => a.To).Distinct().Order(StringComparer.Ordinal))}");
        }
        Assert.Contains(arrows, a => a is { From: "Exports", To: Akka });
        Assert.Contains(arrows, a => a is { From: "Exports", To: Backends });
        Assert.Contains(arrows, a => a is { From: "Connections", To: "Exports" });
        Assert.Contains(arrows, a => a is { From: "Nbd", To: Codec });
    }

    [Theory]
    // The protocol layer knows no Akka, no bitmaps, no connection actors.
    [InlineData("Nbd", Akka)]
    [InlineData("Nbd", "Bitmaps")]
    [InlineData("Nbd", "Connections")]
    // Nor the cluster: a forwarding device declares it (IForwardingDevice); issue 16, item 2.
    [InlineData("Nbd", "Cluster")]
    // Nor the exports: it serves from the contracts it declares (IExportDirectory, ExportHandle,
    // ExportInfo, MetaContext, ExportAccess), which Exports and Cluster implement (issue 16).
    [InlineData("Nbd", "Exports")]
    // TLS and telemetry are leaves: everything may use them, they use (almost) nothing.
    [InlineData("Tls", Akka)]
    [InlineData("Tls", Backends)]
    [InlineData("Tls", Root)]
    [InlineData("Tls", "Bitmaps")]
    [InlineData("Tls", "Cluster")]
    [InlineData("Tls", "Connections")]
    [InlineData("Tls", "Exports")]
    [InlineData("Tls", "Nbd")]
    [InlineData("Tls", Codec)]
    [InlineData("Tls", "Telemetry")]
    [InlineData("Telemetry", Akka)]
    [InlineData("Telemetry", "Bitmaps")]
    [InlineData("Telemetry", "Cluster")]
    [InlineData("Telemetry", "Connections")]
    [InlineData("Telemetry", "Exports")]
    [InlineData("Telemetry", "Tls")]
    // Single-node code does not know the cluster, and nothing below the connection actors knows them.
    [InlineData("Bitmaps", "Cluster")]
    [InlineData("Bitmaps", "Exports")]
    [InlineData("Exports", "Cluster")]
    [InlineData("Bitmaps", "Connections")]
    [InlineData("Connections", "Cluster")]
    [InlineData("Connections", "Bitmaps")]
    [InlineData("Exports", "Connections")]
    [InlineData("Cluster", "Connections")]
    public void Forbidden_arrow_is_absent(string folder, string forbidden)
    {
        string[] found = [.. s_arrows.Value.Where(a => a.From == folder && a.To == forbidden).Select(a => a.Where).Distinct().Take(20)];
        if (found.Length > 0)
        {
            Assert.Fail($"Gateway.Actors/{folder} must not reference {forbidden} (docs/architecture.md, \"Arrows that must not exist\"):\n{string.Join("\n", found)}");
        }
    }

    private static List<Arrow> FindArrows()
    {
        string project = Path.Combine(RepositoryRoot(), "Gateway.Actors");
        var parse = new CSharpParseOptions(LanguageVersion.Latest);
        var trees = new List<SyntaxTree>
        {
            CSharpSyntaxTree.ParseText(string.Concat(ImplicitUsings.Select(u => $"global using global::{u};\n")), parse, path: "ImplicitUsings.cs"),
        };
        foreach (string file in Directory.EnumerateFiles(project, "*.cs", SearchOption.AllDirectories))
        {
            string relative = Path.GetRelativePath(project, file);
            string top = relative.Split(Path.DirectorySeparatorChar)[0];
            if (top is "obj" or "bin")
            {
                continue;
            }
            trees.Add(CSharpSyntaxTree.ParseText(File.ReadAllText(file), parse, path: relative));
        }
        CSharpCompilation compilation = CSharpCompilation.Create(
            "Gateway.Actors.Analysed", trees, References(),
            new CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary, allowUnsafe: true, nullableContextOptions: NullableContextOptions.Enable));

        var arrows = new List<Arrow>();
        foreach (SyntaxTree tree in compilation.SyntaxTrees)
        {
            string[] segments = tree.FilePath.Split(Path.DirectorySeparatorChar);
            if (segments.Length < 2 || !Folders.Contains(segments[0]))
            {
                continue;
            }
            string folder = segments[0];
            SemanticModel model = compilation.GetSemanticModel(tree);
            foreach (SimpleNameSyntax name in tree.GetRoot().DescendantNodes().OfType<SimpleNameSyntax>())
            {
                SymbolInfo info = model.GetSymbolInfo(name);
                string? target = PartOf(info.Symbol ?? info.CandidateSymbols.FirstOrDefault());
                if (target is not null && target != folder)
                {
                    int line = name.GetLocation().GetLineSpan().StartLinePosition.Line + 1;
                    arrows.Add(new Arrow(folder, target, $"Gateway.Actors/{tree.FilePath}:{line}: {name.Parent}"));
                }
            }
        }
        return arrows;
    }

    /// <summary>The folder of Gateway.Actors, or Akka, or Gateway.Backends, or Gateway.Nbd, that declares what the name resolves to; null for anything else.</summary>
    private static string? PartOf(ISymbol? symbol)
    {
        if (symbol is null or INamespaceSymbol)
        {
            return null; // a using directive, or the left of a qualified name whose right side counts
        }
        INamedTypeSymbol? type = symbol switch
        {
            INamedTypeSymbol named => named,
            IMethodSymbol { ReducedFrom: { } extension } => extension.ContainingType,
            _ => symbol.ContainingType,
        };
        if (type is null)
        {
            return null;
        }
        string ns = type.OriginalDefinition.ContainingNamespace?.ToDisplayString() ?? "";
        string assembly = type.OriginalDefinition.ContainingAssembly?.Name ?? "";
        if (assembly.StartsWith(Akka, StringComparison.Ordinal) || ns == Akka || ns.StartsWith(Akka + ".", StringComparison.Ordinal))
        {
            return Akka;
        }
        if (ns == Backends || ns.StartsWith(Backends + ".", StringComparison.Ordinal))
        {
            return Backends;
        }
        if (ns == Codec)
        {
            return Codec;
        }
        if (ns.StartsWith("Gateway.Actors.", StringComparison.Ordinal))
        {
            return ns["Gateway.Actors.".Length..].Split('.')[0];
        }
        return ns == "Gateway.Actors" ? Root : null;
    }

    /// <summary>The runtime's assemblies and those next to the tests (Akka, Gateway.Backends, Gateway.Nbd), without a built Gateway.Actors.</summary>
    private static List<MetadataReference> References()
    {
        var byName = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        string platform = AppContext.GetData("TRUSTED_PLATFORM_ASSEMBLIES") as string ?? "";
        foreach (string path in platform.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            byName.TryAdd(Path.GetFileName(path), path);
        }
        foreach (string path in Directory.EnumerateFiles(AppContext.BaseDirectory, "*.dll"))
        {
            byName.TryAdd(Path.GetFileName(path), path);
        }
        var references = new List<MetadataReference>();
        foreach ((string file, string path) in byName)
        {
            bool gateway = file.StartsWith("Gateway.", StringComparison.OrdinalIgnoreCase);
            bool leaf = file.Equals(Backends + ".dll", StringComparison.OrdinalIgnoreCase) || file.Equals(Codec + ".dll", StringComparison.OrdinalIgnoreCase);
            if ((!gateway || leaf) && IsManaged(path))
            {
                references.Add(MetadataReference.CreateFromFile(path));
            }
        }
        return references;
    }

    private static bool IsManaged(string path)
    {
        try
        {
            AssemblyName.GetAssemblyName(path);
            return true;
        }
        catch (BadImageFormatException)
        {
            return false;
        }
        catch (FileLoadException)
        {
            return false;
        }
    }

    private static string RepositoryRoot()
    {
        for (DirectoryInfo? dir = new(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "Gateway.sln")))
            {
                return dir.FullName;
            }
        }
        throw new Xunit.Sdk.XunitException($"Gateway.sln not found above {AppContext.BaseDirectory}: the test reads the sources of Gateway.Actors");
    }
}
