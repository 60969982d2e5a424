package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// Traffic from outside the mesh (c/datapath.c, from_external and
// to_external): isth_lb holds the frontends at load-balancer and external
// addresses with backends of their own in isth_backends, and one entry per
// such address (port 0, protocol 0) that marks it as known: traffic to a
// known address on a port without a frontend is dropped
// (ReasonDropNoFrontend), never routed back out. A node's own address is
// known the same way, for its node ports, with External.Node set: there
// traffic no node-port frontend takes is the node's own and passes.

// SNATMark and SNATMarkMask are the packet mark from_external gives
// packets of flows under externalTrafficPolicy Cluster (c/datapath.h,
// SNAT_MARK): the node masquerades packets that carry it.
const (
	SNATMark     uint32 = 0x1e740000
	SNATMarkMask uint32 = 0xffff0000
)

// isth_lb flags (c/datapath.h, LB_F_*).
const (
	lbFlagSNAT  = 0x1
	lbFlagLocal = 0x2
	lbFlagAddr  = 0x4
	lbFlagNode  = 0x8
)

// ExternalPolicy is a frontend's externalTrafficPolicy in the datapath.
type ExternalPolicy uint8

const (
	// ExternalCluster: any backend; the node SNATs (SNATMark).
	ExternalCluster ExternalPolicy = 1
	// ExternalLocal: the backends are this node's; the client's address
	// is kept.
	ExternalLocal ExternalPolicy = 2
)

func (p ExternalPolicy) String() string {
	switch p {
	case ExternalCluster:
		return "Cluster"
	case ExternalLocal:
		return "Local"
	}
	return fmt.Sprintf("policy-%d", uint8(p))
}

// External is what from_external does with new flows to one frontend.
type External struct {
	Policy   ExternalPolicy
	Backends []Backend
	// Node is for an ExternalAddr key only: the address is one of the
	// node's own, known for its node ports (c/datapath.h, LB_F_NODE).
	Node bool
}

// ExternalAddr is the isth_lb key that marks addr as a known external
// address: a Frontend with port 0 and protocol 0.
func ExternalAddr(addr netip.Addr) Frontend { return Frontend{VIP: addr} }

// IsAddr reports whether f is an ExternalAddr key.
func (f Frontend) IsAddr() bool { return f.Port == 0 && f.Proto == ProtoAny }

func (d *Datapath) checkExternal(f Frontend, e External) error {
	if err := checkAddr(f.VIP); err != nil {
		return err
	}
	if f.IsAddr() {
		if len(e.Backends) > 0 {
			return errors.New("an external address entry has no backends")
		}
		return nil
	}
	if e.Node {
		return errors.New("only an external address entry is a node address")
	}
	if f.Proto != ProtoTCP && f.Proto != ProtoUDP {
		return errors.New("protocol must be tcp or udp")
	}
	if f.Port == 0 {
		return errors.New("port 0")
	}
	if e.Policy != ExternalCluster && e.Policy != ExternalLocal {
		return fmt.Errorf("unknown external traffic policy %d", e.Policy)
	}
	for _, b := range e.Backends {
		if err := checkAddr(b.Addr); err != nil {
			return fmt.Errorf("backend: %w", err)
		}
		if b.Addr.Is4() != f.VIP.Is4() {
			return fmt.Errorf("backend %s is not of the frontend's family", b.Addr)
		}
	}
	return nil
}

// ExternalUpsert installs an external frontend with its backends, or (for
// ExternalAddr(a)) marks a as a known external address. Like
// ServiceUpsert, it changes the backends make-before-break: existing flows
// keep theirs through conntrack.
func (d *Datapath) ExternalUpsert(f Frontend, e External) error {
	if err := d.checkExternal(f, e); err != nil {
		return fmt.Errorf("external upsert %s: %w", f, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	k := svcKey(f)
	if f.IsAddr() {
		v := datapathLbVal{Flags: lbFlagAddr}
		if e.Node {
			v.Flags |= lbFlagNode
		}
		if err := d.objs.IsthLb.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("external upsert %s: %w", f, err)
		}
		return nil
	}
	flags := uint32(lbFlagSNAT)
	if e.Policy == ExternalLocal {
		flags = lbFlagLocal
	}
	var old datapathLbVal
	oldCount := uint32(0)
	id, known := d.lbIDs[f]
	if known {
		if err := d.objs.IsthLb.Lookup(&k, &old); err == nil {
			oldCount = old.Count
		}
	} else {
		id = d.allocServiceID()
	}
	newCount := uint32(len(e.Backends))
	v := datapathLbVal{Id: id, Count: newCount, Flags: flags}
	if known && newCount < oldCount {
		if err := d.objs.IsthLb.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("external upsert %s: %w", f, err)
		}
	}
	for i, b := range e.Backends {
		bk := datapathBeKey{SvcId: id, Slot: uint32(i + 1)}
		bv := datapathBeVal{Port: b.Port, ClusterId: b.ClusterID}
		bv.Addr.B = addr16(b.Addr)
		if err := d.objs.IsthBackends.Update(&bk, &bv, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("external upsert %s: backend %d: %w", f, i+1, err)
		}
	}
	if !known || newCount >= oldCount {
		if err := d.objs.IsthLb.Update(&k, &v, ebpf.UpdateAny); err != nil {
			if !known {
				delete(d.usedIDs, id)
			}
			return fmt.Errorf("external upsert %s: %w", f, err)
		}
	}
	for s := newCount + 1; s <= oldCount; s++ {
		bk := datapathBeKey{SvcId: id, Slot: s}
		_ = d.objs.IsthBackends.Delete(&bk)
	}
	d.lbIDs[f] = id
	return nil
}

// ExternalDelete removes an external frontend and its backends, or a
// known external address; a missing one is not an error.
func (d *Datapath) ExternalDelete(f Frontend) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	k := svcKey(f)
	var v datapathLbVal
	if err := d.objs.IsthLb.Lookup(&k, &v); err != nil {
		delete(d.lbIDs, f)
		return nil
	}
	if err := d.objs.IsthLb.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("external delete %s: %w", f, err)
	}
	if v.Flags&lbFlagAddr == 0 {
		for s := uint32(1); s <= v.Count; s++ {
			bk := datapathBeKey{SvcId: v.Id, Slot: s}
			_ = d.objs.IsthBackends.Delete(&bk)
		}
		delete(d.usedIDs, v.Id)
	}
	delete(d.lbIDs, f)
	return nil
}

// ExternalList returns every entry of isth_lb: frontends with their
// backends in slot order, and the known addresses (ExternalAddr keys,
// with a zero External but for Node).
func (d *Datapath) ExternalList() (map[Frontend]External, error) {
	out := map[Frontend]External{}
	var k datapathSvcKey
	var v datapathLbVal
	it := d.objs.IsthLb.Iterate()
	for it.Next(&k, &v) {
		f := Frontend{VIP: addrFrom16(k.Vip.B), Port: k.Port, Proto: Proto(k.Proto)}
		if v.Flags&lbFlagAddr != 0 {
			out[f] = External{Node: v.Flags&lbFlagNode != 0}
			continue
		}
		e := External{Policy: ExternalCluster, Backends: make([]Backend, 0, v.Count)}
		if v.Flags&lbFlagLocal != 0 {
			e.Policy = ExternalLocal
		}
		for s := uint32(1); s <= v.Count; s++ {
			bk := datapathBeKey{SvcId: v.Id, Slot: s}
			var bv datapathBeVal
			if err := d.objs.IsthBackends.Lookup(&bk, &bv); err != nil {
				return nil, fmt.Errorf("external list %s: backend slot %d: %w", f, s, err)
			}
			e.Backends = append(e.Backends, Backend{Addr: addrFrom16(bv.Addr.B), Port: bv.Port, ClusterID: bv.ClusterId})
		}
		out[f] = e
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("external list: %w", err)
	}
	return out, nil
}

// loadExternalIDs rebuilds the frontend -> ID table of isth_lb from the
// pinned map (the IDs share isth_services' space in isth_backends).
func (d *Datapath) loadExternalIDs() error {
	var k datapathSvcKey
	var v datapathLbVal
	it := d.objs.IsthLb.Iterate()
	for it.Next(&k, &v) {
		if v.Flags&lbFlagAddr != 0 {
			continue
		}
		f := Frontend{VIP: addrFrom16(k.Vip.B), Port: k.Port, Proto: Proto(k.Proto)}
		d.lbIDs[f] = v.Id
		d.usedIDs[v.Id] = true
		if v.Id >= d.nextID {
			d.nextID = v.Id + 1
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read pinned external frontends: %w", err)
	}
	return nil
}

// FromExternal and ToExternal expose the programs, for tests and
// benchmarks.
func (d *Datapath) FromExternal() *ebpf.Program { return d.objs.FromExternal }
func (d *Datapath) ToExternal() *ebpf.Program   { return d.objs.ToExternal }

// AttachExternal attaches from_external to the ingress and to_external to
// the egress of one of the node's external devices, with pinned tcx links
// (pinned as ext-<ifname>-<direction>): an agent that restarts updates them
// in place, so flows from outside never see a detached moment. There is
// no clsact fallback: it needs tcx (Linux >= 6.6).
func (d *Datapath) AttachExternal(ifname string, ifindex int) error {
	if err := d.attachTCX("ext-"+ifname, ifindex, "ingress", ebpf.AttachTCXIngress, d.objs.FromExternal); err != nil {
		return err
	}
	return d.attachTCX("ext-"+ifname, ifindex, "egress", ebpf.AttachTCXEgress, d.objs.ToExternal)
}

// DetachExternal removes the programs from an external device (a missing
// attachment is not an error).
func (d *Datapath) DetachExternal(ifname string) error {
	return d.detachPinned("ext-" + ifname)
}

// ExternalAttached lists the devices (by name) whose external programs
// are pinned in this datapath's link directory.
func (d *Datapath) ExternalAttached() ([]string, error) {
	return d.pinnedLinks("ext-")
}
