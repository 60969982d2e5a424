package datapath

import (
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// syncExternal writes isth_lb: the frontends at load-balancer and
// external addresses and the node ports at the node's addresses (the
// Resolver tells them apart), each with the backends traffic from outside
// the mesh may take, and one entry per such address that marks it as
// known (a node address with External.Node: there a miss is the node's
// own traffic). Under externalTrafficPolicy Cluster a frontend takes every
// backend the services map has for it (this node's, other nodes', other
// clusters' for a global service); under Local only this node's
// endpoints. Like the services map, it writes only the frontends in check
// (the touched ones, or all of them when full) and diffs against a shadow
// of what it wrote.
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
		r.lbNode, r.lbNodeOf = map[bpf.Frontend][]bpf.Frontend{}, map[bpf.Frontend]bpf.Frontend{}
		r.lbDirty, r.lbAddrRef, r.lbCounts0 = map[bpf.Frontend]struct{}{}, map[netip.Addr]int{}, ExternalCounts{}
		full = true
	}
	nodeAddrs := nodePortAddrs(s.HostAddrs)
	if !slices.Equal(nodeAddrs, r.lbNodeAddrs) {
		r.lbNodeAddrs = nodeAddrs
		full = true // every node port, at the new addresses
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
			for f := range r.lbNode {
				if _, ok := want[f]; !ok && !yield(f) {
					return
				}
			}
		})
	}
	var local map[netip.Addr]bool // this node's endpoint addresses, when needed
	external := func(f bpf.Frontend, policy string) bpf.External {
		bes := want[f]
		if h, ok := r.svcShadow[f]; ok {
			bes = h // as written to the services map (unknown backends kept)
		}
		if policy != objects.TrafficPolicyLocal {
			return bpf.External{Policy: bpf.ExternalCluster, Backends: bes}
		}
		if local == nil {
			local = map[netip.Addr]bool{}
			for _, ep := range s.Endpoints {
				for _, ip := range ep.IPs {
					local[ip.Unmap()] = true
				}
			}
		}
		e := bpf.External{Policy: bpf.ExternalLocal, Backends: []bpf.Backend{}}
		for _, b := range bes {
			if b.ClusterID == 0 && local[b.Addr] {
				e.Backends = append(e.Backends, b)
			}
		}
		return e
	}
	changed := full
	for _, f := range check {
		if f.IsNodePort() {
			changed = r.wantNodePort(f, nodeAddrs, external) || changed
			continue
		}
		if _, ok := r.lbNodeOf[f]; ok {
			continue // a node port's, done with it
		}
		policy, ext := r.resolver.External(f)
		if !ext {
			changed = r.delLBWant(f) || changed
			continue
		}
		e := external(f, policy)
		if old, had := r.lbWant[f]; !had || !sameExternal(old, e) {
			r.setLBWant(f, e)
			changed = true
		}
	}
	if !changed {
		return nil
	}
	counts := r.lbCounts0
	counts.Addresses = len(r.lbAddrRef)
	failed := false
	note := func(err error) {
		res.note(&res.External, err)
		failed = failed || err != nil
	}
	isNode := map[netip.Addr]bool{}
	for _, a := range nodeAddrs {
		isNode[a] = true
	}
	// An address's entry is wanted while a frontend of lbWant is at it.
	addrWant := func(f bpf.Frontend) bool { return f == bpf.ExternalAddr(f.VIP) && r.lbAddrRef[f.VIP] > 0 }
	write := func(f bpf.Frontend) {
		if e, ok := r.lbWant[f]; ok {
			if h, had := r.lbShadow[f]; !had || !sameExternal(h, e) {
				err := r.dp.ExternalUpsert(f, e)
				note(err)
				if err == nil {
					r.lbShadow[f] = e
				}
			}
		}
		if a := bpf.ExternalAddr(f.VIP); addrWant(a) {
			e := bpf.External{Node: isNode[f.VIP]}
			if h, had := r.lbShadow[a]; !had || h.Node != e.Node {
				err := r.dp.ExternalUpsert(a, e)
				note(err)
				if err == nil {
					r.lbShadow[a] = e
				}
			}
		}
	}
	remove := func(f bpf.Frontend) {
		if _, frontend := r.lbWant[f]; frontend || addrWant(f) {
			return
		}
		if _, had := r.lbShadow[f]; !had {
			return
		}
		err := r.dp.ExternalDelete(f)
		note(err)
		if err == nil {
			delete(r.lbShadow, f)
		}
	}
	// The frontends, then the known addresses: added before, removed
	// after. All of them after a listing; else the changed ones.
	if full {
		for f := range r.lbWant {
			write(f)
		}
		if s.Mesh.Ready {
			for f := range r.lbShadow {
				remove(f)
			}
		}
	} else {
		for f := range r.lbDirty {
			write(f)
		}
		if s.Mesh.Ready {
			for f := range r.lbDirty {
				remove(f)
				remove(bpf.ExternalAddr(f.VIP))
			}
		}
	}
	clear(r.lbDirty)
	if failed {
		r.lbShadow = nil // list again next time
	}
	r.lbCounts.Store(counts)
	return nil
}

// setLBWant puts f's external frontend e into lbWant, keeping the counts,
// the frontends per address and the changed ones.
func (r *Reconciler) setLBWant(f bpf.Frontend, e bpf.External) {
	if old, had := r.lbWant[f]; had {
		r.countLB(old, -1)
	} else {
		r.lbAddrRef[f.VIP]++
	}
	r.lbWant[f] = e
	r.countLB(e, 1)
	r.lbDirty[f] = struct{}{}
}

// delLBWant takes f out of lbWant; it reports whether it was in.
func (r *Reconciler) delLBWant(f bpf.Frontend) bool {
	old, had := r.lbWant[f]
	if !had {
		return false
	}
	r.countLB(old, -1)
	if r.lbAddrRef[f.VIP]--; r.lbAddrRef[f.VIP] <= 0 {
		delete(r.lbAddrRef, f.VIP)
	}
	delete(r.lbWant, f)
	r.lbDirty[f] = struct{}{}
	return true
}

func (r *Reconciler) countLB(e bpf.External, n int) {
	if e.Policy == bpf.ExternalLocal {
		r.lbCounts0.Local += n
	} else {
		r.lbCounts0.Cluster += n
	}
}

// wantNodePort puts into lbWant the isth_lb frontends node port f (at the
// unspecified address) becomes: one per node address of its family, all
// alike, and takes out those it no longer does. It reports whether lbWant
// changed.
func (r *Reconciler) wantNodePort(f bpf.Frontend, nodeAddrs []netip.Addr, external func(bpf.Frontend, string) bpf.External) bool {
	old := r.lbNode[f]
	var e bpf.External
	policy, ext := r.resolver.External(f)
	var now []bpf.Frontend
	if ext {
		e = external(f, policy)
		for _, a := range nodeAddrs {
			if a.Is4() == f.VIP.Is4() {
				now = append(now, bpf.Frontend{VIP: a, Port: f.Port, Proto: f.Proto})
			}
		}
	}
	changed := !slices.Equal(old, now)
	for _, c := range old {
		if !slices.Contains(now, c) {
			r.delLBWant(c)
			delete(r.lbNodeOf, c)
		}
	}
	for _, c := range now {
		if h, had := r.lbWant[c]; !had || !sameExternal(h, e) {
			r.setLBWant(c, e)
			changed = true
		}
		r.lbNodeOf[c] = f
	}
	if len(now) == 0 {
		delete(r.lbNode, f)
	} else {
		r.lbNode[f] = now
	}
	return changed
}

// nodePortAddrs are the node addresses its node ports answer on: its own
// addresses but loopback (traffic from outside never carries those),
// sorted.
func nodePortAddrs(host []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range host {
		if a = a.Unmap(); a.IsValid() && !a.IsLoopback() {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
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
