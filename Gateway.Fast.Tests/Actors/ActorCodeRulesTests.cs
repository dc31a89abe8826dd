using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.CSharp.Syntax;
using Xunit;

namespace Gateway.Tests.Actors;

/// <summary>
/// Issue 30: the rules Akka.Analyzers (0.3.3, on every project) does not check, checked on the
/// source of every actor class in Gateway.Actors and Gateway.Host:
/// <list type="bullet">
/// <item>no <c>ConfigureAwait(false)</c> in actor code: in a ReceiveAsync handler it moves the rest of
/// the handler off the actor's context, where <c>Sender</c>, <c>Self</c> and <c>Context</c> throw
/// ("There is no active ActorContext") and state changes race the mailbox;</item>
/// <item>no blocking on a task (<c>GetAwaiter().GetResult()</c>, <c>.Wait()</c>, <c>.Result</c> of a
/// task): it holds a dispatcher thread, and the actor's mailbox, for as long as the I/O takes.</item>
/// </list>
/// Lambdas given to <c>Task.Run</c> or <c>ContinueWith</c> are off the actor by construction and
/// exempt from both; static members from the first only (they cannot reach the actor's context, but
/// called synchronously they still hold its thread). Work off the actor comes back as a piped message.
/// </summary>
public sealed class ActorCodeRulesTests
{
    private static readonly string[] ActorBases =
        ["ReceiveActor", "ReceivePersistentActor", "UntypedActor", "UntypedPersistentActor", "ActorBase", "PersistentActor"];

    /// <summary>
    /// Not actors, but called on actors' threads (to create, open and snapshot storage): they must
    /// not block either. (ConfigureAwait(false) is right there: they hold no actor context.)
    /// </summary>
    private static readonly string[] CalledByActors = ["BackendFactory"];

    private static string RepositoryRoot()
    {
        for (DirectoryInfo? dir = new(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "Gateway.sln")))
            {
                return dir.FullName;
            }
        }
        throw new Xunit.Sdk.XunitException($"Gateway.sln not found above {AppContext.BaseDirectory}: the test reads the sources of the actors");
    }

    /// <summary>Every (file, class) in the product that derives from an Akka actor base class.</summary>
    private static List<(string File, ClassDeclarationSyntax Class)> ActorClasses(bool withCalledByActors = false)
    {
        string root = RepositoryRoot();
        var found = new List<(string, ClassDeclarationSyntax)>();
        foreach (string project in new[] { "Gateway.Actors", "Gateway.Host" })
        {
            foreach (string file in Directory.EnumerateFiles(Path.Combine(root, project), "*.cs", SearchOption.AllDirectories))
            {
                if (file.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}", StringComparison.Ordinal)
                    || file.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}", StringComparison.Ordinal))
                {
                    continue;
                }
                SyntaxNode tree = CSharpSyntaxTree.ParseText(File.ReadAllText(file), path: Path.GetRelativePath(root, file)).GetRoot();
                foreach (ClassDeclarationSyntax type in tree.DescendantNodes().OfType<ClassDeclarationSyntax>())
                {
                    found.Add((Path.GetRelativePath(root, file), type));
                }
            }
        }
        // Partial classes: a part without the base list belongs to the actor when another part has it.
        HashSet<string> actors = [.. found.Where(f => f.Item2.BaseList?.Types.Any(t => ActorBases.Contains(BaseName(t.Type))) == true).Select(f => f.Item2.Identifier.Text), .. withCalledByActors ? CalledByActors : []];
        return [.. found.Where(f => actors.Contains(f.Item2.Identifier.Text) && f.Item2.Parent is not ClassDeclarationSyntax)];
    }

    private static string BaseName(TypeSyntax type) => type switch
    {
        GenericNameSyntax g => g.Identifier.Text,
        QualifiedNameSyntax q => BaseName(q.Right),
        SimpleNameSyntax s => s.Identifier.Text,
        _ => type.ToString(),
    };

    /// <summary>
    /// True when the node runs off the actor by construction: in a lambda given to Task.Run or
    /// ContinueWith, or (with <paramref name="staticIsOff"/>) in a static member, which cannot reach
    /// the actor's context. A static method called synchronously still runs on the actor's thread,
    /// so it is not exempt from the blocking rule.
    /// </summary>
    private static bool OffTheActor(SyntaxNode node, bool staticIsOff)
    {
        foreach (SyntaxNode ancestor in node.Ancestors())
        {
            switch (ancestor)
            {
                case MethodDeclarationSyntax method when staticIsOff && method.Modifiers.Any(SyntaxKind.StaticKeyword):
                case LocalFunctionStatementSyntax local when staticIsOff && local.Modifiers.Any(SyntaxKind.StaticKeyword):
                case PropertyDeclarationSyntax property when staticIsOff && property.Modifiers.Any(SyntaxKind.StaticKeyword):
                case LambdaExpressionSyntax lambda when staticIsOff && lambda.Modifiers.Any(SyntaxKind.StaticKeyword):
                    return true;
                case ArgumentSyntax { Parent.Parent: InvocationExpressionSyntax { Expression: MemberAccessExpressionSyntax { Name.Identifier.Text: "Run", Expression: IdentifierNameSyntax { Identifier.Text: "Task" } } } }:
                case ArgumentSyntax { Parent.Parent: InvocationExpressionSyntax { Expression: MemberAccessExpressionSyntax { Name.Identifier.Text: "ContinueWith" } } }:
                    return true;
                case ClassDeclarationSyntax:
                    return false;
            }
        }
        return false;
    }

    private static string Where(string file, SyntaxNode node) => $"{file}:{node.GetLocation().GetLineSpan().StartLinePosition.Line + 1}: {node}";

    [Fact]
    public void The_rules_see_the_actors()
    {
        string[] names = [.. ActorClasses(withCalledByActors: true).Select(a => a.Class.Identifier.Text).Distinct()];
        // A rename or a moved folder must not leave the rules below checking nothing.
        Assert.Contains("ExportActor", names);
        Assert.Contains("ExportRegistryActor", names);
        Assert.Contains("BitmapsActor", names);
        Assert.Contains("ExportEntity", names);
        Assert.Contains("ConnectionSupervisor", names);
        Assert.Contains("BackendFactory", names);
    }

    [Fact]
    public void No_actor_code_uses_ConfigureAwait_false_where_it_would_leave_the_actor_context()
    {
        List<string> found = [.. ActorClasses().SelectMany(a => a.Class.DescendantNodes().OfType<InvocationExpressionSyntax>()
            .Where(i => i.Expression is MemberAccessExpressionSyntax { Name.Identifier.Text: "ConfigureAwait" }
                && i.ArgumentList.Arguments is [{ Expression: LiteralExpressionSyntax { RawKind: (int)SyntaxKind.FalseLiteralExpression } }]
                && !OffTheActor(i, staticIsOff: true))
            .Select(i => Where(a.File, i)))];
        Assert.True(found.Count == 0, "ConfigureAwait(false) in actor code (await without it, or pipe the task to Self):\n" + string.Join("\n", found));
    }

    [Fact]
    public void No_actor_blocks_on_a_task()
    {
        List<string> found = [];
        foreach ((string file, ClassDeclarationSyntax type) in ActorClasses(withCalledByActors: true))
        {
            foreach (MemberAccessExpressionSyntax access in type.DescendantNodes().OfType<MemberAccessExpressionSyntax>())
            {
                bool blocking = access.Name.Identifier.Text switch
                {
                    "GetResult" => access.Expression is InvocationExpressionSyntax { Expression: MemberAccessExpressionSyntax { Name.Identifier.Text: "GetAwaiter" } },
                    // Task.Wait, SemaphoreSlim.Wait, ManualResetEventSlim.Wait: all hold the thread.
                    "Wait" => access.Parent is InvocationExpressionSyntax,
                    // A task's Result (syntax alone cannot tell it from a message's Result property:
                    // only what is visibly a task, a call to an ...Async method or a name with Task in it).
                    "Result" => access.Expression.ToString().EndsWith("Async()", StringComparison.Ordinal) || access.Expression.ToString().Contains("Task", StringComparison.Ordinal),
                    _ => false,
                };
                if (blocking && !OffTheActor(access, staticIsOff: false))
                {
                    found.Add(Where(file, access));
                }
            }
        }
        Assert.True(found.Count == 0, "an actor blocks on a task (pipe it to Self instead):\n" + string.Join("\n", found));
    }
}
