{{/*
Name of the chart, or nameOverride. Kubernetes names are DNS labels: at most 63
characters, no trailing dash.
*/}}
{{- define "webhook-dispatcher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources. The release name alone is used when it
already contains the chart name, so `helm install webhook-dispatcher .` does not
give webhook-dispatcher-webhook-dispatcher.
*/}}
{{- define "webhook-dispatcher.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label. "+" is not allowed in label
values.
*/}}
{{- define "webhook-dispatcher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource. They carry versions, so they change on upgrades:
never use them as selectors.
*/}}
{{- define "webhook-dispatcher.labels" -}}
helm.sh/chart: {{ include "webhook-dispatcher.chart" . }}
{{ include "webhook-dispatcher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: webhook-dispatcher
{{- end }}

{{/*
Labels that identify the release's pods. A Deployment's selector is immutable, so
these must stay the same across upgrades: no chart or app version here.
*/}}
{{- define "webhook-dispatcher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "webhook-dispatcher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector of the dispatcher pods only: the topics Job's pod shares the release's
labels but must not become an endpoint of the Service nor count in the PDB.
*/}}
{{- define "webhook-dispatcher.dispatcherSelectorLabels" -}}
{{ include "webhook-dispatcher.selectorLabels" . }}
app.kubernetes.io/component: dispatcher
{{- end }}

{{/*
Name of the ServiceAccount the pods run as.
*/}}
{{- define "webhook-dispatcher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "webhook-dispatcher.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: the digest wins over the tag, the tag defaults to appVersion.
*/}}
{{- define "webhook-dispatcher.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the drain timeout rounded up, plus a margin, so
the kubelet's SIGKILL can only come after the drain has had all its time.
*/}}
{{- define "webhook-dispatcher.terminationGracePeriodSeconds" -}}
{{- add (ceil .Values.config.drain_timeout_s | int) .Values.terminationGraceExtraSeconds }}
{{- end }}
