using System.CommandLine;
using System.Net;
using Gateway.Host;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace Gateway.Tests.Protocol;

/// <summary>How <c>gateway serve</c> reads <c>--max-connections</c> and <c>--handshake-timeout</c>.</summary>
public sealed class LimitOptionsTests
{
    private static readonly GatewayOptions Single = new("/tmp/data", new IPEndPoint(IPAddress.Loopback, 10809), new IPEndPoint(IPAddress.Loopback, 10880));

    private static GatewayOptions Apply(string[] args, Dictionary<string, string?>? config = null)
    {
        var serve = new Command("serve");
        SecurityCli.AddTo(serve);
        ParseResult parse = serve.Parse(args);
        Assert.Empty(parse.Errors);
        return SecurityCli.Apply(Single, parse, new ConfigurationBuilder().AddInMemoryCollection(config ?? []).Build());
    }

    [Fact]
    public void Defaults_are_qemus_100_connections_and_10_s_handshake()
    {
        GatewayOptions options = Apply([]);
        Assert.Equal(100, options.MaxConnections);
        Assert.Equal(TimeSpan.FromSeconds(10), options.HandshakeTimeout);
        Assert.Equal(TimeSpan.FromSeconds(10), SecurityCli.NbdSettings(options, NullLoggerFactory.Instance).HandshakeTimeout);
    }

    [Fact]
    public void Command_line_wins_over_the_config_file_and_zero_means_no_limit()
    {
        var config = new Dictionary<string, string?> { ["Gateway:MaxConnections"] = "7", ["Gateway:NbdHandshakeTimeout"] = "2.5" };
        GatewayOptions fromConfig = Apply([], config);
        Assert.Equal(7, fromConfig.MaxConnections);
        Assert.Equal(TimeSpan.FromSeconds(2.5), fromConfig.HandshakeTimeout);

        GatewayOptions fromCli = Apply(["--max-connections", "0", "--handshake-timeout", "0"], config);
        Assert.Null(fromCli.MaxConnections);
        Assert.Equal(TimeSpan.Zero, SecurityCli.NbdSettings(fromCli, NullLoggerFactory.Instance).HandshakeTimeout);
    }

    [Theory]
    [InlineData("--max-connections", "-1")]
    [InlineData("--handshake-timeout", "-2")]
    public void Negative_limits_are_refused(string option, string value) =>
        Assert.Throws<ArgumentException>(() => Apply([option, value]));

    [Fact]
    public void Config_value_that_is_not_a_number_is_refused() =>
        Assert.Contains("Gateway:NbdHandshakeTimeout", Assert.Throws<ArgumentException>(() => Apply([], new() { ["Gateway:NbdHandshakeTimeout"] = "10s" })).Message);
}
