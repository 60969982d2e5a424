// Package helm tests the Helm chart deploy/helm/isthmus with Helm v4 (make
// helm builds it into bin/helm-<version>): lint, and template for the
// default values and the values files in testdata/, with the rendered
// objects checked.
package helm

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

// HelmVersion is the Makefile's HELM_VERSION.
const HelmVersion = "v4.3.2"

const chart = "isthmus"

var valuesFiles = []string{"testdata/wireguard.yaml", "testdata/mesh-peer.yaml", "testdata/registry-existing-pki.yaml", "testdata/external-etcd.yaml"}

func helmBin(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "bin", "helm-"+HelmVersion))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		testenv.Skip(t, "%s not found: make helm builds it (Helm %s from the module proxy)", p, HelmVersion)
	}
	return p
}

func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(helmBin(t), args...)
	// No user configuration or cache of the machine's Helm.
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CONFIG_HOME="+home, "HELM_CACHE_HOME="+home, "HELM_DATA_HOME="+home)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String() + errb.String(), err
	}
	return out.String(), nil
}

func TestLint(t *testing.T) {
	for _, v := range append([]string{""}, valuesFiles...) {
		args := []string{"lint", "--strict", chart}
		if v != "" {
			args = append(args, "-f", v)
		}
		if out, err := helm(t, args...); err != nil {
			t.Errorf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// rendered is the output of helm template, by kind and name.
type rendered map[string][]byte

func render(t *testing.T, values string, set ...string) rendered {
	t.Helper()
	args := []string{"template", "rel", chart, "--namespace", "kube-system", "--include-crds"}
	if values != "" {
		args = append(args, "-f", values)
	}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	out, err := helm(t, args...)
	if err != nil {
		t.Fatalf("helm template %s: %v\n%s", values, err, out)
	}
	r := rendered{}
	for doc := range strings.SplitSeq(out, "\n---\n") {
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("rendered YAML: %v\n%s", err, doc)
		}
		if meta.Kind == "" {
			continue
		}
		key := meta.Kind + "/" + meta.Metadata.Name
		if _, dup := r[key]; dup {
			t.Fatalf("%s rendered twice", key)
		}
		r[key] = []byte(doc)
	}
	return r
}

func (r rendered) get(t *testing.T, key string, into any) {
	t.Helper()
	doc, ok := r[key]
	if !ok {
		keys := make([]string, 0, len(r))
		for k := range r {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		t.Fatalf("%s not rendered; have %v", key, keys)
	}
	if err := yaml.UnmarshalStrict(doc, into); err != nil {
		t.Fatalf("%s: %v", key, err)
	}
}

func configMap(t *testing.T, r rendered) map[string]string {
	var cm corev1.ConfigMap
	r.get(t, "ConfigMap/rel-isthmus-config", &cm)
	return cm.Data
}

func container(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s", name)
	return corev1.Container{}
}

func hasArg(c corev1.Container, arg string) bool { return slices.Contains(c.Args, arg) }

// checkAgent checks the agent DaemonSet's invariants.
func checkAgent(t *testing.T, r rendered, image string) appsv1.DaemonSet {
	t.Helper()
	var ds appsv1.DaemonSet
	r.get(t, "DaemonSet/rel-isthmus-agent", &ds)
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || spec.HostPID {
		t.Errorf("agent: hostNetwork %v hostPID %v, want true, false", spec.HostNetwork, spec.HostPID)
	}
	c := container(t, spec, "agent")
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("agent: not privileged")
	}
	if c.Image != image {
		t.Errorf("agent image %q, want %q", c.Image, image)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	for path, prop := range map[string]corev1.MountPropagationMode{
		"/sys/fs/bpf":    corev1.MountPropagationBidirectional,
		"/var/run/netns": corev1.MountPropagationHostToContainer,
	} {
		// The host's /run/netns: the runtime checks the propagation of
		// the literal host path, and /var/run is a symlink to /run.
		host := map[string]string{"/var/run/netns": "/run/netns"}[path]
		if host == "" {
			host = path
		}
		m, ok := mounts[path]
		if !ok || hostPaths[m.Name] != host {
			t.Errorf("agent: %s is not the host's (mount %+v, host paths %v)", path, m, hostPaths)
			continue
		}
		if m.MountPropagation == nil || *m.MountPropagation != prop {
			t.Errorf("agent: %s propagation %v, want %s", path, m.MountPropagation, prop)
		}
	}
	for _, p := range []string{"/var/run/isthmus", "/var/lib/isthmus", "/var/run/wireguard", "/opt/cni/bin", "/etc/cni/net.d"} {
		if m, ok := mounts[p]; !ok || hostPaths[m.Name] != p {
			t.Errorf("agent: host directory %s not mounted", p)
		}
	}
	for _, a := range []string{"--kubernetes", "--node-name=$(NODE_NAME)", "--kvstore-bundle=/etc/isthmus/kvstore", "--cni-bin-dir=/opt/cni/bin", "--cni-conf-dir=/etc/cni/net.d", "--encryption=$(ENCRYPTION)", "--kubernetes-policy-peers=cluster"} {
		if !hasArg(c, a) {
			t.Errorf("agent: no arg %s in %q", a, c.Args)
		}
	}
	var nodeName bool
	for _, e := range c.Env {
		nodeName = nodeName || (e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName")
	}
	if !nodeName {
		t.Error("agent: NODE_NAME is not spec.nodeName")
	}
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil || us.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		t.Errorf("agent: update strategy %+v, want RollingUpdate with maxUnavailable 1", us)
	}
	if !slices.ContainsFunc(spec.Tolerations, func(t corev1.Toleration) bool { return t.Operator == corev1.TolerationOpExists && t.Key == "" }) {
		t.Errorf("agent: does not tolerate every taint: %+v", spec.Tolerations)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("agent: priority class %q", spec.PriorityClassName)
	}
	if ds.Spec.Template.Annotations["checksum/config"] == "" {
		t.Error("agent: no checksum/config annotation (a changed value would not roll the agents)")
	}
	return ds
}

// rules flattens a role's rules into "group/resource[/name]:verb" strings.
func rules(rs []rbacv1.PolicyRule) []string {
	var out []string
	for _, r := range rs {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					names := r.ResourceNames
					if len(names) == 0 {
						names = []string{""}
					}
					for _, n := range names {
						out = append(out, g+"/"+res+"/"+n+":"+v)
					}
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

func checkRules(t *testing.T, r rendered, key string, want []string) {
	t.Helper()
	var role rbacv1.ClusterRole
	r.get(t, key, &role)
	sort.Strings(want)
	if got := rules(role.Rules); !slices.Equal(got, want) {
		t.Errorf("%s rules:\n got %q\nwant %q", key, got, want)
	}
}

func TestTemplateDefaults(t *testing.T) {
	r := render(t, "")
	checkAgent(t, r, "localhost/isthmus/agent:0.1.0-dev")
	checkRules(t, r, "ClusterRole/rel-isthmus-agent", []string{
		"/nodes/:get",
		"/pods/:list", "/pods/:watch", "/namespaces/:list", "/namespaces/:watch", "/services/:list", "/services/:watch",
		"discovery.k8s.io/endpointslices/:list", "discovery.k8s.io/endpointslices/:watch",
		"networking.k8s.io/networkpolicies/:list", "networking.k8s.io/networkpolicies/:watch",
		"isthmus.io/networkpolicies/:list", "isthmus.io/networkpolicies/:watch",
		"isthmus.io/bgppeeringpolicies/:list", "isthmus.io/bgppeeringpolicies/:watch",
		"isthmus.io/l2announcementpolicies/:list", "isthmus.io/l2announcementpolicies/:watch",
		"multicluster.x-k8s.io/serviceexports/:list", "multicluster.x-k8s.io/serviceexports/:watch",
	})
	checkRules(t, r, "ClusterRole/rel-isthmus-clustermesh", []string{
		"/services/:list", "/services/:watch", "/services/status/:update",
		"discovery.k8s.io/endpointslices/:list", "discovery.k8s.io/endpointslices/:watch",
		"networking.k8s.io/networkpolicies/:list", "networking.k8s.io/networkpolicies/:watch",
		"multicluster.x-k8s.io/serviceexports/:list", "multicluster.x-k8s.io/serviceexports/:watch",
		"multicluster.x-k8s.io/serviceimports/:list", "multicluster.x-k8s.io/serviceimports/:create",
		"multicluster.x-k8s.io/serviceimports/:update", "multicluster.x-k8s.io/serviceimports/:delete",
		"multicluster.x-k8s.io/serviceimports/status/:update",
		"isthmus.io/networkpolicies/:list", "isthmus.io/networkpolicies/:watch",
		"isthmus.io/networkpolicies/status/:update",
		"isthmus.io/loadbalancerippools/:list", "isthmus.io/loadbalancerippools/:watch", "isthmus.io/loadbalancerippools/status/:update",
		"isthmus.io/bgppeeringpolicies/:list", "isthmus.io/bgppeeringpolicies/:watch", "isthmus.io/bgppeeringpolicies/status/:update",
		"isthmus.io/l2announcementpolicies/:list", "isthmus.io/l2announcementpolicies/:watch", "isthmus.io/l2announcementpolicies/status/:update",
		"isthmus.io/externalworkloads/:list", "isthmus.io/externalworkloads/:watch", "isthmus.io/externalworkloads/status/:update",
		"/events/:create",
	})
	var role rbacv1.Role
	r.get(t, "Role/rel-isthmus-pki", &role)
	if got := rules(role.Rules); !slices.Equal(got, []string{
		"/secrets/:create",
		"/secrets/rel-isthmus-agents:get", "/secrets/rel-isthmus-agents:update",
		"/secrets/rel-isthmus-clustermesh-ca:get", "/secrets/rel-isthmus-clustermesh-ca:update",
		"/secrets/rel-isthmus-root:get", "/secrets/rel-isthmus-root:update",
	}) {
		t.Errorf("PKI job role: %q", got)
	}

	var svc corev1.Service
	r.get(t, "Service/rel-isthmus-clustermesh", &svc)
	if svc.Spec.Type != corev1.ServiceTypeClusterIP || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 2379 {
		t.Errorf("clustermesh Service: %s %+v", svc.Spec.Type, svc.Spec.Ports)
	}
	var dep appsv1.Deployment
	r.get(t, "Deployment/rel-isthmus-clustermesh", &dep)
	if *dep.Spec.Replicas != 1 || dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("clustermesh: %d replicas, strategy %s", *dep.Spec.Replicas, dep.Spec.Strategy.Type)
	}
	c := container(t, dep.Spec.Template.Spec, "clustermesh")
	if c.Image != "localhost/isthmus/clustermesh:0.1.0-dev" {
		t.Errorf("clustermesh image %q", c.Image)
	}
	for _, a := range []string{"--kubernetes", "--pod-cidr=$(POD_CIDRS)", "--ca-dir=/etc/isthmus/ca", "--insecure-shared-agent-credential", "--listen-client=0.0.0.0:2379"} {
		if !hasArg(c, a) {
			t.Errorf("clustermesh: no arg %s in %q", a, c.Args)
		}
	}
	var dataVol *corev1.Volume
	for i, v := range dep.Spec.Template.Spec.Volumes {
		if v.Name == "data" {
			dataVol = &dep.Spec.Template.Spec.Volumes[i]
		}
	}
	if dataVol == nil || dataVol.EmptyDir == nil {
		t.Errorf("clustermesh data volume %+v, want an emptyDir", dataVol)
	}
	cm := configMap(t, r)
	if cm["CLUSTER_NAME"] != "default" || cm["POD_CIDRS"] != "10.0.0.0/16" || cm["ENCRYPTION"] != "none" ||
		cm["KVSTORE_ENDPOINTS"] != "https://rel-isthmus-clustermesh.kube-system.svc:2379" {
		t.Errorf("ConfigMap: %v", cm)
	}
	var job batchv1.Job
	r.get(t, "Job/rel-isthmus-pki", &job)
	jc := container(t, job.Spec.Template.Spec, "certs")
	if jc.Image != "localhost/isthmus/clustermesh:0.1.0-dev" || !slices.Equal(jc.Args[:2], []string{"clustermesh", "certs"}) || !hasArg(jc, "--kubernetes-secrets=kube-system") {
		t.Errorf("PKI job: %s %q", jc.Image, jc.Args)
	}
	if job.Annotations["helm.sh/hook"] != "pre-install,pre-upgrade" {
		t.Errorf("PKI job hook %q", job.Annotations["helm.sh/hook"])
	}
	if _, ok := r["Job/rel-isthmus-mesh-peers"]; ok {
		t.Error("a mesh-peers job without peers")
	}
	for _, crd := range []string{"networkpolicies.isthmus.io", "loadbalancerippools.isthmus.io", "bgppeeringpolicies.isthmus.io",
		"l2announcementpolicies.isthmus.io", "externalworkloads.isthmus.io", "serviceexports.multicluster.x-k8s.io", "serviceimports.multicluster.x-k8s.io"} {
		if _, ok := r["CustomResourceDefinition/"+crd]; !ok {
			t.Errorf("CRD %s not in the chart", crd)
		}
	}
}

func TestTemplateWireGuard(t *testing.T) {
	r := render(t, "testdata/wireguard.yaml")
	ds := checkAgent(t, r, "localhost/isthmus/agent:0.1.0-dev")
	c := container(t, ds.Spec.Template.Spec, "agent")
	for _, a := range []string{"--node-encryption=$(NODE_ENCRYPTION)", "--wireguard-port=$(WIREGUARD_PORT)"} {
		if !hasArg(c, a) {
			t.Errorf("agent: no arg %s", a)
		}
	}
	cm := configMap(t, r)
	if cm["ENCRYPTION"] != "wireguard" || cm["NODE_ENCRYPTION"] != "true" || cm["WIREGUARD_PORT"] != "51999" || cm["POD_CIDRS"] != "10.1.0.0/16,fd00:1::/48" {
		t.Errorf("ConfigMap: %v", cm)
	}
	// The userspace engine runs in its own DaemonSet, whose device the
	// agent adopts; replaced only when its pods are deleted.
	if !hasArg(c, "--wireguard-daemon") {
		t.Error("agent: no --wireguard-daemon")
	}
	var wg appsv1.DaemonSet
	r.get(t, "DaemonSet/rel-isthmus-wireguard", &wg)
	wc := container(t, wg.Spec.Template.Spec, "wireguard")
	if wg.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType || !wg.Spec.Template.Spec.HostNetwork ||
		wc.Image != "localhost/isthmus/agent:0.1.0-dev" || !slices.Equal(wc.Command, []string{"/usr/local/bin/isthmus-agent"}) ||
		!hasArg(wc, "wireguard-daemon") || !hasArg(wc, "--cluster-name=c1") || !hasArg(wc, "--node-name=$(NODE_NAME)") {
		t.Errorf("wireguard DaemonSet: strategy %s, hostNetwork %v, container %s %v %v", wg.Spec.UpdateStrategy.Type, wg.Spec.Template.Spec.HostNetwork, wc.Image, wc.Command, wc.Args)
	}
	if _, ok := wg.Spec.Template.Annotations["checksum/config"]; ok {
		t.Error("wireguard DaemonSet: a settings change would restart it")
	}
	// A fixed device name goes to both, and the daemon can be turned off.
	n := render(t, "testdata/wireguard.yaml", "encryption.wireguardDevice=$(NODE_NAME)", "encryption.userspaceDaemon.enabled=false")
	nc := container(t, checkAgent(t, n, "localhost/isthmus/agent:0.1.0-dev").Spec.Template.Spec, "agent")
	if !hasArg(nc, "--wireguard-device=$(NODE_NAME)") || hasArg(nc, "--wireguard-daemon") {
		t.Errorf("agent without the daemon: %v", nc.Args)
	}
	if _, ok := n["DaemonSet/rel-isthmus-wireguard"]; ok {
		t.Error("a wireguard DaemonSet with userspaceDaemon.enabled=false")
	}
	// The default values do not pass the WireGuard flags.
	d := render(t, "")
	if hasArg(container(t, checkAgent(t, d, "localhost/isthmus/agent:0.1.0-dev").Spec.Template.Spec, "agent"), "--wireguard-port=$(WIREGUARD_PORT)") {
		t.Error("WireGuard flags without encryption")
	}
	if _, ok := d["DaemonSet/rel-isthmus-wireguard"]; ok {
		t.Error("a wireguard DaemonSet without encryption")
	}
}

func TestTemplateMeshPeer(t *testing.T) {
	r := render(t, "testdata/mesh-peer.yaml")
	var svc corev1.Service
	r.get(t, "Service/rel-isthmus-clustermesh", &svc)
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || svc.Spec.LoadBalancerIP != "198.51.100.7" {
		t.Errorf("Service %s %q", svc.Spec.Type, svc.Spec.LoadBalancerIP)
	}
	var job batchv1.Job
	r.get(t, "Job/rel-isthmus-mesh-peers", &job)
	c := container(t, job.Spec.Template.Spec, "connect-c1")
	for _, a := range []string{"connect", "--name=c1", "--bundle=/etc/isthmus/peers/c1", "--endpoints=https://192.0.2.7:2379", "--kvstore-bundle=/etc/isthmus/root"} {
		if !hasArg(c, a) {
			t.Errorf("mesh-peers job: no arg %s in %q", a, c.Args)
		}
	}
	secrets := map[string]bool{}
	for _, v := range job.Spec.Template.Spec.Volumes {
		if v.Secret != nil {
			secrets[v.Secret.SecretName] = true
		}
	}
	if !secrets["isthmus-peer-c1"] || !secrets["rel-isthmus-root"] {
		t.Errorf("mesh-peers job secrets %v", secrets)
	}
	var pvc corev1.PersistentVolumeClaim
	r.get(t, "PersistentVolumeClaim/rel-isthmus-clustermesh-data", &pvc)
	if q := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; q.String() != "2Gi" {
		t.Errorf("PVC size %s", q.String())
	}
	var dep appsv1.Deployment
	r.get(t, "Deployment/rel-isthmus-clustermesh", &dep)
	if !hasArg(container(t, dep.Spec.Template.Spec, "clustermesh"), "--advertise-client=https://198.51.100.7:2379") {
		t.Error("clustermesh: advertiseClient not passed")
	}
}

func TestTemplateExternalEtcd(t *testing.T) {
	r := render(t, "testdata/external-etcd.yaml")
	var dep appsv1.Deployment
	r.get(t, "Deployment/rel-isthmus-clustermesh", &dep)
	c := container(t, dep.Spec.Template.Spec, "clustermesh")
	for _, a := range []string{"--etcd-endpoints=https://192.0.2.21:2379,https://192.0.2.22:2379", "--etcd-ca=/etc/isthmus/etcd/ca.crt",
		"--etcd-cert=/etc/isthmus/etcd/client.crt", "--etcd-key=/etc/isthmus/etcd/client.key"} {
		if !hasArg(c, a) {
			t.Errorf("clustermesh: no arg %s in %q", a, c.Args)
		}
	}
	// The server refuses the embedded etcd's flags with an external one.
	for _, a := range c.Args {
		for _, bad := range []string{"--data-dir", "--ca-dir", "--insecure-shared-agent-credential", "--listen-client"} {
			if strings.HasPrefix(a, bad) {
				t.Errorf("clustermesh: %s with an external etcd", a)
			}
		}
	}
	secrets := map[string]bool{}
	for _, v := range dep.Spec.Template.Spec.Volumes {
		if v.Secret != nil {
			secrets[v.Secret.SecretName] = true
		}
	}
	if !secrets["etcd-isthmus-server"] || secrets["etcd-ca"] {
		t.Errorf("clustermesh Secrets %v: want the etcd credential, not the CA", secrets)
	}
	if cm := configMap(t, r); cm["KVSTORE_ENDPOINTS"] != "https://192.0.2.21:2379,https://192.0.2.22:2379" {
		t.Errorf("the agents' endpoints: %q", cm["KVSTORE_ENDPOINTS"])
	}
	if _, ok := r["Service/rel-isthmus-clustermesh"]; ok {
		t.Error("a Service for an etcd the server does not run")
	}
	if _, ok := r["Job/rel-isthmus-pki"]; ok {
		t.Error("a PKI job with an external etcd")
	}
}

func TestTemplateRegistryExistingPKI(t *testing.T) {
	r := render(t, "testdata/registry-existing-pki.yaml")
	ds := checkAgent(t, r, "registry.example.com/isthmus/agent:v9.9.9")
	c := container(t, ds.Spec.Template.Spec, "agent")
	if c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("pull policy %s", c.ImagePullPolicy)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	if env["KUBERNETES_SERVICE_HOST"] != "192.0.2.10" || env["KUBERNETES_SERVICE_PORT"] != "6443" {
		t.Errorf("agent env %v", env)
	}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == "kvstore-bundle" && v.Secret.SecretName != "my-agents" {
			t.Errorf("agent bundle Secret %s", v.Secret.SecretName)
		}
	}
	var svc corev1.Service
	r.get(t, "Service/rel-isthmus-clustermesh", &svc)
	if svc.Spec.Type != corev1.ServiceTypeNodePort || svc.Spec.Ports[0].NodePort != 32379 {
		t.Errorf("Service %s %+v", svc.Spec.Type, svc.Spec.Ports)
	}
	if _, ok := r["Job/rel-isthmus-pki"]; ok {
		t.Error("a PKI job with an existing PKI")
	}
	var dep appsv1.Deployment
	r.get(t, "Deployment/rel-isthmus-clustermesh", &dep)
	if img := container(t, dep.Spec.Template.Spec, "clustermesh").Image; img != "registry.example.com/isthmus/clustermesh:v9.9.9" {
		t.Errorf("clustermesh image %s", img)
	}
	if configMap(t, r)["KVSTORE_ENDPOINTS"] != "https://192.0.2.10:32379" {
		t.Errorf("KVSTORE_ENDPOINTS %q", configMap(t, r)["KVSTORE_ENDPOINTS"])
	}
}

// Values that cannot work are refused at template time, naming the value.
func TestTemplateRefusesBadValues(t *testing.T) {
	for set, want := range map[string]string{
		"cluster.id=0":                                                 "cluster.id",
		"cluster.name=Not_A_Label":                                     "cluster.name",
		"encryption.type=ipsec":                                        "encryption.type",
		"encryption.userspaceDaemon.updateStrategy=Always":             "encryption.userspaceDaemon.updateStrategy",
		"clustermesh.externalEtcd.endpoints={https://192.0.2.21:2379}": "clustermesh.externalEtcd.secretName",
		"clustermesh.externalEtcd.endpoints={https://192.0.2.21:2379},clustermesh.externalEtcd.secretName=s": "needs pki.existingCASecret and pki.existingAgentsSecret",
		"clustermesh.service.type=ExternalName": "clustermesh.service.type",
		"pki.existingCASecret=x":                "go together",
		"agent.kubernetesPolicyPeers=all":       "agent.kubernetesPolicyPeers",
	} {
		out, err := helm(t, "template", "rel", chart, "--set", set)
		if err == nil || !strings.Contains(out, want) {
			t.Errorf("--set %s: %v, want an error naming %s\n%s", set, err, want, out)
		}
	}
}

// The chart's crds/ are k8s/crds' manifests (make crds writes those).
func TestCRDsMatchK8s(t *testing.T) {
	src, err := filepath.Glob("../../k8s/crds/*.yaml")
	if err != nil || len(src) == 0 {
		t.Fatalf("k8s/crds: %v %v", src, err)
	}
	inChart, _ := filepath.Glob(filepath.Join(chart, "crds", "*.yaml"))
	var want, got []string
	for _, p := range src {
		want = append(want, filepath.Base(p))
	}
	for _, p := range inChart {
		got = append(got, filepath.Base(p))
	}
	if !slices.Equal(want, got) {
		t.Fatalf("crds in the chart %v, in k8s/crds %v: cp k8s/crds/*.yaml deploy/helm/isthmus/crds/", got, want)
	}
	for _, p := range src {
		a, _ := os.ReadFile(p)
		b, _ := os.ReadFile(filepath.Join(chart, "crds", filepath.Base(p)))
		if !bytes.Equal(a, b) {
			t.Errorf("deploy/helm/isthmus/crds/%s differs from k8s/crds: cp k8s/crds/*.yaml deploy/helm/isthmus/crds/", filepath.Base(p))
		}
	}
}
