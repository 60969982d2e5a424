package bpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sort"

	"github.com/cilium/ebpf"
)

// Map flags mirrored from c/datapath.h.
const (
	epFlagPolicyIngress = 0x1
	epFlagPolicyEgress  = 0x2
)

// addr16 encodes an address the way the datapath keys it: IPv4 as
// IPv4-mapped IPv6.
func addr16(a netip.Addr) [16]byte {
	return a.As16() // maps IPv4 into ::ffff:0:0/96
}

// addrFrom16 decodes a datapath address, unmapping IPv4.
func addrFrom16(b [16]byte) netip.Addr {
	return netip.AddrFrom16(b).Unmap()
}

func prefixLen16(p netip.Prefix) uint32 {
	if p.Addr().Is4() {
		return uint32(96 + p.Bits())
	}
	return uint32(p.Bits())
}

func checkAddr(a netip.Addr) error {
	if !a.IsValid() {
		return errors.New("invalid address")
	}
	if a.Is4In6() {
		return fmt.Errorf("address %s: use the plain IPv4 form", a)
	}
	return nil
}

// IPCacheUpsert maps a prefix (a /32 or /128 for a single address) to an identity.
// IPCacheMaxEntries is the capacity of the BPF ipcache (max_entries of
// isth_ipcache in bpf/c/datapath.c).
const IPCacheMaxEntries = 512 * 1024

func (d *Datapath) IPCacheUpsert(p netip.Prefix, e IPCacheEntry) error {
	if err := checkAddr(p.Addr()); err != nil {
		return fmt.Errorf("ipcache upsert %s: %w", p, err)
	}
	p = p.Masked()
	k := datapathIpcacheKey{Prefixlen: prefixLen16(p)}
	k.Addr.B = addr16(p.Addr())
	v := datapathIpcacheVal{Identity: e.Identity}
	if e.HostIP.IsValid() {
		v.Host.B = addr16(e.HostIP)
	}
	if err := d.objs.IsthIpcache.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("ipcache upsert %s: %w", p, err)
	}
	return nil
}

// IPCacheBatch is how many entries IPCacheUpsertBatch hands the kernel in
// one call: 32 KiB of keys and values (20 and 24 bytes each).
const IPCacheBatch = 1024

// IPCacheUpsertBatch upserts ps[i] -> es[i] in order, IPCacheBatch entries
// per BPF_MAP_UPDATE_BATCH call (a kernel whose LPM trie has no batch
// calls, ErrNotSupported, gets one update per entry). A full sync of 100,000 remote
// endpoints is 100,000 updates: one syscall each cost the agent about
// four times the CPU of the batches (measured on this project's VMs, where
// a syscall is dear). It returns how many were written before the first
// failure, and that failure, naming its prefix.
func (d *Datapath) IPCacheUpsertBatch(ps []netip.Prefix, es []IPCacheEntry) (int, error) {
	if len(ps) != len(es) {
		return 0, fmt.Errorf("ipcache upsert batch: %d prefixes, %d entries", len(ps), len(es))
	}
	done := 0
	keys := make([]datapathIpcacheKey, 0, min(len(ps), IPCacheBatch))
	vals := make([]datapathIpcacheVal, 0, cap(keys))
	for done < len(ps) {
		n := min(len(ps)-done, IPCacheBatch)
		keys, vals = keys[:0], vals[:0]
		for i := done; i < done+n; i++ {
			p := ps[i]
			if err := checkAddr(p.Addr()); err != nil {
				n = i - done // the ones before it go in first
				if n == 0 {
					return done, fmt.Errorf("ipcache upsert %s: %w", p, err)
				}
				break
			}
			p = p.Masked()
			k := datapathIpcacheKey{Prefixlen: prefixLen16(p)}
			k.Addr.B = addr16(p.Addr())
			v := datapathIpcacheVal{Identity: es[i].Identity}
			if es[i].HostIP.IsValid() {
				v.Host.B = addr16(es[i].HostIP)
			}
			keys, vals = append(keys, k), append(vals, v)
		}
		if d.noBatch.Load() {
			for i := range n {
				if err := d.IPCacheUpsert(ps[done+i], es[done+i]); err != nil {
					return done + i, err
				}
			}
			done += n
			continue
		}
		c, err := d.objs.IsthIpcache.BatchUpdate(keys, vals, nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			d.noBatch.Store(true) // and this batch again, one by one
			continue
		}
		done += c
		if err != nil {
			if c < n {
				return done, fmt.Errorf("ipcache upsert %s: %w", ps[done].Masked(), err)
			}
			return done, fmt.Errorf("ipcache upsert: %w", err)
		}
	}
	return done, nil
}

// IPCacheDelete removes a prefix; a missing prefix is not an error.
func (d *Datapath) IPCacheDelete(p netip.Prefix) error {
	p = p.Masked()
	k := datapathIpcacheKey{Prefixlen: prefixLen16(p)}
	k.Addr.B = addr16(p.Addr())
	if err := d.objs.IsthIpcache.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("ipcache delete %s: %w", p, err)
	}
	return nil
}

// IPCacheList returns every ipcache entry.
func (d *Datapath) IPCacheList() (map[netip.Prefix]IPCacheEntry, error) {
	out := map[netip.Prefix]IPCacheEntry{}
	var k datapathIpcacheKey
	var v datapathIpcacheVal
	it := d.objs.IsthIpcache.Iterate()
	for it.Next(&k, &v) {
		a := netip.AddrFrom16(k.Addr.B)
		bits := int(k.Prefixlen)
		if a.Is4In6() && bits >= 96 {
			a, bits = a.Unmap(), bits-96
		}
		e := IPCacheEntry{Identity: v.Identity}
		if v.Host.B != ([16]byte{}) {
			e.HostIP = addrFrom16(v.Host.B)
		}
		out[netip.PrefixFrom(a, bits)] = e
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("ipcache list: %w", err)
	}
	return out, nil
}

// IPCacheLookup returns the identity of an address as the datapath sees it
// (longest prefix match).
func (d *Datapath) IPCacheLookup(a netip.Addr) (IPCacheEntry, bool) {
	k := datapathIpcacheKey{Prefixlen: 128}
	k.Addr.B = addr16(a)
	var v datapathIpcacheVal
	if err := d.objs.IsthIpcache.Lookup(&k, &v); err != nil {
		return IPCacheEntry{}, false
	}
	e := IPCacheEntry{Identity: v.Identity}
	if v.Host.B != ([16]byte{}) {
		e.HostIP = addrFrom16(v.Host.B)
	}
	return e, true
}

func macBytes(m net.HardwareAddr) (out [6]byte) {
	copy(out[:], m)
	return out
}

// EndpointUpsert installs or updates a local pod address.
func (d *Datapath) EndpointUpsert(ip netip.Addr, e EndpointInfo) error {
	if err := checkAddr(ip); err != nil {
		return fmt.Errorf("endpoint upsert: %w", err)
	}
	if e.ID == 0 {
		return fmt.Errorf("endpoint upsert %s: endpoint ID 0 is reserved", ip)
	}
	var k datapathEpKey
	k.Addr.B = addr16(ip)
	v := datapathEpVal{Id: e.ID, Ifindex: e.IfIndex, Identity: e.Identity, PodMac: macBytes(e.PodMAC), HostMac: macBytes(e.HostMAC)}
	if e.PolicyIngress {
		v.Flags |= epFlagPolicyIngress
	}
	if e.PolicyEgress {
		v.Flags |= epFlagPolicyEgress
	}
	if err := d.objs.IsthEndpoints.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("endpoint upsert %s: %w", ip, err)
	}
	return nil
}

// EndpointDelete removes a local pod address; a missing one is not an error.
func (d *Datapath) EndpointDelete(ip netip.Addr) error {
	var k datapathEpKey
	k.Addr.B = addr16(ip)
	if err := d.objs.IsthEndpoints.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("endpoint delete %s: %w", ip, err)
	}
	return nil
}

// EndpointList returns every local pod address.
func (d *Datapath) EndpointList() (map[netip.Addr]EndpointInfo, error) {
	out := map[netip.Addr]EndpointInfo{}
	var k datapathEpKey
	var v datapathEpVal
	it := d.objs.IsthEndpoints.Iterate()
	for it.Next(&k, &v) {
		out[addrFrom16(k.Addr.B)] = EndpointInfo{
			ID: v.Id, IfIndex: v.Ifindex, Identity: v.Identity,
			PodMAC: append(net.HardwareAddr(nil), v.PodMac[:]...), HostMAC: append(net.HardwareAddr(nil), v.HostMac[:]...),
			PolicyIngress: v.Flags&epFlagPolicyIngress != 0, PolicyEgress: v.Flags&epFlagPolicyEgress != 0,
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("endpoint list: %w", err)
	}
	return out, nil
}

func svcKey(f Frontend) datapathSvcKey {
	k := datapathSvcKey{Port: f.Port, Proto: uint8(f.Proto)}
	k.Vip.B = addr16(f.VIP)
	return k
}

// loadServiceIDs rebuilds the frontend -> ID table from the pinned map.
func (d *Datapath) loadServiceIDs() error {
	var k datapathSvcKey
	var v datapathSvcVal
	it := d.objs.IsthServices.Iterate()
	for it.Next(&k, &v) {
		f := Frontend{VIP: addrFrom16(k.Vip.B), Port: k.Port, Proto: Proto(k.Proto)}
		d.svcIDs[f] = v.Id
		d.usedIDs[v.Id] = true
		if v.Id >= d.nextID {
			d.nextID = v.Id + 1
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read pinned services: %w", err)
	}
	return nil
}

func (d *Datapath) allocServiceID() uint32 {
	for d.usedIDs[d.nextID] || d.nextID == 0 {
		d.nextID++
	}
	id := d.nextID
	d.usedIDs[id] = true
	d.nextID++
	return id
}

// ServiceUpsert installs a frontend with its backends. Existing flows keep
// their backend through conntrack; new flows pick among the new set.
func (d *Datapath) ServiceUpsert(f Frontend, backends []Backend) error {
	if err := checkAddr(f.VIP); err != nil {
		return fmt.Errorf("service upsert %s: %w", f, err)
	}
	if f.Proto != ProtoTCP && f.Proto != ProtoUDP {
		return fmt.Errorf("service upsert %s: protocol must be tcp or udp", f)
	}
	for _, b := range backends {
		if err := checkAddr(b.Addr); err != nil {
			return fmt.Errorf("service upsert %s: backend: %w", f, err)
		}
		if b.Addr.Is4() != f.VIP.Is4() {
			return fmt.Errorf("service upsert %s: backend %s is not of the frontend's family", f, b.Addr)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()

	k := svcKey(f)
	var old datapathSvcVal
	oldCount := uint32(0)
	id, known := d.svcIDs[f]
	if known {
		if err := d.objs.IsthServices.Lookup(&k, &old); err == nil {
			oldCount = old.Count
		}
	} else {
		id = d.allocServiceID()
	}
	newCount := uint32(len(backends))
	v := datapathSvcVal{Id: id, Count: newCount}

	// Shrinking: publish the smaller count first so no new flow picks a slot
	// about to disappear. Growing: fill the slots first.
	if known && newCount < oldCount {
		if err := d.objs.IsthServices.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("service upsert %s: %w", f, err)
		}
	}
	for i, b := range backends {
		bk := datapathBeKey{SvcId: id, Slot: uint32(i + 1)}
		bv := datapathBeVal{Port: b.Port, ClusterId: b.ClusterID}
		bv.Addr.B = addr16(b.Addr)
		if err := d.objs.IsthBackends.Update(&bk, &bv, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("service upsert %s: backend %d: %w", f, i+1, err)
		}
	}
	if !known || newCount >= oldCount {
		if err := d.objs.IsthServices.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("service upsert %s: %w", f, err)
		}
	}
	for s := newCount + 1; s <= oldCount; s++ {
		bk := datapathBeKey{SvcId: id, Slot: s}
		_ = d.objs.IsthBackends.Delete(&bk)
	}
	d.svcIDs[f] = id
	return nil
}

// ServiceDelete removes a frontend and its backends; a missing one is not an error.
func (d *Datapath) ServiceDelete(f Frontend) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	k := svcKey(f)
	var v datapathSvcVal
	if err := d.objs.IsthServices.Lookup(&k, &v); err != nil {
		delete(d.svcIDs, f)
		return nil
	}
	if err := d.objs.IsthServices.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("service delete %s: %w", f, err)
	}
	for s := uint32(1); s <= v.Count; s++ {
		bk := datapathBeKey{SvcId: v.Id, Slot: s}
		_ = d.objs.IsthBackends.Delete(&bk)
	}
	delete(d.svcIDs, f)
	delete(d.usedIDs, v.Id)
	return nil
}

// ServiceList returns every frontend with its backends in slot order.
func (d *Datapath) ServiceList() (map[Frontend][]Backend, error) {
	out := map[Frontend][]Backend{}
	var k datapathSvcKey
	var v datapathSvcVal
	it := d.objs.IsthServices.Iterate()
	for it.Next(&k, &v) {
		f := Frontend{VIP: addrFrom16(k.Vip.B), Port: k.Port, Proto: Proto(k.Proto)}
		bes := make([]Backend, 0, v.Count)
		for s := uint32(1); s <= v.Count; s++ {
			bk := datapathBeKey{SvcId: v.Id, Slot: s}
			var bv datapathBeVal
			if err := d.objs.IsthBackends.Lookup(&bk, &bv); err != nil {
				return nil, fmt.Errorf("service list %s: backend slot %d: %w", f, s, err)
			}
			bes = append(bes, Backend{Addr: addrFrom16(bv.Addr.B), Port: bv.Port, ClusterID: bv.ClusterId})
		}
		out[f] = bes
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("service list: %w", err)
	}
	return out, nil
}

func polKey(p PolicyKey) datapathPolKey {
	return datapathPolKey{EpId: p.EndpointID, Identity: p.PeerIdentity, Port: p.Port, Proto: uint8(p.Proto), Dir: uint8(p.Direction)}
}

// PolicyList returns every allow entry.
func (d *Datapath) PolicyList() ([]PolicyKey, error) {
	var out []PolicyKey
	var k datapathPolKey
	var v datapathPolVal
	it := d.objs.IsthPolicy.Iterate()
	for it.Next(&k, &v) {
		out = append(out, PolicyKey{EndpointID: k.EpId, PeerIdentity: k.Identity, Port: k.Port, Proto: Proto(k.Proto), Direction: Direction(k.Dir)})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("policy list: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return lessPolicy(out[i], out[j]) })
	return out, nil
}

func lessPolicy(a, b PolicyKey) bool {
	if a.EndpointID != b.EndpointID {
		return a.EndpointID < b.EndpointID
	}
	if a.Direction != b.Direction {
		return a.Direction < b.Direction
	}
	if a.PeerIdentity != b.PeerIdentity {
		return a.PeerIdentity < b.PeerIdentity
	}
	if a.Proto != b.Proto {
		return a.Proto < b.Proto
	}
	return a.Port < b.Port
}

// PolicyUpdate adds the entries of add, then removes those of del (a
// missing one is not an error), without listing the map: for a caller
// that keeps a shadow of it.
func (d *Datapath) PolicyUpdate(add, del []PolicyKey) error {
	for _, p := range add {
		if p.Direction != Ingress && p.Direction != Egress {
			return fmt.Errorf("policy add: entry %+v has no direction", p)
		}
		if p.Proto == ProtoAny && p.Port != 0 {
			return fmt.Errorf("policy add: entry %+v has a port but no protocol", p)
		}
	}
	v := datapathPolVal{Flags: 1}
	for _, p := range add {
		k := polKey(p)
		if err := d.objs.IsthPolicy.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("policy add %+v: %w", p, err)
		}
	}
	for _, p := range del {
		k := polKey(p)
		if err := d.objs.IsthPolicy.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("policy delete %+v: %w", p, err)
		}
	}
	return nil
}

// PolicySync makes the policy map equal to want: new entries are added
// before stale ones are removed, so an allowed flow never sees a gap.
func (d *Datapath) PolicySync(want []PolicyKey) error {
	have, err := d.PolicyList()
	if err != nil {
		return err
	}
	wantSet := make(map[PolicyKey]bool, len(want))
	for _, p := range want {
		if p.Direction != Ingress && p.Direction != Egress {
			return fmt.Errorf("policy sync: entry %+v has no direction", p)
		}
		if p.Proto == ProtoAny && p.Port != 0 {
			return fmt.Errorf("policy sync: entry %+v has a port but no protocol", p)
		}
		wantSet[p] = true
	}
	haveSet := make(map[PolicyKey]bool, len(have))
	for _, p := range have {
		haveSet[p] = true
	}
	v := datapathPolVal{Flags: 1}
	for p := range wantSet {
		if haveSet[p] {
			continue
		}
		k := polKey(p)
		if err := d.objs.IsthPolicy.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("policy add %+v: %w", p, err)
		}
	}
	for p := range haveSet {
		if wantSet[p] {
			continue
		}
		k := polKey(p)
		if err := d.objs.IsthPolicy.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("policy delete %+v: %w", p, err)
		}
	}
	return nil
}

// Metrics returns the datapath counters by reason, summed over CPUs.
func (d *Datapath) Metrics() (map[Reason]Counter, error) {
	out := map[Reason]Counter{}
	for r := Reason(0); r < ReasonCount; r++ {
		var per []datapathMetricVal
		key := uint32(r)
		if err := d.objs.IsthMetrics.Lookup(&key, &per); err != nil {
			return nil, fmt.Errorf("metrics %s: %w", r, err)
		}
		var c Counter
		for _, v := range per {
			c.Packets += v.Packets
			c.Bytes += v.Bytes
		}
		if _, named := reasonNames[r]; named || c.Packets > 0 {
			out[r] = c
		}
	}
	return out, nil
}

// ConntrackCount returns the number of tracked flow entries.
func (d *Datapath) ConntrackCount() (int, error) {
	n := 0
	var k datapathCtKey
	var v datapathCtVal
	it := d.objs.IsthCt.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("conntrack count: %w", err)
	}
	return n, nil
}

// ConntrackFlush empties the conntrack table (tests and benchmarks).
func (d *Datapath) ConntrackFlush() error {
	var k datapathCtKey
	var keys []datapathCtKey
	var v datapathCtVal
	it := d.objs.IsthCt.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	for i := range keys {
		_ = d.objs.IsthCt.Delete(&keys[i])
	}
	return it.Err()
}

// ReadIPCache reads the ipcache pinned in pinDir without loading the
// datapath: for tools, tests and benchmarks that watch a node from outside.
func ReadIPCache(pinDir string) (map[netip.Prefix]IPCacheEntry, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "isth_ipcache"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open ipcache in %s: %w", pinDir, err)
	}
	defer m.Close()
	d := &Datapath{objs: datapathObjects{datapathMaps: datapathMaps{IsthIpcache: m}}}
	return d.IPCacheList()
}
