package bpf

import (
	"fmt"
	"net/netip"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// PinnedIPCache is a read-only handle on the ipcache a node's agent pinned,
// for tools and benchmarks that poll it from outside: unlike ReadIPCache,
// which lists the whole map, Lookup costs one syscall, so a caller can poll
// for one address every few microseconds.
type PinnedIPCache struct{ m *ebpf.Map }

// OpenPinnedIPCache opens the ipcache pinned in pinDir (read-only).
func OpenPinnedIPCache(pinDir string) (*PinnedIPCache, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "isth_ipcache"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open ipcache in %s: %w", pinDir, err)
	}
	return &PinnedIPCache{m: m}, nil
}

// Close releases the map.
func (c *PinnedIPCache) Close() error { return c.m.Close() }

// Lookup returns the entry the datapath finds for a (longest prefix match:
// an address without an entry of its own matches a covering prefix such
// as the world entry 0.0.0.0/0, so compare what comes back).
func (c *PinnedIPCache) Lookup(a netip.Addr) (IPCacheEntry, bool) {
	k := datapathIpcacheKey{Prefixlen: 128}
	k.Addr.B = addr16(a)
	var v datapathIpcacheVal
	if err := c.m.Lookup(&k, &v); err != nil {
		return IPCacheEntry{}, false
	}
	e := IPCacheEntry{Identity: v.Identity}
	if v.Host.B != ([16]byte{}) {
		e.HostIP = addrFrom16(v.Host.B)
	}
	return e, true
}

// Count returns the number of entries (walking the keys only).
func (c *PinnedIPCache) Count() (int, error) {
	var k datapathIpcacheKey
	n := 0
	it := c.m.Iterate()
	var v datapathIpcacheVal
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		return n, fmt.Errorf("ipcache count: %w", err)
	}
	return n, nil
}
