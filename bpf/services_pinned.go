package bpf

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// PinnedServices is a read-only handle on the services and backends maps a
// node's agent pinned, for tools and benchmarks that poll them from
// outside: Backends costs 1 + (number of backends) lookups, where
// ServiceList walks every service.
type PinnedServices struct{ svcs, bes *ebpf.Map }

// OpenPinnedServices opens the services and backends maps pinned in pinDir
// (read-only).
func OpenPinnedServices(pinDir string) (*PinnedServices, error) {
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	svcs, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "isth_services"), ro)
	if err != nil {
		return nil, fmt.Errorf("open services map in %s: %w", pinDir, err)
	}
	bes, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "isth_backends"), ro)
	if err != nil {
		svcs.Close()
		return nil, fmt.Errorf("open backends map in %s: %w", pinDir, err)
	}
	return &PinnedServices{svcs: svcs, bes: bes}, nil
}

// Close releases the maps.
func (p *PinnedServices) Close() error {
	return errors.Join(p.svcs.Close(), p.bes.Close())
}

// Backends returns f's backends in slot order, and false when f is not in
// the map. The agent fills new slots before it publishes a larger count and
// publishes a smaller count before it drops slots, so a slot below the
// count is missing only in a race with a removal of f: that also returns
// false.
func (p *PinnedServices) Backends(f Frontend) ([]Backend, bool) {
	k := svcKey(f)
	var v datapathSvcVal
	if err := p.svcs.Lookup(&k, &v); err != nil {
		return nil, false
	}
	out := make([]Backend, 0, v.Count)
	for s := uint32(1); s <= v.Count; s++ {
		bk := datapathBeKey{SvcId: v.Id, Slot: s}
		var bv datapathBeVal
		if err := p.bes.Lookup(&bk, &bv); err != nil {
			return nil, false
		}
		out = append(out, Backend{Addr: addrFrom16(bv.Addr.B), Port: bv.Port, ClusterID: bv.ClusterId})
	}
	return out, true
}
