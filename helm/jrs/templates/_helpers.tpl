{{/*
Expand the name of the chart.
*/}}
{{- define "jrs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "jrs.fullname" -}}
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
{{- define "jrs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels (without the component, which tells the service, batch and test pods apart).
*/}}
{{- define "jrs.core.labels" -}}
helm.sh/chart: {{ include "jrs.chart" . }}
{{ include "jrs.baseSelectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "jrs.baseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "jrs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the REST service pods (the Service must never select batch or test pods).
*/}}
{{- define "jrs.selectorLabels" -}}
{{ include "jrs.baseSelectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "jrs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jrs.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image: repository@digest, else repository:tag with the tag "<appVersion>-<cpu|gpu>" by default.
*/}}
{{- define "jrs.image" -}}
{{- $flavour := .Values.image.flavour | default (ternary "gpu" "cpu" .Values.gpu.enabled) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavour)) }}
{{- end }}
{{- end }}

{{/*
JRS_DEVICE / --device: the value of `device`, else cuda with a GPU and cpu without.
*/}}
{{- define "jrs.device" -}}
{{- .Values.device | default (ternary "cuda" "cpu" .Values.gpu.enabled) }}
{{- end }}

{{/*
Resources with the GPU limit added when gpu.enabled. Call with (dict "resources" R "gpu" .Values.gpu).
*/}}
{{- define "jrs.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if .gpu.enabled }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- with $res }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the API keys.
*/}}
{{- define "jrs.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "jrs.fullname" .)) }}
{{- end }}

{{/*
Base64 content of the chart-managed API key file: the given keys, else the key of the existing
Secret (kept across upgrades), else a new random key.
*/}}
{{- define "jrs.apiKeysData" -}}
{{- if .Values.apiKeys.keys }}
{{- join "\n" .Values.apiKeys.keys | b64enc }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "jrs.apiKeysSecretName" .) | default dict }}
{{- $data := get $existing "data" | default dict }}
{{- get $data .Values.apiKeys.secretKey | default (randAlphaNum 48 | b64enc) }}
{{- end }}
{{- end }}

{{/*
Name of the data claim.
*/}}
{{- define "jrs.dataClaimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "jrs.fullname" .)) }}
{{- end }}

{{/*
Environment shared by the service and batch pods.
*/}}
{{- define "jrs.commonEnv" -}}
- name: JRS_DEVICE
  value: {{ include "jrs.device" . | quote }}
- name: JRS_ENGINE
  value: {{ .Values.engine | default "auto" | quote }}
- name: JRS_PRECISION
  value: {{ .Values.precision | default "auto" | quote }}
{{- if .Values.model.volume }}
- name: JRS_MODEL_DIR
  value: {{ .Values.model.mountPath | quote }}
{{- end }}
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end }}

{{/*
Pod-level scheduling: nodeSelector and tolerations merged with the GPU ones when gpu.enabled.
Call with (dict "nodeSelector" N "tolerations" T "affinity" A "gpu" .Values.gpu).
*/}}
{{- define "jrs.scheduling" -}}
{{- $nodeSelector := deepCopy (.nodeSelector | default dict) }}
{{- $tolerations := .tolerations | default list }}
{{- if .gpu.enabled }}
{{- $nodeSelector = merge $nodeSelector (.gpu.nodeSelector | default dict) }}
{{- $tolerations = concat $tolerations (.gpu.tolerations | default list) }}
{{- if .gpu.runtimeClassName }}
runtimeClassName: {{ .gpu.runtimeClassName }}
{{- end }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Checks of value combinations that the schema cannot express.
*/}}
{{- define "jrs.validate" -}}
{{- if and .Values.persistence.enabled (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "jrs keeps its job store (SQLite) and job folders per pod, and a pod that starts re-queues the jobs it finds running: pods must never share the data volume. With replicaCount > 1 or autoscaling.enabled set persistence.enabled=false (each pod keeps its jobs on an emptyDir) and service.sessionAffinity=ClientIP." }}
{{- end }}
{{- if and .Values.batchJob.enabled (not .Values.batchJob.claimName) (not .Values.persistence.enabled) }}
{{- fail "batchJob needs a volume shared by its pods for the manifest, the DICOM inputs and the outputs: set batchJob.claimName, or persistence.enabled=true to use the chart's data claim." }}
{{- end }}
{{- if .Values.adaptation.enabled }}
{{- if not .Values.persistence.enabled }}
{{- fail "adaptation keeps the patient store (patients.sqlite3, planning scans, adaptation checkpoints, patient models) in JRS_DATA_DIR: set persistence.enabled=true, so that a restarted pod keeps its patients and continues a stopped adaptation." }}
{{- end }}
{{- if and (eq .Values.adaptation.mode "service") .Values.gpu.enabled }}
{{- fail "adaptation.mode=service runs the service from the CPU adaptation image, which cannot use the GPU: with gpu.enabled set adaptation.mode=worker (the GPU service and a CPU adaptation worker on one data volume)." }}
{{- end }}
{{- if and (eq .Values.adaptation.mode "worker") (has "ReadWriteOncePod" .Values.persistence.accessModes) }}
{{- fail "adaptation.mode=worker mounts the data claim in two pods (service and worker): ReadWriteOncePod allows one; use ReadWriteOnce (both pods are kept on one node)." }}
{{- end }}
{{- range $name := list "JRS_ADAPTATION" "JRS_ADAPT_MINUTES" "JRS_ADAPT_ARGS" "JRS_ADAPT_BASE_DIR" "JRS_PATIENT_RETENTION_DAYS" }}
{{- if hasKey $.Values.config $name }}
{{- fail (printf "config.%s conflicts with adaptation.enabled, which sets it: use the adaptation.* values (mode, minutes, threads, extraArgs, baseDir, patientRetentionDays)." $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "jrs.synonymsEnabled" . }}
{{- if and .Values.synonyms.table .Values.synonyms.existingConfigMap }}
{{- fail "synonyms.table and synonyms.existingConfigMap are both set: give the site's synonym table in one of them." }}
{{- end }}
{{- if hasKey .Values.config "JRS_SYNONYMS" }}
{{- fail (printf "config.JRS_SYNONYMS conflicts with synonyms.%s, which mounts the synonym file and sets JRS_SYNONYMS to %s: remove config.JRS_SYNONYMS." (ternary "table" "existingConfigMap" (not (empty .Values.synonyms.table))) (include "jrs.synonymsPath" .)) }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if eq (get . "name" | toString) "JRS_SYNONYMS" }}
{{- fail (printf "extraEnv JRS_SYNONYMS conflicts with synonyms.table / synonyms.existingConfigMap, which set JRS_SYNONYMS to %s: remove it from extraEnv." (include "jrs.synonymsPath" $)) }}
{{- end }}
{{- end }}
{{- if .Values.batchJob.enabled }}
{{- range .Values.batchJob.extraArgs }}
{{- if or (eq (toString .) "--synonyms") (hasPrefix "--synonyms=" (toString .)) }}
{{- fail (printf "batchJob.extraArgs has --synonyms, which the chart passes itself (%s) while synonyms.table or synonyms.existingConfigMap is set: remove it from batchJob.extraArgs." (include "jrs.synonymsPath" $)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the batch Job: "<fullname>-batch[-<nameSuffix>]" (at most 57 characters).
*/}}
{{- define "jrs.batchJobName" -}}
{{- $base := printf "%s-batch" (include "jrs.fullname" . | trunc 40 | trimSuffix "-") }}
{{- with .Values.batchJob.nameSuffix }}
{{- printf "%s-%s" $base . }}
{{- else }}
{{- $base }}
{{- end }}
{{- end }}

{{/*
Patient-specific adaptation (docs/adaptation.md). "service": the service pod adapts, "worker": a
separate Deployment does; "" when adaptation is off.
*/}}
{{- define "jrs.adaptationMode" -}}
{{- if .Values.adaptation.enabled }}
{{- .Values.adaptation.mode }}
{{- end }}
{{- end }}

{{/*
The adaptation image (docker/Dockerfile.adapt-cpu): repository@digest, else repository:tag with
the repository of `image` and the tag "<appVersion>-adapt-cpu" by default.
*/}}
{{- define "jrs.adaptationImage" -}}
{{- $image := .Values.adaptation.image }}
{{- $repository := $image.repository | default .Values.image.repository }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository ($image.tag | default (printf "%s-adapt-cpu" .Chart.AppVersion)) }}
{{- end }}
{{- end }}

{{/*
The image of the service pods: the adaptation image when they adapt themselves, else `image`.
*/}}
{{- define "jrs.serviceImage" -}}
{{- if eq (include "jrs.adaptationMode" .) "service" }}
{{- include "jrs.adaptationImage" . }}
{{- else }}
{{- include "jrs.image" . }}
{{- end }}
{{- end }}

{{/*
Name of the adaptation worker Deployment: "<fullname>-adaptation".
*/}}
{{- define "jrs.adaptationWorkerName" -}}
{{- printf "%s-adaptation" (include "jrs.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{/*
JRS_ADAPT_ARGS: `--threads <threads>` and adaptation.extraArgs, each argument single-quoted
unless it is plain (the service splits the value like a shell).
*/}}
{{- define "jrs.adaptationArgs" -}}
{{- $args := list }}
{{- if not (kindIs "invalid" .Values.adaptation.threads) }}
{{- $args = append $args "--threads" }}
{{- $args = append $args (toString .Values.adaptation.threads) }}
{{- end }}
{{- range .Values.adaptation.extraArgs }}
{{- $args = append $args (ternary . (squote .) (regexMatch "^[-A-Za-z0-9_.,:=/+@]+$" .)) }}
{{- end }}
{{- join " " $args }}
{{- end }}

{{/*
Environment of adaptation, for the service pods and the worker (only when adaptation.enabled):
JRS_ADAPTATION is "local" where the service adapts itself, "external" where the worker does.
*/}}
{{- define "jrs.adaptationEnv" -}}
{{- $ada := .Values.adaptation -}}
- name: JRS_ADAPTATION
  value: {{ ternary "local" "external" (eq $ada.mode "service") | quote }}
- name: JRS_ADAPT_MINUTES
  value: {{ $ada.minutes | toString | quote }}
- name: JRS_ADAPT_ARGS
  value: {{ include "jrs.adaptationArgs" . | quote }}
{{- with $ada.baseDir }}
- name: JRS_ADAPT_BASE_DIR
  value: {{ . | quote }}
{{- end }}
- name: JRS_PATIENT_RETENTION_DAYS
  value: {{ $ada.patientRetentionDays | toString | quote }}
{{- end }}

{{/*
Affinity of the pods that open the data volume's SQLite stores: with an adaptation worker, the
service and worker pods must share a node (the stores run in WAL mode, which needs one host; a
ReadWriteOnce volume attaches to one node). Adds a required podAffinity term to the given
affinity. Call with (dict "root" $ "affinity" A).
*/}}
{{- define "jrs.storeAffinity" -}}
{{- $affinity := deepCopy (.affinity | default dict) }}
{{- if eq (include "jrs.adaptationMode" .root) "worker" }}
{{- $podAffinity := get $affinity "podAffinity" | default dict }}
{{- $required := get $podAffinity "requiredDuringSchedulingIgnoredDuringExecution" | default list }}
{{- $labels := include "jrs.baseSelectorLabels" .root | fromYaml }}
{{- $component := dict "key" "app.kubernetes.io/component" "operator" "In" "values" (list "api" "adaptation") }}
{{- $selector := dict "matchLabels" $labels "matchExpressions" (list $component) }}
{{- $term := dict "labelSelector" $selector "topologyKey" "kubernetes.io/hostname" }}
{{- $_ := set $podAffinity "requiredDuringSchedulingIgnoredDuringExecution" (append $required $term) }}
{{- $_ := set $affinity "podAffinity" $podAffinity }}
{{- end }}
{{- with $affinity }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
The site's ROI-name synonym table (JRS_SYNONYMS): "true" when synonyms.table or
synonyms.existingConfigMap is set, else "".
*/}}
{{- define "jrs.synonymsEnabled" -}}
{{- if or .Values.synonyms.table .Values.synonyms.existingConfigMap }}true{{ end }}
{{- end }}

{{/*
Name of the ConfigMap holding the synonym file: synonyms.existingConfigMap, else
"<fullname>-synonyms" (rendered from synonyms.table).
*/}}
{{- define "jrs.synonymsConfigMapName" -}}
{{- .Values.synonyms.existingConfigMap | default (printf "%s-synonyms" (include "jrs.fullname" .)) }}
{{- end }}

{{/*
The synonym file in the pods: <synonyms.mountPath>/<synonyms.key>.
*/}}
{{- define "jrs.synonymsPath" -}}
{{- printf "%s/%s" (.Values.synonyms.mountPath | trimSuffix "/") .Values.synonyms.key }}
{{- end }}

{{/*
The file the chart writes from synonyms.table (the ConfigMap's data and its checksum).
*/}}
{{- define "jrs.synonymsFile" -}}
{{- toYaml .Values.synonyms.table }}
{{- end }}

{{/*
Pod annotation that rolls the pods when the chart's synonym file changes (none for an existing
ConfigMap, whose content the chart does not know).
*/}}
{{- define "jrs.synonymsChecksum" -}}
{{- if and .Values.synonyms.table (not .Values.synonyms.existingConfigMap) }}
checksum/synonyms: {{ include "jrs.synonymsFile" . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Read-only mount of the synonym file (a container's volumeMounts item).
*/}}
{{- define "jrs.synonymsVolumeMount" -}}
- name: synonyms
  mountPath: {{ .Values.synonyms.mountPath | quote }}
  readOnly: true
{{- end }}

{{/*
The volume of the synonym file (a pod's volumes item).
*/}}
{{- define "jrs.synonymsVolume" -}}
- name: synonyms
  configMap:
    name: {{ include "jrs.synonymsConfigMapName" . }}
    defaultMode: 0444
    items:
      - key: {{ .Values.synonyms.key | quote }}
        path: {{ .Values.synonyms.key | quote }}
{{- end }}
