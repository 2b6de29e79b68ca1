{{/*
Names, labels, and the mapping from chart values to jobstream's environment variables.
*/}}

{{- define "jobstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "jobstream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "jobstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "jobstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jobstream.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "jobstream.labels" -}}
helm.sh/chart: {{ include "jobstream.chart" .ctx }}
{{ include "jobstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: jobstream
{{- end -}}

{{- define "jobstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "jobstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "jobstream.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The values -> environment mapping, in one place.

A setting's path is its dotted name (`transport`, `worker.max_in_flight`,
`retry.policy.max_attempts`); its variable is JOBSTREAM_ + the path in upper case with "__"
for each dot, as pydantic-settings reads it (prefix JOBSTREAM_, nested delimiter "__").
tests/helm/test_chart.py checks every variable the chart renders against the fields of
consumer.Settings.
*/}}
{{- define "jobstream.envName" -}}
{{- printf "JOBSTREAM_%s" (. | replace "." "__" | upper) -}}
{{- end -}}

{{/* The text of a value: strings as they are, everything else as JSON (numbers, booleans, lists, maps). */}}
{{- define "jobstream.envValue" -}}
{{- if kindIs "string" . -}}
{{- . -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* True ("true") for a value that is not rendered: null, "", an empty list or map. */}}
{{- define "jobstream.isUnset" -}}
{{- if kindIs "invalid" . -}}true
{{- else if and (kindIs "string" .) (eq . "") -}}true
{{- else if and (or (kindIs "slice" .) (kindIs "map" .)) (eq (len .) 0) -}}true
{{- end -}}
{{- end -}}

{{/*
Settings whose value is a map (a JSON object in one variable), not a section of settings.
tests/helm/test_chart.py renders a value into every map-typed field of consumer.Settings,
so a new one that is missing here fails the tests.
*/}}
{{- define "jobstream.mapSettings" -}}
{{- list "routing.routes" "retry.per_type" "worker.priority_weights" | toJson -}}
{{- end -}}

{{/*
A settings tree (config or secrets.values) as "NAME: value" pairs. A map is a section
(`worker`, `retry.policy`) and is walked into, unless it is a map-typed setting; the
section of the transport not in use (`kafka` or `nats`) is skipped.
Call with (dict "tree" .Values.config "transport" "kafka").
*/}}
{{- define "jobstream.settingsEnv" -}}
{{- $env := dict -}}
{{- $_ := include "jobstream.collectEnv" (dict "env" $env "tree" .tree "path" "" "transport" .transport) -}}
{{- toYaml $env -}}
{{- end -}}

{{/* Adds the settings of one (sub)tree to .env; recursive. */}}
{{- define "jobstream.collectEnv" -}}
{{- $maps := include "jobstream.mapSettings" . | fromJsonArray -}}
{{- range $key, $value := .tree -}}
{{- $path := ternary $key (printf "%s.%s" $.path $key) (eq $.path "") -}}
{{- $otherTransport := and (eq $.path "") (has $key (list "kafka" "nats")) (ne $key $.transport) -}}
{{- if $otherTransport -}}
{{- else if and (kindIs "map" $value) (not (has $path $maps)) -}}
{{- $_ := include "jobstream.collectEnv" (dict "env" $.env "tree" $value "path" $path "transport" $.transport) -}}
{{- else if not (include "jobstream.isUnset" $value) -}}
{{- $_ := set $.env (include "jobstream.envName" $path) (include "jobstream.envValue" $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "jobstream.configEnv" -}}
{{- include "jobstream.settingsEnv" (dict "tree" .Values.config "transport" .Values.config.transport) -}}
{{- end -}}

{{- define "jobstream.secretEnv" -}}
{{- include "jobstream.settingsEnv" (dict "tree" .Values.secrets.values "transport" .Values.config.transport) -}}
{{- end -}}

{{/* The file settings in use, as "NAME: /mount/path/file" pairs (transport-filtered like config). */}}
{{- define "jobstream.fileEnv" -}}
{{- $env := dict -}}
{{- $mount := trimSuffix "/" .Values.secretFiles.mountPath -}}
{{- range $section, $settings := .Values.secretFiles.settings -}}
{{- if or (eq $section $.Values.config.transport) (not (has $section (list "kafka" "nats"))) -}}
{{- range $name, $file := $settings -}}
{{- if $file -}}
{{- $_ := set $env (include "jobstream.envName" (printf "%s.%s" $section $name)) (printf "%s/%s" $mount $file) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $env -}}
{{- end -}}

{{/* Files the pods mount, by file name (transport-filtered). */}}
{{- define "jobstream.usedFiles" -}}
{{- $files := list -}}
{{- range $section, $settings := .Values.secretFiles.settings -}}
{{- if or (eq $section $.Values.config.transport) (not (has $section (list "kafka" "nats"))) -}}
{{- range $name, $file := $settings -}}
{{- if $file -}}{{- $files = append $files $file -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $files | uniq | sortAlpha | toJson -}}
{{- end -}}

{{- define "jobstream.configMapName" -}}
{{- printf "%s-config" (include "jobstream.fullname" .) -}}
{{- end -}}

{{/* Name of the Secret with the secret settings, or "" when there is none. */}}
{{- define "jobstream.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else if ne (include "jobstream.secretEnv" . | fromYaml | len) 0 -}}
{{- printf "%s-secrets" (include "jobstream.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Name of the Secret with the files, or "" when no file setting is used. */}}
{{- define "jobstream.filesSecretName" -}}
{{- if ne (include "jobstream.usedFiles" . | fromJsonArray | len) 0 -}}
{{- default (printf "%s-files" (include "jobstream.fullname" .)) .Values.secretFiles.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* A setting from config, or a default (the code's default; the tests compare them). */}}
{{- define "jobstream.drainTimeout" -}}
{{- $worker := .Values.config.worker | default dict -}}
{{- if hasKey $worker "drain_timeout_s" -}}{{ $worker.drain_timeout_s }}{{- else -}}25{{- end -}}
{{- end -}}

{{- define "jobstream.stream" -}}
{{- $routing := .Values.config.routing | default dict -}}
{{- .Values.autoscaling.keda.nats.stream | default (get $routing "stream") | default "JOBS" -}}
{{- end -}}

{{- define "jobstream.group" -}}
{{- $worker := .Values.config.worker | default dict -}}
{{- get $worker "group" | default "jobstream-workers" -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds of the worker: explicit, or drain_timeout_s rounded up plus
worker.drainMarginSeconds. Kubernetes sends SIGKILL when it ends, so it must outlast the
drain, or jobs cut off by the kill are redelivered although they might have finished.
*/}}
{{- define "jobstream.gracePeriod" -}}
{{- $drain := include "jobstream.drainTimeout" . | float64 -}}
{{- if hasKey .Values.worker "terminationGracePeriodSeconds" -}}
{{- $grace := .Values.worker.terminationGracePeriodSeconds | int -}}
{{- if le (float64 $grace) $drain -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be longer than config.worker.drain_timeout_s (%v): Kubernetes kills the pod when the grace period ends, cutting the drain short. Raise it, or leave it unset to get drain_timeout_s + worker.drainMarginSeconds." $grace $drain) -}}
{{- end -}}
{{- $grace -}}
{{- else -}}
{{- add (ceil $drain | int) (.Values.worker.drainMarginSeconds | int) -}}
{{- end -}}
{{- end -}}

{{/* Checks that span several values; each failure says what to change. */}}
{{- define "jobstream.validate" -}}
{{- $v := .Values -}}
{{- if and $v.autoscaling.keda.enabled $v.autoscaling.hpa.enabled -}}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are mutually exclusive: both would own the worker's replica count. Enable one of them (or neither, for worker.replicas)." -}}
{{- end -}}
{{- if and $v.autoscaling.keda.enabled (gt ($v.autoscaling.keda.minReplicas | int) ($v.autoscaling.keda.maxReplicas | int)) -}}
{{- fail (printf "autoscaling.keda.minReplicas (%v) is larger than autoscaling.keda.maxReplicas (%v)." $v.autoscaling.keda.minReplicas $v.autoscaling.keda.maxReplicas) -}}
{{- end -}}
{{- if and $v.autoscaling.hpa.enabled (gt ($v.autoscaling.hpa.minReplicas | int) ($v.autoscaling.hpa.maxReplicas | int)) -}}
{{- fail (printf "autoscaling.hpa.minReplicas (%v) is larger than autoscaling.hpa.maxReplicas (%v)." $v.autoscaling.hpa.minReplicas $v.autoscaling.hpa.maxReplicas) -}}
{{- end -}}
{{- if and $v.autoscaling.hpa.enabled (not (dig "requests" "cpu" "" ($v.worker.resources | default dict))) -}}
{{- fail "autoscaling.hpa.enabled needs worker.resources.requests.cpu: the HPA scales on CPU use relative to the request." -}}
{{- end -}}
{{- $transport := $v.config.transport -}}
{{- $config := $v.config -}}
{{- if eq $transport "kafka" -}}
{{- $kafka := $config.kafka | default dict -}}
{{- if not (get $kafka "bootstrap_servers") -}}
{{- fail "config.kafka.bootstrap_servers is required with config.transport=kafka (host:port,host:port of the brokers)." -}}
{{- end -}}
{{- $protocol := get $kafka "security_protocol" | default "PLAINTEXT" -}}
{{- if hasPrefix "SASL_" $protocol -}}
{{- if not (and (get $kafka "sasl_mechanism") (get $kafka "sasl_username")) -}}
{{- fail (printf "config.kafka.security_protocol=%s needs config.kafka.sasl_mechanism and config.kafka.sasl_username, and the password in secrets (JOBSTREAM_KAFKA__SASL_PASSWORD)." $protocol) -}}
{{- end -}}
{{- if not (or $v.secrets.existingSecret $v.secrets.values.kafka.sasl_password $v.secretFiles.settings.kafka.sasl_password_file) -}}
{{- fail (printf "config.kafka.security_protocol=%s needs a SASL password: set secrets.values.kafka.sasl_password, secrets.existingSecret with the key JOBSTREAM_KAFKA__SASL_PASSWORD, or secretFiles.settings.kafka.sasl_password_file." $protocol) -}}
{{- end -}}
{{- end -}}
{{- else if eq $transport "nats" -}}
{{- $nats := $config.nats | default dict -}}
{{- if not (get $nats "servers") -}}
{{- fail "config.nats.servers is required with config.transport=nats (a list of nats:// URLs)." -}}
{{- end -}}
{{- end -}}
{{- $idem := $config.idempotency | default dict -}}
{{- $backend := get $idem "backend" | default "memory" -}}
{{- if and (ne $backend "memory") (not (or $v.secrets.existingSecret $v.secrets.values.idempotency.url)) -}}
{{- fail (printf "config.idempotency.backend=%s needs its URL: set secrets.values.idempotency.url, or secrets.existingSecret with the key JOBSTREAM_IDEMPOTENCY__URL." $backend) -}}
{{- end -}}
{{- $status := $config.status | default dict -}}
{{- if and $v.ingress.enabled (ne (get $status "backend" | default "none") "redis") -}}
{{- fail "ingress.enabled needs the shared job status store: set config.status.backend=redis and its URL in secrets.values.status.url (or secrets.existingSecret with JOBSTREAM_STATUS__URL); see docs/http-api.md." -}}
{{- end -}}
{{- if and (eq (get $status "backend" | default "none") "redis") (not (or $v.secrets.existingSecret $v.secrets.values.status.url)) -}}
{{- fail "config.status.backend=redis needs its URL: set secrets.values.status.url, or secrets.existingSecret with the key JOBSTREAM_STATUS__URL." -}}
{{- end -}}
{{- if and $v.secrets.existingSecret (ne (include "jobstream.secretEnv" . | fromYaml | len) 0) -}}
{{- fail "secrets.existingSecret and secrets.values are exclusive: put every secret setting into the existing Secret, or leave secrets.existingSecret empty." -}}
{{- end -}}
{{- range $v.extraEnv -}}
{{- if hasPrefix "JOBSTREAM_" (upper .name) -}}{{- /* jobstream reads its variables in any case */ -}}
{{- fail (printf "extraEnv sets %s: jobstream settings belong in `config` (or `secrets` / `secretFiles`), where the chart checks them; see values.yaml." .name) -}}
{{- end -}}
{{- end -}}
{{- if and $v.secretFiles.existingSecret $v.secretFiles.files -}}
{{- fail "secretFiles.existingSecret and secretFiles.files are exclusive: put the files into the existing Secret, or leave secretFiles.existingSecret empty." -}}
{{- end -}}
{{- if not $v.secretFiles.existingSecret -}}
{{- range $file := include "jobstream.usedFiles" . | fromJsonArray -}}
{{- if not (hasKey $v.secretFiles.files $file) -}}
{{- fail (printf "secretFiles.settings names the file %q, but secretFiles.files has no such file (and secretFiles.existingSecret is empty)." $file) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The health port (schema: 1-65535). */}}
{{- define "jobstream.healthPort" -}}
{{- $health := .Values.config.health | default dict -}}
{{- get $health "port" | default 8080 | int -}}
{{- end -}}

{{/* Pod-level fields shared by the worker and the ingress. */}}
{{- define "jobstream.podCommon" -}}
serviceAccountName: {{ include "jobstream.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template annotations: roll the pods when the configuration or a chart-made Secret changes. */}}
{{- define "jobstream.podAnnotations" -}}
checksum/config: {{ include "jobstream.configEnv" . | sha256sum }}
checksum/secrets: {{ printf "%s\n%s" (include "jobstream.secretEnv" .) (toJson .Values.secretFiles.files) | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Environment of every jobstream container: ConfigMap, secrets, file paths, extras. */}}
{{- define "jobstream.containerEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "jobstream.configMapName" . }}
  {{- with include "jobstream.secretName" . }}
  - secretRef:
      name: {{ . }}
  {{- end }}
env:
  # The chart owns the bind address: probes come from the kubelet, not from localhost.
  - name: JOBSTREAM_HEALTH__HOST
    value: "0.0.0.0"
  {{- range $name, $path := include "jobstream.fileEnv" . | fromYaml }}
  - name: {{ $name }}
    value: {{ $path | quote }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Volumes of every jobstream pod: /tmp, and the secret files when used. */}}
{{- define "jobstream.volumes" -}}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: {{ .Values.worker.tmpSizeLimit | default "256Mi" }}
  {{- with include "jobstream.filesSecretName" . }}
  - name: secret-files
    secret:
      secretName: {{ . }}
      defaultMode: 0440
  {{- end }}
{{- end -}}

{{- define "jobstream.volumeMounts" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- if include "jobstream.filesSecretName" . }}
  - name: secret-files
    mountPath: {{ .Values.secretFiles.mountPath }}
    readOnly: true
  {{- end }}
{{- end -}}
