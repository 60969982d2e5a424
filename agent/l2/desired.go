package l2

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	gl2 "github.com/isthmus-mesh/isthmus/gateway/l2"
)

// Input is what the agent's reconcile gives the announcements: the
// applied policies and services, and which services have a ready backend
// on this node.
type Input struct {
	Policies []objects.L2AnnouncementPolicy
	Services []objects.Service
	// HasLocalBackend reports whether svc has a ready backend on this
	// node (only asked for externalTrafficPolicy Local services).
	HasLocalBackend func(svc objects.Service) bool
}

// plan is Input worked out against this node: the addresses to announce,
// this node's own eligibility, the interfaces it would answer on per
// policy, and the per-policy status.
type plan struct {
	addrs    []Address
	self     Member
	ifaces   map[string][]string // policy key -> usable interfaces with carrier
	policies []api.L2PolicyStatus
}

// makePlan works out in against the node's labels and links.
func makePlan(in Input, node string, labels map[string]string, links []gl2.Link) plan {
	p := plan{self: Member{Node: node}, ifaces: map[string][]string{}}
	claimed := map[netip.Addr]bool{}
	local := map[string]bool{}
	for _, pol := range in.Policies {
		key := objects.Key(&pol)
		st := api.L2PolicyStatus{Name: key, Selected: pol.Spec.NodeSelector.Matches(labels)}
		match, err := pol.Spec.InterfaceMatcher()
		if err != nil {
			st.Problem = fmt.Sprintf("interface pattern: %v", err)
			p.policies = append(p.policies, st)
			continue
		}
		var matched, unusable []string
		for _, l := range links {
			if !match(l.Name) {
				continue
			}
			matched = append(matched, l.Name)
			switch {
			case l.Unusable != "":
				unusable = append(unusable, l.Name+": "+l.Unusable)
			case l.Carrier:
				st.Interfaces = append(st.Interfaces, l.Name)
			}
		}
		for _, svc := range in.Services {
			if !pol.Spec.SelectsService(svc) {
				continue
			}
			st.Services++
			ext := map[string]bool{}
			for _, e := range svc.Spec.ExternalIPs {
				ext[e] = true
			}
			for _, a := range svc.ExternalAddrs() {
				isExt := ext[a.String()]
				if (isExt && !pol.Spec.CoversExternalIPs()) || (!isExt && !pol.Spec.CoversLoadBalancerIPs()) || claimed[a] {
					continue // another policy (earlier by key) or service has it
				}
				claimed[a] = true
				st.Addresses++
				sk := objects.Key(&svc)
				addr := Address{Addr: a, Policy: key, Service: sk, Local: svc.Spec.ExternalTraffic() == objects.TrafficPolicyLocal}
				p.addrs = append(p.addrs, addr)
				if addr.Local && in.HasLocalBackend != nil && in.HasLocalBackend(svc) {
					local[sk] = true
				}
			}
		}
		switch {
		case st.Services == 0:
			st.Problem = "the service selector matches no service"
		case !st.Selected:
			// Not a problem: other nodes answer.
		case len(matched) == 0:
			st.Problem = "no interface of this node matches the interface pattern"
		case len(matched) == len(unusable):
			st.Problem = fmt.Sprintf("no matching interface may answer: %v", unusable)
		case len(st.Interfaces) == 0:
			st.Problem = "no matching interface has carrier"
		}
		if st.Selected && len(st.Interfaces) > 0 {
			p.self.Policies = append(p.self.Policies, key)
			p.ifaces[key] = st.Interfaces
		}
		p.policies = append(p.policies, st)
	}
	slices.Sort(p.self.Policies)
	p.self.Local = slices.Sorted(maps.Keys(local))
	return p
}
