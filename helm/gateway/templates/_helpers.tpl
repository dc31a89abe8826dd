{{/* Names */}}
{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The headless Service that gives the StatefulSet's pods their DNS names. */}}
{{- define "gateway.headlessName" -}}
{{- printf "%s-cluster" (include "gateway.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
Akka.Management's service name (Gateway:Cluster:ServiceName). Akka.Discovery.KubernetesApi
lists the pods labelled app=<this> (its selector app={0}), so every gateway pod carries that label.
*/}}
{{- define "gateway.clusterServiceName" -}}
{{- default (include "gateway.fullname" .) .Values.cluster.serviceName }}
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels */}}
{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Pod labels: the selector labels plus the discovery label. */}}
{{- define "gateway.podLabels" -}}
{{ include "gateway.selectorLabels" . }}
app: {{ include "gateway.clusterServiceName" . }}
{{- end }}

{{- define "gateway.requiredContactPoints" -}}
{{- if gt (int .Values.cluster.requiredContactPoints) 0 }}
{{- .Values.cluster.requiredContactPoints | int }}
{{- else }}
{{- min 3 (int .Values.replicaCount) }}
{{- end }}
{{- end }}

{{/* Secrets: the chart's own when it is given the value, else the existing one. */}}
{{- define "gateway.postgresSecretName" -}}
{{- if .Values.postgres.connectionString }}
{{- printf "%s-postgres" (include "gateway.fullname" .) }}
{{- else }}
{{- required "postgres.existingSecret or postgres.connectionString is required: the cluster keeps its journal in PostgreSQL" .Values.postgres.existingSecret }}
{{- end }}
{{- end }}

{{- define "gateway.adminSecretName" -}}
{{- if .Values.admin.token }}
{{- printf "%s-admin" (include "gateway.fullname" .) }}
{{- else }}
{{- required "admin.existingSecret or admin.token is required: the admin API listens beyond loopback and needs a bearer token" .Values.admin.existingSecret }}
{{- end }}
{{- end }}

{{/* "" when the pods get no S3 credentials from a Secret. */}}
{{- define "gateway.s3SecretName" -}}
{{- if or .Values.s3.accessKeyId .Values.s3.secretAccessKey }}
{{- printf "%s-s3" (include "gateway.fullname" .) }}
{{- else }}
{{- .Values.s3.existingSecret }}
{{- end }}
{{- end }}

{{- define "gateway.endpoint" -}}
{{- $address := .root.Values.listenAddress }}
{{- if contains ":" $address }}
{{- printf "[%s]:%d" $address (int .port) }}
{{- else }}
{{- printf "%s:%d" $address (int .port) }}
{{- end }}
{{- end }}

{{/*
gateway.json: what the gateway reads with `serve --config`. Per-pod and secret values come
from the environment (Gateway__Cluster__NodeName, ...), see the StatefulSet.
*/}}
{{- define "gateway.config" -}}
{{- $ports := .Values.ports }}
{{- $gateway := deepCopy .Values.config }}
{{- $_ := set $gateway "Data" .Values.dataPath }}
{{- $_ := set $gateway "Nbd" (include "gateway.endpoint" (dict "root" . "port" $ports.nbd)) }}
{{- $_ := set $gateway "Admin" (include "gateway.endpoint" (dict "root" . "port" $ports.admin)) }}
{{- $_ := set $gateway "Health" (include "gateway.endpoint" (dict "root" . "port" $ports.health)) }}
{{- $cluster := dict
      "Remoting" (include "gateway.endpoint" (dict "root" . "port" $ports.remoting))
      "Peer" (include "gateway.endpoint" (dict "root" . "port" $ports.peer))
      "Discovery" "kubernetes"
      "ManagementPort" ($ports.management | int)
      "ServiceName" (include "gateway.clusterServiceName" .)
      "RequiredContactPoints" (include "gateway.requiredContactPoints" . | int) }}
{{- if .Values.clusterTls.enabled }}
{{- $_ := set $cluster "TlsCertificate" "/etc/gateway/cluster-tls/tls.crt" }}
{{- $_ := set $cluster "TlsKey" "/etc/gateway/cluster-tls/tls.key" }}
{{- $_ := set $cluster "TlsCa" "/etc/gateway/cluster-tls/ca.crt" }}
{{- end }}
{{- $_ := set $gateway "Cluster" (merge $cluster (get $gateway "Cluster" | default dict)) }}
{{- if or .Values.s3.serviceUrl .Values.s3.bucket }}
{{- $_ := set $gateway "S3" (dict "ServiceUrl" .Values.s3.serviceUrl "Bucket" .Values.s3.bucket) }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $_ := set $gateway "Tls" (dict "Certificates" "/etc/gateway/tls" "Mode" .Values.tls.mode "RequireClientCertificate" .Values.tls.requireClientCertificate) }}
{{- end }}
{{- dict "Gateway" $gateway | toPrettyJson }}
{{- end }}

{{/*
CSI driver. The name is the plugin's (GetPluginInfo in `gateway csi`): the CSIDriver object,
the classes' provisioner and driver, the kubelet's plugin folder and the SnapshotMetadataService
all carry it, so it is fixed, not a value.
*/}}
{{- define "gateway.csi.driverName" -}}
csi.nbd-gateway.dev
{{- end }}

{{- define "gateway.csi.controllerName" -}}
{{- printf "%s-csi-controller" (include "gateway.fullname" . | trunc 48 | trimSuffix "-") }}
{{- end }}

{{- define "gateway.csi.nodeName" -}}
{{- printf "%s-csi-node" (include "gateway.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "gateway.csi.snapshotMetadataName" -}}
{{- printf "%s-csi-snapshot-metadata" (include "gateway.fullname" . | trunc 41 | trimSuffix "-") }}
{{- end }}

{{/*
The CSI pods' labels: a name of their own, so that no gateway Service, the budget or the
anti-affinity (all app.kubernetes.io/name=<name>) ever selects them. Call with
(dict "root" $ "component" "controller").
*/}}
{{- define "gateway.csi.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-csi" (include "gateway.name" .root) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Where the plugin finds the gateway: the chart's own admin and NBD Services. */}}
{{- define "gateway.csi.adminUrl" -}}
{{- if not .Values.admin.service.enabled }}
{{- fail "csi.enabled needs admin.service.enabled: the CSI plugin creates and deletes exports through the admin API" }}
{{- end }}
{{- printf "http://%s-admin.%s.svc:%d/" (include "gateway.fullname" .) .Release.Namespace (int .Values.admin.service.port) }}
{{- end }}

{{- define "gateway.csi.nbdAddress" -}}
{{- printf "%s.%s.svc:%d" (include "gateway.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}

{{/* The socket the plugin listens on and every sidecar dials, in the shared /csi folder. */}}
{{- define "gateway.csi.socket" -}}
/csi/csi.sock
{{- end }}

{{/* The node plugin's socket folder as the kubelet sees it. */}}
{{- define "gateway.csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (.Values.csi.kubeletDir | trimSuffix "/") (include "gateway.csi.driverName" .) }}
{{- end }}

{{- define "gateway.csi.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/* The plugin's command line, the same in both modes but for --mode and --node-id. */}}
{{- define "gateway.csi.pluginArgs" -}}
- csi
- --mode
- {{ .mode }}
- --endpoint
- unix://{{ include "gateway.csi.socket" .root }}
- --admin
- {{ include "gateway.csi.adminUrl" .root }}
- --nbd
- {{ include "gateway.csi.nbdAddress" .root }}
- --token-file
- /etc/gateway-csi/admin/{{ .root.Values.admin.existingSecretKey }}
{{- if eq .mode "node" }}
- --node-id
- $(CSI_NODE_ID)
{{- with .root.Values.csi.node.nbdTls.existingSecret }}
- --nbd-tls-ca
- /etc/gateway-csi/nbd-tls/ca.crt
{{- if $.root.Values.csi.node.nbdTls.clientCertificate }}
- --nbd-tls-cert
- /etc/gateway-csi/nbd-tls/tls.crt
- --nbd-tls-key
- /etc/gateway-csi/nbd-tls/tls.key
{{- end }}
{{- with $.root.Values.csi.node.nbdTls.hostname }}
- --nbd-tls-hostname
- {{ . }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The security context of every container but the node plugin: no privilege at all. */}}
{{- define "gateway.csi.restricted" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
