package kube

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/isthmus-mesh/isthmus/k8s/crds"
	"github.com/isthmus-mesh/isthmus/lab"
)

// MeshOptions make the clusters of a lab mesh (lab.AddCluster) Kubernetes
// clusters: a control plane in each cluster's router, containerd and a
// kubelet on each node, the agents in Kubernetes mode with the isthmus-cni
// plugin, and the clustermesh servers reading the API server.
type MeshOptions struct {
	// Images is a tarball every node imports (WriteImages).
	Images string
	// ExtraImages are more tarballs every node imports, e.g. the chart's
	// agent and clustermesh images (ociimage.WriteIsthmus).
	ExtraImages []string
	// Binaries default to FindBinaries.
	Binaries *Binaries
	// InstallWithHelm builds the clusters for a Helm install of Isthmus
	// (deploy/helm/isthmus): Enable sets NoServer and NoAgents, since the
	// chart runs the server and the agents; the CRDs are left to the chart;
	// and each node's containerd takes its CNI plugins and config from
	// <bin>/<node name> and <conf>/<node name> of HelmCNIDirs, where the
	// chart's agent (agent.cni.nodeSubPath) installs them (the lab's nodes
	// share one filesystem). The bin dir starts with links to Debian's
	// plugins (loopback).
	InstallWithHelm bool
}

// HelmCNIDirs returns the base CNI bin and conf dirs of a lab built with
// MeshOptions.InstallWithHelm: the chart's agent.cni.binDir and confDir.
func HelmCNIDirs(l *lab.Lab) (bin, conf string) {
	return filepath.Join(l.Dir(), "helm-cni", "bin"), filepath.Join(l.Dir(), "helm-cni", "net.d")
}

// Mesh keeps the Kubernetes side of a lab mesh's clusters.
type Mesh struct {
	opts MeshOptions

	mu       sync.Mutex
	clusters map[string]*Cluster // by lab cluster name
}

// NewMesh returns a Mesh; Enable hooks it into cluster options.
func NewMesh(o MeshOptions) *Mesh {
	return &Mesh{opts: o, clusters: map[string]*Cluster{}}
}

// Enable sets the hooks of o: lab.AddCluster with them builds a Kubernetes
// cluster.
func (m *Mesh) Enable(o *lab.ClusterOptions) {
	o.BeforeServer = m.beforeServer
	o.BeforeAgent = m.beforeAgent
	if m.opts.InstallWithHelm {
		o.NoServer, o.NoAgents = true, true
	}
}

// Cluster returns the Kubernetes cluster of the lab cluster named name.
func (m *Mesh) Cluster(name string) *Cluster {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.clusters[name]
}

// beforeServer starts the control plane in the cluster's router, with the
// lab's pod CIDRs, installs the CRDs and points the server at it.
func (m *Mesh) beforeServer(ctx context.Context, c *lab.Cluster) ([]string, error) {
	kc, err := Start(ctx, c.Lab(), ClusterOptions{
		Name: c.Name, ControlPlane: c.Router, AdvertiseAddr: c.RouterIPs()[0],
		ClusterCIDRs: c.PodCIDRs(), NodeCIDRsFromCaller: true, Binaries: m.opts.Binaries,
	})
	if err != nil {
		return nil, err
	}
	if !m.opts.InstallWithHelm {
		if err := crds.Install(ctx, kc.Config); err != nil {
			return nil, err
		}
	}
	m.mu.Lock()
	m.clusters[c.Name] = kc
	m.mu.Unlock()
	return []string{"--kubeconfig", kc.AdminKubeconfig}, nil
}

// beforeAgent starts containerd and the kubelet of node j, gives the Node
// the lab's pod CIDRs of that node (as a node IPAM controller would), and
// returns the agent's Kubernetes-mode flags.
func (m *Mesh) beforeAgent(ctx context.Context, c *lab.Cluster, n *lab.Node, j int) ([]string, error) {
	kc := m.Cluster(c.Name)
	if kc == nil {
		return nil, fmt.Errorf("kube: cluster %s has no control plane", c.Name)
	}
	// Two plugin dirs make the node a private one (symlinks to Debian's
	// plugins, for loopback), where the agent installs isthmus-cni.
	extra := filepath.Join(n.Dir(), "cni-plugins")
	if err := os.MkdirAll(extra, 0o755); err != nil {
		return nil, err
	}
	var images []string
	if m.opts.Images != "" {
		images = []string{m.opts.Images}
	}
	images = append(images, m.opts.ExtraImages...)
	no := NodeOptions{Name: n.NodeName(), IP: c.NodeIPs(j)[0], CNIBinDirs: []string{extra, "/usr/lib/cni"}, Images: images}
	if m.opts.InstallWithHelm {
		bin, conf := HelmCNIDirs(c.Lab())
		no.CNIBinDirs = []string{filepath.Join(bin, n.NodeName())}
		no.CNIConfDir = filepath.Join(conf, n.NodeName())
		if err := linkPlugins(no.CNIBinDirs[0], []string{"/usr/lib/cni"}); err != nil {
			return nil, err
		}
	}
	kn, err := kc.AddNode(ctx, n, no)
	if err != nil {
		return nil, err
	}
	var cidrs []string
	for _, p := range c.NodePodCIDRs(j) {
		cidrs = append(cidrs, p.String())
	}
	patch := fmt.Sprintf(`{"spec":{"podCIDR":%q,"podCIDRs":[%q,%q]}}`, cidrs[0], cidrs[0], cidrs[1])
	if _, err := kc.Client.CoreV1().Nodes().Patch(ctx, kn.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return nil, fmt.Errorf("kube: pod CIDRs of node %s: %w", kn.Name, err)
	}
	if m.opts.InstallWithHelm {
		return nil, nil
	}
	return []string{"--kubeconfig", kc.AdminKubeconfig, "--cni-bin-dir", kn.CNIBinDir, "--cni-conf-dir", kn.CNIConfDir}, nil
}
