package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/lab"
)

// NodeOptions describe a Kubernetes node.
type NodeOptions struct {
	// Name is the Kubernetes node name, used as is (the caller makes it
	// unique, e.g. the lab node's FullName).
	Name string
	// IP is the node's address (--node-ip) in its namespace; the
	// apiserver reaches the kubelet there.
	IP netip.Addr
	// CNIBinDirs are where containerd finds CNI plugins; default
	// /usr/lib/cni. containerd 1.6 takes one dir: with several, the node
	// gets <node dir>/kube/cni-bin with a symlink to every plugin (the first
	// dir that has a name wins).
	CNIBinDirs []string
	// CNIConfDir defaults to <node dir>/kube/cni/net.d. The node is not
	// Ready until a network config is there (see WritePTPConfig).
	CNIConfDir string
	// Images are tarballs to import into the node's containerd (namespace
	// k8s.io), e.g. the one WriteImages writes.
	Images []string
	// SandboxImage is containerd's sandbox_image; default PauseImage.
	SandboxImage string
	// KubeletArgs are extra kubelet flags.
	KubeletArgs []string
}

// Node is a Kubernetes node running in a lab node's namespace: its own
// containerd (root, state, socket, runc root) and kubelet (root, certs,
// logs, cgroup root), all below Dir.
type Node struct {
	Name    string
	IP      netip.Addr
	LabNode *lab.Node
	Dir     string // <lab node dir>/kube

	Containerd, Kubelet *lab.Proc
	ContainerdSocket    string
	CNIConfDir          string
	CNIBinDir           string
	// IPAMDir is a per-node data dir for host-local IPAM.
	IPAMDir string
	// Kubeconfig is the kubelet's (system:node:<Name>).
	Kubeconfig string
	// CgroupRoot is the kubelet's cgroupRoot, /<lab node full name>,
	// created in every cgroup hierarchy.
	CgroupRoot string

	cluster     *Cluster
	kubeletArgs []string
	cpCtx       context.Context
}

// StopKubelet stops the node's kubelet (its pods keep running, as on a
// real node); StartKubelet starts it again with the same flags.
func (n *Node) StopKubelet() error { return n.Kubelet.Stop() }

// StartKubelet starts the kubelet again after StopKubelet.
func (n *Node) StartKubelet() error {
	p, err := n.LabNode.Start(n.cpCtx, n.kubeletArgs...)
	if err != nil {
		return err
	}
	n.Kubelet = p
	return nil
}

// AddNode starts containerd and a kubelet in n's namespace, joined to the
// cluster, and returns when the Node object exists. The node's pod CIDRs
// come from the controller manager (PodCIDRs); it becomes Ready once a CNI
// config is in CNIConfDir. Its processes, pods, mounts and cgroups are
// removed when the lab closes.
func (c *Cluster) AddNode(ctx context.Context, n *lab.Node, o NodeOptions) (*Node, error) {
	if o.Name == "" {
		o.Name = n.FullName()
	}
	if !o.IP.IsValid() {
		return nil, errors.New("kube: NodeOptions.IP is required")
	}
	if o.SandboxImage == "" {
		o.SandboxImage = PauseImage
	}
	if len(o.CNIBinDirs) == 0 {
		o.CNIBinDirs = []string{"/usr/lib/cni"}
	}
	c.mu.Lock()
	if _, dup := c.nodes[o.Name]; dup {
		c.mu.Unlock()
		return nil, fmt.Errorf("kube: node %s already in cluster %s", o.Name, c.Name)
	}
	d := filepath.Join(n.Dir(), "kube")
	node := &Node{
		Name: o.Name, IP: o.IP, LabNode: n, Dir: d, cluster: c,
		ContainerdSocket: filepath.Join(d, "containerd.sock"),
		CNIConfDir:       o.CNIConfDir,
		IPAMDir:          filepath.Join(d, "cni-ipam"),
		CgroupRoot:       "/" + n.FullName(),
	}
	c.nodes[o.Name] = node
	c.mu.Unlock()
	if node.CNIConfDir == "" {
		node.CNIConfDir = filepath.Join(d, "cni", "net.d")
	}
	for _, sub := range []string{"containerd-root", "containerd-state", "runc", "kubelet/pki", "pod-logs", "volume-plugins", "cni-ipam"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(node.CNIConfDir, 0o755); err != nil {
		return nil, err
	}
	var err error
	if node.CNIBinDir, err = mergeBinDirs(filepath.Join(d, "cni-bin"), o.CNIBinDirs); err != nil {
		return nil, err
	}
	// Teardown: before the lab kills its processes, stop the kubelet and
	// containerd, kill the pods in the node's cgroups, remove the sandbox
	// namespaces, the mounts below Dir and the cgroups. (Shims are found by
	// the lab's cleanup by their command line.)
	if err := c.lab.OnClose(node.teardown); err != nil {
		return nil, err
	}
	if err := node.makeCgroups(); err != nil {
		return nil, err
	}

	// containerd.
	cfgPath := filepath.Join(d, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(node.containerdConfig(o.SandboxImage)), 0o644); err != nil {
		return nil, err
	}
	cp := context.WithoutCancel(ctx)
	if node.Containerd, err = n.Start(cp, "containerd", "--config", cfgPath); err != nil {
		return nil, err
	}
	if err := node.waitContainerd(ctx); err != nil {
		return nil, err
	}
	for _, img := range o.Images {
		if out, err := exec.CommandContext(ctx, "ctr", "-a", node.ContainerdSocket, "-n", "k8s.io", "images", "import", img).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("kube: import %s into %s: %w: %s", img, o.Name, err, strings.TrimSpace(string(out)))
		}
	}

	// kubelet.
	if node.Kubeconfig, err = c.KubeconfigFor("system:node:"+o.Name, "system:nodes"); err != nil {
		return nil, err
	}
	dns := []string{o.Name}
	if h := n.FullName(); h != o.Name {
		dns = append(dns, h)
	}
	srvCrt, srvKey, err := c.ca.issueFiles(filepath.Join(d, "kubelet", "pki"), "kubelet", certSpec{
		cn: "system:node:" + o.Name, orgs: []string{"system:nodes"}, dns: dns, ips: []net.IP{net.IP(o.IP.AsSlice())}, server: true,
	})
	if err != nil {
		return nil, err
	}
	kcfg := filepath.Join(d, "kubelet-config.yaml")
	if err := os.WriteFile(kcfg, []byte(node.kubeletConfig(srvCrt, srvKey)), 0o644); err != nil {
		return nil, err
	}
	args := []string{c.Binaries.Kubelet,
		"--config=" + kcfg,
		"--kubeconfig=" + node.Kubeconfig,
		"--hostname-override=" + o.Name,
		"--node-ip=" + o.IP.String(),
		"--root-dir=" + filepath.Join(d, "kubelet"),
		"--cert-dir=" + filepath.Join(d, "kubelet", "pki"),
		"--v=1",
	}
	args = append(args, o.KubeletArgs...)
	node.kubeletArgs, node.cpCtx = args, cp
	if node.Kubelet, err = n.Start(cp, args...); err != nil {
		return nil, err
	}
	// The Node object.
	err = poll(ctx, 60*time.Second, func() (bool, error) {
		if node.Kubelet.Exited() {
			return false, fmt.Errorf("kubelet exited: %v\n%s", node.Kubelet.Wait(), lab.Tail(node.Kubelet.Log(), 4000))
		}
		_, err := c.Client.CoreV1().Nodes().Get(ctx, o.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, nil
	})
	if err != nil {
		return nil, fmt.Errorf("kube: node %s did not register: %w", o.Name, err)
	}
	return node, nil
}

// Nodes returns the cluster's nodes by name.
func (c *Cluster) Nodes() map[string]*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]*Node, len(c.nodes))
	for k, v := range c.nodes {
		m[k] = v
	}
	return m
}

func poll(ctx context.Context, timeout time.Duration, f func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := f()
		if err != nil || ok {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// mergeBinDirs returns dirs[0] when there is one dir, else a dir of
// symlinks to the plugins of all dirs (first one wins).
func mergeBinDirs(merged string, dirs []string) (string, error) {
	if len(dirs) == 1 {
		return dirs[0], nil
	}
	return merged, linkPlugins(merged, dirs)
}

// linkPlugins makes dst hold a symlink to every plugin of dirs (first one
// wins).
func linkPlugins(dst string, dirs []string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	for _, d := range dirs {
		ents, err := os.ReadDir(d)
		if err != nil {
			return fmt.Errorf("kube: CNI bin dir: %w", err)
		}
		for _, e := range ents {
			if err := os.Symlink(filepath.Join(d, e.Name()), filepath.Join(dst, e.Name())); err != nil && !errors.Is(err, os.ErrExist) {
				return err
			}
		}
	}
	return nil
}

// makeCgroups creates the kubelet's cgroupRoot in every cgroup hierarchy
// (the kubelet expects it with the cgroupfs driver on cgroup v1), with
// cpuset's cpus and mems copied from the parent.
func (n *Node) makeCgroups() error {
	mounts, err := lab.CgroupMounts()
	if err != nil {
		return err
	}
	for _, m := range mounts {
		dir := filepath.Join(m, n.CgroupRoot)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("kube: cgroup %s: %w", dir, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if b, err := os.ReadFile(filepath.Join(m, f)); err == nil {
				if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
					if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
						return fmt.Errorf("kube: %s/%s: %w", dir, f, err)
					}
				}
			}
		}
	}
	return nil
}

func (n *Node) cgroupDirs() []string {
	mounts, _ := lab.CgroupMounts()
	var dirs []string
	for _, m := range mounts {
		if _, err := os.Stat(filepath.Join(m, n.CgroupRoot)); err == nil {
			dirs = append(dirs, filepath.Join(m, n.CgroupRoot))
		}
	}
	return dirs
}

func (n *Node) teardown() error {
	var errs []error
	for _, p := range []*lab.Proc{n.Kubelet, n.Containerd} {
		if p != nil {
			if err := p.Kill(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	nets, err := lab.KillCgroups(n.cgroupDirs())
	if err != nil {
		errs = append(errs, err)
	}
	if err := lab.UnmountUnder([]string{n.Dir}, nets); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (n *Node) waitContainerd(ctx context.Context) error {
	err := poll(ctx, 30*time.Second, func() (bool, error) {
		if n.Containerd.Exited() {
			return false, fmt.Errorf("containerd exited: %v\n%s", n.Containerd.Wait(), lab.Tail(n.Containerd.Log(), 4000))
		}
		c, err := net.Dial("unix", n.ContainerdSocket)
		if err != nil {
			return false, nil
		}
		c.Close()
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("kube: containerd of %s: %w", n.Name, err)
	}
	return nil
}

func (n *Node) containerdConfig(sandbox string) string {
	d := n.Dir
	return fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %q
`, filepath.Join(d, "containerd-root"), filepath.Join(d, "containerd-state"),
		n.ContainerdSocket, n.ContainerdSocket+".ttrpc", sandbox,
		n.CNIBinDir, n.CNIConfDir, filepath.Join(d, "runc"))
}

func (n *Node) kubeletConfig(crt, key string) string {
	d := n.Dir
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: %s
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://%s
podLogsDir: %s
volumePluginDir: %s
address: %s
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %s}
authorization:
  mode: Webhook
tlsCertFile: %s
tlsPrivateKeyFile: %s
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
`, n.CgroupRoot, n.ContainerdSocket, filepath.Join(d, "pod-logs"), filepath.Join(d, "volume-plugins"),
		n.IP, n.cluster.CACert, crt, key)
}

// PodCIDRs waits until the controller manager has assigned the node its
// pod CIDRs (spec.podCIDRs) and returns them.
func (n *Node) PodCIDRs(ctx context.Context) ([]netip.Prefix, error) {
	var out []netip.Prefix
	err := poll(ctx, 60*time.Second, func() (bool, error) {
		obj, err := n.cluster.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil || len(obj.Spec.PodCIDRs) == 0 {
			return false, nil
		}
		out = out[:0]
		for _, s := range obj.Spec.PodCIDRs {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return false, fmt.Errorf("node %s: pod CIDR %q: %w", n.Name, s, err)
			}
			out = append(out, p)
		}
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("kube: pod CIDRs of %s: %w", n.Name, err)
	}
	return out, nil
}

// WritePTPConfig waits for the node's pod CIDRs and writes a CNI conflist
// into CNIConfDir that gives pods a veth with the standard ptp plugin and
// addresses from host-local IPAM (per-node data dir IPAMDir). A
// placeholder until the Isthmus CNI plugin: the caller routes the pod
// CIDRs between nodes. It returns the pod CIDRs.
func (n *Node) WritePTPConfig(ctx context.Context) ([]netip.Prefix, error) {
	cidrs, err := n.PodCIDRs(ctx)
	if err != nil {
		return nil, err
	}
	type rng struct {
		Subnet string `json:"subnet"`
	}
	var ranges [][]rng
	var routes []map[string]string
	for _, p := range cidrs {
		ranges = append(ranges, []rng{{Subnet: p.String()}})
		dst := "0.0.0.0/0"
		if p.Addr().Is6() {
			dst = "::/0"
		}
		routes = append(routes, map[string]string{"dst": dst})
	}
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "lab-ptp",
		"plugins": []any{map[string]any{
			"type":   "ptp",
			"ipMasq": false,
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": n.IPAMDir,
				"ranges":  ranges,
				"routes":  routes,
			},
		}},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return nil, err
	}
	tmp := filepath.Join(n.CNIConfDir, ".10-lab-ptp.conflist.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return nil, err
	}
	return cidrs, os.Rename(tmp, filepath.Join(n.CNIConfDir, "10-lab-ptp.conflist"))
}

// WaitNodesReady waits until the named nodes (default: all of AddNode)
// report Ready.
func (c *Cluster) WaitNodesReady(ctx context.Context, names ...string) error {
	if len(names) == 0 {
		for n := range c.Nodes() {
			names = append(names, n)
		}
	}
	pending := names
	err := poll(ctx, 120*time.Second, func() (bool, error) {
		var still []string
		for _, name := range names {
			obj, err := c.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil || !nodeReady(obj) {
				still = append(still, name)
			}
		}
		pending = still
		return len(still) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("kube: nodes not Ready: %s: %w", strings.Join(pending, ", "), err)
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
