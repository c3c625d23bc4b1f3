{{- define "podvisor.name" -}}podvisor{{- end -}}

{{- define "podvisor.fullname" -}}
{{- if contains "podvisor" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-podvisor" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "podvisor.selectorLabels" -}}
app.kubernetes.io/name: podvisor
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podvisor.labels" -}}
{{ include "podvisor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "podvisor.serviceAccountName" -}}
{{- default (include "podvisor.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The ConfigMap's data: CLOUD_PROVIDER, the shared variables and the
     chosen provider's, each non-empty value as a string. */}}
{{- define "podvisor.configData" -}}
{{- $provider := index .Values.providers .Values.provider -}}
{{- if and (eq .Values.provider "aws") (not (include "podvisor.truthy" $provider.env.USE_PODVM_LAUNCHTEMPLATE)) -}}
{{- $_ := required "providers.aws.env.PODVM_AMI_ID is required with provider aws (unless USE_PODVM_LAUNCHTEMPLATE is true: then the launch template names the image)" $provider.env.PODVM_AMI_ID -}}
{{- end -}}
{{- if eq .Values.provider "azure" -}}
{{- range $key := list "AZURE_SUBSCRIPTION_ID" "AZURE_REGION" "AZURE_RESOURCE_GROUP" "AZURE_SUBNET_ID" "AZURE_IMAGE_ID" -}}
{{- $_ := required (printf "providers.azure.env.%s is required with provider azure" $key) (index $provider.env $key) -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.provider "ibmcloud" -}}
{{- range $key := list "IBMCLOUD_PODVM_IMAGE_ID" "IBMCLOUD_ZONE" "IBMCLOUD_VPC_ID" "IBMCLOUD_VPC_SUBNET_ID" "IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME" -}}
{{- $_ := required (printf "providers.ibmcloud.env.%s is required with provider ibmcloud" $key) (index $provider.env $key) -}}
{{- end -}}
{{- end -}}
CLOUD_PROVIDER: {{ .Values.provider | quote }}
{{- range $key, $value := .Values.config.env }}
{{- if ne (toString $value) "" }}
{{ $key }}: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- range $key, $value := $provider.env }}
{{- if ne (toString $value) "" }}
{{ $key }}: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "podvisor.secretData" -}}
{{- $provider := index .Values.providers .Values.provider -}}
{{- range $key, $value := $provider.secretEnv }}
{{- if ne (toString $value) "" }}
{{ $key }}: {{ toString $value | b64enc | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* "true" when the value is one of the spellings the daemon's boolean
     variables accept as true (clap's BoolishValueParser: y, yes, t, true,
     on, 1, any case), else empty. */}}
{{- define "podvisor.truthy" -}}
{{- if has (lower (toString .)) (list "y" "yes" "t" "true" "on" "1") -}}true{{- end -}}
{{- end -}}

{{/* "true" when the daemon runs on Azure with AKS workload identity: the
     pod carries the label the azure-workload-identity webhook selects on,
     and the ServiceAccount the client id the webhook injects. */}}
{{- define "podvisor.azureWorkloadIdentity" -}}
{{- if and (eq .Values.provider "azure") .Values.providers.azure.workloadIdentity.enabled -}}true{{- end -}}
{{- end -}}
