{{/*
Names, labels and the values derived from several settings. Everything the
operator's flags, the Services, the certificate and the webhook must agree on
(Service names, DNS names, the TLS Secret, the policy server address) is
defined once here.
*/}}

{{- define "lastguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lastguard.fullname" -}}
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

{{- define "lastguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lastguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lastguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "lastguard.labels" -}}
helm.sh/chart: {{ include "lastguard.chart" . }}
app.kubernetes.io/name: {{ include "lastguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lastguard
{{- end -}}

{{- define "lastguard.operatorName" -}}
{{- printf "%s-operator" (include "lastguard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lastguard.webhookServiceName" -}}
{{- printf "%s-webhook" (include "lastguard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lastguard.metricsServiceName" -}}
{{- printf "%s-metrics" (include "lastguard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lastguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lastguard.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: repository@digest when a digest is given, else repository:tag. */}}
{{- define "lastguard.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Where injected sidecars get their policies: the operator's gRPC Service. */}}
{{- define "lastguard.policyServer" -}}
{{- default (printf "%s.%s.svc:%d" (include "lastguard.operatorName" .) .Release.Namespace (int .Values.ports.grpc)) .Values.webhook.inject.policyServer -}}
{{- end -}}

{{/* The injection mode of pods without a lastguard.dev/mode annotation. */}}
{{- define "lastguard.injectDefaultMode" -}}
{{- if .Values.webhook.inject.defaultMode -}}
{{- .Values.webhook.inject.defaultMode -}}
{{- else if .Values.istio.enabled -}}
sidecar
{{- else -}}
envoy
{{- end -}}
{{- end -}}

{{/* Namespaces never injected: the system ones, the release's own, and webhook.excludeNamespaces. */}}
{{- define "lastguard.excludedNamespaces" -}}
{{- $names := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- concat $names .Values.webhook.excludeNamespaces | uniq | toJson -}}
{{- end -}}

{{/* The Secret holding tls.crt, tls.key and ca.crt, mounted by the operator. */}}
{{- define "lastguard.tlsSecretName" -}}
{{- if eq .Values.tls.mode "existingSecret" -}}
{{- required "tls.existingSecret.name is required when tls.mode is existingSecret" .Values.tls.existingSecret.name -}}
{{- else -}}
{{- printf "%s-tls" (include "lastguard.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Every name the serving certificate must carry: both Services, short to fully qualified. */}}
{{- define "lastguard.dnsNames" -}}
{{- $names := list -}}
{{- range $service := list (include "lastguard.operatorName" .) (include "lastguard.webhookServiceName" .) -}}
{{- $names = concat $names (list $service (printf "%s.%s" $service $.Release.Namespace) (printf "%s.%s.svc" $service $.Release.Namespace) (printf "%s.%s.svc.%s" $service $.Release.Namespace $.Values.clusterDomain)) -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/*
tls.mode=generate: the CA and serving certificate as base64 PEM, {"ca.crt", "tls.crt", "tls.key"}.

Computed once per render and memoised in .Values (every template of a chart
shares that map), so the Secret and the webhook's caBundle hold the same CA.
On upgrade the existing Secret is reused when it was made for the same DNS
names, so certificates do not change on every `helm upgrade`; offline
(`helm template`) lookup finds nothing and a new CA is made each time.
*/}}
{{- define "lastguard.generatedTls" -}}
{{- if not (hasKey .Values "_lastguardGeneratedTls") -}}
{{- $dnsNames := include "lastguard.dnsNames" . | fromJsonArray -}}
{{- $fingerprint := $dnsNames | join "," | sha256sum | trunc 16 -}}
{{- $material := dict -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "lastguard.tlsSecretName" .) -}}
{{- if and $existing $existing.data (eq (dig "metadata" "annotations" "lastguard.dev/dns-names-digest" "" $existing) $fingerprint) -}}
{{- $data := $existing.data -}}
{{- if and (index $data "ca.crt") (index $data "tls.crt") (index $data "tls.key") -}}
{{- $material = dict "ca.crt" (index $data "ca.crt") "tls.crt" (index $data "tls.crt") "tls.key" (index $data "tls.key") -}}
{{- end -}}
{{- end -}}
{{- if not $material -}}
{{- $days := int .Values.tls.generate.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "lastguard.fullname" .)) $days -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" (include "lastguard.operatorName" .) .Release.Namespace) nil $dnsNames $days $ca -}}
{{- $material = dict "ca.crt" ($ca.Cert | b64enc) "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) -}}
{{- end -}}
{{- $_ := set $material "fingerprint" $fingerprint -}}
{{- $_ := set .Values "_lastguardGeneratedTls" $material -}}
{{- end -}}
{{- toJson (get .Values "_lastguardGeneratedTls") -}}
{{- end -}}

{{/* The webhook's caBundle (base64 PEM), or "" when cert-manager's cainjector fills it in. */}}
{{- define "lastguard.webhookCaBundle" -}}
{{- if eq .Values.tls.mode "generate" -}}
{{- index (include "lastguard.generatedTls" . | fromJson) "ca.crt" -}}
{{- else if eq .Values.tls.mode "existingSecret" -}}
{{- if .Values.tls.existingSecret.caBundle -}}
{{- .Values.tls.existingSecret.caBundle | b64enc -}}
{{- else -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace .Values.tls.existingSecret.name -}}
{{- $ca := dig "data" "ca.crt" "" $secret -}}
{{- required (printf "tls.existingSecret.caBundle is required: Secret %s/%s with a ca.crt was not found (offline rendering cannot read it)" .Release.Namespace .Values.tls.existingSecret.name) $ca -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lastguard.certManagerCertificateName" -}}
{{- printf "%s-serving" (include "lastguard.fullname" .) -}}
{{- end -}}
