{{/*
Expand the name of the chart.
*/}}
{{- define "idselect.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "idselect.fullname" -}}
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
Create chart name and version as used by the chart label.
*/}}
{{- define "idselect.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "idselect.labels" -}}
helm.sh/chart: {{ include "idselect.chart" . }}
{{ include "idselect.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "idselect.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idselect.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "idselect.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "idselect.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image.
*/}}
{{- define "idselect.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Whether the server gets an API key, and from which Secret.
*/}}
{{- define "idselect.apiKeyEnabled" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.value }}true{{- end }}
{{- end }}

{{- define "idselect.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else }}
{{- include "idselect.fullname" . }}
{{- end }}
{{- end }}

{{/*
Arguments of `idselect serve` (the image's ENTRYPOINT): the model, then flags.
*/}}
{{- define "idselect.args" -}}
- {{ .Values.model | quote }}
- --host
- "0.0.0.0"
- --port
- {{ .Values.containerPort | int | toString | quote }}
{{- if not (kindIs "invalid" .Values.visualTokenBudget) }}
- --visual-token-budget
- {{ .Values.visualTokenBudget | int | toString | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.maxVisualTokenBudget) }}
- --max-visual-token-budget
- {{ .Values.maxVisualTokenBudget | int | toString | quote }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | toString | quote }}
{{- end }}
{{- end }}

{{/*
Name of the model-cache claim.
*/}}
{{- define "idselect.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-models" (include "idselect.fullname" .)) }}
{{- end }}

{{/*
Mutually exclusive options.
*/}}
{{- define "idselect.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: KEDA manages its own HorizontalPodAutoscaler" }}
{{- end }}
{{- if and .Values.apiKey.value .Values.apiKey.existingSecret }}
{{- fail "set apiKey.value or apiKey.existingSecret, not both" }}
{{- end }}
{{- end }}
