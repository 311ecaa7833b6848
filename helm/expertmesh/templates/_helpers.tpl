{{/* Names and labels. */}}
{{- define "expertmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "expertmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "expertmesh.labels" -}}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "expertmesh.tokensSecret" -}}
{{- .Values.tokens.existingSecret | default (printf "%s-tokens" (include "expertmesh.fullname" .)) -}}
{{- end -}}

{{/* The Serve config: the user's, or the bundled pcb-aoi one. */}}
{{- define "expertmesh.serveConfig" -}}
{{- .Values.serveConfig | default (.Files.Get "files/serve-config.yaml") -}}
{{- end -}}

{{/*
The container of a Ray pod. Args: dict "root" $ "node" <pool> "resources" <k8s resources> "gpus" <int>.
RAY_OVERRIDE_LABELS gives each Ray node the labels the placement controller plans against:
expertmesh.io/node = the pod name (unique per pod), expertmesh.io/pool = the group's pool.
*/}}
{{- define "expertmesh.container" -}}
{{- $root := .root -}}
image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
env:
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: RAY_OVERRIDE_LABELS
    value: {{ printf "{\"expertmesh.io/node\": \"$(POD_NAME)\", \"expertmesh.io/pool\": \"%s\"}" .pool | quote }}
  - name: EXPERTMESH_TOKENS_FILE
    value: {{ printf "%s/%s" $root.Values.tokens.mountPath $root.Values.tokens.key | quote }}
  - name: RAY_USAGE_STATS_ENABLED
    value: "0"
  # the largest gRPC message Serve's proxy takes (bytes): larger ones are refused before they are buffered
  - name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
    value: {{ mul $root.Values.limits.grpcMaxMessageMiB 1048576 | quote }}
ports:
  - {name: gcs, containerPort: 6379}
  - {name: dashboard, containerPort: 8265}
  - {name: client, containerPort: 10001}
  - {name: serve, containerPort: {{ $root.Values.services.httpPort }}}
  - {name: grpc, containerPort: {{ $root.Values.services.grpcPort }}}
  - {name: metrics, containerPort: {{ $root.Values.metrics.port }}}
resources:
  {{- $res := deepCopy (.resources | default dict) }}
  {{- if gt (int .gpus) 0 }}
  {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($res.limits | default dict)) }}
  {{- end }}
  {{- toYaml $res | nindent 2 }}
volumeMounts:
  - name: models
    mountPath: {{ $root.Values.models.mountPath }}
    readOnly: true
  - name: tokens
    mountPath: {{ $root.Values.tokens.mountPath }}
    readOnly: true
{{- end -}}

{{/* Volumes and the zoo-building init container shared by every Ray pod. */}}
{{- define "expertmesh.podExtras" -}}
{{- $root := . -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if eq $root.Values.models.source "build" }}
initContainers:
  - name: build-zoo
    image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: ["expertmesh", "zoo", "build", "--zoo", "{{ $root.Values.models.mountPath }}/zoo/pcb-aoi", "--no-baseline", "--no-progress"]
    resources:
      {{- toYaml $root.Values.models.build.resources | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: {{ $root.Values.models.mountPath }}
{{- end }}
volumes:
  - name: models
    {{- if eq $root.Values.models.source "pvc" }}
    persistentVolumeClaim:
      claimName: {{ $root.Values.models.pvc.claimName }}
      readOnly: {{ $root.Values.models.pvc.readOnly }}
    {{- else }}
    emptyDir: {}
    {{- end }}
  - name: tokens
    secret:
      secretName: {{ include "expertmesh.tokensSecret" $root }}
{{- end -}}
