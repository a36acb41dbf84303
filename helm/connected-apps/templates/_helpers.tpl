{{/*
Helpers of the connected-apps chart. They use text/template, sprig and
Helm's include/tpl/toYaml/fromYaml/required only, so helm/render (CI's
renderer) renders them as Helm does.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "connected-apps.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The resource name prefix: fullnameOverride, or release name + chart name. */}}
{{- define "connected-apps.fullname" -}}
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

{{/* A component's resource name: <fullname>-<component>, at most 63 characters. */}}
{{- define "connected-apps.componentName" -}}
{{- printf "%s-%s" (include "connected-apps.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "connected-apps.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "connected-apps.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "connected-apps.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: connected-apps
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of the chart's pods. */}}
{{- define "connected-apps.selectorLabels" -}}
app.kubernetes.io/name: {{ include "connected-apps.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one role's pods: dict "root" $ "component" "api". */}}
{{- define "connected-apps.componentSelectorLabels" -}}
{{ include "connected-apps.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's resources. */}}
{{- define "connected-apps.componentLabels" -}}
{{ include "connected-apps.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
The label that puts a pod behind the metrics Service (the three serving
roles, not the migration Job, which serves nothing).
*/}}
{{- define "connected-apps.metricsLabel" -}}
connected-apps.varai.com/metrics: "true"
{{- end -}}

{{- define "connected-apps.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "connected-apps.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "connected-apps.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{- define "connected-apps.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "connected-apps.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The migration Job's ServiceAccount: it runs before the chart's own exists. */}}
{{- define "connected-apps.migrationServiceAccountName" -}}
{{- if .Values.migrations.serviceAccountName -}}
{{- .Values.migrations.serviceAccountName -}}
{{- else if not .Values.serviceAccount.create -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* The Secret the pods read: the chart's, or the existing one. */}}
{{- define "connected-apps.secretName" -}}
{{- if .Values.secrets.create -}}
{{- include "connected-apps.componentName" (dict "root" . "component" "secrets") -}}
{{- else -}}
{{- required "secrets.existingSecret is required when secrets.create is false" .Values.secrets.existingSecret -}}
{{- end -}}
{{- end -}}

{{/*
The Secret the migration Job reads. A chart-created Secret does not exist
yet when a pre-install hook runs, so the chart also makes a hook copy of
it (templates/migration-job.yaml) that Helm creates just before the Job
and deletes once the Job succeeded.
*/}}
{{- define "connected-apps.migrationSecretName" -}}
{{- if .Values.secrets.create -}}
{{- include "connected-apps.componentName" (dict "root" . "component" "migrate") -}}
{{- else -}}
{{- include "connected-apps.secretName" . -}}
{{- end -}}
{{- end -}}

{{/*
The ConfigMap's data, one KEY: "value" per line. Shared by the ConfigMap
and the migration Job (which runs before the ConfigMap exists).
Numbers go through int64: Helm reads values as float64, which would print
1000000 as 1e+06.
*/}}
{{- define "connected-apps.configData" -}}
{{- $c := .Values.config -}}
APP_ENV: {{ $c.appEnv | quote }}
PORT: {{ .Values.containerPort | int64 | quote }}
BIND_ADDRESS: "0.0.0.0"
LOG_LEVEL: {{ $c.logLevel | quote }}
LOG_FORMAT: {{ $c.logFormat | quote }}
{{- with $c.corsOrigins }}
CORS_ORIGINS: {{ join "," . | quote }}
{{- end }}
ENABLE_BETA_APPS: {{ $c.enableBetaApps | toString | quote }}
ENABLE_USAGE_ALERTS: {{ $c.enableUsageAlerts | toString | quote }}
ENABLE_TOKEN_ANALYTICS: {{ $c.enableTokenAnalytics | toString | quote }}
{{- with $c.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
{{- end }}
PAST_DUE_GRACE_HOURS: {{ $c.pastDueGraceHours | int64 | quote }}
USAGE_STREAM_SHARDS: {{ $c.usageStreamShards | int64 | quote }}
FLUSHER_WORKERS: {{ $c.flusherWorkers | int64 | quote }}
FLUSH_BATCH_SIZE: {{ $c.flushBatchSize | int64 | quote }}
RATE_LIMIT_CONSUME_PER_HOUR: {{ $c.rateLimit.consumePerHour | int64 | quote }}
RATE_LIMIT_CONSUME_BURST: {{ $c.rateLimit.consumeBurst | int64 | quote }}
RATE_LIMIT_APPS_PER_HOUR: {{ $c.rateLimit.appsPerHour | int64 | quote }}
RATE_LIMIT_ACTIVATE_PER_HOUR: {{ $c.rateLimit.activatePerHour | int64 | quote }}
RATE_LIMIT_BILLING_PER_HOUR: {{ $c.rateLimit.billingPerHour | int64 | quote }}
HTTP_HEADER_TIMEOUT_SECS: {{ $c.http.headerTimeoutSecs | int64 | quote }}
HTTP_BODY_TIMEOUT_SECS: {{ $c.http.bodyTimeoutSecs | int64 | quote }}
HTTP_REQUEST_TIMEOUT_SECS: {{ $c.http.requestTimeoutSecs | int64 | quote }}
STRIPE_API_BASE: {{ $c.stripeApiBase | quote }}
{{- with $c.stripePublishableKey }}
STRIPE_PUBLISHABLE_KEY: {{ . | quote }}
{{- end }}
REDIS_POOL_SIZE: {{ .Values.redis.poolSize | int64 | quote }}
DATABASE_MAX_CONNECTIONS: {{ .Values.postgres.maxConnections | int64 | quote }}
MIGRATE_ON_START: "false"
{{- with .Values.postgres.tls.sslMode }}
PGSSLMODE: {{ . | quote }}
{{- end }}
{{- if .Values.postgres.tls.ca.secretName }}
PGSSLROOTCERT: "/etc/connected-apps/tls/postgres/ca.crt"
{{- end }}
{{- if .Values.redis.tls.ca.secretName }}
SSL_CERT_FILE: "/etc/connected-apps/tls/redis/ca.crt"
{{- end }}
{{- range $k, $v := $c.extra }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* One secretKeyRef env var: dict "name" "X" "secret" S "key" K "optional" bool. */}}
{{- define "connected-apps.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/*
The URL of the external Redis built from redis.* (redis.host set), with
$(REDIS_PASSWORD) expanded by Kubernetes from the variable defined just
before it.
*/}}
{{- define "connected-apps.redisUrl" -}}
{{- $r := .Values.redis -}}
{{- $scheme := ternary "rediss" "redis" $r.tls.enabled -}}
{{- if $r.cluster.enabled }}{{ $scheme = printf "%s-cluster" $scheme }}{{ end -}}
{{- $auth := "" -}}
{{- if $r.auth.enabled }}{{ $auth = printf "%s:$(REDIS_PASSWORD)@" $r.auth.username }}{{ end -}}
{{- $url := printf "%s://%s%s:%d" $scheme $auth $r.host (int64 $r.port) -}}
{{- if $r.cluster.enabled -}}
{{- $nodes := list -}}
{{- range $r.cluster.nodes }}{{ $nodes = append $nodes (printf "node=%s" .) }}{{ end -}}
{{- if $nodes }}{{ $url = printf "%s?%s" $url (join "&" $nodes) }}{{ end -}}
{{- else -}}
{{- $url = printf "%s/%d" $url (int64 $r.database) -}}
{{- end -}}
{{- $url -}}
{{- end -}}

{{/*
The secret environment of a container: dict "root" $ "secret" NAME.
Required variables first, then the optional ones (optional: true, so a
Secret without the key still starts the pod).
*/}}
{{- define "connected-apps.secretEnvVars" -}}
{{- $root := .root -}}
{{- $s := .secret -}}
{{- $k := $root.Values.secrets.keys -}}
{{- if $root.Values.postgres.host }}
{{ include "connected-apps.secretEnv" (dict "name" "DATABASE_PASSWORD" "secret" $s "key" $k.databasePassword) }}
- name: DATABASE_URL
  value: {{ printf "postgres://%s:$(DATABASE_PASSWORD)@%s:%d/%s" $root.Values.postgres.user $root.Values.postgres.host (int64 $root.Values.postgres.port) $root.Values.postgres.database | quote }}
{{- else }}
{{ include "connected-apps.secretEnv" (dict "name" "DATABASE_URL" "secret" $s "key" $k.databaseUrl) }}
{{- end }}
{{- if $root.Values.redis.host }}
{{- if $root.Values.redis.auth.enabled }}
{{ include "connected-apps.secretEnv" (dict "name" "REDIS_PASSWORD" "secret" $s "key" $k.redisPassword) }}
{{- end }}
- name: REDIS_URL
  value: {{ include "connected-apps.redisUrl" $root | quote }}
{{- else }}
{{ include "connected-apps.secretEnv" (dict "name" "REDIS_URL" "secret" $s "key" $k.redisUrl) }}
{{- end }}
{{ include "connected-apps.secretEnv" (dict "name" "JWT_SECRET" "secret" $s "key" $k.jwtSecret) }}
{{ include "connected-apps.secretEnv" (dict "name" "DATA_ENCRYPTION_KEYS" "secret" $s "key" $k.dataEncryptionKeys) }}
{{ include "connected-apps.secretEnv" (dict "name" "STRIPE_SECRET_KEY" "secret" $s "key" $k.stripeSecretKey "optional" true) }}
{{ include "connected-apps.secretEnv" (dict "name" "STRIPE_WEBHOOK_SECRET" "secret" $s "key" $k.stripeWebhookSecret "optional" true) }}
{{ include "connected-apps.secretEnv" (dict "name" "SENTRY_DSN" "secret" $s "key" $k.sentryDsn "optional" true) }}
{{ include "connected-apps.secretEnv" (dict "name" "API_RATE_LIMIT_REDIS_URL" "secret" $s "key" $k.apiRateLimitRedisUrl "optional" true) }}
{{- end -}}

{{/* Extra EnvVars (global, then the role's), strings rendered with tpl. */}}
{{- define "connected-apps.extraEnv" -}}
{{- $all := concat .root.Values.extraEnv (.extra | default list) -}}
{{- with $all }}
{{ tpl (toYaml .) $.root }}
{{- end }}
{{- end -}}

{{/* Volumes of every pod: /tmp and the CA bundles. */}}
{{- define "connected-apps.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- with .Values.postgres.tls.ca.secretName }}
- name: postgres-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $.Values.postgres.tls.ca.key }}
        path: ca.crt
{{- end }}
{{- with .Values.redis.tls.ca.secretName }}
- name: redis-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $.Values.redis.tls.ca.key }}
        path: ca.crt
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "connected-apps.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.postgres.tls.ca.secretName }}
- name: postgres-ca
  mountPath: /etc/connected-apps/tls/postgres
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.ca.secretName }}
- name: redis-ca
  mountPath: /etc/connected-apps/tls/redis
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Annotations that roll the pods when their configuration changes: the
rendered ConfigMap and chart-created Secret. (A change to an existing
Secret does not roll them: see README, "Secrets".)
*/}}
{{- define "connected-apps.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/*
A role's Deployment: dict "root" $ "component" "api" "role" .Values.api.
*/}}
{{- define "connected-apps.deployment" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $component := .component -}}
{{- $ctx := dict "root" $root "component" $component -}}
{{- $selector := include "connected-apps.componentSelectorLabels" $ctx | fromYaml -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "connected-apps.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "connected-apps.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not (and (eq $component "api") $role.autoscaling.enabled) }}
  replicas: {{ $role.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- toYaml $selector | nindent 6 }}
  strategy:
    {{- toYaml $role.strategy | nindent 4 }}
  template:
    metadata:
      labels:
        {{- toYaml $selector | nindent 8 }}
        {{- include "connected-apps.metricsLabel" $root | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $role.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "connected-apps.checksums" $root | nindent 8 }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $role.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "connected-apps.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $role.terminationGracePeriodSeconds }}
      containers:
        - name: {{ $component }}
          image: {{ include "connected-apps.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            - {{ $root.Values.image.binary | quote }}
            - serve
          args:
            - --roles
            - {{ $component }}
            {{- with $role.extraArgs }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: http
              containerPort: {{ $root.Values.containerPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "connected-apps.fullname" $root }}
            {{- with $root.Values.extraEnvFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            {{- include "connected-apps.secretEnvVars" (dict "root" $root "secret" (include "connected-apps.secretName" $root)) | trim | nindent 12 }}
            {{- if eq $component "flusher" }}
            # Each flusher's consumer name in the streams' group: its pod name.
            - name: FLUSHER_CONSUMER
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- end }}
            {{- with $role.tokioWorkerThreads }}
            - name: TOKIO_WORKER_THREADS
              value: {{ . | toString | quote }}
            {{- end }}
            {{- with include "connected-apps.extraEnv" (dict "root" $root "extra" $role.extraEnv) | trim }}
            {{- . | nindent 12 }}
            {{- end }}
          readinessProbe:
            httpGet:
              path: {{ $root.Values.probes.readiness.path }}
              port: http
            periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.readiness.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
          livenessProbe:
            httpGet:
              path: {{ $root.Values.probes.liveness.path }}
              port: http
            periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
          {{- if and (eq $component "api") (gt (int $role.lifecycle.preStopSleepSeconds) 0) }}
          lifecycle:
            preStop:
              {{- if eq $role.lifecycle.preStopHandler "exec" }}
              exec:
                command:
                  - /bin/sleep
                  - {{ $role.lifecycle.preStopSleepSeconds | int64 | quote }}
              {{- else }}
              sleep:
                seconds: {{ $role.lifecycle.preStopSleepSeconds | int64 }}
              {{- end }}
          {{- end }}
          resources:
            {{- toYaml $role.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "connected-apps.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "connected-apps.volumes" $root | nindent 8 }}
      {{- with $role.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- range . }}
        {{- $c := deepCopy . }}
        {{- if not (hasKey $c "labelSelector") }}
        {{- $_ := set $c "labelSelector" (dict "matchLabels" $selector) }}
        {{- end }}
        - {{ toYaml $c | nindent 10 | trim }}
        {{- end }}
      {{- end }}
{{- end -}}

{{/*
The chart-created Secret's data (secrets.create: true), base64. The
required variables are checked here as the service checks them at start,
so a bad value fails the install instead of crash-looping the pods.
*/}}
{{- define "connected-apps.secretData" -}}
{{- $v := .Values.secrets.values -}}
{{- $k := .Values.secrets.keys -}}
{{- if .Values.postgres.host }}
{{ $k.databasePassword }}: {{ required "secrets.values.databasePassword is required when secrets.create is true and postgres.host is set" $v.databasePassword | b64enc | quote }}
{{- else }}
{{- $url := required "secrets.values.databaseUrl is required when secrets.create is true (or set postgres.host)" $v.databaseUrl }}
{{- if not (regexMatch "^postgres(ql)?://" $url) }}
{{- fail "secrets.values.databaseUrl must be a postgres:// URL" }}
{{- end }}
{{ $k.databaseUrl }}: {{ $url | b64enc | quote }}
{{- end }}
{{- if .Values.redis.host }}
{{- if .Values.redis.auth.enabled }}
{{ $k.redisPassword }}: {{ required "secrets.values.redisPassword is required when secrets.create is true and redis.auth.enabled" $v.redisPassword | b64enc | quote }}
{{- end }}
{{- else }}
{{- $url := required "secrets.values.redisUrl is required when secrets.create is true (or set redis.host)" $v.redisUrl }}
{{- if not (regexMatch "^rediss?(-cluster)?://" $url) }}
{{- fail "secrets.values.redisUrl must be a redis://, rediss://, redis-cluster:// or rediss-cluster:// URL" }}
{{- end }}
{{ $k.redisUrl }}: {{ $url | b64enc | quote }}
{{- end }}
{{- $jwt := required "secrets.values.jwtSecret is required when secrets.create is true" $v.jwtSecret }}
{{- if lt (len $jwt) 32 }}
{{- fail "secrets.values.jwtSecret must be at least 32 bytes" }}
{{- end }}
{{ $k.jwtSecret }}: {{ $jwt | b64enc | quote }}
{{- $keys := required "secrets.values.dataEncryptionKeys is required when secrets.create is true" $v.dataEncryptionKeys }}
{{- if not (regexMatch "^[[:space:]]*[^:,[:space:]]+:[A-Za-z0-9+/]{43}=[[:space:]]*(,[[:space:]]*[^:,[:space:]]+:[A-Za-z0-9+/]{43}=[[:space:]]*)*$" $keys) }}
{{- fail "secrets.values.dataEncryptionKeys must be <id>:<base64 of 32 bytes>, comma-separated" }}
{{- end }}
{{ $k.dataEncryptionKeys }}: {{ $keys | b64enc | quote }}
{{- with $v.stripeSecretKey }}
{{ $k.stripeSecretKey }}: {{ . | b64enc | quote }}
{{- end }}
{{- with $v.stripeWebhookSecret }}
{{ $k.stripeWebhookSecret }}: {{ . | b64enc | quote }}
{{- end }}
{{- with $v.sentryDsn }}
{{ $k.sentryDsn }}: {{ . | b64enc | quote }}
{{- end }}
{{- with $v.apiRateLimitRedisUrl }}
{{ $k.apiRateLimitRedisUrl }}: {{ . | b64enc | quote }}
{{- end }}
{{- end -}}
