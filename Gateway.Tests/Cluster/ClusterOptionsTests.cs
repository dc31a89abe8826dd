using System.CommandLine;
using System.Net;
using System.Text.Json;
using Gateway.Actors.Exports;
using Gateway.Host;
using Gateway.Tests.Interop;
using Microsoft.Extensions.Configuration;
using Xunit;

namespace Gateway.Tests.Cluster;

/// <summary>How <c>gateway serve</c> reads its cluster, health and S3-default settings.</summary>
public sealed class ClusterOptionsTests
{
    private static readonly GatewayOptions Single = new("/tmp/data", new IPEndPoint(IPAddress.Loopback, 10809), new IPEndPoint(IPAddress.Loopback, 10880));

    private static GatewayOptions Apply(string[] args, Dictionary<string, string?>? config = null)
    {
        var serve = new Command("serve");
        ClusterCli.AddTo(serve);
        serve.Options.Add(Health.Option);
        ParseResult parse = serve.Parse(args);
        Assert.Empty(parse.Errors);
        IConfiguration configuration = new ConfigurationBuilder().AddInMemoryCollection(config ?? []).Build();
        GatewayOptions options = Health.Apply(ClusterCli.Apply(Single, parse, configuration), parse, configuration);
        ClusterCli.LoadTls(options);
        return options;
    }

    [Fact]
    public void Without_remoting_the_gateway_is_a_single_node()
    {
        GatewayOptions options = Apply([]);
        Assert.Null(options.Cluster);
        Assert.Null(options.HealthEndpoint);
    }

    [Fact]
    public void Remoting_alone_bootstraps_a_cluster_of_itself_with_peer_on_the_next_port()
    {
        ClusterSettings cluster = Apply(["--remoting", "127.0.0.1:7401", "--postgres", "Host=db"]).Cluster!;
        Assert.Equal(["127.0.0.1:7401"], cluster.Seeds);
        Assert.Equal(7402, cluster.Peer.Port);
        Assert.Equal("127.0.0.1:7401", cluster.NodeName);
        Assert.Equal("127.0.0.1", cluster.PublicHostname);
        Assert.Null(cluster.Discovery);
        Assert.Equal("akka.tcp://gateway@127.0.0.1:7401", ClusterSettings.SeedAddress(cluster.Seeds[0]));
        Assert.Equal("akka.ssl.tcp://gateway@127.0.0.1:7401", ClusterSettings.SeedAddress(cluster.Seeds[0], tls: true));
    }

    [Fact]
    public void Command_line_and_configuration_give_every_setting()
    {
        ClusterSettings cluster = Apply(["--remoting", "0.0.0.0:4053", "--public-hostname", "10.0.0.7", "--seed", "10.0.0.1:4053", "--seed", "10.0.0.2:4053",
            "--node-name", "gw7", "--peer", "0.0.0.0:5000", "--health", "0.0.0.0:8080"],
            new() { ["Gateway:Cluster:Postgres"] = "Host=db;Database=gw" }).Cluster!;
        Assert.Equal(["10.0.0.1:4053", "10.0.0.2:4053"], cluster.Seeds);
        Assert.Equal(("gw7", "10.0.0.7", 5000, "Host=db;Database=gw"), (cluster.NodeName, cluster.PublicHostname, cluster.Peer.Port, cluster.Postgres));
        Assert.Equal(8080, Apply(["--health", "0.0.0.0:8080"]).HealthEndpoint!.Port);
    }

    [Fact]
    public void Kubernetes_discovery_replaces_seeds()
    {
        ClusterSettings cluster = Apply([], new()
        {
            ["Gateway:Cluster:Remoting"] = "0.0.0.0:4053",
            ["Gateway:Cluster:PublicHostname"] = "10.244.1.7",
            ["Gateway:Cluster:Postgres"] = "Host=db",
            ["Gateway:Cluster:Discovery"] = "kubernetes",
            ["Gateway:Cluster:ServiceName"] = "gw-gateway",
            ["Gateway:Cluster:Namespace"] = "storage",
            ["Gateway:Cluster:RequiredContactPoints"] = "3",
        }).Cluster!;
        Assert.Empty(cluster.Seeds);
        Assert.Equal(new KubernetesDiscovery("gw-gateway", "storage", KubernetesDiscovery.DefaultManagementPort, 3), cluster.Discovery);
    }

    [Theory]
    [InlineData("--postgres and --seed need --remoting", new[] { "--seed", "127.0.0.1:7401" }, "--remoting")]
    [InlineData("no PostgreSQL", new[] { "--remoting", "127.0.0.1:7401" }, "PostgreSQL")]
    [InlineData("wildcard without public host", new[] { "--remoting", "0.0.0.0:7401", "--postgres", "Host=db" }, "--public-hostname")]
    [InlineData("bad seed", new[] { "--remoting", "127.0.0.1:7401", "--postgres", "Host=db", "--seed", "gw1" }, "--seed 'gw1'")]
    [InlineData("bad remoting", new[] { "--remoting", "7401", "--postgres", "Host=db" }, "--remoting '7401'")]
    public void Bad_settings_are_refused_with_what_is_wrong(string what, string[] args, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => Apply(args));
        Assert.True(e.Message.Contains(expected, StringComparison.Ordinal), $"{what}: {e.Message}");
    }

    [Fact]
    public void Unknown_discovery_and_discovery_with_seeds_are_refused()
    {
        Assert.Contains("not one of seeds, kubernetes", Assert.Throws<ArgumentException>(() =>
            Apply(["--remoting", "127.0.0.1:7401", "--postgres", "Host=db"], new() { ["Gateway:Cluster:Discovery"] = "dns" })).Message);
        Assert.Contains("exclude each other", Assert.Throws<ArgumentException>(() =>
            Apply(["--remoting", "127.0.0.1:7401", "--postgres", "Host=db", "--seed", "127.0.0.1:7401"], new() { ["Gateway:Cluster:Discovery"] = "kubernetes" })).Message);
    }

    [Fact]
    public async Task Cluster_tls_takes_all_three_files_from_the_command_line_or_configuration()
    {
        OpensslPki pki = await OpensslPki.CreateAsync();
        try
        {
            string node = await pki.IssueNodeAsync("node", "gw1");
            string cert = Path.Combine(node, "node-cert.pem"), key = Path.Combine(node, "node-key.pem"), ca = Path.Combine(node, "ca-cert.pem");
            Assert.Null(Apply(["--remoting", "127.0.0.1:7401", "--postgres", "Host=db"]).Cluster!.Tls);
            Assert.Equal(new ClusterTlsFiles(cert, key, ca), Apply(["--remoting", "127.0.0.1:7401", "--postgres", "Host=db",
                "--cluster-tls-cert", cert, "--cluster-tls-key", key, "--cluster-tls-ca", ca]).Cluster!.Tls);
            Assert.Equal(new ClusterTlsFiles(cert, key, ca), Apply(["--remoting", "127.0.0.1:7401", "--postgres", "Host=db"], new()
            {
                ["Gateway:Cluster:TlsCertificate"] = cert,
                ["Gateway:Cluster:TlsKey"] = key,
                ["Gateway:Cluster:TlsCa"] = ca,
            }).Cluster!.Tls);

            // A partial set, a missing file, a file that is not PEM: refused at startup, saying what.
            string[] cluster = ["--remoting", "127.0.0.1:7401", "--postgres", "Host=db"];
            Assert.Contains("--cluster-tls-ca missing", Assert.Throws<ArgumentException>(() =>
                Apply([.. cluster, "--cluster-tls-cert", cert, "--cluster-tls-key", key])).Message);
            Assert.Contains("--cluster-tls-cert, --cluster-tls-key missing", Assert.Throws<ArgumentException>(() =>
                Apply(cluster, new() { ["Gateway:Cluster:TlsCa"] = ca })).Message);
            Assert.Contains("do not load", Assert.Throws<ArgumentException>(() =>
                Apply([.. cluster, "--cluster-tls-cert", cert, "--cluster-tls-key", key, "--cluster-tls-ca", Path.Combine(node, "absent.pem")])).Message);
            string garbage = Path.Combine(node, "garbage.pem");
            await File.WriteAllTextAsync(garbage, "not a certificate");
            Assert.Contains("do not load", Assert.Throws<ArgumentException>(() =>
                Apply([.. cluster, "--cluster-tls-cert", garbage, "--cluster-tls-key", key, "--cluster-tls-ca", ca])).Message);
            Assert.Contains("need cluster mode", Assert.Throws<ArgumentException>(() => Apply(["--cluster-tls-cert", cert])).Message);
        }
        finally
        {
            pki.Delete();
        }
    }

    [Fact]
    public void S3_exports_take_endpoint_and_bucket_from_configuration_when_the_request_has_none()
    {
        IConfiguration config = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Gateway:S3:ServiceUrl"] = "http://minio:9000",
            ["Gateway:S3:Bucket"] = "disks",
        }).Build();
        S3Spec? defaults = AdminApi.S3Defaults(config);
        CreateExportRequest bare = JsonSerializer.Deserialize("""{"name":"a","size":"1G","backend":{"type":"s3"}}""", AdminJson.Default.CreateExportRequest)!;
        ExportSpec? spec = AdminApi.ToSpec(bare, out string? problem, defaults);
        Assert.Null(problem);
        Assert.Equal(("http://minio:9000", "disks", "a/"), (spec!.Backend.S3!.Endpoint, spec.Backend.S3.Bucket, spec.Backend.S3.Prefix));

        CreateExportRequest own = JsonSerializer.Deserialize("""{"name":"b","size":"1G","backend":{"type":"s3","s3":{"bucket":"other","prefix":"vm/"}}}""", AdminJson.Default.CreateExportRequest)!;
        spec = AdminApi.ToSpec(own, out problem, defaults);
        Assert.Null(problem);
        Assert.Equal(("http://minio:9000", "other", "vm/"), (spec!.Backend.S3!.Endpoint, spec.Backend.S3.Bucket, spec.Backend.S3.Prefix));

        Assert.Null(AdminApi.ToSpec(bare, out problem));
        Assert.Contains("endpoint", problem);

        // An overlay on an S3 base image: the configured store unless the request names one; the bucket is the image's.
        CreateExportRequest overlay = JsonSerializer.Deserialize("""{"name":"c","size":"1G","backend":{"type":"overlay","baseImage":"s3://images/deb.qcow2"}}""", AdminJson.Default.CreateExportRequest)!;
        spec = AdminApi.ToSpec(overlay, out problem, defaults);
        Assert.Null(problem);
        Assert.Equal(("http://minio:9000", null, null), (spec!.Backend.S3!.Endpoint, spec.Backend.S3.Bucket, spec.Backend.S3.Prefix));
        Assert.Null(AdminApi.ToSpec(overlay, out problem));
        Assert.Contains("give s3 settings with its endpoint", problem);
        CreateExportRequest withBucket = JsonSerializer.Deserialize("""{"name":"d","size":"1G","backend":{"type":"overlay","baseImage":"s3://images/deb.qcow2","s3":{"endpoint":"http://x:9000","bucket":"images"}}}""", AdminJson.Default.CreateExportRequest)!;
        Assert.Null(AdminApi.ToSpec(withBucket, out problem));
        Assert.Contains("bucket and key are in the baseImage", problem);
        CreateExportRequest notS3 = JsonSerializer.Deserialize("""{"name":"e","size":"1G","backend":{"type":"overlay","baseImage":"/images/deb.qcow2","s3":{"endpoint":"http://x:9000"}}}""", AdminJson.Default.CreateExportRequest)!;
        Assert.Null(AdminApi.ToSpec(notS3, out problem));
        Assert.Contains("s3 settings are only for", problem);
    }
}
