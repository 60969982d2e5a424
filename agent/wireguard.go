package agent

// Transparent encryption (--encryption=wireguard): one WireGuard device per
// node, its public key published in the node record, its peers and routes
// reconciled from the node records of the whole mesh.
//
// Routing. The tunnel routes live in their own table (EncryptionTable),
// reached through one policy rule:
//
//   - pod-to-pod mode: "from <this node's pod CIDR> lookup 73". Only
//     traffic that pods send takes the tunnel; replies to and from node
//     addresses stay on the underlay, symmetric on both ends.
//   - node encryption: "not fwmark <mark> lookup 73", and the table also
//     routes every other node's underlay address into the tunnel. The
//     device marks its own UDP packets, so they skip the rule and leave
//     through the underlay.
//
// The table routes every remote pod CIDR into the device, and also holds
// an "unreachable" route for each at a worse metric. When the device is
// gone (the embedded engine dies with the agent) or a node publishes no key,
// pod traffic to those CIDRs fails closed instead of leaving in plaintext
// through the main table.

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/node"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/gateway/wireguard"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
)

const (
	// EncryptionNone and EncryptionWireGuard are the values of --encryption.
	EncryptionNone      = "none"
	EncryptionWireGuard = "wireguard"

	// EncryptionTable is the routing table of the tunnel routes, and
	// encryptionRulePriority the priority of the rule that leads to it
	// (before the main table's 32766).
	EncryptionTable        = 73
	encryptionRulePriority = 73
	// encryptionMark is the firewall mark of WireGuard's own packets.
	encryptionMark = 0x1e73
	// unreachableMetric is the metric of the fail-closed routes, worse
	// than the device routes' 0.
	unreachableMetric = 4096
	deviceMetric      = 1

	wireguardKeyFile   = "wireguard.key"
	wireguardPeersFile = "wireguard-peers.json"
)

// DefaultWireGuardDevice names the device when --wireguard-device is not
// given: "isthmus-wg" plus a short hash of the cluster and node name, so
// several agents on one host (a lab) get different devices.
func DefaultWireGuardDevice(cluster, node string) string {
	h := sha256.Sum256([]byte(cluster + "/" + node))
	return "isthwg" + hex.EncodeToString(h[:])[:8]
}

func (c Config) encrypted() bool { return c.Encryption == EncryptionWireGuard }

func (c Config) validateEncryption() []error {
	var errs []error
	switch c.Encryption {
	case "", EncryptionNone:
		if c.NodeEncryption {
			errs = append(errs, errors.New("--node-encryption needs --encryption=wireguard"))
		}
	case EncryptionWireGuard:
		if !c.ClusterMode() {
			errs = append(errs, errors.New("--encryption=wireguard needs cluster mode (--kvstore-endpoints): peers and their keys come from the cluster's node records"))
		}
	default:
		errs = append(errs, fmt.Errorf("--encryption %q: want none or wireguard", c.Encryption))
	}
	if c.WireGuardPort < 0 || c.WireGuardPort > 65535 {
		errs = append(errs, fmt.Errorf("--wireguard-port %d out of range 1-65535", c.WireGuardPort))
	}
	return errs
}

// encryption is the agent's WireGuard device and what the last sync found.
type encryption struct {
	dev     *wireguard.Device
	nodeEnc bool
	nl      *netlink.Handle

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

	mu          sync.Mutex
	peerNodes   map[string]string // public key -> "<cluster>/<node>"
	unencrypted []string
	refused     []string
	lastErr     string
}

// openEncryption creates the device; the key file lives in the state dir,
// so a restarted agent keeps its key.
func (a *Agent) openEncryption() (*encryption, error) {
	// The mesh detects the node IPs later the same way; the MTU needs them
	// now (an IPv6-only underlay costs 20 bytes more).
	underlay, v6 := node.UnderlayMTU(a.underlayIPs())
	mtu := wireguard.MTUFor(underlay, v6)
	if mtu < 1280 {
		return nil, fmt.Errorf("underlay MTU %d leaves %d for WireGuard; IPv6 pods need 1280", underlay, mtu)
	}
	name := a.cfg.WireGuardDevice
	if name == "" {
		name = DefaultWireGuardDevice(a.cfg.ClusterName, a.cfg.NodeName)
	}
	dev, err := wireguard.Open(wireguard.Config{
		Name: name, ListenPort: a.cfg.WireGuardPort, MTU: mtu, FirewallMark: encryptionMark,
		KeyFile: filepath.Join(a.cfg.StateDir, wireguardKeyFile), Logger: a.log,
	})
	if err != nil {
		return nil, err
	}
	h, err := netlink.NewHandle()
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("netlink handle for encryption routes: %w", err)
	}
	return &encryption{dev: dev, nodeEnc: a.cfg.NodeEncryption, nl: h,
		peersFile: filepath.Join(a.cfg.StateDir, wireguardPeersFile)}, nil
}

// setUpEncryption opens the WireGuard device when encryption is on, and
// removes the routing an encrypted earlier run left when it is off. It also
// settles an automatic pod MTU.
func (a *Agent) setUpEncryption() error {
	if !a.cfg.encrypted() {
		if a.cfg.MTU == 0 {
			a.cfg.MTU, _ = node.UnderlayMTU(a.underlayIPs())
		}
		if a.mesh == nil {
			return nil // standalone agents never route through a tunnel
		}
		if err := removeEncryptionRouting(); err != nil {
			a.log.Warn("cannot remove the encryption routing of an earlier run", "err", err)
		}
		return nil
	}
	enc, err := a.openEncryption()
	if err != nil {
		return fmt.Errorf("encryption: %w", err)
	}
	a.enc = enc
	if a.cfg.MTU == 0 {
		a.cfg.MTU = enc.dev.MTU()
	} else if a.cfg.MTU > enc.dev.MTU() {
		a.log.Warn("pod MTU is larger than the WireGuard device's: big packets to other nodes need path MTU discovery", "mtu", a.cfg.MTU, "wireguardMTU", enc.dev.MTU())
	}
	return nil
}

func (e *encryption) close() {
	if e == nil {
		return
	}
	// The fail-closed routes and the rule stay: until the next agent has
	// its device up, pod traffic to other nodes is dropped, not sent in
	// plaintext.
	e.dev.Close()
	e.nl.Close()
}

// underlayIPs are the node's underlay addresses: --node-ip, or else those
// the mesh would detect (the default route's interface's).
func (a *Agent) underlayIPs() []netip.Addr {
	if len(a.cfg.NodeIPs) > 0 {
		return a.cfg.NodeIPs
	}
	ips, _ := a.detectNodeIPs()
	return ips
}

// encryptionPlan is what the device and the routing should hold.
type encryptionPlan struct {
	peers       []wireguard.Peer
	peerNodes   map[string]string
	routes      []netip.Prefix // into the device
	unreachable []netip.Prefix // fail-closed fallback
	unencrypted []string
	refused     []string
}

// planEncryption derives the peers from the mesh's node records. A key
// claimed by two nodes (or by another node and this one) is refused for all
// of them: WireGuard routes by key, so a copied key would let one node take
// the other's traffic.
func planEncryption(m desired.Mesh, selfKey string, nodeEnc bool) encryptionPlan {
	p := encryptionPlan{peerNodes: map[string]string{}}
	claims := map[string][]string{}
	var others []records.Node
	for _, n := range m.View.Nodes {
		if n.Cluster == m.Cluster && n.Name == m.Node {
			continue
		}
		others = append(others, n)
		if n.WireGuardPublicKey != "" {
			claims[n.WireGuardPublicKey] = append(claims[n.WireGuardPublicKey], n.Cluster+"/"+n.Name)
		}
	}
	// The view's order is not stable (map iteration): sort, so the same
	// records give the same plan (and the same saved file).
	slices.SortFunc(others, func(a, b records.Node) int {
		return cmp.Or(cmp.Compare(a.Cluster, b.Cluster), cmp.Compare(a.Name, b.Name))
	})
	for _, n := range others {
		name := n.Cluster + "/" + n.Name
		for _, c := range n.PodCIDRs {
			p.unreachable = append(p.unreachable, c)
		}
		key := n.WireGuardPublicKey
		switch {
		case key == "":
			p.unencrypted = append(p.unencrypted, name)
			continue
		case key == selfKey:
			p.refused = append(p.refused, name+": publishes this node's own WireGuard public key")
			continue
		case len(claims[key]) > 1:
			p.refused = append(p.refused, name+": WireGuard public key also claimed by "+strings.Join(slices.DeleteFunc(slices.Clone(claims[key]), func(s string) bool { return s == name }), ", "))
			continue
		}
		nodePort := cmp.Or(n.WireGuardPort, wireguard.DefaultListenPort)
		ep, ok := wireguard.EndpointFor(m.NodeIPs, n.IPs, nodePort)
		if !ok {
			p.refused = append(p.refused, name+": no underlay address of a family this node has")
			continue
		}
		allowed := slices.Clone(n.PodCIDRs)
		if nodeEnc {
			for _, ip := range n.IPs {
				allowed = append(allowed, netip.PrefixFrom(ip, ip.BitLen()))
			}
		}
		p.peers = append(p.peers, wireguard.Peer{PublicKey: key, Endpoint: ep, AllowedIPs: allowed})
		p.peerNodes[key] = name
		p.routes = append(p.routes, allowed...)
	}
	return p
}

// syncEncryption brings the device's peers, the tunnel table and the rules
// to the mesh's node records; it returns how many things it changed. Until
// the mesh is listed (an agent restarted while etcd is unreachable) it
// applies the peers saved at the last sync instead.
func (a *Agent) syncEncryption(m desired.Mesh) (int, error) {
	e := a.enc
	if e == nil {
		return 0, nil
	}
	if !m.Ready {
		return a.restoreEncryption(m.PodCIDRs)
	}
	plan := planEncryption(m, e.dev.PublicKey(), e.nodeEnc)
	// Most reconciles change endpoints, not nodes: skip the device and
	// netlink round trips when the plan is the one applied last, but check
	// the kernel again every reconcile.ResyncInterval to catch drift.
	key := fmt.Sprint(plan.peers, plan.unreachable, plan.refused, plan.unencrypted, m.PodCIDRs)
	if key == e.applied && time.Since(e.appliedAt) < reconcile.ResyncInterval {
		return 0, nil
	}
	n, err := a.applyEncryption(plan, m.PodCIDRs)
	e.applied = ""
	if err == nil {
		e.applied, e.appliedAt = key, time.Now()
		e.savePlan(plan, a.log)
	}
	return n, err
}

// applyEncryption applies a peer plan to the device and the routing, and
// records what it refused for the status.
func (a *Agent) applyEncryption(plan encryptionPlan, local []netip.Prefix) (int, error) {
	e := a.enc
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
		a.log.Error("wireguard: refusing peers; traffic to their pods is dropped", "refused", plan.refused)
	}
	if newlyUnencrypted && len(plan.unencrypted) > 0 {
		a.log.Warn("wireguard: nodes without encryption in the mesh; traffic to their pods is dropped, not sent in plaintext", "nodes", plan.unencrypted)
	}
	return changes, err
}

// savedPlan is the peersFile format.
type savedPlan struct {
	Peers []savedPeer `json:"peers"`
	// Unreachable are the pod CIDRs that fail closed.
	Unreachable []netip.Prefix `json:"unreachable"`
}

type savedPeer struct {
	Node       string         `json:"node"`
	PublicKey  string         `json:"publicKey"`
	Endpoint   netip.AddrPort `json:"endpoint"`
	AllowedIPs []netip.Prefix `json:"allowedIPs"`
}

func (e *encryption) savePlan(plan encryptionPlan, log *slog.Logger) {
	sp := savedPlan{Unreachable: plan.unreachable}
	for _, p := range plan.peers {
		sp.Peers = append(sp.Peers, savedPeer{Node: plan.peerNodes[p.PublicKey], PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs})
	}
	data, err := json.MarshalIndent(sp, "", "  ")
	if err != nil || bytes.Equal(data, e.saved) {
		return
	}
	if err := atomicfile.Write(e.peersFile, data, 0o600); err != nil {
		log.Warn("wireguard: cannot save the peers for a restart without etcd", "err", err)
		return
	}
	e.saved = data
}

// restoreEncryption applies the saved plan once, until the mesh is listed:
// tunnels to the nodes known at the last sync. A missing or unreadable
// file leaves only the fail-closed routes of the earlier run.
func (a *Agent) restoreEncryption(local []netip.Prefix) (int, error) {
	e := a.enc
	if e.restored {
		return 0, nil
	}
	data, err := os.ReadFile(e.peersFile)
	if errors.Is(err, os.ErrNotExist) {
		e.restored = true
		return 0, nil
	}
	var sp savedPlan
	if err == nil {
		err = strictjson.Decode(data, &sp)
	}
	if err != nil {
		e.restored = true
		a.log.Warn("wireguard: ignoring the saved peers; tunnels come back when etcd is reachable", "file", e.peersFile, "err", err)
		return 0, nil
	}
	plan := encryptionPlan{peerNodes: map[string]string{}, unreachable: sp.Unreachable}
	for _, p := range sp.Peers {
		plan.peers = append(plan.peers, wireguard.Peer{PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs})
		plan.peerNodes[p.PublicKey] = p.Node
		plan.routes = append(plan.routes, p.AllowedIPs...)
	}
	n, err := a.applyEncryption(plan, local)
	if err == nil {
		e.restored, e.saved = true, data
		a.log.Info("wireguard: peers restored from the last sync until etcd is listed", "peers", len(plan.peers))
	}
	return n, err
}

// syncRouting converges the rules and the tunnel table.
func (e *encryption) syncRouting(plan encryptionPlan, local []netip.Prefix) (int, error) {
	link, err := e.nl.LinkByName(e.dev.Name())
	if err != nil {
		return 0, fmt.Errorf("wireguard device %s: %w", e.dev.Name(), err)
	}
	return syncTableAndRules(e, link, plan, local)
}

func syncTableAndRules(e *encryption, link netlink.Link, plan encryptionPlan, local []netip.Prefix) (int, error) {
	var want []netlink.Route
	seen := map[netip.Prefix]bool{}
	for _, p := range plan.routes {
		p = p.Masked()
		if seen[p] || slices.Contains(local, p) {
			continue
		}
		seen[p] = true
		// An explicit metric: IPv6 would turn 0 into 1024.
		want = append(want, netlink.Route{Dst: routes.IPNet(p), LinkIndex: link.Attrs().Index, Scope: netlink.SCOPE_LINK, Priority: deviceMetric,
			Table: EncryptionTable, Protocol: routes.Protocol, Type: unix.RTN_UNICAST})
	}
	for _, p := range plan.unreachable {
		p = p.Masked()
		if slices.Contains(local, p) {
			continue
		}
		want = append(want, netlink.Route{Dst: routes.IPNet(p), Priority: unreachableMetric, Scope: netlink.SCOPE_UNIVERSE,
			Table: EncryptionTable, Protocol: routes.Protocol, Type: unix.RTN_UNREACHABLE})
	}
	n, err := syncTable(e.nl, want)
	r, rerr := syncRules(e.nl, wantRules(local, e.nodeEnc))
	return n + r, errors.Join(err, rerr)
}

type routeKey struct {
	dst      netip.Prefix
	priority int
}

// syncTable makes the agent's routes in EncryptionTable equal to want.
func syncTable(h *netlink.Handle, want []netlink.Route) (int, error) {
	have, err := h.RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{Table: EncryptionTable, Protocol: routes.Protocol},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return 0, fmt.Errorf("list routes of table %d: %w", EncryptionTable, err)
	}
	cur := map[routeKey]netlink.Route{}
	for _, rt := range have {
		if p, ok := routes.Prefix(rt.Dst); ok {
			cur[routeKey{p, rt.Priority}] = rt
		}
	}
	changes := 0
	var errs []error
	keep := map[routeKey]bool{}
	for _, w := range want {
		p, _ := routes.Prefix(w.Dst)
		k := routeKey{p, w.Priority}
		keep[k] = true
		// The kernel puts IPv6 unreachable routes on lo: compare the link
		// of device routes only.
		if old, ok := cur[k]; ok && old.Type == w.Type && (w.Type != unix.RTN_UNICAST || old.LinkIndex == w.LinkIndex) {
			continue
		}
		if err := h.RouteReplace(&w); err != nil {
			errs = append(errs, fmt.Errorf("route %s (table %d): %w", p, EncryptionTable, err))
			continue
		}
		changes++
	}
	for k, rt := range cur {
		if keep[k] {
			continue
		}
		if err := h.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("remove route %s (table %d): %w", k.dst, EncryptionTable, err))
			continue
		}
		changes++
	}
	return changes, errors.Join(errs...)
}

// wantRules are the rules that lead to EncryptionTable.
func wantRules(local []netip.Prefix, nodeEnc bool) []*netlink.Rule {
	var out []*netlink.Rule
	if nodeEnc {
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			r := encryptionRule(family)
			mask := uint32(0xffffffff)
			r.Mark, r.Mask, r.Invert = encryptionMark, &mask, true
			out = append(out, r)
		}
		return out
	}
	for _, p := range local {
		family := netlink.FAMILY_V4
		if p.Addr().Is6() {
			family = netlink.FAMILY_V6
		}
		r := encryptionRule(family)
		r.Src = routes.IPNet(p)
		out = append(out, r)
	}
	return out
}

func encryptionRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family, r.Table, r.Priority = family, EncryptionTable, encryptionRulePriority
	return r
}

func ruleID(r netlink.Rule) string {
	src := ""
	if r.Src != nil {
		if p, ok := routes.Prefix(r.Src); ok {
			src = p.String()
		}
	}
	return fmt.Sprintf("%d from=%s mark=%#x invert=%v", r.Family, src, r.Mark, r.Invert)
}

// syncRules makes the rules at encryptionRulePriority that lead to
// EncryptionTable equal to want.
func syncRules(h *netlink.Handle, want []*netlink.Rule) (int, error) {
	var have []netlink.Rule
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.RuleListFiltered(family, &netlink.Rule{Table: EncryptionTable}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return 0, fmt.Errorf("list rules: %w", err)
		}
		for _, r := range rs {
			r.Family = family
			if r.Priority == encryptionRulePriority {
				have = append(have, r)
			}
		}
	}
	wantIDs := map[string]bool{}
	for _, r := range want {
		wantIDs[ruleID(*r)] = true
	}
	haveIDs := map[string]bool{}
	changes := 0
	var errs []error
	for _, r := range have {
		id := ruleID(r)
		if wantIDs[id] && !haveIDs[id] {
			haveIDs[id] = true
			continue
		}
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove rule %s: %w", id, err))
			continue
		}
		changes++
	}
	for _, r := range want {
		if haveIDs[ruleID(*r)] {
			continue
		}
		if err := h.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add rule %s: %w", ruleID(*r), err))
			continue
		}
		changes++
	}
	return changes, errors.Join(errs...)
}

// removeEncryptionRouting undoes what an earlier run with encryption left
// (rules and the tunnel table), for an agent started without encryption.
func removeEncryptionRouting() error {
	h, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	_, err = syncTable(h, nil)
	_, rerr := syncRules(h, nil)
	return errors.Join(err, rerr)
}

// wireguardPublication is what the node record says about encryption.
func (a *Agent) wireguardPublication() (key string, port int) {
	if a.enc == nil {
		return "", 0
	}
	return a.enc.dev.PublicKey(), a.enc.dev.ListenPort()
}

// RotateWireGuardKey implements api.Backend: a new key, applied to the
// device, written to the key file and published. Peers switch to it when
// the node record reaches them; flows pause for about one handshake.
func (a *Agent) RotateWireGuardKey(ctx context.Context) (api.WireGuardStatus, error) {
	if a.enc == nil {
		return api.WireGuardStatus{}, api.Errorf(http.StatusConflict, "encryption is off on this node (start the agent with --encryption=wireguard)")
	}
	a.mu.Lock()
	_, err := a.enc.dev.Rotate()
	if err == nil {
		a.publishLocked()
	}
	a.mu.Unlock()
	if err != nil {
		return api.WireGuardStatus{}, err
	}
	a.rec.Request()
	return *a.wireguardStatus(), nil
}

// wireguardStatus is the "wireguard" section of the status; nil when
// encryption is off.
func (a *Agent) wireguardStatus() *api.WireGuardStatus {
	e := a.enc
	if e == nil {
		return nil
	}
	st := &api.WireGuardStatus{Device: e.dev.Name(), Mode: e.dev.Mode(), PublicKey: e.dev.PublicKey(),
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
