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
