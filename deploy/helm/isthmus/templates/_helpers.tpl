{{/* Names, labels and shared values of the chart. */}}
{{- define "isthmus.fullname" -}}
{{- if contains "isthmus" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-isthmus" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "isthmus.agent" -}}{{ include "isthmus.fullname" . }}-agent{{- end -}}
{{- define "isthmus.clustermesh" -}}{{ include "isthmus.fullname" . }}-clustermesh{{- end -}}
{{- define "isthmus.config" -}}{{ include "isthmus.fullname" . }}-config{{- end -}}
{{- define "isthmus.pkiJob" -}}{{ include "isthmus.fullname" . }}-pki{{- end -}}
{{- define "isthmus.peersJob" -}}{{ include "isthmus.fullname" . }}-mesh-peers{{- end -}}

{{- define "isthmus.caSecret" -}}
{{- .Values.pki.existingCASecret | default (printf "%s-clustermesh-ca" (include "isthmus.fullname" .)) -}}
{{- end -}}
{{- define "isthmus.agentsSecret" -}}
{{- .Values.pki.existingAgentsSecret | default (printf "%s-agents" (include "isthmus.fullname" .)) -}}
{{- end -}}
{{- define "isthmus.rootSecret" -}}{{ include "isthmus.fullname" . }}-root{{- end -}}

{{- define "isthmus.labels" -}}
app.kubernetes.io/name: isthmus
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
isthmus.io/cluster: {{ .Values.cluster.name | quote }}
{{- end -}}

{{- define "isthmus.selector" -}}
app.kubernetes.io/name: isthmus
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "isthmus.tag" -}}{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
{{- define "isthmus.agentImage" -}}{{ .Values.agent.image.repository }}:{{ include "isthmus.tag" . }}{{- end -}}
{{- define "isthmus.clustermeshImage" -}}{{ .Values.clustermesh.image.repository }}:{{ include "isthmus.tag" . }}{{- end -}}

{{/* The clustermesh server's client URLs as the agents and jobs use them. */}}
{{- define "isthmus.kvstoreEndpoints" -}}
{{- if .Values.agent.kvstoreEndpoints -}}
{{- join "," .Values.agent.kvstoreEndpoints -}}
{{- else if .Values.clustermesh.externalEtcd.endpoints -}}
{{- join "," .Values.clustermesh.externalEtcd.endpoints -}}
{{- else -}}
{{- printf "https://%s.%s.svc:%d" (include "isthmus.clustermesh" .) .Release.Namespace (int .Values.clustermesh.port) -}}
{{- end -}}
{{- end -}}

{{/* KUBERNETES_SERVICE_HOST/PORT overrides (k8sService). */}}
{{- define "isthmus.k8sServiceEnv" -}}
{{- if .Values.k8sService.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sService.host | quote }}
{{- end }}
{{- if .Values.k8sService.port }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sService.port | quote }}
{{- end }}
{{- end -}}

{{/* Checks of values that would only fail at run time. */}}
{{- define "isthmus.validate" -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$" .Values.cluster.name) -}}
{{- fail "cluster.name must be a DNS label of at most 32 characters" -}}
{{- end -}}
{{- if or (lt (int .Values.cluster.id) 1) (gt (int .Values.cluster.id) 4095) -}}
{{- fail "cluster.id must be 1-4095" -}}
{{- end -}}
{{- if not .Values.cluster.podCIDRs -}}
{{- fail "cluster.podCIDRs needs the cluster's pod address range(s)" -}}
{{- end -}}
{{- if not (has .Values.encryption.type (list "none" "wireguard")) -}}
{{- fail "encryption.type must be none or wireguard" -}}
{{- end -}}
{{- if not (has .Values.agent.kubernetesPolicyPeers (list "cluster" "mesh")) -}}
{{- fail "agent.kubernetesPolicyPeers must be cluster or mesh" -}}
{{- end -}}
{{- if .Values.clustermesh.externalEtcd.endpoints -}}
{{- if not .Values.clustermesh.externalEtcd.secretName -}}
{{- fail "clustermesh.externalEtcd.secretName: the Secret with the server's credential (ca.crt, client.crt, client.key) for the external etcd" -}}
{{- end -}}
{{- if not .Values.pki.existingAgentsSecret -}}
{{- fail "clustermesh.externalEtcd needs pki.existingCASecret and pki.existingAgentsSecret: the agents' credential must be a user of the external etcd, which the chart cannot create" -}}
{{- end -}}
{{- if .Values.mesh.peers -}}
{{- fail "mesh.peers needs the embedded etcd (the job connects with its root credential): connect from the external etcd's side with isthmus clustermesh connect --bundle" -}}
{{- end -}}
{{- end -}}
{{- if not (has .Values.encryption.userspaceDaemon.updateStrategy (list "OnDelete" "RollingUpdate")) -}}
{{- fail "encryption.userspaceDaemon.updateStrategy must be OnDelete or RollingUpdate" -}}
{{- end -}}
{{- if not (has .Values.clustermesh.service.type (list "ClusterIP" "NodePort" "LoadBalancer")) -}}
{{- fail "clustermesh.service.type must be ClusterIP, NodePort or LoadBalancer" -}}
{{- end -}}
{{- if ne (empty .Values.pki.existingCASecret) (empty .Values.pki.existingAgentsSecret) -}}
{{- fail "pki.existingCASecret and pki.existingAgentsSecret go together" -}}
{{- end -}}
{{- if not (has .Values.globalServices.affinity (list "" "local" "remote")) -}}
{{- fail "globalServices.affinity must be \"\", local or remote" -}}
{{- end -}}
{{- range .Values.mesh.peers -}}
{{- if or (not .name) (not .secretName) -}}
{{- fail "every mesh.peers entry needs name and secretName" -}}
{{- end -}}
{{- if eq .name $.Values.cluster.name -}}
{{- fail "mesh.peers: a peer cannot be this cluster" -}}
{{- end -}}
{{- end -}}
{{- end -}}
