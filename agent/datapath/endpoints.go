package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// epEntries is what one endpoint (or the external workload) makes of the
// endpoints map and of the policy map. The reconciler keeps them per
// endpoint, so that a run in which only some endpoints changed derives
// and writes theirs alone.
type epEntries struct {
	infos []epInfo
	keys  []bpf.PolicyKey // sorted, no repeats
}

// epInfo is one address's entry in the endpoints map.
type epInfo struct {
	ip   netip.Addr
	info bpf.EndpointInfo
}

// workloadKey keys the external workload's entries among the endpoints'
// (no endpoint key is empty).
const workloadKey = ""

// newCompiler prepares the policies of s for one endpoint at a time.
func newCompiler(s desired.State) *policy.Compiler {
	c := policy.NewCompiler(s.Policies, s.Identities.List(), s.Cluster)
	c.HostIngress = s.AllowLocalHostIngress
	return c
}

// endpointEntries derives what ep makes of the maps. A bad MAC in its
// state leaves it out of the endpoints map, with an error.
func endpointEntries(c *policy.Compiler, cluster string, ep state.Endpoint) (epEntries, error) {
	var out epEntries
	var in, eg bool
	out.keys, in, eg = c.Endpoint(policy.Endpoint{ID: ep.ID, Namespace: ep.Namespace, Identity: ep.Identity, Labels: desired.IdentityLabels(cluster, ep.Namespace, ep.Labels)})
	hostMAC, err1 := net.ParseMAC(ep.HostMAC)
	podMAC, err2 := net.ParseMAC(ep.PodMAC)
	if err := errors.Join(err1, err2); err != nil {
		return out, fmt.Errorf("endpoint %s: bad MAC in state: %w", ep.Key(), err)
	}
	for _, ip := range ep.IPs {
		out.infos = append(out.infos, epInfo{ip, bpf.EndpointInfo{
			ID: ep.ID, IfIndex: uint32(ep.IfIndex), Identity: ep.Identity,
			PodMAC: podMAC, HostMAC: hostMAC, PolicyIngress: in, PolicyEgress: eg,
		}})
	}
	return out, nil
}

// workloadEntries derives what an external workload's host makes of the
// maps: enforced on its WireGuard device (from_host, to_host) like a pod
// on its veth; the device is L3: no MACs.
func workloadEntries(c *policy.Compiler, cluster string, w *state.Endpoint) epEntries {
	var out epEntries
	var in, eg bool
	out.keys, in, eg = c.Endpoint(policy.Endpoint{ID: w.ID, Namespace: w.Namespace, Identity: w.Identity, Labels: desired.IdentityLabels(cluster, w.Namespace, w.Labels)})
	for _, ip := range w.IPs {
		out.infos = append(out.infos, epInfo{ip, bpf.EndpointInfo{ID: w.ID, IfIndex: uint32(w.IfIndex), Identity: w.Identity,
			PolicyIngress: in, PolicyEgress: eg}})
	}
	return out
}

// syncEndpoints makes the entries of the endpoints map at the addresses
// of consider, or at every address (in want or in the map) with all,
// equal to want. clean reports that every write went through, so policy
// entries no endpoint needs may go.
func (r *Reconciler) syncEndpoints(want map[netip.Addr]bpf.EndpointInfo, consider []netip.Addr, all bool, res *Result) (clean bool, err error) {
	if r.epShadow == nil {
		have, err := r.dp.EndpointList()
		if err != nil {
			return false, err
		}
		r.epShadow = have
	}
	have := r.epShadow
	before := len(res.Errs)
	write := func(ip netip.Addr) {
		e, ok := want[ip]
		h, had := have[ip]
		switch {
		case ok && (!had || !sameEndpointInfo(h, e)):
			err := r.dp.EndpointUpsert(ip, e)
			res.note(&res.Endpoints, err)
			if err == nil {
				have[ip] = e
			}
		case !ok && had:
			err := r.dp.EndpointDelete(ip)
			res.note(&res.Endpoints, err)
			if err == nil {
				delete(have, ip)
			}
		}
	}
	if all {
		// Additions and changes first, then what goes.
		for ip := range want {
			write(ip)
		}
		for ip := range have {
			if _, ok := want[ip]; !ok {
				write(ip)
			}
		}
	} else {
		for _, ip := range consider {
			write(ip)
		}
	}
	clean = len(res.Errs) == before
	if !clean {
		r.epShadow = nil // list again next time
	}
	return clean, nil
}

func sameEndpointInfo(a, b bpf.EndpointInfo) bool {
	return a.ID == b.ID && a.IfIndex == b.IfIndex && a.Identity == b.Identity &&
		a.PolicyIngress == b.PolicyIngress && a.PolicyEgress == b.PolicyEgress &&
		bytes.Equal(a.PodMAC, b.PodMAC) && bytes.Equal(a.HostMAC, b.HostMAC)
}
