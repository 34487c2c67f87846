{{/*
Pieces of the API's objects (api.enabled): its pods' selector and its checks.
*/}}

{{/* Where the API keys are mounted. */}}
{{- define "webhook-dispatcher.apiKeysDir" -}}/etc/dispatcher/api-keys{{- end }}

{{/* Selector of the API pods only. */}}
{{- define "webhook-dispatcher.apiSelectorLabels" -}}
{{ include "webhook-dispatcher.selectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{- define "webhook-dispatcher.apiValidate" -}}
{{- if not .Values.api.keys.existingSecret }}
{{- fail "api.keys.existingSecret is required with api.enabled: API keys (their hashes) are only read from an existing Secret" }}
{{- end }}
{{- if and .Values.api.ingress.enabled (not .Values.api.ingress.host) }}
{{- fail "api.ingress.host is required with api.ingress.enabled" }}
{{- end }}
{{- end }}

{{/*
The API's StatefulSet for one role (dict "root" $ "writer" true|false): the writer
(one pod, holds the writer role) or the replicas that forward changes to it.

A StatefulSet, for both: each pod keeps its delivery history store on a volume of
its own (a claim per pod), so a restart or a rollout resumes from it in seconds
instead of rebuilding it from the attempts topic; and a StatefulSet of one pod
replaces it by deleting the old pod before starting the new one, so two writers
never overlap in a rollout (its transactional.id fences the old one anyway,
should it linger on a partitioned node).
*/}}
{{- define "webhook-dispatcher.apiStatefulSet" -}}
{{- $root := .root -}}
{{- $writer := .writer -}}
{{- $component := ternary "api-writer" "api" $writer -}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "webhook-dispatcher.fullname" $root }}-{{ $component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "webhook-dispatcher.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  {{- if $writer }}
  replicas: 1
  {{- else }}
  replicas: {{ $root.Values.api.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  serviceName: {{ include "webhook-dispatcher.fullname" $root }}-{{ $component }}
  {{- if not $writer }}
  # Pods are alike (any answers any read): no need to start them in order.
  podManagementPolicy: Parallel
  {{- end }}
  selector:
    matchLabels:
      {{- include "webhook-dispatcher.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ $component }}
  updateStrategy:
    type: RollingUpdate
  {{- if eq $root.Values.api.history.volume "persistentVolumeClaim" }}
  persistentVolumeClaimRetentionPolicy:
    whenDeleted: Retain
    whenScaled: Delete
  volumeClaimTemplates:
    - metadata:
        name: history
        labels:
          {{- include "webhook-dispatcher.labels" $root | nindent 10 }}
          app.kubernetes.io/component: {{ $component }}
      spec:
        accessModes: ["ReadWriteOnce"]
        {{- with $root.Values.api.history.storageClassName }}
        storageClassName: {{ . | quote }}
        {{- end }}
        resources:
          requests:
            storage: {{ $root.Values.api.history.size | quote }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "webhook-dispatcher.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $component }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $root.Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "webhook-dispatcher.serviceAccountName" $root }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ include "webhook-dispatcher.terminationGracePeriodSeconds" $root }}
      securityContext:
        {{- include "webhook-dispatcher.podSecurityContext" $root | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.priorityClassName }}
      priorityClassName: {{ . | quote }}
      {{- end }}
      containers:
        - name: api
          image: {{ include "webhook-dispatcher.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["api"]
          ports:
            - name: api
              containerPort: {{ $root.Values.api.port }}
              protocol: TCP
            - name: http
              containerPort: {{ $root.Values.httpPort }}
              protocol: TCP
          env:
            {{- include "webhook-dispatcher.env" $root | nindent 12 }}
            - name: DISPATCHER_API_PORT
              value: {{ $root.Values.api.port | int | quote }}
            - name: DISPATCHER_API_HISTORY_PATH
              value: /var/lib/dispatcher/history/history.sqlite3
            {{- if not $writer }}
            # Changes go to the one writer; this replica serves reads.
            - name: DISPATCHER_API_WRITER_URL
              value: {{ include "webhook-dispatcher.apiWriterUrl" $root | quote }}
            {{- end }}
            - name: DISPATCHER_API_KEYS_FILE
              value: {{ printf "%s/keys.json" (include "webhook-dispatcher.apiKeysDir" $root) | quote }}
          # Ready once its view of the webhooks and the delivery history caught up.
          startupProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.startup.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.readiness.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
          {{- with $root.Values.api.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- include "webhook-dispatcher.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            {{- include "webhook-dispatcher.volumeMounts" $root | nindent 12 }}
            - name: api-keys
              mountPath: {{ include "webhook-dispatcher.apiKeysDir" $root }}
              readOnly: true
            - name: history
              mountPath: /var/lib/dispatcher/history
      volumes:
        {{- include "webhook-dispatcher.volumes" $root | nindent 8 }}
        - name: api-keys
          secret:
            secretName: {{ $root.Values.api.keys.existingSecret | quote }}
            defaultMode: 0440
            items:
              - key: {{ $root.Values.api.keys.key | quote }}
                path: keys.json
        {{- if eq $root.Values.api.history.volume "emptyDir" }}
        # The history store, rebuilt from the attempts topic whenever the pod starts.
        - name: history
          emptyDir:
            {{- with $root.Values.api.history.size }}
            sizeLimit: {{ . | quote }}
            {{- end }}
        {{- end }}
      {{- with $root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* The writer's in-cluster URL, which the other API replicas forward changes to. */}}
{{- define "webhook-dispatcher.apiWriterUrl" -}}
http://{{ include "webhook-dispatcher.fullname" . }}-api-writer.{{ .Release.Namespace }}.svc:{{ .Values.api.port }}
{{- end }}

{{/* Selector of the API writer pod only. */}}
{{- define "webhook-dispatcher.apiWriterSelectorLabels" -}}
{{ include "webhook-dispatcher.selectorLabels" . }}
app.kubernetes.io/component: api-writer
{{- end }}
