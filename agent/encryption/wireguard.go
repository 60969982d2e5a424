package encryption

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/gateway/wireguard"
)

const (
	// ModeNone and ModeWireGuard are the values of --encryption.
	ModeNone      = "none"
	ModeWireGuard = "wireguard"

	// Table is the routing table of the tunnel routes, and rulePriority
	// the priority of the rule that leads to it (before the main table's
	// 32766).
	Table        = 73
	rulePriority = 73
	// encryptionMark is the firewall mark of WireGuard's own packets.
	encryptionMark = 0x1e73
	// unreachableMetric is the metric of the fail-closed routes, worse
	// than the device routes' 0.
	unreachableMetric = 4096
	deviceMetric      = 1

	wireguardKeyFile   = "wireguard.key"
	wireguardPeersFile = "wireguard-peers.json"
)

// DefaultDevice names the device when --wireguard-device is not
// given: "isthmus-wg" plus a short hash of the cluster and node name, so
// several agents on one host (a lab) get different devices.
func DefaultDevice(cluster, node string) string {
	h := sha256.Sum256([]byte(cluster + "/" + node))
	return "isthwg" + hex.EncodeToString(h[:])[:8]
}

// Validate checks the encryption flags: the mode, --node-encryption,
// whether the agent runs in cluster mode, and the port.
func Validate(mode string, nodeEncryption, clusterMode bool, port int) []error {
	var errs []error
	switch mode {
	case "", ModeNone:
		if nodeEncryption {
			errs = append(errs, errors.New("--node-encryption needs --encryption=wireguard"))
		}
	case ModeWireGuard:
		if !clusterMode {
			errs = append(errs, errors.New("--encryption=wireguard needs cluster mode (--kvstore-endpoints): peers and their keys come from the cluster's node records"))
		}
	default:
		errs = append(errs, fmt.Errorf("--encryption %q: want none or wireguard", mode))
	}
	if port < 0 || port > 65535 {
		errs = append(errs, fmt.Errorf("--wireguard-port %d out of range 1-65535", port))
	}
	return errs
}

// WireGuard is the node's WireGuard device and what the last sync found.
type WireGuard struct {
	dev     *wireguard.Device
	nodeEnc bool
	nl      *netlink.Handle
	log     *slog.Logger

	// peersFile keeps the last peer plan applied from a listed mesh, so
	// that an agent restarted while etcd is unreachable brings its tunnels
	// back at once (the embedded device dies with the process).
	peersFile string
	restored  bool   // the saved plan was applied (only the reconciler)
	saved     []byte // what peersFile holds (only the reconciler)
	// applied and appliedAt: the plan last applied without error, and
	// when (only the reconciler).
	applied   string
	appliedAt time.Time
	// vips are the service addresses an external workload routes into
	// the device (SetServiceRoutes; only the reconciler).
	vips []netip.Prefix

	mu          sync.Mutex
	peerNodes   map[string]string // public key -> "<cluster>/<node>"
	unencrypted []string
	refused     []string
	lastErr     string
}

// Config is the device's configuration.
type Config struct {
	Cluster, Node  string
	Device         string // "" derives one (DefaultDevice)
	Port           int    // 0 means wireguard.DefaultListenPort
	NodeEncryption bool   // node-to-node traffic too
	// Daemon adopts the device of `isthmus-agent wireguard-daemon` when
	// the kernel has no WireGuard (wireguard.ModeUserspaceDaemon).
	Daemon   bool
	StateDir string // the key and the saved peers
	// Underlay returns the MTU of the node's underlay interface, and
	// whether it is IPv6 only (20 bytes more overhead).
	Underlay func() (mtu int, v6 bool)
	Log      *slog.Logger
}

// Open creates the device; the key file lives in the state dir, so a
// restarted agent keeps its key.
func Open(cfg Config) (*WireGuard, error) {
	underlay, v6 := cfg.Underlay()
	mtu := wireguard.MTUFor(underlay, v6)
	if mtu < 1280 {
		return nil, fmt.Errorf("underlay MTU %d leaves %d for WireGuard; IPv6 pods need 1280", underlay, mtu)
	}
	name := cfg.Device
	if name == "" {
		name = DefaultDevice(cfg.Cluster, cfg.Node)
	}
	mode := ""
	if cfg.Daemon {
		mode = wireguard.ModeUserspaceDaemon
	}
	dev, err := wireguard.Open(wireguard.Config{
		Name: name, ListenPort: cfg.Port, MTU: mtu, FirewallMark: encryptionMark,
		KeyFile: filepath.Join(cfg.StateDir, wireguardKeyFile), Logger: cfg.Log, Mode: mode,
	})
	if err != nil {
		return nil, err
	}
	h, err := netlink.NewHandle()
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("netlink handle for encryption routes: %w", err)
	}
	return &WireGuard{dev: dev, nodeEnc: cfg.NodeEncryption, nl: h, log: cfg.Log,
		peersFile: filepath.Join(cfg.StateDir, wireguardPeersFile)}, nil
}

// MTU is the device's MTU.
func (e *WireGuard) MTU() int { return e.dev.MTU() }

// Close closes the device (nil: nothing).
func (e *WireGuard) Close() {
	if e == nil {
		return
	}
	// The fail-closed routes and the rule stay: until the next agent has
	// its device up, pod traffic to other nodes is dropped, not sent in
	// plaintext.
	e.dev.Close()
	e.nl.Close()
}

// Sync brings the device's peers, the tunnel table and the rules
// to the mesh's node records; it returns how many things it changed. Until
// the mesh is listed (an agent restarted while etcd is unreachable) it
// applies the peers saved at the last sync instead.
func (e *WireGuard) Sync(m desired.Mesh) (int, error) {
	if e == nil {
		return 0, nil
	}
	if !m.Ready {
		return e.restore(m.PodCIDRs)
	}
	plan := planEncryption(m, e.dev.PublicKey(), e.nodeEnc)
	plan.vips = e.vips
	// Most reconciles change endpoints, not nodes: skip the device and
	// netlink round trips when the plan is the one applied last, but check
	// the kernel again every reconcile.ResyncInterval to catch drift.
	key := fmt.Sprint(plan.peers, plan.unreachable, plan.refused, plan.unencrypted, m.PodCIDRs, plan.vips)
	if key == e.applied && time.Since(e.appliedAt) < reconcile.ResyncInterval {
		return 0, nil
	}
	n, err := e.apply(plan, m.PodCIDRs)
	e.applied = ""
	if err == nil {
		e.applied, e.appliedAt = key, time.Now()
		e.savePlan(plan)
	}
	return n, err
}

// SetServiceRoutes sets the service addresses (VIPs) an external
// workload routes into the device, applied at the next Sync. The host has
// no pod veth: its traffic to a VIP must reach the device, where from_host
// translates it to a backend anywhere in the mesh (docs/vms.md). A node
// never calls it: its pods' service traffic is translated on their veths.
func (e *WireGuard) SetServiceRoutes(vips []netip.Addr) {
	if e == nil {
		return
	}
	out := make([]netip.Prefix, 0, len(vips))
	for _, a := range vips {
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	slices.SortFunc(out, netip.Prefix.Compare)
	e.vips = slices.Compact(out)
}

// apply applies a peer plan to the device and the routing, and
// records what it refused for the status.
func (e *WireGuard) apply(plan encryptionPlan, local []netip.Prefix) (int, error) {
	var errs []error
	err := e.dev.SyncPeers(plan.peers)
	var bad *wireguard.InvalidPeersError
	if errors.As(err, &bad) {
		// Leave out what the device refused, apply the rest.
		drop := bad.Keys()
		plan.peers = slices.DeleteFunc(plan.peers, func(p wireguard.Peer) bool { return slices.Contains(drop, p.PublicKey) })
		for _, pr := range bad.Problems {
			plan.refused = append(plan.refused, cmp.Or(plan.peerNodes[pr.PublicKey], pr.PublicKey)+": "+pr.Reason)
		}
		plan.routes = nil
		for _, p := range plan.peers {
			plan.routes = append(plan.routes, p.AllowedIPs...)
		}
		err = e.dev.SyncPeers(plan.peers)
	}
	if err != nil {
		errs = append(errs, err)
	}
	changes, err := e.syncRouting(plan, local)
	if err != nil {
		errs = append(errs, err)
	}
	err = errors.Join(errs...)

	e.mu.Lock()
	newlyRefused := !slices.Equal(e.refused, plan.refused)
	newlyUnencrypted := !slices.Equal(e.unencrypted, plan.unencrypted)
	e.peerNodes, e.unencrypted, e.refused = plan.peerNodes, plan.unencrypted, plan.refused
	e.lastErr = ""
	if err != nil {
		e.lastErr = err.Error()
	}
	e.mu.Unlock()
	if newlyRefused && len(plan.refused) > 0 {
		e.log.Error("wireguard: refusing peers; traffic to their pods is dropped", "refused", plan.refused)
	}
	if newlyUnencrypted && len(plan.unencrypted) > 0 {
		e.log.Warn("wireguard: nodes without encryption in the mesh; traffic to their pods is dropped, not sent in plaintext", "nodes", plan.unencrypted)
	}
	return changes, err
}

// Publication is what the node record says about encryption (nothing
// when e is nil: encryption is off).
func (e *WireGuard) Publication() (key string, port int) {
	if e == nil {
		return "", 0
	}
	return e.dev.PublicKey(), e.dev.ListenPort()
}

// Rotate gives the device a new key, written to the key file. Peers switch
// to it when the node record reaches them; flows pause for about one
// handshake.
func (e *WireGuard) Rotate() error {
	_, err := e.dev.Rotate()
	return err
}

// Status is the "wireguard" section of the status; nil when encryption
// is off (e is nil).
func (e *WireGuard) Status() *api.WireGuardStatus {
	if e == nil {
		return nil
	}
	mode := e.dev.Mode()
	if e.dev.External() {
		mode = wireguard.ModeUserspaceDaemon
	}
	st := &api.WireGuardStatus{Device: e.dev.Name(), Mode: mode, PublicKey: e.dev.PublicKey(),
		ListenPort: e.dev.ListenPort(), MTU: e.dev.MTU(), NodeEncryption: e.nodeEnc, Peers: []api.WireGuardPeer{}}
	e.mu.Lock()
	names := e.peerNodes
	st.Unencrypted, st.Refused, st.LastError = slices.Clone(e.unencrypted), slices.Clone(e.refused), e.lastErr
	e.mu.Unlock()
	s, err := e.dev.Stats()
	if err != nil {
		st.LastError = err.Error()
		return st
	}
	for _, p := range s.Peers {
		wp := api.WireGuardPeer{Node: names[p.PublicKey], PublicKey: p.PublicKey, AllowedIPs: p.AllowedIPs,
			LastHandshake: p.LastHandshake, RxBytes: p.RxBytes, TxBytes: p.TxBytes}
		if p.Endpoint.IsValid() {
			wp.Endpoint = p.Endpoint.String()
		}
		st.Peers = append(st.Peers, wp)
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Node < st.Peers[j].Node })
	return st
}
