package datapath

import (
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// syncExternal writes isth_lb: the frontends at load-balancer and
// external addresses (the Resolver tells them apart), each with the
// backends traffic from outside the mesh may take, and one entry per such
// address that marks it as known. Under externalTrafficPolicy Cluster a
// frontend takes every backend the services map has for it (this node's,
// other nodes', other clusters' for a global service); under Local only
// this node's endpoints. Like the services map, it writes only the
// frontends in check (the touched ones, or all of them when full) and
// diffs against a shadow of what it wrote.
func (r *Reconciler) syncExternal(s desired.State, want map[bpf.Frontend][]bpf.Backend, check []bpf.Frontend, full bool, res *Result) error {
	if r.lbShadow == nil {
		have, err := r.dp.ExternalList()
		if err != nil {
			return err
		}
		r.lbShadow, full = have, true
	}
	if r.lbWant == nil {
		r.lbWant = map[bpf.Frontend]bpf.External{}
		full = true
	}
	if full {
		check = slices.Collect(func(yield func(bpf.Frontend) bool) {
			for f := range want {
				if !yield(f) {
					return
				}
			}
			for f := range r.lbWant {
				if _, ok := want[f]; !ok && !yield(f) {
					return
				}
			}
		})
	}
	var local map[netip.Addr]bool // this node's endpoint addresses, when needed
	changed := full
	for _, f := range check {
		policy, ext := r.resolver.External(f)
		if !ext {
			if _, had := r.lbWant[f]; had {
				delete(r.lbWant, f)
				changed = true
			}
			continue
		}
		bes := want[f]
		if h, ok := r.svcShadow[f]; ok {
			bes = h // as written to the services map (unknown backends kept)
		}
		e := bpf.External{Policy: bpf.ExternalCluster, Backends: bes}
		if policy == objects.TrafficPolicyLocal {
			if local == nil {
				local = map[netip.Addr]bool{}
				for _, ep := range s.Endpoints {
					for _, ip := range ep.IPs {
						local[ip.Unmap()] = true
					}
				}
			}
			e = bpf.External{Policy: bpf.ExternalLocal, Backends: []bpf.Backend{}}
			for _, b := range bes {
				if b.ClusterID == 0 && local[b.Addr] {
					e.Backends = append(e.Backends, b)
				}
			}
		}
		if old, had := r.lbWant[f]; !had || !sameExternal(old, e) {
			r.lbWant[f] = e
			changed = true
		}
	}
	if !changed {
		return nil
	}
	var counts ExternalCounts
	for _, e := range r.lbWant {
		if e.Policy == bpf.ExternalLocal {
			counts.Local++
		} else {
			counts.Cluster++
		}
	}

	// The frontends, then the known addresses: added before, removed after.
	failed := false
	note := func(err error) {
		res.note(&res.External, err)
		failed = failed || err != nil
	}
	addrs := map[bpf.Frontend]bool{}
	for f := range r.lbWant {
		addrs[bpf.ExternalAddr(f.VIP)] = true
	}
	for f, e := range r.lbWant {
		if h, had := r.lbShadow[f]; !had || !sameExternal(h, e) {
			err := r.dp.ExternalUpsert(f, e)
			note(err)
			if err == nil {
				r.lbShadow[f] = e
			}
		}
	}
	for a := range addrs {
		if _, had := r.lbShadow[a]; !had {
			err := r.dp.ExternalUpsert(a, bpf.External{})
			note(err)
			if err == nil {
				r.lbShadow[a] = bpf.External{}
			}
		}
	}
	if s.Mesh.Ready {
		for f := range r.lbShadow {
			_, frontend := r.lbWant[f]
			if frontend || addrs[f] {
				continue
			}
			err := r.dp.ExternalDelete(f)
			note(err)
			if err == nil {
				delete(r.lbShadow, f)
			}
		}
	}
	if failed {
		r.lbShadow = nil // list again next time
	}
	counts.Addresses = len(addrs)
	r.lbCounts.Store(counts)
	return nil
}

// ExternalCounts counts what isth_lb should hold.
type ExternalCounts struct {
	Cluster, Local int // frontends by externalTrafficPolicy
	Addresses      int // known external addresses
}

// ExternalCounts is what the last Sync wanted in isth_lb: Cluster > 0
// means the node's SNAT is needed (gateway/northsouth).
func (r *Reconciler) ExternalCounts() ExternalCounts {
	c, _ := r.lbCounts.Load().(ExternalCounts)
	return c
}

func sameExternal(a, b bpf.External) bool {
	return a.Policy == b.Policy && slices.Equal(a.Backends, b.Backends)
}
