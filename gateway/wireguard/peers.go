package wireguard

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Peer is one remote WireGuard device the local one should talk to.
type Peer struct {
	// PublicKey in base64, as records.Node carries it.
	PublicKey string
	// Endpoint is where to send to; the zero value leaves it unset (or as
	// the peer last roamed to) and waits for the peer to call in.
	Endpoint netip.AddrPort
	// AllowedIPs are the inner addresses routed to and accepted from the
	// peer; host bits are ignored.
	AllowedIPs []netip.Prefix
	// PersistentKeepalive, whole seconds; 0 turns it off.
	PersistentKeepalive time.Duration
}

// PeerProblem is why SyncPeers refused one entry of its list.
type PeerProblem struct {
	PublicKey string
	Reason    string
}

// InvalidPeersError is SyncPeers refusing a list; nothing was applied. The
// caller can drop the named keys and sync again.
type InvalidPeersError struct {
	Problems []PeerProblem
}

func (e *InvalidPeersError) Error() string {
	var b strings.Builder
	b.WriteString("wireguard: refusing peer list:")
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteString(";")
		}
		fmt.Fprintf(&b, " peer %q: %s", p.PublicKey, p.Reason)
	}
	return b.String()
}

// Keys lists the public keys with a problem, once each.
func (e *InvalidPeersError) Keys() []string {
	var keys []string
	for _, p := range e.Problems {
		if !slices.Contains(keys, p.PublicKey) {
			keys = append(keys, p.PublicKey)
		}
	}
	return keys
}

// SyncPeers makes the device's peer set equal to want: it adds missing
// peers, removes peers not in want, and changes only the fields that differ
// on the others (AllowedIPs are replaced as a whole). Unchanged peers are not
// touched, so their sessions and counters carry on. A list with an invalid
// or duplicate key, an invalid address, or a prefix given to two peers is
// refused whole with an *InvalidPeersError.
//
// Keep every endpoint of one device in one address family (EndpointFor
// does): the embedded engine of this wireguard-go version corrupts the
// destination of some IPv6 datagrams sent after IPv4 ones, so a mixed list
// works but loses packets. SyncPeers logs a warning when it sees one.
func (d *Device) SyncPeers(want []Peer) error {
	d.mu.Lock()
	self := d.key.PublicKey()
	d.mu.Unlock()
	parsed, err := validatePeers(want, self)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errClosed
	}
	dev, err := d.device()
	if err != nil {
		return err
	}
	if d.mode == ModeUserspace && mixedFamilies(parsed) {
		d.log.Warn("WireGuard peers use both IPv4 and IPv6 endpoints; the embedded engine may send some datagrams to a corrupted IPv6 address after an IPv4 one (wireguard-go StdNetBind.Send, upstream PR #135), costing retransmits. Pick endpoints with EndpointFor.")
	}
	changes := planPeers(dev.Peers, parsed)
	if len(changes) == 0 {
		return nil
	}
	if err := d.wg.ConfigureDevice(d.name, wgtypes.Config{Peers: changes}); err != nil {
		return fmt.Errorf("wireguard %s: apply %d peer changes: %w", d.name, len(changes), err)
	}
	var added, updated, removed int
	for _, c := range changes {
		switch {
		case c.Remove:
			removed++
		case c.UpdateOnly:
			updated++
		default:
			added++
		}
	}
	d.log.Info("WireGuard peers synced", "added", added, "updated", updated, "removed", removed, "peers", len(parsed))
	return nil
}

// EndpointFor picks where to reach a peer: its first IPv4 address when both
// nodes have IPv4 underlay addresses, else its first IPv6 one when both have
// IPv6 (link-local addresses are skipped: they need a zone). Every node
// applying the same rule keeps each device on one address family, which the
// embedded engine needs (see SyncPeers) and which makes peers send from the
// address the other side expects, so WireGuard's roaming changes nothing.
func EndpointFor(local, remote []netip.Addr, port int) (netip.AddrPort, bool) {
	has := func(addrs []netip.Addr, v4 bool) (netip.Addr, bool) {
		for _, a := range addrs {
			a = a.Unmap()
			if a.IsValid() && a.Is4() == v4 && !a.IsLinkLocalUnicast() && !a.IsUnspecified() {
				return a, true
			}
		}
		return netip.Addr{}, false
	}
	if port <= 0 || port > 65535 {
		return netip.AddrPort{}, false
	}
	for _, v4 := range []bool{true, false} {
		_, l := has(local, v4)
		r, ok := has(remote, v4)
		if l && ok {
			return netip.AddrPortFrom(r, uint16(port)), true
		}
	}
	return netip.AddrPort{}, false
}

func mixedFamilies(peers []wantPeer) bool {
	var v4, v6 bool
	for _, p := range peers {
		if p.endpoint.IsValid() {
			v4 = v4 || p.endpoint.Addr().Is4()
			v6 = v6 || p.endpoint.Addr().Is6()
		}
	}
	return v4 && v6
}

// wantPeer is a validated Peer in wgctrl's terms, normalized for comparison.
type wantPeer struct {
	key       wgtypes.Key
	endpoint  netip.AddrPort // unmapped; zero if unset
	allowed   []netip.Prefix // masked, sorted, deduplicated
	keepalive time.Duration
}

func validatePeers(peers []Peer, self wgtypes.Key) ([]wantPeer, error) {
	var problems []PeerProblem
	bad := func(key, format string, args ...any) {
		problems = append(problems, PeerProblem{PublicKey: key, Reason: fmt.Sprintf(format, args...)})
	}
	// Count by decoded key: two spellings of one key are still one peer.
	count := map[wgtypes.Key]int{}
	for _, p := range peers {
		if k, err := wgtypes.ParseKey(p.PublicKey); err == nil {
			count[k]++
		}
	}
	owner := map[netip.Prefix]string{}
	out := make([]wantPeer, 0, len(peers))
	reported := map[wgtypes.Key]bool{}
	for _, p := range peers {
		k, err := wgtypes.ParseKey(p.PublicKey)
		switch {
		case err != nil || k == (wgtypes.Key{}):
			bad(p.PublicKey, "invalid public key (want base64 of 32 non-zero bytes)")
			continue
		case count[k] > 1:
			if !reported[k] {
				reported[k] = true
				bad(p.PublicKey, "listed %d times (duplicate public key)", count[k])
			}
			continue
		case k == self:
			bad(p.PublicKey, "is this device's own public key")
			continue
		}
		w := wantPeer{key: k}
		if p.Endpoint.IsValid() {
			if p.Endpoint.Port() == 0 {
				bad(p.PublicKey, "endpoint %s has no port", p.Endpoint)
				continue
			}
			w.endpoint = netip.AddrPortFrom(p.Endpoint.Addr().Unmap(), p.Endpoint.Port())
		} else if p.Endpoint.Addr().IsValid() {
			bad(p.PublicKey, "endpoint %s is invalid", p.Endpoint)
			continue
		}
		if p.PersistentKeepalive < 0 || p.PersistentKeepalive > 65535*time.Second {
			bad(p.PublicKey, "persistent keepalive %v out of range [0, 65535s]", p.PersistentKeepalive)
			continue
		}
		w.keepalive = p.PersistentKeepalive.Truncate(time.Second)
		ok := true
		for _, pfx := range p.AllowedIPs {
			if !pfx.IsValid() {
				bad(p.PublicKey, "invalid allowed IP %v", pfx)
				ok = false
				continue
			}
			pfx = pfx.Masked()
			if o, taken := owner[pfx]; taken && o != p.PublicKey {
				// WireGuard gives a prefix to one peer only: the peer
				// configured last would take it, and every later sync
				// would hand it back and forth.
				bad(p.PublicKey, "allowed IP %s is also given to peer %q", pfx, o)
				ok = false
				continue
			}
			owner[pfx] = p.PublicKey
			w.allowed = append(w.allowed, pfx)
		}
		if !ok {
			continue
		}
		w.allowed = normalizePrefixes(w.allowed)
		out = append(out, w)
	}
	if len(problems) > 0 {
		return nil, &InvalidPeersError{Problems: problems}
	}
	return out, nil
}

// planPeers computes the wgctrl changes that turn have into want.
func planPeers(have []wgtypes.Peer, want []wantPeer) []wgtypes.PeerConfig {
	current := make(map[wgtypes.Key]*wgtypes.Peer, len(have))
	for i := range have {
		current[have[i].PublicKey] = &have[i]
	}
	var changes []wgtypes.PeerConfig
	wanted := make(map[wgtypes.Key]bool, len(want))
	for _, w := range want {
		wanted[w.key] = true
		cur, exists := current[w.key]
		if !exists {
			c := wgtypes.PeerConfig{
				PublicKey:         w.key,
				ReplaceAllowedIPs: true,
				AllowedIPs:        ipNets(w.allowed),
			}
			if w.endpoint.IsValid() {
				c.Endpoint = net.UDPAddrFromAddrPort(w.endpoint)
			}
			if w.keepalive != 0 {
				ka := w.keepalive
				c.PersistentKeepaliveInterval = &ka
			}
			changes = append(changes, c)
			continue
		}
		c := wgtypes.PeerConfig{PublicKey: w.key, UpdateOnly: true}
		changed := false
		// An unset endpoint keeps whatever the peer roamed to.
		if w.endpoint.IsValid() && endpointOf(*cur) != w.endpoint {
			c.Endpoint = net.UDPAddrFromAddrPort(w.endpoint)
			changed = true
		}
		if cur.PersistentKeepaliveInterval != w.keepalive {
			ka := w.keepalive
			c.PersistentKeepaliveInterval = &ka
			changed = true
		}
		if !slices.Equal(normalizePrefixes(prefixesOf(cur.AllowedIPs)), w.allowed) {
			c.ReplaceAllowedIPs = true
			c.AllowedIPs = ipNets(w.allowed)
			changed = true
		}
		if changed {
			changes = append(changes, c)
		}
	}
	for _, p := range have {
		if !wanted[p.PublicKey] {
			changes = append(changes, wgtypes.PeerConfig{PublicKey: p.PublicKey, Remove: true})
		}
	}
	return changes
}

func endpointOf(p wgtypes.Peer) netip.AddrPort {
	if p.Endpoint == nil {
		return netip.AddrPort{}
	}
	ap := p.Endpoint.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func prefixesOf(nets []net.IPNet) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(nets))
	for _, n := range nets {
		a, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ones, _ := n.Mask.Size()
		a = a.Unmap()
		if a.Is4() && ones > 32 {
			ones -= 96
		}
		out = append(out, netip.PrefixFrom(a, ones))
	}
	return out
}

func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, 0, len(ps))
	for _, p := range ps {
		out = append(out, net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())})
	}
	return out
}

func normalizePrefixes(ps []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Bits(), b.Bits())
	})
	return slices.Compact(out)
}

// MTUFor is the device MTU for an underlay MTU: WireGuard adds an outer IP
// header (20 bytes for IPv4, 40 for IPv6), UDP (8) and its own 32 bytes
// (header 16, authentication tag 16), so 60 for an IPv4 underlay and 80 for
// IPv6. WireGuard pads the plaintext to 16 bytes but never past the device
// MTU, so padding needs no room. Returns 0 if the underlay cannot carry
// anything.
func MTUFor(underlay int, ipv6Underlay bool) int {
	overhead := 60
	if ipv6Underlay {
		overhead = 80
	}
	if underlay <= overhead {
		return 0
	}
	return underlay - overhead
}
