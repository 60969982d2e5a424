package agenttest

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/endpoint"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// FakeDatapath keeps the maps in memory, like pinned maps that outlive an
// agent, and counts writes.
type FakeDatapath struct {
	mu       sync.Mutex
	IPCache  map[netip.Prefix]bpf.IPCacheEntry
	EPs      map[netip.Addr]bpf.EndpointInfo
	Svcs     map[bpf.Frontend][]bpf.Backend
	Ext      map[bpf.Frontend]bpf.External
	Pol      map[bpf.PolicyKey]bool
	Attached map[string]int // interface -> ifindex
	// ExtAttached are the external devices (north-south) -> ifindex.
	ExtAttached map[string]int
	writes      []string
	lists       int
	FailEP      error // EndpointUpsert fails with it when set
	// AfterIPCacheList, when set, runs after IPCacheList took its copy and
	// before it returns (a listing that takes its time).
	AfterIPCacheList func()
}

// Lists returns how many times a map was listed.
func (d *FakeDatapath) Lists() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lists
}

// NewFakeDatapath returns empty maps.
func NewFakeDatapath() *FakeDatapath {
	return &FakeDatapath{
		IPCache: map[netip.Prefix]bpf.IPCacheEntry{}, EPs: map[netip.Addr]bpf.EndpointInfo{},
		Svcs: map[bpf.Frontend][]bpf.Backend{}, Ext: map[bpf.Frontend]bpf.External{}, Pol: map[bpf.PolicyKey]bool{}, Attached: map[string]int{}, ExtAttached: map[string]int{},
	}
}

func (d *FakeDatapath) write(format string, args ...any) {
	d.writes = append(d.writes, fmt.Sprintf(format, args...))
}

// TakeWrites returns the map writes since the last call, one line each
// ("ipcache+ 10.0.0.1/32", "svc- ...", "policy sync 3").
func (d *FakeDatapath) TakeWrites() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.writes
	d.writes = nil
	return w
}

func (d *FakeDatapath) AttachEndpoint(ifname string, ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.Attached[ifname] = ifindex
	return nil
}

func (d *FakeDatapath) ClsactForNewEndpoints() bool { return false }

func (d *FakeDatapath) AttachNewEndpoint(ifname string, ifindex int) error {
	return d.AttachEndpoint(ifname, ifindex)
}

func (d *FakeDatapath) ReleaseEndpoint(ifname string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.Attached, ifname)
	return nil
}

func (d *FakeDatapath) AttachMode() string { return "tcx" }

func (d *FakeDatapath) IPCacheUpsert(p netip.Prefix, e bpf.IPCacheEntry) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("ipcache+ %s", p)
	d.IPCache[p] = e
	return nil
}

// IPCacheUpsertBatch upserts one by one, a write each, as IPCacheUpsert.
func (d *FakeDatapath) IPCacheUpsertBatch(ps []netip.Prefix, es []bpf.IPCacheEntry) (int, error) {
	for i, p := range ps {
		if err := d.IPCacheUpsert(p, es[i]); err != nil {
			return i, err
		}
	}
	return len(ps), nil
}

func (d *FakeDatapath) IPCacheDelete(p netip.Prefix) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("ipcache- %s", p)
	delete(d.IPCache, p)
	return nil
}

func (d *FakeDatapath) IPCacheList() (map[netip.Prefix]bpf.IPCacheEntry, error) {
	d.mu.Lock()
	d.lists++
	l, after := maps.Clone(d.IPCache), d.AfterIPCacheList
	d.mu.Unlock()
	if after != nil {
		after()
	}
	return l, nil
}

func (d *FakeDatapath) EndpointUpsert(ip netip.Addr, e bpf.EndpointInfo) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.FailEP != nil {
		return d.FailEP
	}
	d.write("ep+ %s", ip)
	d.EPs[ip] = e
	return nil
}

func (d *FakeDatapath) EndpointDelete(ip netip.Addr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("ep- %s", ip)
	delete(d.EPs, ip)
	return nil
}

func (d *FakeDatapath) EndpointList() (map[netip.Addr]bpf.EndpointInfo, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.lists++
	return maps.Clone(d.EPs), nil
}

func (d *FakeDatapath) ServiceUpsert(f bpf.Frontend, b []bpf.Backend) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("svc+ %s", f)
	d.Svcs[f] = slices.Clone(b)
	return nil
}

func (d *FakeDatapath) ServiceDelete(f bpf.Frontend) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("svc- %s", f)
	delete(d.Svcs, f)
	return nil
}

func (d *FakeDatapath) ServiceList() (map[bpf.Frontend][]bpf.Backend, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.lists++
	return maps.Clone(d.Svcs), nil
}

func (d *FakeDatapath) ExternalUpsert(f bpf.Frontend, e bpf.External) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("ext+ %s", f)
	e.Backends = slices.Clone(e.Backends)
	d.Ext[f] = e
	return nil
}

func (d *FakeDatapath) ExternalDelete(f bpf.Frontend) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("ext- %s", f)
	delete(d.Ext, f)
	return nil
}

func (d *FakeDatapath) ExternalList() (map[bpf.Frontend]bpf.External, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.lists++
	return maps.Clone(d.Ext), nil
}

func (d *FakeDatapath) AttachExternal(ifname string, ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ExtAttached[ifname] = ifindex
	return nil
}

func (d *FakeDatapath) DetachExternal(ifname string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.ExtAttached, ifname)
	return nil
}

func (d *FakeDatapath) AttachHost(ifname string, ifindex int) error { return nil }

func (d *FakeDatapath) ExternalAttached() ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Collect(maps.Keys(d.ExtAttached)), nil
}

func (d *FakeDatapath) PolicySync(want []bpf.PolicyKey) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.write("policy sync %d", len(want))
	d.Pol = map[bpf.PolicyKey]bool{}
	for _, k := range want {
		d.Pol[k] = true
	}
	return nil
}

func (d *FakeDatapath) PolicyUpdate(add, del []bpf.PolicyKey) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(add) > 0 {
		d.write("policy+ %d", len(add))
	}
	if len(del) > 0 {
		d.write("policy- %d", len(del))
	}
	for _, k := range add {
		d.Pol[k] = true
	}
	for _, k := range del {
		delete(d.Pol, k)
	}
	return nil
}

func (d *FakeDatapath) PolicyList() ([]bpf.PolicyKey, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.lists++
	return slices.Collect(maps.Keys(d.Pol)), nil
}

func (d *FakeDatapath) Metrics() (map[bpf.Reason]bpf.Counter, error) {
	return map[bpf.Reason]bpf.Counter{bpf.ReasonForwardLocal: {Packets: 5, Bytes: 500}, bpf.ReasonDropPolicyEgr: {Packets: 2, Bytes: 120}}, nil
}

func (d *FakeDatapath) ConntrackCount() (int, error) { return 3, nil }
func (d *FakeDatapath) Close() error                 { return nil }

// FakePlumber pretends to create veths; netns paths under /netns/ exist.
type FakePlumber struct {
	mu        sync.Mutex
	Links     map[string]endpoint.Result
	next      int
	FailAfter string // Create fails for this host interface
	Deleted   []string
}

// NewFakePlumber returns a plumber without links.
func NewFakePlumber() *FakePlumber {
	return &FakePlumber{Links: map[string]endpoint.Result{}, next: 100}
}

func (p *FakePlumber) PrepareNode() error { return nil }

func (p *FakePlumber) CheckNetns(path string) error {
	if !strings.HasPrefix(path, "/netns/") {
		return fmt.Errorf("netns %s does not exist", path)
	}
	return nil
}

func (p *FakePlumber) Create(s endpoint.Spec) (endpoint.Result, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s.HostIfName == p.FailAfter {
		return endpoint.Result{}, fmt.Errorf("add address to eth0 in %s: boom", s.NetnsPath)
	}
	p.next++
	r := endpoint.Result{
		HostIfIndex: p.next,
		HostMAC:     net.HardwareAddr{2, 0, 0, 0, 0, byte(p.next)},
		PodMAC:      net.HardwareAddr{2, 0, 0, 0, 1, byte(p.next)},
	}
	if s.BeforeUp != nil {
		// As endpoint.Create: the datapath attaches before the host end is
		// up; a failure removes the pair.
		if err := s.BeforeUp(r.HostIfIndex); err != nil {
			return endpoint.Result{}, err
		}
	}
	p.Links[s.HostIfName] = r
	return r, nil
}

func (p *FakePlumber) Delete(n string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.Links, n)
	p.Deleted = append(p.Deleted, n)
	return nil
}

func (p *FakePlumber) List() ([]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Sorted(maps.Keys(p.Links)), nil
}

func (p *FakePlumber) Lookup(n string) (endpoint.Result, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.Links[n]
	if !ok {
		return endpoint.Result{}, fmt.Errorf("lookup %s: %w", n, endpoint.ErrNotFound)
	}
	return r, nil
}

// FakeRouter records the routes the agent wants.
type FakeRouter struct {
	mu     sync.Mutex
	routes map[netip.Prefix]netip.Addr
}

// NewFakeRouter returns a router without routes.
func NewFakeRouter() *FakeRouter { return &FakeRouter{routes: map[netip.Prefix]netip.Addr{}} }

// SyncRoutes implements routes.Router.
func (r *FakeRouter) SyncRoutes(want []desired.PodRoute, prune bool) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if prune {
		r.routes = map[netip.Prefix]netip.Addr{}
	}
	for _, w := range want {
		r.routes[w.Dst] = w.Via
	}
	return 0, nil
}

// Get returns the routes: pod CIDR -> node address.
func (r *FakeRouter) Get() map[netip.Prefix]netip.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.routes)
}
