package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/bigtcp"
	"github.com/isthmus-mesh/isthmus/agent/clustermode"
	"github.com/isthmus-mesh/isthmus/agent/cniinstall"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/encryption"
	"github.com/isthmus-mesh/isthmus/agent/kube"
	"github.com/isthmus-mesh/isthmus/agent/metrics"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

const (
	// DefaultMetricsAddr is where isthmus-agent serves /metrics, /healthz
	// and /readyz over TCP unless told otherwise.
	DefaultMetricsAddr = metrics.DefaultAddr
	// DefaultLeaseTTL is the default TTL of a node's records in etcd.
	DefaultLeaseTTL = clustermode.DefaultLeaseTTL

	// EncryptionNone and EncryptionWireGuard are the values of --encryption.
	EncryptionNone      = encryption.ModeNone
	EncryptionWireGuard = encryption.ModeWireGuard
	// EncryptionTable is the routing table of the tunnel routes.
	EncryptionTable = encryption.Table
	// RouteProtocol marks the routes the agent installs ("proto 73").
	RouteProtocol = routes.Protocol

	// PolicyPeersCluster and PolicyPeersMesh are the values of
	// --kubernetes-policy-peers.
	PolicyPeersCluster = "cluster"
	PolicyPeersMesh    = "mesh"
)

// DefaultWireGuardDevice names the device when --wireguard-device is not
// given: "isthwg" plus a short hash of the cluster and node name, so
// several agents on one host (a lab) get different devices.
func DefaultWireGuardDevice(cluster, node string) string {
	return encryption.DefaultDevice(cluster, node)
}

// Config is the node's configuration.
type Config struct {
	NodeName    string
	ClusterName string
	// NodeLabels are the node's labels, which the nodeSelector of a
	// BGPPeeringPolicy or an L2AnnouncementPolicy matches (--node-labels; in Kubernetes mode the Node
	// object's, read at start, when the flag is not given).
	NodeLabels map[string]string
	ClusterID  uint32
	PodCIDRs   []netip.Prefix // at most one IPv4 and one IPv6
	StateDir   string         // endpoints, objects, IPAM and identity state
	SocketPath string         // local API
	BPFFSRoot  string         // maps and links are pinned in <BPFFSRoot>/isthmus/<NodeName>
	MTU        int            // of pod veths; 0: the underlay's, minus WireGuard's overhead when encrypting
	// ResetDatapath removes this node's pinned maps and links before loading
	// the datapath: every flow and every program attachment starts over.
	ResetDatapath bool
	// ExternalDevices name the devices traffic from outside the mesh
	// arrives on (gateway/northsouth); empty: those holding a node IP or
	// a default route.
	ExternalDevices []string
	// MetricsAddr is host:port for GET /metrics, /healthz and /readyz over
	// plain HTTP (agent/metrics); "" turns that listener off. The API socket
	// serves the same paths regardless.
	MetricsAddr string

	// Cluster mode: on when KVStoreEndpoints is set (see agent/clustermode).
	KVStoreEndpoints []string // etcd client URLs of the cluster's server
	KVStoreBundle    string   // directory with ca.crt, client.crt, client.key
	// MaxRemoteIPCache caps the ipcache entries accepted of each remote
	// cluster (0: records.DefaultMaxIPCacheEntries, -1: no cap).
	MaxRemoteIPCache int
	NodeIPs          []netip.Addr  // underlay; default: the default route's interface's
	LeaseTTL         time.Duration // of the node's records; default 60s

	// Transparent encryption (agent/encryption), cluster mode only.
	Encryption      string // EncryptionNone ("" too) or EncryptionWireGuard
	NodeEncryption  bool   // encrypt node-to-node traffic too
	WireGuardPort   int    // UDP port; 0 means 51871
	WireGuardDevice string // device name, unique on the host; "" derives one
	// WireGuardDaemon: without kernel WireGuard, adopt the device of
	// `isthmus-agent wireguard-daemon` instead of embedding the engine, so
	// the tunnels outlive the agent's restarts (--wireguard-daemon).
	WireGuardDaemon bool

	// BigTCP sets GSO/GRO sizes beyond 64 KiB (agent/bigtcp); the zero
	// value is auto for both families at bigtcp.DefaultSize.
	BigTCP bigtcp.Config

	// EndpointAttach is how the pod programs go onto each pod's veth:
	// bpf.AttachTC ("" too) or bpf.AttachTCX (--endpoint-attach).
	EndpointAttach string

	// Kubernetes mode (agent/kube), which needs cluster mode: pods come
	// from the CNI plugin, their labels, the Services and the
	// NetworkPolicies from the API server. Kubeconfig "" means the pod's
	// service account. PrepareKubernetes connects and fills Kube (and the
	// pod CIDRs and node IPs the Node object gives, when not set).
	Kubernetes bool
	Kubeconfig string
	Kube       *kube.Source
	// KubernetesPolicyPeers is what the pod and namespace peers of
	// Kubernetes NetworkPolicies match: PolicyPeersCluster (the default,
	// "" too) or PolicyPeersMesh.
	KubernetesPolicyPeers string
	// CNI, when its BinDir or ConfDir is set, makes the agent install the
	// CNI plugin and a conflist pointing at its socket once it serves
	// (Kubernetes mode); Socket and MTU are filled in by the agent.
	CNI cniinstall.Config
	// L2 tunes L2 announcements (agent/l2); the zero value is the
	// defaults.
	L2 L2Config

	// LabelsFor gives the labels of endpoints added without any (the
	// Kubernetes pod's); see localapi.Config.LabelsFor. nil: none.
	LabelsFor func(ctx context.Context, namespace, name, podUID string) (map[string]string, error)

	// ExternalWorkload makes this agent a VM's or bare-metal host's
	// (isthmus-agent --join, docs/vms.md); nil on a node.
	ExternalWorkload *ExternalWorkload
}

// ExternalWorkload is what an enrolled host runs with: its addresses (its
// node's whole pod CIDRs, /32 and /128, put on the WireGuard device) and
// its identity's labels. The agent publishes them as one endpoint, so
// every node's ipcache maps the addresses to the host's identity.
type ExternalWorkload struct {
	Name, Namespace string
	Labels          map[string]string
	Addresses       []netip.Addr
	// Background runs for the agent's lifetime (certificate renewal).
	Background func(ctx context.Context)
}

// L2Config tunes L2 announcements.
type L2Config struct {
	HeartbeatPort int           // UDP; 0: l2.DefaultHeartbeatPort
	LeaseTTL      time.Duration // of the node's L2 lease; 0: l2.DefaultLeaseTTL
	Refresh       time.Duration // re-announce led addresses this often; 0: only on takeover
}

// ClusterMode reports whether the agent works with its cluster's etcd.
func (c Config) ClusterMode() bool { return len(c.KVStoreEndpoints) > 0 }

// PinDir is where the node's datapath is pinned.
func (c Config) PinDir() string {
	return filepath.Join(c.BPFFSRoot, "isthmus", c.NodeName)
}

// KubernetesStateFile is where Kubernetes mode keeps the last synced
// objects.
func (c Config) KubernetesStateFile() string {
	return filepath.Join(c.StateDir, "kubernetes-objects.json")
}

// PrepareKubernetes connects to the API server and waits until the Node
// object of NodeName has pod CIDRs; the pod CIDRs and node IPs not given
// by flags come from it. It sets Kube.
func (c *Config) PrepareKubernetes(ctx context.Context) error {
	if !c.Kubernetes {
		return nil
	}
	kc := kube.Config{Kubeconfig: c.Kubeconfig, NodeName: c.NodeName, StateFile: c.KubernetesStateFile()}
	if c.KubernetesPolicyPeers != PolicyPeersMesh {
		kc.PolicyPeersCluster = c.ClusterName
	}
	src, err := kube.New(kc)
	if err != nil {
		return err
	}
	n, err := src.WaitNode(ctx)
	if err != nil {
		return err
	}
	if len(c.PodCIDRs) == 0 {
		c.PodCIDRs = n.PodCIDRs
	}
	if len(c.NodeIPs) == 0 {
		c.NodeIPs = n.IPs
	}
	if len(c.NodeLabels) == 0 {
		c.NodeLabels = n.Labels
	}
	c.Kube = src
	return nil
}

func (c Config) encrypted() bool { return c.Encryption == EncryptionWireGuard }

func (c Config) validate() error {
	var errs []error
	if !desired.DNSLabel(c.NodeName) {
		errs = append(errs, fmt.Errorf("node name %q must be a DNS label (lower-case letters, digits and '-', at most 63)", c.NodeName))
	}
	if !desired.DNSLabel(c.ClusterName) || len(c.ClusterName) > records.MaxClusterNameLen {
		errs = append(errs, fmt.Errorf("cluster name %q must be a DNS label of at most %d characters (lower-case letters, digits and '-')", c.ClusterName, records.MaxClusterNameLen))
	}
	if c.ClusterID < 1 || c.ClusterID > identity.MaxClusterID {
		errs = append(errs, fmt.Errorf("cluster ID %d out of range 1-%d", c.ClusterID, identity.MaxClusterID))
	}
	if len(c.PodCIDRs) == 0 {
		errs = append(errs, errors.New("no pod CIDR configured (one IPv4 and/or one IPv6 CIDR)"))
	}
	for k, v := range c.NodeLabels {
		if err := identity.ValidateLabelKey(k); err != nil {
			errs = append(errs, fmt.Errorf("node label: %w", err))
		} else if err := identity.ValidateLabelValue(v); err != nil {
			errs = append(errs, fmt.Errorf("node label %s: %w", k, err))
		}
	}
	for _, d := range c.ExternalDevices {
		if d == "" || len(d) > 15 || strings.ContainsAny(d, "/ \t") {
			errs = append(errs, fmt.Errorf("external device %q is not a device name (1-15 characters, no '/' or space)", d))
		}
	}
	if c.StateDir == "" || c.SocketPath == "" || c.BPFFSRoot == "" {
		errs = append(errs, errors.New("state dir, socket path and bpffs root are required"))
	}
	if c.MTU != 0 && (c.MTU < 1280 || c.MTU > 65535) {
		errs = append(errs, fmt.Errorf("MTU %d out of range 1280-65535 (IPv6 needs at least 1280)", c.MTU))
	}
	if err := c.BigTCP.WithDefaults().Validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := bpf.ParseEndpointAttach(c.EndpointAttach); err != nil {
		errs = append(errs, fmt.Errorf("--endpoint-attach: %w", err))
	}
	errs = append(errs, encryption.Validate(c.Encryption, c.NodeEncryption, c.ClusterMode(), c.WireGuardPort)...)
	if w := c.ExternalWorkload; w != nil {
		if !c.ClusterMode() || !c.encrypted() || !c.NodeEncryption || c.Kubernetes {
			errs = append(errs, errors.New("an external workload runs in cluster mode with --encryption=wireguard and --node-encryption, not in Kubernetes mode"))
		}
		if len(w.Addresses) == 0 {
			errs = append(errs, errors.New("an external workload needs its addresses"))
		}
	}
	if c.Kubernetes && !c.ClusterMode() {
		errs = append(errs, errors.New("kubernetes mode needs cluster mode (--kvstore-endpoints): identities are allocated in the cluster's etcd"))
	}
	if p := c.KubernetesPolicyPeers; p != "" && p != PolicyPeersCluster && p != PolicyPeersMesh {
		errs = append(errs, fmt.Errorf("--kubernetes-policy-peers %q: must be %s or %s", p, PolicyPeersCluster, PolicyPeersMesh))
	}
	if c.Kubernetes && c.Kube == nil {
		errs = append(errs, errors.New("kubernetes mode: not connected to the API server (call PrepareKubernetes)"))
	}
	for k, v := range c.NodeLabels {
		if err := identity.ValidateLabelKey(k); err != nil {
			errs = append(errs, fmt.Errorf("--node-labels: %w", err))
		} else if err := identity.ValidateLabelValue(v); err != nil {
			errs = append(errs, fmt.Errorf("--node-labels %s: %w", k, err))
		}
	}
	if c.L2.HeartbeatPort < 0 || c.L2.HeartbeatPort > 65535 {
		errs = append(errs, fmt.Errorf("--l2-heartbeat-port %d out of range 1-65535", c.L2.HeartbeatPort))
	}
	if c.L2.LeaseTTL != 0 && (c.L2.LeaseTTL < 2*time.Second || c.L2.LeaseTTL%time.Second != 0) {
		errs = append(errs, fmt.Errorf("--l2-lease-ttl %v: whole seconds, at least 2s (etcd grants leases in seconds; a leader stops answering %v before its lease could expire)", c.L2.LeaseTTL, 700*time.Millisecond))
	}
	if c.L2.Refresh < 0 {
		errs = append(errs, fmt.Errorf("--l2-refresh %v must not be negative", c.L2.Refresh))
	}
	if c.ClusterMode() {
		errs = append(errs, clustermode.Validate(c.KVStoreEndpoints, c.KVStoreBundle, c.NodeIPs, c.LeaseTTL)...)
	} else if c.KVStoreBundle != "" || len(c.NodeIPs) > 0 {
		errs = append(errs, errors.New("--kvstore-bundle and --node-ip need --kvstore-endpoints (cluster mode)"))
	}
	return errors.Join(errs...)
}
