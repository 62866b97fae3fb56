{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. KubeRay derives names like <name>-serve-svc and
<name>-<hash>-head from it, so keep it short: truncated to 40 here to leave room.
*/}}
{{- define "serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value: name-version.
*/}}
{{- define "serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. No model version here: labels end up on pod templates, and a
version change must not roll pods.
*/}}
{{- define "serving.labels" -}}
helm.sh/chart: {{ include "serving.chart" . }}
{{ include "serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: serving
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: name and instance only.
*/}}
{{- define "serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "serving.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference.
*/}}
{{- define "serving.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Name of the bundled MinIO's resources and of its generated Secret.
*/}}
{{- define "serving.minio.fullname" -}}
{{- printf "%s-minio" (include "serving.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "serving.minio.secretName" -}}
{{- default (include "serving.minio.fullname" .) .Values.minio.auth.existingSecret }}
{{- end }}

{{/*
Effective store settings: the bundled MinIO fills in what the user left empty.
*/}}
{{- define "serving.s3.endpoint" -}}
{{- if .Values.store.s3.endpoint }}
{{- .Values.store.s3.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc:9000" (include "serving.minio.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "serving.s3.addressingStyle" -}}
{{- if and .Values.minio.enabled (eq .Values.store.s3.addressingStyle "auto") }}
{{- "path" }}
{{- else }}
{{- .Values.store.s3.addressingStyle }}
{{- end }}
{{- end }}

{{/*
Secret holding the store's access key, with the key names inside it; empty when
the pod's identity (IRSA / workload identity) is used.
*/}}
{{- define "serving.credentials.secretName" -}}
{{- if .Values.store.credentials.existingSecret }}
{{- .Values.store.credentials.existingSecret }}
{{- else if .Values.minio.enabled }}
{{- include "serving.minio.secretName" . }}
{{- end }}
{{- end }}

{{- define "serving.credentials.idKey" -}}
{{- if or .Values.store.credentials.existingSecret (not .Values.minio.enabled) }}
{{- .Values.store.credentials.accessKeyIdKey }}
{{- else }}
{{- "root-user" }}
{{- end }}
{{- end }}

{{- define "serving.credentials.secretKey" -}}
{{- if or .Values.store.credentials.existingSecret (not .Values.minio.enabled) }}
{{- .Values.store.credentials.secretAccessKeyKey }}
{{- else }}
{{- "root-password" }}
{{- end }}
{{- end }}

{{/*
The app's args (serving.config.AppConfig). Only the alias name goes here, never
the version it points to: the alias lives in the store.
*/}}
{{- define "serving.appArgs" -}}
store: {{ .Values.store.uri | quote }}
cache_dir: {{ .Values.cache.mountPath | quote }}
cache_max_bytes: {{ .Values.cache.maxBytes | int64 }}
poll_interval_s: {{ .Values.serve.pollIntervalSeconds }}
poll_jitter: {{ .Values.serve.pollJitter }}
retry_backoff_max_s: {{ .Values.serve.retryBackoffMaxSeconds }}
max_body_bytes: {{ .Values.serve.maxBodyBytes | int64 }}
body_timeout_s: {{ .Values.serve.bodyTimeoutSeconds }}
layout: {{ .Values.serve.layout }}
access_log: {{ .Values.serve.accessLog }}
ingress:
  {{- toYaml .Values.serve.ingress | nindent 2 }}
models:
  {{- toYaml .Values.serve.models | nindent 2 }}
pool:
  {{- toYaml .Values.serve.pool | nindent 2 }}
shared_workers:
  {{- toYaml .Values.serve.shared_workers | nindent 2 }}
{{- end }}

{{/*
serveConfigV2: a YAML string KubeRay applies to the running cluster in place.
*/}}
{{- define "serving.serveConfigV2" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.ports.serve }}
  keep_alive_timeout_s: {{ .Values.serve.connections.keepAliveSeconds }}
{{- if .Values.ports.grpc }}
# NOTE: OIP over gRPC; the replicas answer each RPC with the method of its name
# (serving.server.ray.app.GrpcMethods), over the same data plane as HTTP.
grpc_options:
  port: {{ .Values.ports.grpc }}
  grpc_servicer_functions:
    - serving.server.grpc.add_GRPCInferenceServiceServicer_to_server
{{- end }}
applications:
  - name: {{ .Values.serve.applicationName }}
    route_prefix: {{ .Values.serve.routePrefix }}
    import_path: {{ .Values.serve.importPath }}
    args:
      {{- include "serving.appArgs" . | nindent 6 }}
{{- end }}

{{/*
Environment shared by every Ray container. Credentials come only from
secretKeyRef, never from plain values.
*/}}
{{- define "serving.env" -}}
- name: SERVING_STORE
  value: {{ .Values.store.uri | quote }}
- name: SERVING_CACHE_DIR
  value: {{ .Values.cache.mountPath | quote }}
- name: SERVING_CACHE_MAX_BYTES
  value: {{ .Values.cache.maxBytes | int64 | quote }}
- name: SERVING_S3_ADDRESSING_STYLE
  value: {{ include "serving.s3.addressingStyle" . | quote }}
- name: SERVING_PROGRESS
  value: "false"
- name: TORCH_FORCE_WEIGHTS_ONLY_LOAD
  value: "1"
- name: HOME
  value: /tmp
{{- with (include "serving.s3.endpoint" .) }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.store.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with (include "serving.credentials.secretName" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "serving.credentials.idKey" $ }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "serving.credentials.secretKey" $ }}
{{- end }}
{{- include "serving.trustEnv" . }}
{{- if .Values.serve.highThroughput }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE
  value: "0"
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
{{- if not .Values.serve.haproxyMetrics }}
- name: RAY_SERVE_HAPROXY_METRICS_ENABLED
  value: "0"
{{- end }}
- name: RAY_SERVE_HAPROXY_MAXCONN
  value: {{ .Values.serve.connections.maxConnections | quote }}
- name: RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S
  value: {{ .Values.serve.connections.clientTimeoutSeconds | quote }}
{{- end }}
{{- with .Values.store.oci }}
{{- if .plainHttp }}
- name: SERVING_OCI_PLAIN_HTTP
  value: "true"
{{- end }}
{{- if .username }}
- name: SERVING_OCI_USERNAME
  value: {{ .username | quote }}
{{- end }}
{{- if .passwordSecret.existingSecret }}
- name: SERVING_OCI_PASSWORD_FILE
  value: {{ printf "%s/password/password" (trimSuffix "/" .mountPath) | quote }}
{{- end }}
{{- if .dockerConfigSecret }}
- name: SERVING_OCI_DOCKER_CONFIG
  value: {{ printf "%s/docker/config.json" (trimSuffix "/" .mountPath) | quote }}
{{- end }}
{{- if .caSecret.existingSecret }}
- name: SERVING_OCI_CA_FILE
  value: {{ printf "%s/ca/ca.crt" (trimSuffix "/" .mountPath) | quote }}
{{- end }}
{{- end }}
{{- with .Values.admin.existingSecret }}
- name: SERVING_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.admin.tokenKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Load policy and encryption environment (SECURITY.md). Only paths, key ids and names
are rendered: key material stays in Secrets, mounted as files or read through
secretKeyRef. Nothing is rendered for a setting left at its default.
*/}}
{{- define "serving.trustEnv" -}}
{{- $trust := .Values.trust }}
{{- if $trust.requireSignature }}
- name: SERVING_REQUIRE_SIGNATURE
  value: "true"
{{- end }}
{{- if $trust.trustedKeys.existingSecret }}
- name: SERVING_TRUSTED_KEYS
  value: {{ $trust.trustedKeys.mountPath | quote }}
{{- end }}
{{- if $trust.oms.requireSignature }}
- name: SERVING_REQUIRE_OMS_SIGNATURE
  value: "true"
{{- end }}
{{- if $trust.oms.publicKeys.existingSecret }}
- name: SERVING_OMS_PUBLIC_KEYS
  value: {{ $trust.oms.publicKeys.mountPath | quote }}
{{- end }}
{{- if $trust.oms.certificateChains.existingSecret }}
- name: SERVING_OMS_CERTIFICATE_CHAINS
  value: {{ $trust.oms.certificateChains.mountPath | quote }}
{{- end }}
{{- with $trust.unrestrictedModels }}
- name: SERVING_UNRESTRICTED_MODELS
  value: {{ join "," . | quote }}
{{- end }}
{{- with $trust.trustedGlobals }}
{{- /* NOTE: a plain list[str] setting, which pydantic-settings decodes from JSON. */}}
- name: SERVING_TRUSTED_GLOBALS
  value: {{ toJson . | quote }}
{{- end }}
{{- $enc := .Values.encryption }}
{{- if $enc.keySecret.existingSecret }}
- name: SERVING_ENCRYPTION_KEY_FILE
  value: {{ printf "%s/kek" (trimSuffix "/" $enc.keySecret.mountPath) | quote }}
{{- end }}
{{- with $enc.kmsKeyId }}
- name: SERVING_ENCRYPTION_KMS_KEY_ID
  value: {{ . | quote }}
{{- end }}
{{- $sse := .Values.store.sse }}
{{- with $sse.mode }}
- name: SERVING_S3_SSE
  value: {{ . | quote }}
{{- end }}
{{- with $sse.kmsKeyId }}
- name: SERVING_S3_SSE_KMS_KEY_ID
  value: {{ . | quote }}
{{- end }}
{{- with $sse.customerKey.existingSecret }}
- name: SERVING_S3_SSE_C_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $sse.customerKey.key }}
{{- end }}
{{- end }}

{{/*
Refuse combinations that would render but never work. Renders nothing.
*/}}
{{- define "serving.validateTrust" -}}
{{- $sse := .Values.store.sse }}
{{- if and $sse.mode $sse.customerKey.existingSecret }}
{{- fail "store.sse.mode and store.sse.customerKey are exclusive: choose one server-side encryption" }}
{{- end }}
{{- if and $sse.kmsKeyId (ne $sse.mode "aws:kms") }}
{{- fail "store.sse.kmsKeyId needs store.sse.mode aws:kms" }}
{{- end }}
{{- $keysFromEnv := false }}
{{- range .Values.extraEnv }}
{{- if eq .name "SERVING_TRUSTED_KEYS" }}{{ $keysFromEnv = true }}{{ end }}
{{- end }}
{{- $omsFromEnv := false }}
{{- range .Values.extraEnv }}
{{- if hasPrefix "SERVING_OMS_" .name }}{{ $omsFromEnv = true }}{{ end }}
{{- end }}
{{- with .Values.trust.oms }}
{{- if and .requireSignature (not .publicKeys.existingSecret) (not .certificateChains.existingSecret) (not $omsFromEnv) }}
{{- fail "trust.oms.requireSignature needs trust.oms.publicKeys.existingSecret or trust.oms.certificateChains.existingSecret: without a trusted signer every version is refused" }}
{{- end }}
{{- end }}
{{- if and .Values.trust.requireSignature (not .Values.trust.trustedKeys.existingSecret) (not $keysFromEnv) }}
{{- fail "trust.requireSignature needs trust.trustedKeys.existingSecret (a Secret of PEM public keys): without trusted keys every version is refused" }}
{{- end }}
{{- if and .Values.trust.trustedKeys.existingSecret .Values.encryption.keySecret.existingSecret (eq (trimSuffix "/" .Values.trust.trustedKeys.mountPath) (trimSuffix "/" .Values.encryption.keySecret.mountPath)) }}
{{- fail "trust.trustedKeys.mountPath and encryption.keySecret.mountPath must differ" }}
{{- end }}
{{- end }}

{{/*
Volumes shared by head and worker pods: scratch /tmp, /dev/shm and the cache.
*/}}
{{- define "serving.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.scratch.shmSizeLimit }}
{{- $v := .Values.cache.volume }}
- name: model-cache
{{- if eq $v.type "emptyDir" }}
  emptyDir:
    sizeLimit: {{ $v.emptyDir.sizeLimit }}
    {{- with $v.emptyDir.medium }}
    medium: {{ . }}
    {{- end }}
{{- else if eq $v.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ required "cache.volume.persistentVolumeClaim.claimName is required" $v.persistentVolumeClaim.claimName }}
{{- else if eq $v.type "ephemeral" }}
  ephemeral:
    volumeClaimTemplate:
      metadata:
        labels:
          {{- include "serving.selectorLabels" . | nindent 10 }}
      spec:
        accessModes:
          {{- toYaml $v.ephemeral.accessModes | nindent 10 }}
        {{- with $v.ephemeral.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ $v.ephemeral.size }}
{{- else if eq $v.type "hostPath" }}
  hostPath:
    path: {{ $v.hostPath.path }}
    type: {{ $v.hostPath.type }}
{{- end }}
{{- /*
NOTE: Secret files are root-owned; 0440 plus the pod's fsGroup (1000 by default)
makes them readable by the non-root uid and nobody else. Without an fsGroup the
uid cannot read them.
*/}}
{{- with .Values.trust.trustedKeys.existingSecret }}
- name: trusted-keys
  secret:
    secretName: {{ . }}
    defaultMode: 288  # 0440: owner and fsGroup read, nothing else
{{- end }}
{{- with .Values.trust.oms.publicKeys.existingSecret }}
- name: oms-keys
  secret:
    secretName: {{ . }}
    defaultMode: 288  # 0440: owner and fsGroup read, nothing else
{{- end }}
{{- with .Values.trust.oms.certificateChains.existingSecret }}
- name: oms-cas
  secret:
    secretName: {{ . }}
    defaultMode: 288  # 0440: owner and fsGroup read, nothing else
{{- end }}
{{- with .Values.store.oci }}
{{- if .passwordSecret.existingSecret }}
- name: oci-password
  secret:
    secretName: {{ .passwordSecret.existingSecret }}
    defaultMode: 288  # 0440: owner and fsGroup read, nothing else
    items:
      - key: {{ .passwordSecret.key }}
        path: password
{{- end }}
{{- if .dockerConfigSecret }}
- name: oci-docker-config
  secret:
    secretName: {{ .dockerConfigSecret }}
    defaultMode: 288  # 0440: owner and fsGroup read, nothing else
    items:
      - key: .dockerconfigjson
        path: config.json
{{- end }}
{{- if .caSecret.existingSecret }}
- name: oci-ca
  secret:
    secretName: {{ .caSecret.existingSecret }}
    defaultMode: 288  # 0440: owner and fsGroup read, nothing else
    items:
      - key: {{ .caSecret.key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- with .Values.encryption.keySecret }}
{{- if .existingSecret }}
- name: encryption-key
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 288  # 0440: owner and fsGroup read, nothing else
    items:
      - key: {{ .key }}
        path: kek
{{- end }}
{{- end }}
{{- end }}

{{- define "serving.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if .Values.trust.trustedKeys.existingSecret }}
- name: trusted-keys
  mountPath: {{ .Values.trust.trustedKeys.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.encryption.keySecret.existingSecret }}
- name: encryption-key
  mountPath: {{ .Values.encryption.keySecret.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.trust.oms }}
{{- if .publicKeys.existingSecret }}
- name: oms-keys
  mountPath: {{ .publicKeys.mountPath }}
  readOnly: true
{{- end }}
{{- if .certificateChains.existingSecret }}
- name: oms-cas
  mountPath: {{ .certificateChains.mountPath }}
  readOnly: true
{{- end }}
{{- end }}
{{- with .Values.store.oci }}
{{- $base := trimSuffix "/" .mountPath }}
{{- if .passwordSecret.existingSecret }}
- name: oci-password
  mountPath: {{ $base }}/password
  readOnly: true
{{- end }}
{{- if .dockerConfigSecret }}
- name: oci-docker-config
  mountPath: {{ $base }}/docker
  readOnly: true
{{- end }}
{{- if .caSecret.existingSecret }}
- name: oci-ca
  mountPath: {{ $base }}/ca
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/*
rayStartParams: user values first, then what the chart needs (metrics port,
dashboard bound to all interfaces on the head). Values are strings, as KubeRay wants.
*/}}
{{- define "serving.rayStartParams" -}}
{{- $params := dict "metrics-export-port" (toString .root.Values.ports.metrics) }}
{{- if .head }}
{{- $_ := set $params "dashboard-host" "0.0.0.0" }}
{{- end }}
{{- range $k, $v := .params }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- $_ := set $params "metrics-export-port" (toString .root.Values.ports.metrics) }}
{{- range $k, $v := $params }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end }}

{{/*
A Ray pod template. Args: root (the chart context), component (ray-head or
ray-worker), group (head or one workerGroups entry). The Ray container is first,
as KubeRay requires. KubeRay wraps the command with `ray start`.
*/}}
{{- define "serving.rayPodTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
metadata:
  # NOTE: no chart version or model version here: any change to this template
  # makes KubeRay start a whole new Ray cluster.
  labels:
    {{- include "serving.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/part-of: serving
    app.kubernetes.io/component: {{ .component }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "serving.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with (default $root.Values.nodeSelector $group.nodeSelector) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $root.Values.tolerations $group.tolerations) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $root.Values.affinity $group.affinity) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .component "ray-head") }}
      image: {{ include "serving.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      ports:
        - name: serve
          containerPort: {{ $root.Values.ports.serve }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $root.Values.ports.metrics }}
          protocol: TCP
        {{- if $root.Values.ports.grpc }}
        - name: grpc
          containerPort: {{ $root.Values.ports.grpc }}
          protocol: TCP
        {{- end }}
        {{- if eq .component "ray-head" }}
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: {{ $root.Values.ports.dashboard }}
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        {{- end }}
      env:
        {{- include "serving.env" $root | nindent 8 }}
      {{- with $root.Values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $group.resources | nindent 8 }}
      volumeMounts:
        {{- include "serving.volumeMounts" $root | nindent 8 }}
      lifecycle:
        preStop:
          exec:
            # NOTE: lets Serve drain in-flight requests before the pod goes away.
            command: ["/bin/sh", "-c", "ray stop"]
  volumes:
    {{- include "serving.volumes" $root | nindent 4 }}
{{- end }}
