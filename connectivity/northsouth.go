package connectivity

import (
	"net/netip"
)

// OutsideClient is a host outside the mesh that reaches a cluster's
// service through its load-balancer or external addresses (the lab's
// outside clients of `lab up --bgp` and `--l2`).
type OutsideClient struct {
	Name    string
	Cluster string // the cluster whose addresses it dials
	Netns   string // path of its network namespace
	// Addrs are the service's addresses from outside in that cluster.
	Addrs []netip.AddrPort
	// Via says how the client's network finds the addresses ("BGP", "L2").
	Via string
}

// northSouth: every outside client sends requests to each of its
// cluster's external service addresses until backends of every cluster
// with echo pods have answered (the service is global: the node that
// takes the traffic balances it over the whole mesh).
func (k *checker) northSouth() {
	const check = "north-south (outside to service address)"
	if len(k.t.Outside) == 0 {
		return // the target has no outside client: nothing to say
	}
	want := map[string]bool{}
	for _, p := range k.t.Pods {
		if p.Role == RoleEcho {
			want[p.Cluster] = true
		}
	}
	for _, c := range k.t.Outside {
		if len(c.Addrs) == 0 {
			k.add(Result{Check: check, From: c.Name, Result: Fail, Detail: "the service has no address from outside in " + c.Cluster})
			continue
		}
		for _, a := range c.Addrs {
			r := k.spread(check, c.Name, c.Netns, a, want)
			if c.Via != "" {
				r.Detail += " (" + c.Via + ")"
			}
			k.add(r)
		}
	}
}
