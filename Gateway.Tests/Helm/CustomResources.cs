using System.Text.Json.Serialization;
using k8s;
using k8s.Models;

namespace Gateway.Tests.Helm;

/// <summary>
/// The custom resources the chart renders, as types for KubernetesClient's strict YAML load
/// (which otherwise rejects a kind it does not know). Their fields are the CRDs' (the schemas in
/// ops/helm-render/crds), so a misspelled field fails the strict load as it does for built-in kinds.
/// </summary>
public static class CustomResources
{
    /// <summary>apiVersion/kind → type, for <c>KubernetesYaml.LoadAllFromString(typeMap:)</c>.</summary>
    public static readonly IDictionary<string, Type> TypeMap = new Dictionary<string, Type>
    {
        [$"{V1VolumeSnapshotClass.KubeApiVersionWithGroup}/{V1VolumeSnapshotClass.KubeKind}"] = typeof(V1VolumeSnapshotClass),
        [$"{V1Beta1SnapshotMetadataService.KubeApiVersionWithGroup}/{V1Beta1SnapshotMetadataService.KubeKind}"] = typeof(V1Beta1SnapshotMetadataService),
    };
}

/// <summary>snapshot.storage.k8s.io/v1 VolumeSnapshotClass (kubernetes-csi/external-snapshotter).</summary>
public sealed class V1VolumeSnapshotClass : IKubernetesObject<V1ObjectMeta>
{
    public const string KubeApiVersionWithGroup = "snapshot.storage.k8s.io/v1";
    public const string KubeKind = "VolumeSnapshotClass";

    [JsonPropertyName("apiVersion")]
    public string ApiVersion { get; set; } = KubeApiVersionWithGroup;

    [JsonPropertyName("kind")]
    public string Kind { get; set; } = KubeKind;

    [JsonPropertyName("metadata")]
    public V1ObjectMeta Metadata { get; set; } = new();

    /// <summary>Required: the CSI driver that takes the snapshots.</summary>
    [JsonPropertyName("driver")]
    public string? Driver { get; set; }

    /// <summary>Required: Delete or Retain.</summary>
    [JsonPropertyName("deletionPolicy")]
    public string? DeletionPolicy { get; set; }

    [JsonPropertyName("parameters")]
    public IDictionary<string, string>? Parameters { get; set; }
}

/// <summary>cbt.storage.k8s.io/v1beta1 SnapshotMetadataService (kubernetes-csi/external-snapshot-metadata v1.0.0).</summary>
public sealed class V1Beta1SnapshotMetadataService : IKubernetesObject<V1ObjectMeta>
{
    public const string KubeApiVersionWithGroup = "cbt.storage.k8s.io/v1beta1";
    public const string KubeKind = "SnapshotMetadataService";

    [JsonPropertyName("apiVersion")]
    public string ApiVersion { get; set; } = KubeApiVersionWithGroup;

    [JsonPropertyName("kind")]
    public string Kind { get; set; } = KubeKind;

    [JsonPropertyName("metadata")]
    public V1ObjectMeta Metadata { get; set; } = new();

    [JsonPropertyName("spec")]
    public SnapshotMetadataServiceSpec? Spec { get; set; }
}

public sealed class SnapshotMetadataServiceSpec
{
    /// <summary>Required: host:port of the sidecar's gRPC service.</summary>
    [JsonPropertyName("address")]
    public string? Address { get; set; }

    /// <summary>Required: the audience of the tokens backup clients present.</summary>
    [JsonPropertyName("audience")]
    public string? Audience { get; set; }

    /// <summary>Required: base64 PEM of the CA that signed the sidecar's certificate.</summary>
    [JsonPropertyName("caCert")]
    public string? CaCert { get; set; }
}
