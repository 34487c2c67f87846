{{/*
Pieces shared by the dispatcher's Deployment and the topics Job, so both talk to
Kafka with the same settings and run with the same hardening.
*/}}

{{/* Where the Kafka TLS files and the endpoint CA bundle are mounted. */}}
{{- define "webhook-dispatcher.kafkaTlsDir" -}}/etc/dispatcher/kafka-tls{{- end }}
{{- define "webhook-dispatcher.endpointCADir" -}}/etc/dispatcher/endpoint-ca{{- end }}
{{- define "webhook-dispatcher.eventCatalogDir" -}}/etc/dispatcher/event-catalog{{- end }}

{{/*
A value as plain text, for environment variables and PromQL. Helm reads every
number in values as a float64, which would print 604800000 as 6.048e+08: whole
numbers are printed as integers. Lists and maps become JSON, which the settings
accept.
*/}}
{{- define "webhook-dispatcher.scalar" -}}
{{- if or (kindIs "slice" .) (kindIs "map" .) }}
{{- toJson . }}
{{- else if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Checks of combinations the schema cannot express, with messages naming the values.
*/}}
{{- define "webhook-dispatcher.validate" -}}
{{- $kafka := .Values.kafka }}
{{- if not $kafka.bootstrapServers }}
{{- fail "kafka.bootstrapServers is required (host:port of the Kafka brokers)" }}
{{- end }}
{{- if and $kafka.sasl.mechanism (not $kafka.sasl.existingSecret) }}
{{- fail "kafka.sasl.mechanism needs kafka.sasl.existingSecret: SASL credentials are only read from an existing Secret" }}
{{- end }}
{{- if and $kafka.sasl.existingSecret (not $kafka.sasl.mechanism) }}
{{- fail "kafka.sasl.existingSecret is set but kafka.sasl.mechanism is empty: set the mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)" }}
{{- end }}
{{- if and $kafka.sasl.mechanism (not (has $kafka.securityProtocol (list "SASL_SSL" "SASL_PLAINTEXT"))) }}
{{- fail "kafka.sasl.mechanism needs kafka.securityProtocol SASL_SSL (or SASL_PLAINTEXT)" }}
{{- end }}
{{- if ne (empty $kafka.tls.certKey) (empty $kafka.tls.keyKey) }}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey go together: mutual TLS needs both the certificate and its key" }}
{{- end }}
{{- if and $kafka.tls.certKey (not $kafka.tls.existingSecret) }}
{{- fail "kafka.tls.certKey needs kafka.tls.existingSecret: the client certificate is read from an existing Secret" }}
{{- end }}
{{- if and $kafka.tls.existingSecret (not (has $kafka.securityProtocol (list "SSL" "SASL_SSL"))) }}
{{- fail "kafka.tls.existingSecret needs kafka.securityProtocol SSL or SASL_SSL, or its files would go unused" }}
{{- end }}
{{- if ge (int64 .Values.config.partition_buffer_low) (int64 .Values.config.partition_buffer_high) }}
{{- fail "config.partition_buffer_low must be below config.partition_buffer_high" }}
{{- end }}
{{- end }}

{{/*
Environment of the dispatcher container: Kafka connection and security first,
then every entry of .Values.config as DISPATCHER_<KEY>.
*/}}
{{- define "webhook-dispatcher.env" -}}
{{- $kafka := .Values.kafka }}
{{- $tlsDir := include "webhook-dispatcher.kafkaTlsDir" . -}}
- name: DISPATCHER_KAFKA_BOOTSTRAP_SERVERS
  value: {{ $kafka.bootstrapServers | quote }}
{{- with $kafka.securityProtocol }}
- name: DISPATCHER_KAFKA_SECURITY_PROTOCOL
  value: {{ . | quote }}
{{- end }}
{{- if $kafka.sasl.mechanism }}
- name: DISPATCHER_KAFKA_SASL_MECHANISM
  value: {{ $kafka.sasl.mechanism | quote }}
- name: DISPATCHER_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.sasl.existingSecret | quote }}
      key: {{ $kafka.sasl.usernameKey | quote }}
- name: DISPATCHER_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.sasl.existingSecret | quote }}
      key: {{ $kafka.sasl.passwordKey | quote }}
{{- end }}
{{- if $kafka.tls.existingSecret }}
{{- if $kafka.tls.caKey }}
- name: DISPATCHER_KAFKA_SSL_CA_LOCATION
  value: {{ printf "%s/ca.crt" $tlsDir | quote }}
{{- end }}
{{- if $kafka.tls.certKey }}
- name: DISPATCHER_KAFKA_SSL_CERTIFICATE_LOCATION
  value: {{ printf "%s/client.crt" $tlsDir | quote }}
- name: DISPATCHER_KAFKA_SSL_KEY_LOCATION
  value: {{ printf "%s/client.key" $tlsDir | quote }}
{{- end }}
{{- end }}
{{- with $kafka.extraConfig }}
- name: DISPATCHER_KAFKA_EXTRA_CONFIG
  value: {{ toJson . | quote }}
{{- end }}
{{- with $kafka.consumerExtraConfig }}
- name: DISPATCHER_KAFKA_CONSUMER_EXTRA_CONFIG
  value: {{ toJson . | quote }}
{{- end }}
{{- if .Values.endpointCA.existingConfigMap }}
- name: DISPATCHER_HTTP_CA_FILE
  value: {{ printf "%s/ca.crt" (include "webhook-dispatcher.endpointCADir" .) | quote }}
{{- end }}
{{- if .Values.api.eventCatalog.existingConfigMap }}
# The API lists the catalog, the dispatcher reads its input topics, the topics
# Job creates them: all three see the same file.
- name: DISPATCHER_EVENT_CATALOG_FILE
  value: {{ printf "%s/catalog.json" (include "webhook-dispatcher.eventCatalogDir" .) | quote }}
{{- end }}
- name: DISPATCHER_HTTP_PORT
  value: {{ .Values.httpPort | int | quote }}
{{- range $key, $value := .Values.config }}
- name: {{ printf "DISPATCHER_%s" (upper $key) }}
  value: {{ include "webhook-dispatcher.scalar" $value | quote }}
{{- end }}
{{- end }}

{{/* Volumes of the pod: a writable /tmp, and the Kafka and endpoint CA files. */}}
{{- define "webhook-dispatcher.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit | quote }}
{{- with .Values.kafka.tls }}
{{- if .existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .existingSecret | quote }}
    # Readable by the pod's fsGroup only; librdkafka reads them once at start-up.
    defaultMode: 0440
    items:
      {{- if .caKey }}
      - key: {{ .caKey | quote }}
        path: ca.crt
      {{- end }}
      {{- if .certKey }}
      - key: {{ .certKey | quote }}
        path: client.crt
      - key: {{ .keyKey | quote }}
        path: client.key
      {{- end }}
{{- end }}
{{- end }}
{{- with .Values.endpointCA }}
{{- if .existingConfigMap }}
- name: endpoint-ca
  configMap:
    name: {{ .existingConfigMap | quote }}
    items:
      - key: {{ .key | quote }}
        path: ca.crt
{{- end }}
{{- end }}
{{- with .Values.api.eventCatalog.existingConfigMap }}
- name: event-catalog
  configMap:
    name: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "webhook-dispatcher.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: {{ include "webhook-dispatcher.kafkaTlsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.endpointCA.existingConfigMap }}
- name: endpoint-ca
  mountPath: {{ include "webhook-dispatcher.endpointCADir" . }}
  readOnly: true
{{- end }}
{{- if .Values.api.eventCatalog.existingConfigMap }}
- name: event-catalog
  mountPath: {{ include "webhook-dispatcher.eventCatalogDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod-level security context: ids from values, the hardening fixed. */}}
{{- define "webhook-dispatcher.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ .fsGroup | int64 }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context: nothing to write but /tmp, no privileges. */}}
{{- define "webhook-dispatcher.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
