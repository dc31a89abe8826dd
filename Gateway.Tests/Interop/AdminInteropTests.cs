using System.Net;
using System.Text;
using System.Text.Json;
using Xunit;

namespace Gateway.Tests.Interop;

/// <summary>The admin HTTP API and the <c>gateway export</c> CLI against one real gateway process.</summary>
public sealed class AdminInteropTests(GatewayFixture fixture) : IClassFixture<GatewayFixture>
{
    private const long MiB = 1 << 20;
    private readonly GatewayProcess _gateway = fixture.Gateway;

    private async Task<(HttpStatusCode Status, string Body)> PostAsync(string json)
    {
        using var content = new StringContent(json, Encoding.UTF8, "application/json");
        using HttpResponseMessage response = await _gateway.Http.PostAsync("v1/exports", content);
        return (response.StatusCode, await response.Content.ReadAsStringAsync());
    }

    private async Task<(HttpStatusCode Status, string Body)> SendAsync(HttpMethod method, string path)
    {
        using var request = new HttpRequestMessage(method, path);
        using HttpResponseMessage response = await _gateway.Http.SendAsync(request);
        return (response.StatusCode, await response.Content.ReadAsStringAsync());
    }

    /// <summary>The "error" text of a 4xx answer; fails when the body is not <c>{"error": "..."}</c>.</summary>
    private string ErrorMessage((HttpStatusCode Status, string Body) answer)
    {
        try
        {
            using JsonDocument doc = JsonDocument.Parse(answer.Body);
            string? error = doc.RootElement.GetProperty("error").GetString();
            Assert.False(string.IsNullOrWhiteSpace(error), $"empty error message: {answer.Body}");
            return error!;
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            Assert.Fail($"answer {(int)answer.Status} is not {{\"error\": \"...\"}}: {answer.Body}\n{_gateway.Describe()}");
            return null!;
        }
    }

    private void AssertStatus(HttpStatusCode expected, (HttpStatusCode Status, string Body) answer, string what) =>
        Assert.True(answer.Status == expected,
            $"{what}: expected {(int)expected}, got {(int)answer.Status}: {answer.Body}\n{_gateway.Describe()}");

    private async Task<string[]> ListedNamesAsync()
    {
        (HttpStatusCode status, string body) = await SendAsync(HttpMethod.Get, "v1/exports");
        Assert.Equal(HttpStatusCode.OK, status);
        using JsonDocument doc = JsonDocument.Parse(body);
        return [.. doc.RootElement.EnumerateArray().Select(e => e.GetProperty("name").GetString()!)];
    }

    private static async Task WaitUntilGoneAsync(string path)
    {
        // Removal stops the export's actor first and deletes the file after: allow it a moment.
        for (int i = 0; i < 50 && File.Exists(path); i++)
        {
            await Task.Delay(100);
        }
    }

    [Fact]
    public async Task Cli_adds_lists_shows_and_removes_an_export()
    {
        ToolResult add = await _gateway.CliAsync("export", "add", "cli-disk", "--size", "32M", "--description", "made by the CLI");
        Assert.True(add.Succeeded, add.Describe());
        Assert.Contains("cli-disk", add.Stdout);
        Assert.True(File.Exists(_gateway.ExportFile("cli-disk")), "the CLI-created export has no file");
        Assert.Equal(32 * MiB, new FileInfo(_gateway.ExportFile("cli-disk")).Length);

        ToolResult list = await _gateway.CliAsync("export", "list");
        Assert.True(list.Succeeded, list.Describe());
        string row = list.Stdout.Split('\n').SingleOrDefault(l => l.StartsWith("cli-disk ", StringComparison.Ordinal))
            ?? throw new Xunit.Sdk.XunitException($"export list has no row for cli-disk\n{list.Stdout}");
        Assert.Contains("32 MiB", row);
        Assert.Contains(" rw ", row);
        Assert.Contains("made by the CLI", row);
        Assert.Contains(list.Stdout.Split('\n'), l => l.StartsWith("disk0 ", StringComparison.Ordinal));

        ToolResult show = await _gateway.CliAsync("export", "show", "cli-disk");
        Assert.True(show.Succeeded, show.Describe());
        using (JsonDocument shown = JsonDocument.Parse(show.Stdout))
        {
            Assert.Equal("cli-disk", shown.RootElement.GetProperty("name").GetString());
            Assert.Equal(32 * MiB, shown.RootElement.GetProperty("size").GetInt64());
            Assert.False(shown.RootElement.GetProperty("readOnly").GetBoolean());
            Assert.Equal("made by the CLI", shown.RootElement.GetProperty("description").GetString());
        }

        ToolResult remove = await _gateway.CliAsync("export", "remove", "cli-disk");
        Assert.True(remove.Succeeded, remove.Describe());
        ToolResult after = await _gateway.CliAsync("export", "list");
        Assert.DoesNotContain(after.Stdout.Split('\n'), l => l.StartsWith("cli-disk ", StringComparison.Ordinal));
        ToolResult showGone = await _gateway.CliAsync("export", "show", "cli-disk");
        Assert.NotEqual(0, showGone.ExitCode);
        Assert.Contains("not found", showGone.Stderr);
        await WaitUntilGoneAsync(_gateway.ExportFile("cli-disk"));
        Assert.False(File.Exists(_gateway.ExportFile("cli-disk")), "remove left the export's file behind");
    }

    [Fact]
    public async Task Cli_adds_a_read_only_export_that_lists_as_ro()
    {
        ToolResult add = await _gateway.CliAsync("export", "add", "cli-ro", "--size", "1M", "--read-only");
        Assert.True(add.Succeeded, add.Describe());
        ToolResult list = await _gateway.CliAsync("export", "list");
        string row = list.Stdout.Split('\n').Single(l => l.StartsWith("cli-ro ", StringComparison.Ordinal));
        Assert.Contains(" ro ", row);
    }

    [Fact]
    public async Task Cli_rejects_a_duplicate_name_and_a_bad_size_with_a_message()
    {
        ToolResult duplicate = await _gateway.CliAsync("export", "add", "disk0", "--size", "1M");
        Assert.NotEqual(0, duplicate.ExitCode);
        Assert.Contains("already exists", duplicate.Stderr);
        Assert.Contains("409", duplicate.Stderr);

        ToolResult badSize = await _gateway.CliAsync("export", "add", "cli-bad-size", "--size", "abc");
        Assert.NotEqual(0, badSize.ExitCode);
        Assert.Contains("size", badSize.Stderr);
        Assert.DoesNotContain("cli-bad-size", await ListedNamesAsync());
    }

    [Fact]
    public async Task Cli_remove_of_an_unknown_export_fails_with_not_found()
    {
        ToolResult remove = await _gateway.CliAsync("export", "remove", "no-such-export");
        Assert.NotEqual(0, remove.ExitCode);
        Assert.Contains("not found", remove.Stderr);
        Assert.Contains("404", remove.Stderr);
    }

    [Theory]
    [InlineData("{nope")]
    [InlineData("")]
    [InlineData("[]")]
    [InlineData("{\"name\": \"x\", \"size\": }")]
    public async Task Create_with_bad_json_answers_400_with_an_error_message(string json)
    {
        var answer = await PostAsync(json);
        AssertStatus(HttpStatusCode.BadRequest, answer, $"POST {json}");
        Assert.NotEmpty(ErrorMessage(answer));
    }

    [Fact]
    public async Task Create_with_a_duplicate_name_answers_409_and_keeps_the_original()
    {
        var first = await PostAsync("""{"name": "dup", "size": 1048576, "description": "the original"}""");
        AssertStatus(HttpStatusCode.Created, first, "first create");

        var second = await PostAsync("""{"name": "dup", "size": 2097152}""");

        AssertStatus(HttpStatusCode.Conflict, second, "second create of the same name");
        Assert.Contains("dup", ErrorMessage(second));
        var shown = await SendAsync(HttpMethod.Get, "v1/exports/dup");
        Assert.Contains("the original", shown.Body);
        Assert.Equal(MiB, new FileInfo(_gateway.ExportFile("dup")).Length);
    }

    [Theory]
    [InlineData("0")]
    [InlineData("-1")]
    [InlineData("\"abc\"")]
    [InlineData("\"-1G\"")]
    [InlineData("1.5")]
    [InlineData("null")]
    public async Task Create_with_a_bad_size_answers_400_naming_the_size(string size)
    {
        var answer = await PostAsync($$"""{"name": "bad-size", "size": {{size}}}""");

        AssertStatus(HttpStatusCode.BadRequest, answer, $"size {size}");
        Assert.Contains("size", ErrorMessage(answer));
        Assert.DoesNotContain("bad-size", await ListedNamesAsync());
        Assert.False(File.Exists(_gateway.ExportFile("bad-size")));
    }

    [Theory]
    [InlineData("a/b")]
    [InlineData(".hidden")]
    [InlineData("")]
    public async Task Create_with_a_bad_name_answers_400(string name)
    {
        var answer = await PostAsync($$"""{"name": {{JsonSerializer.Serialize(name)}}, "size": 1048576}""");
        AssertStatus(HttpStatusCode.BadRequest, answer, $"name '{name}'");
        Assert.Contains("name", ErrorMessage(answer));
    }

    [Fact]
    public async Task Get_and_delete_of_an_unknown_export_answer_404()
    {
        var get = await SendAsync(HttpMethod.Get, "v1/exports/no-such-export");
        AssertStatus(HttpStatusCode.NotFound, get, "GET unknown export");
        Assert.Contains("no-such-export", ErrorMessage(get));

        var delete = await SendAsync(HttpMethod.Delete, "v1/exports/no-such-export");
        AssertStatus(HttpStatusCode.NotFound, delete, "DELETE unknown export");
        Assert.Contains("no-such-export", ErrorMessage(delete));
    }

    private static string CreateJson(string name, string size, string path) =>
        JsonSerializer.Serialize(new { name, size, backend = new { type = "file", path } });

    [Fact]
    public async Task Failed_create_with_a_path_under_a_regular_file_leaves_nothing()
    {
        string blocker = Path.Combine(_gateway.DataDirectory, "not-a-directory");
        await File.WriteAllTextAsync(blocker, "x");
        string path = Path.Combine(blocker, "sub", "x.img");

        var answer = await PostAsync(CreateJson("under-file", "16M", path));

        Assert.False(answer.Status is HttpStatusCode.Created or HttpStatusCode.OK, $"create under a regular file succeeded: {answer.Body}");
        Assert.NotEmpty(ErrorMessage(answer));
        Assert.DoesNotContain("under-file", await ListedNamesAsync());
        Assert.False(File.Exists(path));
        Assert.Equal("x", await File.ReadAllTextAsync(blocker));
        Assert.False(File.Exists(_gateway.ExportFile("under-file")));
    }

    [Fact]
    public async Task Failed_create_over_a_smaller_existing_file_leaves_the_file_untouched()
    {
        string path = Path.Combine(_gateway.DataDirectory, "small.img");
        byte[] content = [.. Enumerable.Range(0, 4096).Select(i => (byte)i)];
        await File.WriteAllBytesAsync(path, content);

        var answer = await PostAsync(CreateJson("too-big-for-file", "16M", path));

        Assert.False(answer.Status is HttpStatusCode.Created or HttpStatusCode.OK, $"create over a 4 KiB file with size 16M succeeded: {answer.Body}");
        Assert.Contains("small.img", ErrorMessage(answer));
        Assert.DoesNotContain("too-big-for-file", await ListedNamesAsync());
        Assert.Equal(content, await File.ReadAllBytesAsync(path));
    }

    [Fact]
    public async Task Failed_create_leaves_no_file_and_no_new_directory()
    {
        // 100 TiB is within the API's limit but over ext4's largest file: the storage step fails
        // after the gateway has made the directory for it.
        string directory = Path.Combine(_gateway.DataDirectory, "new-dir-for-huge");
        string path = Path.Combine(directory, "deeper", "huge.img");

        var answer = await PostAsync(CreateJson("huge", "100T", path));

        Assert.False(answer.Status is HttpStatusCode.Created or HttpStatusCode.OK, $"create of 100 TiB succeeded: {answer.Body}");
        Assert.DoesNotContain("huge", await ListedNamesAsync());
        Assert.False(File.Exists(path), "the failed create left its file");
        Assert.False(Directory.Exists(directory), $"the failed create left the directory {directory} it made");
    }

    [Fact]
    public async Task Failed_create_in_the_default_location_leaves_no_file()
    {
        var answer = await PostAsync("""{"name": "huge-default", "size": "100T"}""");

        Assert.False(answer.Status is HttpStatusCode.Created or HttpStatusCode.OK, $"create of 100 TiB succeeded: {answer.Body}");
        Assert.DoesNotContain("huge-default", await ListedNamesAsync());
        Assert.False(File.Exists(_gateway.ExportFile("huge-default")), "the failed create left its file");
    }

    [Theory]
    [InlineData("file-too-small")]
    [InlineData("path-not-creatable")]
    public async Task Create_whose_storage_cannot_be_made_answers_4xx_naming_the_problem(string problem)
    {
        // docs/architecture.md#the-interface-contract: "Errors: 4xx with {error} naming what was wrong". Both are the caller's
        // doing (a path that cannot hold the export), not a server fault.
        string path;
        if (problem == "file-too-small")
        {
            path = Path.Combine(_gateway.DataDirectory, "tiny-" + Guid.NewGuid().ToString("N") + ".img");
            await File.WriteAllBytesAsync(path, new byte[4096]);
        }
        else
        {
            string blocker = Path.Combine(_gateway.DataDirectory, "blocker-" + Guid.NewGuid().ToString("N"));
            await File.WriteAllTextAsync(blocker, "x");
            path = Path.Combine(blocker, "x.img");
        }

        var answer = await PostAsync(CreateJson("storage-" + problem, "16M", path));

        Assert.True((int)answer.Status is >= 400 and < 500,
            $"expected a 4xx for {problem}, got {(int)answer.Status}: {answer.Body}");
        Assert.NotEmpty(ErrorMessage(answer));
    }
}
