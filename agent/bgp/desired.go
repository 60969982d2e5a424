// Package bgp is the agent's BGP reconciler: it derives the speaker's
// configuration (package bgp at the top of the module) from desired state
// (the BGPPeeringPolicy that selects this node, its pod CIDRs, the
// services the policy's advertisements select, the local endpoints for
// externalTrafficPolicy Local) and converges the speaker to it. It also
// serves the status, the CLI's `isthmus bgp` and the metrics.
package bgp

import (
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/state"
	speaker "github.com/isthmus-mesh/isthmus/bgp"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// Input is what the speaker's configuration is derived from.
type Input struct {
	Objects    desired.Objects
	Endpoints  []state.Endpoint // this node's: the ready local backends
	NodeLabels map[string]string
	PodCIDRs   []netip.Prefix
	// NodeIPs give the default router ID (the first IPv4 one).
	NodeIPs []netip.Addr
	// ChangedSince, when not nil, returns the keys (objects.Key) of the
	// objects changed since the objects of generation gen (ok false: not
	// known). Derive ignores it.
	ChangedSince func(gen uint64) (keys []string, ok bool)
}

// Plan is the derived configuration and how it was chosen.
type Plan struct {
	Config  speaker.Config
	Policy  string   // the policy in use, "" for none
	Ignored []string // other policies selecting the node
	// Sources say, per prefix, why it is announced.
	Sources map[netip.Prefix][]string
	// Err says why the policy cannot be used (no router ID).
	Err string
}

// Derive computes the speaker's configuration. One policy per node: when
// several select it, the first by name is used and the others are
// reported as ignored.
func Derive(in Input) Plan { return derive(in) }

// announce is one prefix a service announces, for advertisement ad (an
// index into the policy's advertisements), with its source (Plan.Sources),
// a one-element slice shared by the plans that use it.
type announce struct {
	pfx    netip.Prefix
	ad     int
	source []string
}

func derive(in Input) Plan {
	plan, pol, comms := base(in, selected(in.Objects, in.NodeLabels))
	if pol == nil || plan.Err != "" {
		return plan
	}
	ads := pol.Spec.Advertisements
	// One slice of paths (not one allocation per prefix), indexed by
	// prefix.
	var paths []speaker.Path
	idx := map[netip.Prefix]int{}
	add := func(pfx netip.Prefix, i int, source []string) {
		j, ok := idx[pfx]
		if !ok {
			j = len(paths)
			idx[pfx] = j
			paths = append(paths, speaker.Path{Prefix: pfx})
		}
		p := &paths[j]
		// Several advertisements of one prefix: the union of their
		// communities and the highest local preference.
		for _, v := range comms[i].std {
			if !slices.Contains(p.Communities, v) {
				p.Communities = append(p.Communities, v)
			}
		}
		for _, v := range comms[i].large {
			if !slices.Contains(p.Large, v) {
				p.Large = append(p.Large, v)
			}
		}
		if lp := ads[i].LocalPreference; lp != nil && *lp > p.LocalPref {
			p.LocalPref = *lp
		}
		switch have := plan.Sources[pfx]; {
		case len(have) == 0:
			plan.Sources[pfx] = source // shared, and never appended to in place: cap 1
		case !slices.Contains(have, source[0]):
			plan.Sources[pfx] = append(slices.Clip(have), source[0])
		}
	}
	for i, ad := range ads {
		if ad.Type == objects.AdvertisePodCIDR {
			for _, c := range in.PodCIDRs {
				add(c.Masked(), i, []string{"pod-cidr"})
			}
		}
	}
	var local *localBackends
	serves := func(s *objects.Service) bool {
		if local == nil {
			local = newLocalBackends(in.Endpoints)
		}
		return local.serves(s)
	}
	for _, o := range in.Objects {
		if s, ok := o.(*objects.Service); ok {
			for _, a := range announces(s, ads, serves) {
				add(a.pfx, a.ad, a.source)
			}
		}
	}
	slices.SortFunc(paths, func(a, b speaker.Path) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c
		}
		return a.Prefix.Bits() - b.Prefix.Bits()
	})
	for i := range paths {
		slices.Sort(paths[i].Communities)
		slices.SortFunc(paths[i].Large, func(a, b [3]uint32) int { return slices.Compare(a[:], b[:]) })
	}
	plan.Config.Paths = paths
	return plan
}

// selected are the policies that select a node with labels nodeLabels.
func selected(objs desired.Objects, nodeLabels map[string]string) []*objects.BGPPeeringPolicy {
	var sel []*objects.BGPPeeringPolicy
	for _, o := range objs {
		if p, ok := o.(*objects.BGPPeeringPolicy); ok && p.Spec.NodeSelector.Matches(nodeLabels) {
			sel = append(sel, p)
		}
	}
	return sel
}

// parsed are the communities of one advertisement, parsed.
type parsed struct {
	std   []uint32
	large [][3]uint32
}

// base is the plan of the policies sel without paths: the policy in use
// (nil for none), the others ignored, the speaker's identity and peers,
// and the communities of each of its advertisements.
func base(in Input, sel []*objects.BGPPeeringPolicy) (Plan, *objects.BGPPeeringPolicy, []parsed) {
	if len(sel) == 0 {
		return Plan{}, nil, nil
	}
	slices.SortFunc(sel, func(a, b *objects.BGPPeeringPolicy) int { return strings.Compare(a.Metadata.Name, b.Metadata.Name) })
	pol := sel[0]
	plan := Plan{Policy: pol.Metadata.Name, Sources: map[netip.Prefix][]string{}}
	for _, p := range sel[1:] {
		plan.Ignored = append(plan.Ignored, p.Metadata.Name)
	}
	c := speaker.Config{ASN: pol.Spec.LocalASN}
	if pol.Spec.RouterID != "" {
		c.RouterID, _ = netip.ParseAddr(pol.Spec.RouterID) // validated
	} else {
		for _, a := range in.NodeIPs {
			if a.Is4() && !a.IsLoopback() {
				c.RouterID = a
				break
			}
		}
	}
	if !c.RouterID.IsValid() {
		plan.Err = fmt.Sprintf("policy %s: no routerID and the node has no IPv4 address to default to", pol.Metadata.Name)
		return plan, pol, nil
	}
	for _, n := range pol.Spec.Neighbors {
		c.Peers = append(c.Peers, peer(n))
	}
	ads := pol.Spec.Advertisements
	comms := make([]parsed, len(ads))
	for i, ad := range ads {
		for _, s := range ad.Communities {
			std, large, err := objects.ParseCommunity(s)
			switch {
			case err != nil:
			case std != nil:
				comms[i].std = append(comms[i].std, *std)
			case large != nil:
				comms[i].large = append(comms[i].large, *large)
			}
		}
	}
	plan.Config = c
	return plan, pol, comms
}

// announces is what service s announces under the advertisements ads;
// serves tells whether a ready local backend exists (for
// externalTrafficPolicy Local).
func announces(s *objects.Service, ads []objects.BGPAdvertisement, serves func(*objects.Service) bool) (as []announce) {
	var ext map[netip.Addr]bool
	for i, ad := range ads {
		if ad.Type == objects.AdvertisePodCIDR || !ad.Selector.Matches(serviceLabels(s)) {
			continue
		}
		if s.Spec.ExternalTraffic() == objects.TrafficPolicyLocal && !serves(s) {
			continue // only nodes with a ready local backend attract its traffic
		}
		if ext == nil {
			ext = map[netip.Addr]bool{}
			for _, v := range s.Spec.ExternalIPs {
				if a, err := netip.ParseAddr(v); err == nil {
					ext[a] = true
				}
			}
		}
		source := []string{ad.Type + " " + s.Metadata.Namespace + "/" + s.Metadata.Name}
		for _, a := range s.ExternalAddrs() {
			if ext[a] != (ad.Type == objects.AdvertiseExternalIP) {
				continue // an address of the other type
			}
			as = append(as, announce{pfx: netip.PrefixFrom(a, a.BitLen()), ad: i, source: source})
		}
	}
	return as
}

// serviceLabels are what an advertisement's selector sees: the service's
// labels and its namespace.
func serviceLabels(s *objects.Service) map[string]string {
	l := make(map[string]string, len(s.Metadata.Labels)+1)
	maps.Copy(l, s.Metadata.Labels)
	l[identity.LabelNamespace] = s.Metadata.Namespace
	return l
}

// peer reads the neighbour's password file: a file that cannot be read
// keeps the peer down with the reason (a session without the password
// would be refused anyway).
func peer(n objects.BGPNeighbor) speaker.Peer {
	a, _ := netip.ParseAddr(n.Address) // validated
	p := speaker.Peer{Address: a, ASN: n.PeerASN, Port: n.Port, MultihopTTL: n.EBGPMultihopTTL,
		GracefulRestart: n.GracefulRestart.Enabled, RestartTime: time.Duration(n.GracefulRestart.RestartTimeSeconds) * time.Second}
	sec := func(v *uint16, def uint16) time.Duration {
		if v == nil {
			return time.Duration(def) * time.Second
		}
		return time.Duration(*v) * time.Second
	}
	p.HoldTime = sec(n.Timers.HoldTimeSeconds, objects.DefaultBGPHoldTime)
	p.Keepalive = sec(n.Timers.KeepaliveTimeSeconds, objects.DefaultBGPHoldTime/3)
	p.ConnectRetry = sec(n.Timers.ConnectRetryTimeSeconds, objects.DefaultBGPConnectRetryTime)
	if n.PasswordFile != "" {
		b, err := os.ReadFile(n.PasswordFile)
		switch pw := strings.TrimSpace(string(b)); {
		case err != nil:
			p.PasswordError = fmt.Sprintf("password file: %v", err)
		case pw == "":
			p.PasswordError = fmt.Sprintf("password file %s is empty", n.PasswordFile)
		case len(pw) > 80:
			p.PasswordError = fmt.Sprintf("password file %s: the password is longer than TCP MD5's 80 bytes", n.PasswordFile)
		default:
			p.Password = pw
		}
	}
	return p
}

// localBackends are the node's endpoints, by namespace and by address.
type localBackends struct {
	byNS map[string][]state.Endpoint
	ips  map[netip.Addr]bool
}

func newLocalBackends(eps []state.Endpoint) *localBackends {
	l := &localBackends{byNS: map[string][]state.Endpoint{}, ips: map[netip.Addr]bool{}}
	for _, e := range eps {
		l.byNS[e.Namespace] = append(l.byNS[e.Namespace], e)
		for _, a := range e.IPs {
			l.ips[a] = true
		}
	}
	return l
}

// serves reports whether the service has a ready backend on this node: a
// local endpoint its selector picks, or an explicit backend that is a
// local endpoint's address. Endpoints in the store are plumbed, so ready.
func (l *localBackends) serves(s *objects.Service) bool {
	for _, b := range s.Spec.Backends {
		if a, err := netip.ParseAddr(b.IP); err == nil && l.ips[a] {
			return true
		}
	}
	if len(s.Spec.Selector) == 0 {
		return false
	}
	for _, e := range l.byNS[s.Metadata.Namespace] {
		match := true
		for k, v := range s.Spec.Selector {
			if e.Labels[k] != v {
				match = false
				break
			}
		}
		if match {
			return true
		}
	}
	return false
}
