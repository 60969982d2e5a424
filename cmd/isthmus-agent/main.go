// Command isthmus-agent runs the Isthmus node agent: it plumbs pods, loads
// the eBPF datapath and serves the local API that the isthmus CLI talks to.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent"
	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/bigtcp"
	"github.com/isthmus-mesh/isthmus/agent/cniinstall"
	"github.com/isthmus-mesh/isthmus/agent/l2"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// gcPercent is the agent's default GOGC.
const gcPercent = 50

func main() {
	if err := newCommand(runAgent).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}

// runAgent runs the agent until SIGTERM or SIGINT.
func runAgent(cfg agent.Config) error {
	if os.Geteuid() != 0 {
		return errors.New("isthmus-agent needs root (it creates network interfaces and loads eBPF programs)")
	}
	if os.Getenv("GOGC") == "" {
		// Most of the agent's heap is the mesh's tables, which live as
		// long as the mesh: collecting at 50 % growth instead of Go's
		// 100 % keeps its resident memory near what it holds (at 100,000
		// remote endpoints, about 45 MB less), for a little more CPU in
		// the collector. GOGC in the environment overrides it.
		debug.SetGCPercent(gcPercent)
	}
	// SIGTERM and SIGINT stop the agent gracefully; programs stay
	// attached and maps pinned, so traffic keeps flowing.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Kubernetes mode: the Node object gives the pod CIDRs (waited for).
	if err := cfg.PrepareKubernetes(ctx); err != nil {
		return err
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// newCommand parses the flags into an agent.Config and hands it to run.
func newCommand(run func(agent.Config) error) *cobra.Command {
	var (
		cfg       agent.Config
		podCIDRs  []string
		logLevel  string
		endpoints []string
		nodeIPs   []string
		bigTCP6   string
		bigTCP4   string
		labels    []string
		join      joinFlags // issue 16: external workloads
	)
	cmd := &cobra.Command{
		Use:   "isthmus-agent --pod-cidr CIDR [--pod-cidr CIDR] [flags]",
		Short: "Run the Isthmus node agent",
		Long: `isthmus-agent runs one Isthmus node: it creates pod interfaces (veth pairs)
with addresses from the node's pod CIDRs, loads the eBPF datapath (policy,
service load balancing, conntrack) onto them, and serves the local API used by
the isthmus CLI on a unix socket.

Maps and program links are pinned in bpffs, so pods keep their traffic while
the agent is stopped or restarting; a restarted agent picks up where it left.

With --kubernetes (or --kubeconfig) the agent is the networking plugin of a
Kubernetes node: the isthmus-cni plugin asks it for pod interfaces, the
pod's and its namespace's labels make the identity, and Services (ClusterIP,
from EndpointSlices, so no kube-proxy is needed), Kubernetes NetworkPolicies
(whose pod and namespace peers match this cluster's pods unless
--kubernetes-policy-peers=mesh) and isthmus.io NetworkPolicies (cluster-aware
selectors) come from the API server. The node's pod
CIDRs come from its Node object (spec.podCIDRs). Kubernetes mode runs in
cluster mode: identities are mesh-wide, in the cluster's etcd.

With --kvstore-endpoints the node joins its cluster (cluster mode): it
publishes its node and endpoints to the cluster's etcd (leased), allocates
identities there, and takes from it the nodes, endpoints, identities and
services of its cluster and of connected clusters, and the objects applied
in its own cluster; isthmus apply, get and delete then act on the whole
cluster. The datapath starts from local state at once; etcd is reached in
the background, with retries. With --encryption=wireguard, traffic to pods
on other nodes goes through a WireGuard device whose public key the node
publishes in its node record.

BIG TCP (--ipv6-big-tcp, --ipv4-big-tcp, --big-tcp-size) sets GSO/GRO
sizes beyond 64 KiB on the node's external devices and on both ends of
every pod veth, each capped by the device's tso_max_size: auto (the
default) turns it on where the kernel and the device support it; a device
that cannot take the size or refuses it is left at (rolled back to) 65536
alone, a pod veth with both its ends, and reported in isthmus status.
Pods are reconciled in place: changing these flags and restarting the
agent changes running pods without restarting them.

A BGPPeeringPolicy whose nodeSelector matches --node-labels makes the
agent peer with the policy's routers over BGP (embedded GoBGP, export only)
and announce the node's pod CIDRs and the selected services' external and
load-balancer addresses. A restarted agent keeps its routes at the peers
through graceful restart; see docs/bgp.md.

--metrics-addr serves Prometheus metrics, /healthz and /readyz over HTTP
(the API socket serves them too). Needs root; runs until SIGTERM or SIGINT.`,
		Example: `  isthmus-agent --pod-cidr 10.200.0.0/24 --pod-cidr fd00:200::/64
  isthmus-agent --node-name n1 --cluster-name lab --cluster-id 7 --pod-cidr 10.7.1.0/24
  isthmus-agent --node-name n1 --cluster-name c1 --cluster-id 1 --pod-cidr 10.1.1.0/24 \
      --kvstore-endpoints https://192.0.2.1:2379 --kvstore-bundle /var/lib/isthmus/pki/agents --node-ip 192.0.2.11`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level, err := parseLevel(logLevel)
			if err != nil {
				return err
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))

			if cfg.Kubeconfig != "" {
				cfg.Kubernetes = true
			}
			if p := cfg.KubernetesPolicyPeers; p != agent.PolicyPeersCluster && p != agent.PolicyPeersMesh {
				return fmt.Errorf("--kubernetes-policy-peers %q: must be %s or %s", p, agent.PolicyPeersCluster, agent.PolicyPeersMesh)
			}
			if join.server != "" && len(podCIDRs) > 0 {
				return errors.New("--pod-cidr is not for --join: an external workload's address comes from its enrollment")
			}
			if len(podCIDRs) == 0 && !cfg.Kubernetes && join.server == "" {
				return errors.New(`required flag(s) "pod-cidr" not set (in Kubernetes mode, --kubernetes, the Node object gives them)`)
			}
			for _, s := range podCIDRs {
				p, err := parseCIDR(s)
				if err != nil {
					return err
				}
				for _, q := range cfg.PodCIDRs {
					if q.Addr().Is4() == p.Addr().Is4() {
						return fmt.Errorf("--pod-cidr %s and %s are both IPv%d: give at most one IPv4 and one IPv6 CIDR", q, p, map[bool]int{true: 4, false: 6}[p.Addr().Is4()])
					}
				}
				cfg.PodCIDRs = append(cfg.PodCIDRs, p)
			}
			for _, e := range endpoints {
				if e = strings.TrimSpace(e); e != "" {
					cfg.KVStoreEndpoints = append(cfg.KVStoreEndpoints, e)
				}
			}
			for _, s := range nodeIPs {
				ip, err := netip.ParseAddr(strings.TrimSpace(s))
				if err != nil {
					return fmt.Errorf("--node-ip %q: not an IP address", s)
				}
				cfg.NodeIPs = append(cfg.NodeIPs, ip)
			}
			for _, kv := range labels {
				k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
				if !ok || k == "" {
					return fmt.Errorf("--node-labels %q: want key=value", kv)
				}
				if cfg.NodeLabels == nil {
					cfg.NodeLabels = map[string]string{}
				}
				if _, dup := cfg.NodeLabels[k]; dup {
					return fmt.Errorf("--node-labels: %s given twice", k)
				}
				cfg.NodeLabels[k] = v
			}
			var err6, err4 error
			cfg.BigTCP.IPv6, err6 = bigtcp.ParseMode("--ipv6-big-tcp", bigTCP6)
			cfg.BigTCP.IPv4, err4 = bigtcp.ParseMode("--ipv4-big-tcp", bigTCP4)
			if err := errors.Join(err6, err4); err != nil {
				return err
			}
			if join.server != "" {
				if err := join.configure(&cfg); err != nil {
					return err
				}
			}
			if cfg.StateDir == "" {
				cfg.StateDir = filepath.Join("/var/lib/isthmus", cfg.NodeName)
			}
			if cfg.SocketPath == "" {
				cfg.SocketPath = api.DefaultSocketPath(cfg.NodeName)
			}
			if cfg.CNI.BinDir != "" && cfg.CNI.PluginPath == "" {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("--cni-plugin-path: find the agent's own binary: %w", err)
				}
				cfg.CNI.PluginPath = filepath.Join(filepath.Dir(exe), cniinstall.PluginType)
			}
			return run(cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.NodeName, "node-name", api.DefaultNodeName(), "name of this node, unique in the cluster (a DNS label)")
	f.StringSliceVar(&labels, "node-labels", nil, "labels of this node, key=value, comma-separated: the nodeSelector of a BGPPeeringPolicy or an L2AnnouncementPolicy matches them (in Kubernetes mode the Node object's labels when not given)")
	f.StringVar(&cfg.ClusterName, "cluster-name", "default", "name of the cluster this node belongs to (a DNS label); part of every identity")
	f.Uint32Var(&cfg.ClusterID, "cluster-id", 1, "numeric cluster ID, 1-4095, unique in the mesh; the high bits of every identity")
	f.StringSliceVar(&podCIDRs, "pod-cidr", nil, "pod address range of this node; repeat for dual stack (one IPv4 and one IPv6 CIDR)")
	f.StringVar(&cfg.StateDir, "state-dir", "", "directory for the agent's state: endpoints, applied objects, IPAM, identities (default /var/lib/isthmus/<node-name>)")
	f.StringVar(&cfg.SocketPath, "socket", "", "unix socket of the local API (default /var/run/isthmus/<node-name>.sock)")
	f.StringVar(&cfg.BPFFSRoot, "bpffs", "/sys/fs/bpf", "bpffs mount point; maps and links are pinned under <bpffs>/isthmus/<node-name> (mounted if needed)")
	f.IntVar(&cfg.MTU, "mtu", 0, "MTU of pod interfaces (default: the underlay interface's MTU, minus WireGuard's overhead with --encryption=wireguard)")
	f.BoolVar(&cfg.ResetDatapath, "reset-datapath", false, "remove this node's pinned maps and links before starting (drops all tracked flows; for a datapath version whose maps changed layout)")
	f.StringSliceVar(&cfg.ExternalDevices, "external-devices", nil, "devices traffic from outside the mesh arrives on, comma-separated (from_external/to_external are attached to them); default: the devices holding a node IP or a default route")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", agent.DefaultMetricsAddr, `serve GET /metrics (Prometheus), /healthz and /readyz over plain HTTP on this host:port; "" turns it off (the API socket serves them regardless)`)
	f.StringSliceVar(&endpoints, "kvstore-endpoints", nil, "cluster mode: etcd client URLs of the cluster's isthmus-clustermesh, comma-separated (https://host:2379); without it the agent runs standalone")
	f.StringVar(&cfg.KVStoreBundle, "kvstore-bundle", "", "cluster mode: directory with ca.crt, client.crt and client.key for etcd (the etcd user is the certificate's common name)")
	f.StringSliceVar(&nodeIPs, "node-ip", nil, "cluster mode: underlay address of this node, IPv4 and/or IPv6; repeat for dual stack (default: the addresses of the interface holding the default route)")
	f.IntVar(&cfg.MaxRemoteIPCache, "max-remote-ipcache", records.DefaultMaxIPCacheEntries, "cluster mode: ipcache entries accepted per remote cluster at most (past it, those whose keys sort last are refused); -1: no cap")
	f.DurationVar(&cfg.LeaseTTL, "lease-ttl", agent.DefaultLeaseTTL, "cluster mode: TTL of this node's records in etcd; a node that stops renewing vanishes from the mesh after it")
	f.StringVar(&cfg.Encryption, "encryption", agent.EncryptionNone, "cluster mode: transparent encryption of pod traffic to other nodes and clusters: none or wireguard")
	f.BoolVar(&cfg.NodeEncryption, "node-encryption", false, "with --encryption=wireguard: also encrypt traffic between node addresses")
	f.IntVar(&cfg.WireGuardPort, "wireguard-port", 51871, "UDP port of the node's WireGuard device (peers learn it from the node record)")
	f.StringVar(&cfg.WireGuardDevice, "wireguard-device", "", "name of the WireGuard device, unique on the host (default isthwg<hash of cluster and node name>)")
	f.BoolVar(&cfg.WireGuardDaemon, "wireguard-daemon", false, "with --encryption=wireguard and no kernel WireGuard: use the device that 'isthmus-agent wireguard-daemon' serves on this node (waiting up to a minute for it) instead of embedding the engine, so the tunnels and their sessions outlive the agent's restarts")
	f.StringVar(&bigTCP6, "ipv6-big-tcp", string(bigtcp.Auto), "IPv6 BIG TCP (GSO/GRO beyond 64 KiB) on the external devices and pod veths: off, on, or auto (on where the kernel and each device support it)")
	f.StringVar(&bigTCP4, "ipv4-big-tcp", string(bigtcp.Auto), "IPv4 BIG TCP (gso_ipv4_max_size, Linux >= 6.3): off, on (an error on an older kernel), or auto")
	f.IntVar(&cfg.BigTCP.Size, "big-tcp-size", bigtcp.DefaultSize, "GSO/GRO size in bytes with BIG TCP, 65537-524288; each device gets at most its tso_max_size")
	f.StringVar(&cfg.EndpointAttach, "endpoint-attach", bpf.AttachTC, "how the pod programs are attached to each pod's veth: tc (a clsact qdisc with direct-action filters, taken without waiting for an RCU grace period) or tcx (pinned BPF links, Linux >= 6.6: each attach and detach holds the node's RTNL lock through a grace period, about 15 ms, so pods created together wait for each other); veths attached the other way move over at the agent's start")
	f.BoolVar(&cfg.Kubernetes, "kubernetes", false, "Kubernetes mode (needs --kvstore-endpoints): pods come from the isthmus-cni plugin, their labels, Services, EndpointSlices and NetworkPolicies from the API server, the pod CIDRs and node IPs (unless given) from this node's Node object; with the pod's service account unless --kubeconfig")
	f.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "Kubernetes mode: kubeconfig file of the API server (implies --kubernetes); default: the in-cluster service account")
	f.StringVar(&cfg.KubernetesPolicyPeers, "kubernetes-policy-peers", agent.PolicyPeersCluster, "Kubernetes mode: what the podSelector and namespaceSelector peers of Kubernetes NetworkPolicies match: "+
		"cluster (the pods of this node's cluster only: a policy written for one cluster does not admit pods another cluster labels alike) or mesh (alike-labelled pods of every cluster); "+
		"isthmus.io NetworkPolicies name clusters explicitly")
	f.StringVar(&cfg.CNI.BinDir, "cni-bin-dir", "", "Kubernetes mode: copy the CNI plugin (isthmus-cni) into this directory at start, e.g. /opt/cni/bin; \"\" (the default): do not")
	f.StringVar(&cfg.CNI.ConfDir, "cni-conf-dir", "", "Kubernetes mode: write "+cniinstall.ConfListName+" (the plugin, pointed at --socket) into this directory at start, e.g. /etc/cni/net.d; \"\" (the default): do not")
	f.StringVar(&cfg.CNI.PluginPath, "cni-plugin-path", "", "the isthmus-cni binary that --cni-bin-dir gets (default: isthmus-cni next to the agent's binary)")
	f.IntVar(&cfg.L2.HeartbeatPort, "l2-heartbeat-port", l2.DefaultHeartbeatPort, "cluster mode, L2 announcements: UDP port of the heartbeats between the nodes (every 100ms; a node unheard for 350ms is dead to the others)")
	f.DurationVar(&cfg.L2.LeaseTTL, "l2-lease-ttl", l2.DefaultLeaseTTL, "cluster mode, L2 announcements: TTL of the node's L2 lease in etcd (whole seconds, >= 2s); a node that cannot renew it stops answering 700ms before it could expire")
	f.DurationVar(&cfg.L2.Refresh, "l2-refresh", 0, "L2 announcements: re-send gratuitous ARPs / unsolicited NAs for the led addresses this often (0: only on takeover)")
	f.StringVar(&cfg.CNI.CNIVersion, "cni-version", cniinstall.DefaultCNIVersion, "cniVersion of the written conflist: 1.0.0 works with containerd 1.6 and later; 1.1.0 (STATUS, GC) needs a runtime with libcni >= 1.2 (containerd 2)")
	f.StringVar(&join.server, "join", "", "run as an external workload (a VM or bare-metal host): enroll at this enrollment server, https://host:port (isthmus vm token create prints it), once; later starts reuse the stored credential")
	f.StringVar(&join.token, "token", "", "with --join: the one-time enrollment token (only needed the first time)")
	f.StringVar(&join.fingerprint, "ca-fingerprint", "", "with --join: SHA-256 of the cluster's CA certificate to pin (hex, as isthmus vm token create prints it)")
	cmd.AddCommand(wireguardDaemonCommand())
	return cmd
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

func parseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("--pod-cidr %q: not a CIDR (want e.g. 10.200.0.0/24 or fd00:200::/64)", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("--pod-cidr %s has host bits set: did you mean %s?", p, p.Masked())
	}
	return p, nil
}
