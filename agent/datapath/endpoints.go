package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// syncEndpoints makes the endpoints map hold every local endpoint's
// addresses with its enforcement flags. clean reports that every write
// went through, so policy entries no endpoint needs may go.
func (r *Reconciler) syncEndpoints(s desired.State, compiled policy.Result, res *Result) (clean bool, err error) {
	want := map[netip.Addr]bpf.EndpointInfo{}
	for _, ep := range s.Endpoints {
		hostMAC, err1 := net.ParseMAC(ep.HostMAC)
		podMAC, err2 := net.ParseMAC(ep.PodMAC)
		if err := errors.Join(err1, err2); err != nil {
			res.Errs = append(res.Errs, fmt.Errorf("endpoint %s: bad MAC in state: %w", ep.Key(), err))
			continue
		}
		for _, ip := range ep.IPs {
			want[ip] = bpf.EndpointInfo{
				ID: ep.ID, IfIndex: uint32(ep.IfIndex), Identity: ep.Identity,
				PodMAC: podMAC, HostMAC: hostMAC,
				PolicyIngress: compiled.Ingress[ep.ID], PolicyEgress: compiled.Egress[ep.ID],
			}
		}
	}
	if w := s.Workload; w != nil {
		// The host of an external workload, enforced on its WireGuard
		// device (from_host, to_host) like a pod on its veth; the device
		// is L3: no MACs.
		for _, ip := range w.IPs {
			want[ip] = bpf.EndpointInfo{ID: w.ID, IfIndex: uint32(w.IfIndex), Identity: w.Identity,
				PolicyIngress: compiled.Ingress[w.ID], PolicyEgress: compiled.Egress[w.ID]}
		}
	}
	if r.epShadow == nil {
		have, err := r.dp.EndpointList()
		if err != nil {
			return false, err
		}
		r.epShadow = have
	}
	have := r.epShadow
	before := len(res.Errs)
	for ip, e := range want {
		if h, ok := have[ip]; !ok || !sameEndpointInfo(h, e) {
			err := r.dp.EndpointUpsert(ip, e)
			res.note(&res.Endpoints, err)
			if err == nil {
				have[ip] = e
			}
		}
	}
	for ip := range have {
		if _, ok := want[ip]; !ok {
			err := r.dp.EndpointDelete(ip)
			res.note(&res.Endpoints, err)
			if err == nil {
				delete(have, ip)
			}
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
