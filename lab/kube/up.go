package kube

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/internal/ociimage"
	"github.com/isthmus-mesh/isthmus/k8s/apis/v1alpha1"
	"github.com/isthmus-mesh/isthmus/lab"
)

// `isthmus lab up --kubernetes` (Up): the demo mesh of lab.Up, with real
// Kubernetes clusters underneath and Isthmus installed into each by its
// own Helm chart, from images packaged from the binaries next to the CLI.

// HelmVersion is the Helm the lab installs the chart with (`make helm`
// builds bin/helm-<HelmVersion>).
const HelmVersion = "v4.3.2"

// HelmNamespace is the namespace of the lab's Isthmus releases.
const HelmNamespace = "kube-system"

// ReleaseName is the Helm release of Isthmus in every lab cluster.
const ReleaseName = "isthmus"

// ImageTag is the tag of the chart's images in the lab (imported into each
// node's containerd, never pulled).
const ImageTag = "lab"

// ServiceVIPs are the ClusterIPs the lab requests for the echo Service in
// every cluster (inside the default ServiceCIDRs), so that a pod dials the
// same addresses in each cluster, as in the standalone lab.
var ServiceVIPs = []netip.Addr{netip.MustParseAddr("10.96.0.100"), netip.MustParseAddr("fd00:10:96::100")}

// UpOptions size the Kubernetes lab.
type UpOptions struct {
	Clusters    int    // default 2
	Nodes       int    // per cluster, default 2
	PodsPerNode int    // echo pods per node, default 2
	Encryption  string // "wireguard" or "none" (default)
	// Chart is the Helm chart's directory (default: FindChart).
	Chart string
	// Detached, StateFile, Timeout, Binaries and Progress are as in
	// lab.UpOptions.
	Detached  bool
	StateFile string
	Timeout   time.Duration
	Binaries  func() (lab.Binaries, error)
	Progress  func(format string, args ...any)
}

// Lab is a running Kubernetes lab: the lab, the Kubernetes side of each
// cluster, and what a Helm command needs.
type Lab struct {
	*lab.Lab
	Clusters []*lab.Cluster
	Kube     []*Cluster
	Helm     string
	Chart    string
	// Values are the values file of each cluster's release.
	Values []string
}

// Up builds the lab: a fabric router and o.Clusters Kubernetes clusters of
// o.Nodes nodes in network namespaces; Isthmus installed into each by its
// Helm chart; the clusters connected (`isthmus clustermesh connect
// --kubeconfig`, run in the fabric namespace, which reaches every API
// server); echo pods on every node, one denied pod per cluster, the global
// echo Service and a Kubernetes NetworkPolicy in each cluster. It returns
// once every agent sees the whole mesh. On failure it removes what it
// built.
func Up(ctx context.Context, o UpOptions) (kl *Lab, st *lab.State, err error) {
	if o.Clusters == 0 {
		o.Clusters = 2
	}
	if o.Nodes == 0 {
		o.Nodes = 2
	}
	if o.PodsPerNode == 0 {
		o.PodsPerNode = 2
	}
	if o.Encryption == "" {
		o.Encryption = "none"
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Minute
	}
	switch {
	case o.Clusters < 1 || o.Clusters > 4:
		return nil, nil, fmt.Errorf("lab: %d Kubernetes clusters: want 1..4", o.Clusters)
	case o.Nodes < 1 || o.Nodes > 4:
		return nil, nil, fmt.Errorf("lab: %d Kubernetes nodes per cluster: want 1..4", o.Nodes)
	case o.PodsPerNode < 1 || o.PodsPerNode > 10:
		return nil, nil, fmt.Errorf("lab: %d pods per node: want 1..10", o.PodsPerNode)
	case o.Encryption != "none" && o.Encryption != "wireguard":
		return nil, nil, fmt.Errorf("lab: encryption %q: want wireguard or none", o.Encryption)
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string, ...any) {}
	}
	step := lab.Stepper(progress)

	// Everything is found before anything is built.
	findBinaries := o.Binaries
	if findBinaries == nil {
		findBinaries = lab.FindBinaries
	}
	bins, err := findBinaries()
	if err != nil {
		return nil, nil, err
	}
	if err := checkStatic(bins); err != nil {
		return nil, nil, err
	}
	kbins, err := FindBinaries()
	if err != nil {
		return nil, nil, err
	}
	helm, err := FindHelm()
	if err != nil {
		return nil, nil, err
	}
	chart := o.Chart
	if chart == "" {
		if chart, err = FindChart(); err != nil {
			return nil, nil, err
		}
	} else if _, err := os.Stat(filepath.Join(chart, "Chart.yaml")); err != nil {
		return nil, nil, fmt.Errorf("lab: --chart %s: no Chart.yaml: %w", chart, err)
	}
	step("binaries (%s): %s and %s", bins.From, strings.Join(append(bins.Paths(), bins.CNI), ", "), helm)
	step("Kubernetes %s (%s), chart %s", Version, kbins.From, chart)
	if err := lab.EnsureBPFFS(); err != nil {
		return nil, nil, err
	}

	l, err := lab.New(lab.Options{Detached: o.Detached, Logf: progress, Binaries: func() (lab.Binaries, error) { return bins, nil }})
	if err != nil {
		return nil, nil, err
	}
	kl = &Lab{Lab: l, Helm: helm, Chart: chart}
	st = &lab.State{Prefix: l.Prefix(), Dir: l.Dir(), Created: time.Now().UTC(), Encryption: o.Encryption, Binaries: bins,
		Kubernetes: &lab.StateKubernetes{Version: Version, Kubectl: kbins.Kubectl, Helm: helm, Chart: chart, Namespace: HelmNamespace, Release: ReleaseName}}
	defer func() {
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
			if o.StateFile != "" {
				_ = os.Remove(o.StateFile)
			}
		}
	}()
	if o.StateFile != "" {
		if err = lab.WriteState(o.StateFile, st); err != nil {
			return kl, nil, err
		}
	}

	step("images: agent and clustermesh (the chart's), pause and tools, from the static binaries")
	images, err := writeLabImages(l.Dir(), bins)
	if err != nil {
		return kl, nil, err
	}

	step("lab %s: fabric router", l.Prefix())
	fabric, err := l.Fabric()
	if err != nil {
		return kl, nil, err
	}
	m := NewMesh(MeshOptions{Images: images[0], ExtraImages: images[1:], Binaries: &kbins, InstallWithHelm: true})
	kl.Clusters = make([]*lab.Cluster, o.Clusters)
	kl.Kube = make([]*Cluster, o.Clusters)
	kl.Values = make([]string, o.Clusters)
	err = lab.Parallel(o.Clusters, func(i int) error {
		t0 := time.Now()
		co := lab.ClusterOptions{Nodes: o.Nodes}
		m.Enable(&co)
		c, err := l.AddCluster(ctx, i+1, co)
		if err != nil {
			return fmt.Errorf("cluster c%d: %w", i+1, err)
		}
		kl.Clusters[i], kl.Kube[i] = c, m.Cluster(c.Name)
		step("cluster %s: control plane in %s, %d nodes with containerd and kubelet (%.1fs)", c.Name, c.Router.Name(), len(c.Nodes), time.Since(t0).Seconds())
		t0 = time.Now()
		if kl.Values[i], err = writeValues(l, c, kl.Kube[i], o.Encryption); err != nil {
			return err
		}
		if err := kl.HelmInstall(ctx, i, "install"); err != nil {
			return err
		}
		if err := kl.WaitRollout(ctx, i, o.Timeout); err != nil {
			return err
		}
		if err := kl.Kube[i].WaitNodesReady(ctx); err != nil {
			return err
		}
		step("cluster %s: helm install %s: agents and server ready, nodes Ready (%.1fs)", c.Name, ReleaseName, time.Since(t0).Seconds())
		return nil
	})
	if err != nil {
		return kl, nil, err
	}
	for i := range kl.Clusters {
		for j := i + 1; j < len(kl.Clusters); j++ {
			a, b := kl.Kube[i], kl.Kube[j]
			step("connecting %s <-> %s: isthmus clustermesh connect --kubeconfig %s --remote-kubeconfig %s", a.Name, b.Name, a.AdminKubeconfig, b.AdminKubeconfig)
			out, err := fabric.Exec(ctx, bins.CLI, "clustermesh", "connect", "--kubeconfig", a.AdminKubeconfig, "--remote-kubeconfig", b.AdminKubeconfig,
				"--namespace", HelmNamespace, "--wait", "2m")
			if err != nil {
				return kl, nil, fmt.Errorf("lab: connect %s and %s: %w\n%s", a.Name, b.Name, err, out)
			}
		}
	}

	st.Service = lab.StateService{Name: "echo", Namespace: "default", VIPs: ServiceVIPs, Port: 80, TargetPort: connectivity.EchoPort}
	st.Policy = "default/echo-from-echo (networking.k8s.io/v1) and default/echo-from-mesh (isthmus.io/v1alpha1)"
	for i, c := range kl.Clusters {
		k := kl.Kube[i]
		sc := lab.StateCluster{Name: c.Name, ID: c.ID, Server: serverURL(c), Router: c.Router.FullName(), PodCIDRs: c.PodCIDRs(),
			Kubeconfig: k.AdminKubeconfig, APIServer: k.Server}
		for j, n := range c.Nodes {
			sn := lab.StateNode{Name: n.Name(), NodeName: n.NodeName(), Netns: n.FullName(),
				Socket: filepath.Join(runDir(l), n.NodeName()+".sock"),
				PinDir: filepath.Join("/sys/fs/bpf/isthmus", n.NodeName()), IPs: c.NodeIPs(j + 1)}
			if o.Encryption == "wireguard" {
				sn.WireGuardDevice = wireguardDevice(n)
			}
			sc.Nodes = append(sc.Nodes, sn)
		}
		st.Clusters = append(st.Clusters, sc)
	}

	step("workload in every cluster: %d echo pods per node, one denied pod, Service default/echo (global, ClusterIPs %s and %s), NetworkPolicies default/echo-from-echo and default/echo-from-mesh",
		o.PodsPerNode, ServiceVIPs[0], ServiceVIPs[1])
	pods := make([][]lab.StatePod, len(kl.Clusters))
	err = lab.Parallel(len(kl.Clusters), func(i int) error {
		var err error
		pods[i], err = deployWorkload(ctx, kl.Clusters[i], kl.Kube[i], st.Clusters[i], o.PodsPerNode)
		return err
	})
	if err != nil {
		return kl, nil, err
	}
	for _, ps := range pods {
		st.Pods = append(st.Pods, ps...)
	}
	if o.StateFile != "" {
		if err = lab.WriteState(o.StateFile, st); err != nil {
			return kl, nil, err
		}
	}
	step("waiting until every agent sees the whole mesh")
	if err = st.WaitReady(ctx, o.Timeout); err != nil {
		return kl, nil, err
	}
	st.Ready = true
	if o.StateFile != "" {
		if err = lab.WriteState(o.StateFile, st); err != nil {
			return kl, nil, err
		}
	}
	step("ready")
	return kl, st, nil
}

// HelmInstall runs `helm <verb> isthmus <chart> -f <values> [extra]` for
// cluster i ("install" or "upgrade"), in its control plane's namespace,
// where the admin kubeconfig's server is reachable.
func (kl *Lab) HelmInstall(ctx context.Context, i int, verb string, extra ...string) error {
	k := kl.Kube[i]
	home := filepath.Join(kl.Dir(), "helm-home")
	args := append([]string{kl.Helm, verb, ReleaseName, kl.Chart, "--kubeconfig", k.AdminKubeconfig, "-n", HelmNamespace,
		"-f", kl.Values[i], "--timeout", "5m"}, extra...)
	cmd := k.ControlPlane.Command(ctx, args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home+"/cache", "HELM_CONFIG_HOME="+home+"/config", "HELM_DATA_HOME="+home+"/data")
	if out, err := lab.CombinedOutput(cmd); err != nil {
		return fmt.Errorf("lab: cluster %s: helm %s: %v\n%s%s", k.Name, verb, err, out, kl.Diagnose(i))
	}
	return nil
}

// WaitRollout waits until cluster i's agent DaemonSet has an updated,
// available pod on every node and its server Deployment is ready.
func (kl *Lab) WaitRollout(ctx context.Context, i int, timeout time.Duration) error {
	k, nodes := kl.Kube[i], int32(len(kl.Clusters[i].Nodes))
	ds, dep := ReleaseName+"-agent", ReleaseName+"-clustermesh"
	var last error
	err := poll(ctx, timeout, func() (bool, error) {
		d, err := k.Client.AppsV1().DaemonSets(HelmNamespace).Get(ctx, ds, metav1.GetOptions{})
		if err != nil {
			last = err
			return false, nil
		}
		s := d.Status
		if s.ObservedGeneration < d.Generation || s.DesiredNumberScheduled != nodes || s.UpdatedNumberScheduled != nodes || s.NumberReady != nodes || s.NumberAvailable != nodes {
			last = fmt.Errorf("daemonset %s: %d desired, %d updated, %d ready, %d available", ds, s.DesiredNumberScheduled, s.UpdatedNumberScheduled, s.NumberReady, s.NumberAvailable)
			return false, nil
		}
		dp, err := k.Client.AppsV1().Deployments(HelmNamespace).Get(ctx, dep, metav1.GetOptions{})
		if err != nil {
			last = err
			return false, nil
		}
		if dp.Status.ObservedGeneration < dp.Generation || dp.Status.ReadyReplicas != 1 || dp.Status.UpdatedReplicas != 1 {
			last = fmt.Errorf("deployment %s: %d ready, %d updated", dep, dp.Status.ReadyReplicas, dp.Status.UpdatedReplicas)
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("lab: cluster %s: Isthmus not rolled out within %v: %v (last: %v)%s", k.Name, timeout, err, last, kl.Diagnose(i))
	}
	return nil
}

// Diagnose returns the pods of cluster i and the tails of the release's
// logs, for an error message.
func (kl *Lab) Diagnose(i int) string {
	k := kl.Kube[i]
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var b strings.Builder
	if out, err := k.Kubectl(ctx, "get", "pods", "-A", "-o", "wide"); err == nil {
		fmt.Fprintf(&b, "\npods of %s:\n%s", k.Name, out)
	}
	pods, err := k.Client.CoreV1().Pods(HelmNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=isthmus"})
	if err != nil {
		return b.String()
	}
	for _, p := range pods.Items {
		for _, c := range p.Spec.Containers {
			out, _ := k.Kubectl(ctx, "logs", "-n", HelmNamespace, p.Name, "-c", c.Name, "--tail=15")
			fmt.Fprintf(&b, "logs of %s/%s:\n%s", p.Name, c.Name, out)
		}
	}
	return b.String()
}

// checkStatic refuses dynamically linked binaries: the images hold the
// binary alone, without a C library.
func checkStatic(b lab.Binaries) error {
	if b.CNI == "" {
		return fmt.Errorf("lab: no %s next to %s: run 'make lab' (or CGO_ENABLED=0 go build -o bin/ ./cmd/...)", lab.CNIBinary, b.CLI)
	}
	for _, p := range []string{b.Agent, b.Server, b.CLI, b.CNI} {
		f, err := elf.Open(p)
		if err != nil {
			return fmt.Errorf("lab: %s: %w", p, err)
		}
		dynamic := false
		for _, prog := range f.Progs {
			dynamic = dynamic || prog.Type == elf.PT_INTERP
		}
		f.Close()
		if dynamic {
			return fmt.Errorf("lab: %s is dynamically linked, and the Kubernetes lab packages the binaries into images without a C library: build them static (CGO_ENABLED=0; 'make lab LAB_ARGS=--kubernetes' does)", p)
		}
	}
	return nil
}

// writeLabImages packages the binaries: the pause and tools images (first)
// and the chart's agent and clustermesh images tagged ImageTag.
func writeLabImages(dir string, b lab.Binaries) ([]string, error) {
	binDir := filepath.Join(dir, "image-bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return nil, err
	}
	for name, p := range map[string]string{"isthmus-agent": b.Agent, "isthmus-clustermesh": b.Server, "isthmus": b.CLI, "isthmus-cni": b.CNI} {
		if err := os.Symlink(p, filepath.Join(binDir, name)); err != nil {
			return nil, err
		}
	}
	tools := filepath.Join(dir, "images.tar")
	if err := WriteImages(b.CLI, tools); err != nil {
		return nil, err
	}
	chart, err := ociimage.WriteIsthmus(ociimage.Build{BinDir: binDir, Tag: ImageTag}, dir)
	if err != nil {
		return nil, err
	}
	return append([]string{tools}, chart...), nil
}

// runDir is the agents' runDir value: their sockets are
// <runDir>/<node name>.sock on the host.
func runDir(l *lab.Lab) string { return filepath.Join(l.Dir(), "helm-run") }

// wireguardDevice is the device name the lab gives node n's agent
// (encryption.wireguardDevice=$(NODE_NAME)): the node name, which carries
// the lab prefix, so lab cleanup finds its UAPI socket.
func wireguardDevice(n *lab.Node) string { return n.NodeName() }

func serverURL(c *lab.Cluster) string {
	return "https://" + net.JoinHostPort(c.NodeIPs(1)[0].String(), "2379")
}

// writeValues writes cluster c's values file: the API server directly (no
// kube-proxy before the agents serve the kubernetes Service), the server on
// node 1's host network, advertised at that node's address (which other
// clusters reach across the fabric), per-node CNI and state paths (the
// lab's nodes share one filesystem), and the encryption.
func writeValues(l *lab.Lab, c *lab.Cluster, k *Cluster, encryption string) (string, error) {
	bin, conf := HelmCNIDirs(l)
	var cidrs []string
	for _, p := range c.PodCIDRs() {
		cidrs = append(cidrs, p.String())
	}
	nodeIP := c.NodeIPs(1)[0].String()
	values := map[string]any{
		"cluster":    map[string]any{"name": c.Name, "id": c.ID, "podCIDRs": cidrs},
		"image":      map[string]any{"tag": ImageTag, "pullPolicy": "Never"},
		"k8sService": map[string]any{"host": k.AdvertiseAddr.String(), "port": strconv.Itoa(APIServerPort)},
		// Device names are per host: the node name carries the lab prefix,
		// so lab cleanup finds the UAPI sockets.
		"encryption": map[string]any{"type": encryption, "wireguardDevice": "$(NODE_NAME)"},
		"agent": map[string]any{
			"kvstoreEndpoints": []string{serverURL(c)},
			"cni":              map[string]any{"binDir": bin, "confDir": conf, "nodeSubPath": true},
			"runDir":           runDir(l),
			"stateDir":         filepath.Join(l.Dir(), "helm-state"),
			// The host's /sys/fs/bpf is a private mount.
			"bpffsMountPropagation": "None",
		},
		"clustermesh": map[string]any{
			"nodeSelector":    map[string]string{"kubernetes.io/hostname": c.Nodes[0].NodeName()},
			"advertiseClient": []string{serverURL(c)},
			// The agents' etcd client verifies the address it dials.
			"tlsSANs": []string{nodeIP},
		},
	}
	b, err := yaml.Marshal(values)
	if err != nil {
		return "", err
	}
	p := filepath.Join(l.Dir(), "helm-values-"+c.Name+".yaml")
	return p, os.WriteFile(p, b, 0o644)
}

// deployWorkload creates the echo pods (named <node>-echo<i>, one set per
// node), the denied pod on node 1, the global Service and the policy in
// cluster c, waits until the pods are Ready and returns them as the lab
// state records them.
func deployWorkload(ctx context.Context, c *lab.Cluster, k *Cluster, sc lab.StateCluster, perNode int) ([]lab.StatePod, error) {
	type spec struct {
		name, role string
		node       lab.StateNode
		labels     map[string]string
	}
	var specs []spec
	for j, n := range sc.Nodes {
		for i := 1; i <= perNode; i++ {
			specs = append(specs, spec{fmt.Sprintf("%s-echo%d", n.Name, i), connectivity.RoleEcho, n, map[string]string{"app": "echo"}})
		}
		if j == 0 {
			specs = append(specs, spec{c.Name + "-denied", connectivity.RoleDenied, n, map[string]string{"app": "denied"}})
		}
	}
	cs := k.Client
	for _, s := range specs {
		if _, err := cs.CoreV1().Pods("default").Create(ctx, echoPod(s.name, s.node.NodeName, c.Name, s.labels), metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("lab: cluster %s: pod %s: %w", c.Name, s.name, err)
		}
	}
	policy := intstr.FromInt32(connectivity.EchoPort)
	tcp := corev1.ProtocolTCP
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "echo-from-echo", Namespace: "default"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "echo"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "echo"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &policy}},
			}},
		},
	}
	if _, err := cs.NetworkingV1().NetworkPolicies("default").Create(ctx, np, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("lab: cluster %s: NetworkPolicy: %w", c.Name, err)
	}
	// A Kubernetes NetworkPolicy admits its own cluster's pods (the
	// agents' default, --kubernetes-policy-peers=cluster): the echo pods
	// of the other clusters are admitted by an isthmus.io NetworkPolicy,
	// whose selectors span the mesh unless they name a cluster.
	dyn, err := dynamic.NewForConfig(k.Config)
	if err != nil {
		return nil, fmt.Errorf("lab: cluster %s: %w", c.Name, err)
	}
	mesh := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.GroupVersion.String(), "kind": "NetworkPolicy",
		"metadata": map[string]any{"name": "echo-from-mesh", "namespace": "default"},
		"spec": map[string]any{
			"endpointSelector": map[string]any{"matchLabels": map[string]any{"app": "echo"}},
			"ingress": []any{map[string]any{
				"fromEndpoints": []any{map[string]any{"matchLabels": map[string]any{"app": "echo"}}},
				"toPorts":       []any{map[string]any{"port": int64(connectivity.EchoPort), "protocol": "TCP"}},
			}},
		},
	}}
	if _, err := dyn.Resource(v1alpha1.NetworkPolicyResource).Namespace("default").Create(ctx, mesh, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("lab: cluster %s: isthmus.io NetworkPolicy: %w", c.Name, err)
	}
	dual := corev1.IPFamilyPolicyRequireDualStack
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "default", Annotations: map[string]string{"isthmus.io/global": "true"}},
		Spec: corev1.ServiceSpec{
			Selector:       map[string]string{"app": "echo"},
			ClusterIP:      ServiceVIPs[0].String(),
			ClusterIPs:     []string{ServiceVIPs[0].String(), ServiceVIPs[1].String()},
			IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			IPFamilyPolicy: &dual,
			Ports:          []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(connectivity.EchoPort), Protocol: corev1.ProtocolTCP}},
		},
	}
	if _, err := cs.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("lab: cluster %s: Service echo: %w", c.Name, err)
	}

	var out []lab.StatePod
	for _, s := range specs {
		var p *corev1.Pod
		err := poll(ctx, 3*time.Minute, func() (bool, error) {
			got, err := cs.CoreV1().Pods("default").Get(ctx, s.name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			p = got
			return podIsReady(got) && len(got.Status.PodIPs) == 2, nil
		})
		if err != nil {
			return nil, fmt.Errorf("lab: cluster %s: pod %s not Ready with two addresses: %v (phase %s)", c.Name, s.name, err, phaseOf(p))
		}
		netns, err := podNetns(ctx, s.node.Socket, s.name)
		if err != nil {
			return nil, fmt.Errorf("lab: cluster %s: %w", c.Name, err)
		}
		sp := lab.StatePod{Name: s.name, Namespace: "default", Cluster: c.Name, Node: s.node.Name, Netns: netns, Labels: s.labels, Role: s.role}
		for _, ip := range p.Status.PodIPs {
			a, err := netip.ParseAddr(ip.IP)
			if err != nil {
				return nil, fmt.Errorf("lab: pod %s: address %q: %w", s.name, ip.IP, err)
			}
			if a.Is4() {
				sp.IPv4 = a
			} else {
				sp.IPv6 = a
			}
		}
		out = append(out, sp)
	}
	return out, nil
}

// echoPod runs the echo server on node, Ready once it listens.
func echoPod(name, node, cluster string, labels map[string]string) *corev1.Pod {
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name: "echo", Image: ToolsImage, ImagePullPolicy: corev1.PullNever,
				Args: []string{"lab", "echo-server", "--pod", name, "--node", node, "--cluster", cluster, "--listen", fmt.Sprintf(":%d", connectivity.EchoPort)},
				ReadinessProbe: &corev1.Probe{PeriodSeconds: 1,
					ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(connectivity.EchoPort)}}},
			}},
		},
	}
}

func podIsReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func phaseOf(p *corev1.Pod) string {
	if p == nil {
		return "not created"
	}
	return string(p.Status.Phase)
}

// podNetns asks the node's agent for the pod's network namespace (the
// runtime's /var/run/netns/cni-..., which the CNI ADD gave the agent) and
// returns its name.
func podNetns(ctx context.Context, socket, pod string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	eps, err := api.NewClient(socket).ListEndpoints(cctx)
	if err != nil {
		return "", fmt.Errorf("pod %s: agent %s: %w", pod, socket, err)
	}
	for _, ep := range eps {
		if ep.Namespace == "default" && ep.Name == pod {
			if filepath.Dir(ep.Netns) != lab.NetnsDir && filepath.Dir(ep.Netns) != "/run/netns" {
				return "", fmt.Errorf("pod %s: network namespace %s is not under %s", pod, ep.Netns, lab.NetnsDir)
			}
			return filepath.Base(ep.Netns), nil
		}
	}
	return "", fmt.Errorf("pod %s has no endpoint on the agent behind %s", pod, socket)
}

// FindHelm finds Helm, never building it: helm-<HelmVersion> next to the
// running executable, in bin/ of the source tree above the working
// directory, then helm in $PATH.
func FindHelm() (string, error) {
	name := "helm-" + HelmVersion
	var tried []string
	if exe := executable(); exe != "" {
		p := filepath.Join(filepath.Dir(exe), name)
		if isExecutable(p) {
			return p, nil
		}
		tried = append(tried, p)
	}
	if root := sourceTree(); root != "" {
		p := filepath.Join(root, "bin", name)
		if isExecutable(p) {
			return p, nil
		}
		tried = append(tried, p)
	}
	if p, err := exec.LookPath("helm"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("lab: Helm not found (looked for %s and helm in $PATH): run 'make helm' (it builds Helm %s into bin/)", strings.Join(tried, ", "), HelmVersion)
}

// FindChart finds deploy/helm/isthmus: next to the running executable's
// directory (bin/../deploy/helm/isthmus) or in the source tree above the
// working directory.
func FindChart() (string, error) {
	var tried []string
	if exe := executable(); exe != "" {
		d := filepath.Join(filepath.Dir(filepath.Dir(exe)), "deploy", "helm", "isthmus")
		if _, err := os.Stat(filepath.Join(d, "Chart.yaml")); err == nil {
			return d, nil
		}
		tried = append(tried, d)
	}
	if root := sourceTree(); root != "" {
		d := filepath.Join(root, "deploy", "helm", "isthmus")
		if _, err := os.Stat(filepath.Join(d, "Chart.yaml")); err == nil {
			return d, nil
		}
		tried = append(tried, d)
	}
	return "", fmt.Errorf("lab: the Helm chart was not found (looked in %s): pass --chart DIR (deploy/helm/isthmus of the source tree)", strings.Join(tried, ", "))
}

// executable is the running binary's path with symlinks resolved, or "".
func executable() string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	if r, err := filepath.EvalSymlinks(exe); err == nil {
		exe = r
	}
	return exe
}

// sourceTree is the first directory at or above the working directory
// with a go.mod, or "".
func sourceTree() string {
	wd, err := os.Getwd()
	if err != nil {
		return ""
	}
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return ""
		}
	}
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}
