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

{{/* The Secret holding Ray's auth token under the key KubeRay reads (auth_token). */}}
{{- define "expertmesh.rayAuthSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "expertmesh.fullname" .)) -}}
{{- end -}}

{{/*
Checks the schema cannot express, with the value to set named. Nothing random is made at render time: a token is
either given (rendered into a Secret, byte-identical on every render) or in an existing Secret.
*/}}
{{- define "expertmesh.checks" -}}
{{- $v := .Values -}}
{{- if and (not $v.tokens.existingSecret) (not $v.tokens.entries) -}}
{{- fail "station tokens: set tokens.existingSecret (a Secret whose key tokens.key holds `token: factory_id` lines) or tokens.entries ([{factory: factory-a, token: <at least 32 characters>}]); the chart makes no random tokens, so GitOps renders stay identical" -}}
{{- end -}}
{{- if and (eq $v.rayAuth.mode "token") (not $v.rayAuth.existingSecret) (not $v.rayAuth.token) -}}
{{- fail "Ray token authentication (rayAuth.mode=token): set rayAuth.existingSecret (a Secret with key auth_token) or rayAuth.token (at least 32 characters); the chart makes no random token, so GitOps renders stay identical" -}}
{{- end -}}
{{- if and $v.tls.http.enabled (not $v.tls.http.secretName) -}}
{{- fail "tls.http.enabled: set tls.http.secretName (a kubernetes.io/tls Secret with tls.crt and tls.key)" -}}
{{- end -}}
{{- if and $v.tls.ingress.enabled (not $v.tls.ingress.grpc.host) (not $v.tls.ingress.http.host) -}}
{{- fail "tls.ingress.enabled: set tls.ingress.grpc.host and/or tls.ingress.http.host" -}}
{{- end -}}
{{- if and $v.tls.ingress.enabled (not $v.tls.ingress.secretName) -}}
{{- fail "tls.ingress.enabled: set tls.ingress.secretName (a kubernetes.io/tls Secret for the Ingress hosts)" -}}
{{- end -}}
{{- if and $v.gcsFaultTolerance.enabled (not $v.gcsFaultTolerance.redisAddress) -}}
{{- fail "gcsFaultTolerance.enabled: set gcsFaultTolerance.redisAddress (host:port of an external Redis)" -}}
{{- end -}}
{{- if and $v.gcsFaultTolerance.enabled (not $v.gcsFaultTolerance.redisPassword.existingSecret) -}}
{{- fail "gcsFaultTolerance.enabled: set gcsFaultTolerance.redisPassword.existingSecret (a Secret with the Redis password under gcsFaultTolerance.redisPassword.key)" -}}
{{- end -}}
{{- range $what, $res := dict "head.resources" $v.head.resources "cpuWorkers.resources" $v.cpuWorkers.resources "models.build.resources" $v.models.build.resources "autoscaling.resources" $v.autoscaling.resources -}}
{{- include "expertmesh.checkResources" (dict "what" $what "res" $res) -}}
{{- end -}}
{{- range $i, $g := $v.gpuGroups -}}
{{- include "expertmesh.checkResources" (dict "what" (printf "gpuGroups[%d].resources" $i) "res" $g.resources) -}}
{{- end -}}
{{- end -}}

{{/* Every container has requests and limits for cpu and memory. */}}
{{- define "expertmesh.checkResources" -}}
{{- $res := .res | default dict -}}
{{- range $kind := list "requests" "limits" -}}
{{- $r := index $res $kind | default dict -}}
{{- if not (and (hasKey $r "cpu") (hasKey $r "memory")) -}}
{{- fail (printf "%s: set %s.cpu and %s.memory (every container has requests and limits)" $.what $kind $kind) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Serve config: the user's, or the bundled pcb-aoi one; with tls.http on, Serve's HTTP proxy gets the cert. */}}
{{- define "expertmesh.serveConfig" -}}
{{- $cfg := .Values.serveConfig | default (.Files.Get "files/serve-config.yaml") -}}
{{- if .Values.tls.http.enabled -}}
{{- if not (regexMatch "(?m)^http_options:[ \\t]*$" $cfg) -}}
{{- fail "tls.http.enabled: the Serve config has no block `http_options:` at the top level to add ssl_keyfile/ssl_certfile to (write it with `expertmesh config`)" -}}
{{- end -}}
{{- if contains "ssl_keyfile" $cfg -}}
{{- fail "tls.http.enabled: the Serve config already sets ssl_keyfile; drop it there or turn tls.http.enabled off" -}}
{{- end -}}
{{- $ssl := printf "http_options:\n  ssl_keyfile: %s/tls.key\n  ssl_certfile: %s/tls.crt\n" .Values.tls.http.mountPath .Values.tls.http.mountPath -}}
{{- $cfg = regexReplaceAll "(?m)^http_options:[ \\t]*\\n" $cfg $ssl -}}
{{- end -}}
{{- $cfg -}}
{{- end -}}

{{/* The pod-level securityContext of every Ray pod. */}}
{{- define "expertmesh.podSecurityContext" -}}
{{- $s := .Values.security -}}
runAsNonRoot: true
runAsUser: {{ $s.runAsUser }}
runAsGroup: {{ $s.runAsGroup }}
fsGroup: {{ $s.fsGroup }}
seccompProfile:
  type: {{ $s.seccompProfile.type }}
  {{- if eq $s.seccompProfile.type "Localhost" }}
  localhostProfile: {{ $s.seccompProfile.localhostProfile }}
  {{- end }}
{{- end -}}

{{/* The container-level securityContext of every container the chart defines (and the autoscaler sidecar). */}}
{{- define "expertmesh.containerSecurityContext" -}}
{{- $s := .Values.security -}}
runAsNonRoot: true
runAsUser: {{ $s.runAsUser }}
runAsGroup: {{ $s.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ $s.readOnlyRootFilesystem }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: {{ $s.seccompProfile.type }}
  {{- if eq $s.seccompProfile.type "Localhost" }}
  localhostProfile: {{ $s.seccompProfile.localhostProfile }}
  {{- end }}
{{- end -}}

{{/* emptyDir mounts where Ray and ExpertMesh write (the root filesystem is read-only). */}}
{{- define "expertmesh.writableMounts" -}}
{{- range .Values.security.writableDirs }}
- name: {{ .name }}
  mountPath: {{ .mountPath }}
{{- end }}
{{- end -}}

{{/*
The container of a Ray pod. Args: dict "root" $ "node" <pool> "resources" <k8s resources> "gpus" <int> "worker" <bool>.
RAY_OVERRIDE_LABELS gives each Ray node the labels the placement controller plans against:
expertmesh.io/node = the pod name (unique per pod), expertmesh.io/pool = the group's pool.
*/}}
{{- define "expertmesh.container" -}}
{{- $root := .root -}}
image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
securityContext:
  {{- include "expertmesh.containerSecurityContext" $root | nindent 2 }}
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
  {{- if eq $root.Values.rayAuth.mode "token" }}
  # Ray's token authentication: every GCS, raylet and dashboard call needs this token (KubeRay reads the same Secret)
  - name: RAY_AUTH_MODE
    value: token
  - name: RAY_AUTH_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "expertmesh.rayAuthSecret" $root }}
        key: auth_token
  {{- end }}
ports:
  - {name: gcs, containerPort: 6379}
  - {name: dashboard, containerPort: 8265}
  - {name: client, containerPort: 10001}
  - {name: serve, containerPort: {{ $root.Values.services.httpPort }}}
  - {name: grpc, containerPort: {{ $root.Values.services.grpcPort }}}
  - {name: metrics, containerPort: {{ $root.Values.metrics.port }}}
{{- if and .worker $root.Values.tls.http.enabled }}
# Serve's HTTP proxy speaks HTTPS here: KubeRay's own worker readiness probe (plain-HTTP wget) would never pass,
# so the chart sets the same checks with HTTPS for the proxy (KubeRay keeps a probe it finds)
readinessProbe:
  exec:
    command:
      - bash
      - -c
      - {{ printf "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success && wget --tries 1 -T 2 -q --no-check-certificate -O- https://localhost:%d/-/healthz | grep success" (int $root.Values.services.httpPort) | quote }}
  initialDelaySeconds: 10
  timeoutSeconds: 5
  periodSeconds: 5
  successThreshold: 1
  failureThreshold: 1
{{- end }}
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
  {{- if $root.Values.tls.http.enabled }}
  - name: http-tls
    mountPath: {{ $root.Values.tls.http.mountPath }}
    readOnly: true
  {{- end }}
  {{- include "expertmesh.writableMounts" $root | trim | nindent 2 }}
{{- end -}}

{{/* Pod securityContext, volumes and the zoo-building init container shared by every Ray pod. */}}
{{- define "expertmesh.podExtras" -}}
{{- $root := . -}}
securityContext:
  {{- include "expertmesh.podSecurityContext" $root | nindent 2 }}
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
    securityContext:
      {{- include "expertmesh.containerSecurityContext" $root | nindent 6 }}
    resources:
      {{- toYaml $root.Values.models.build.resources | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: {{ $root.Values.models.mountPath }}
      {{- include "expertmesh.writableMounts" $root | trim | nindent 6 }}
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
  {{- if $root.Values.tls.http.enabled }}
  - name: http-tls
    secret:
      secretName: {{ $root.Values.tls.http.secretName }}
  {{- end }}
  {{- range $root.Values.security.writableDirs }}
  - name: {{ .name }}
    emptyDir: {{ if .sizeLimit }}{sizeLimit: {{ .sizeLimit }}}{{ else }}{}{{ end }}
  {{- end }}
{{- end -}}
