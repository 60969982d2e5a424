package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
	"io/fs"
	"maps"
	"math"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

var (
	// ErrNotFound is wrapped by errors about unknown owners.
	ErrNotFound = errors.New("not found")
	// ErrAllocated is wrapped when an owner already holds addresses.
	ErrAllocated = errors.New("already allocated")
	// ErrExhausted is wrapped when a CIDR has no free address left.
	ErrExhausted = errors.New("exhausted")
	// ErrOutsideCIDRs is wrapped by New's error about persisted
	// allocations that the configured CIDRs cannot hand out.
	ErrOutsideCIDRs = errors.New("allocations outside the configured CIDRs")
)

// IPAM allocates pod addresses from the node's CIDRs. It is safe for
// concurrent use.
type IPAM struct {
	mu     sync.Mutex
	path   string
	pools  []*pool // in the order the CIDRs were given
	owners map[string][]netip.Addr
	used   map[netip.Addr]string // address -> owner
	// The allocations as the state file holds them, kept with owners
	// (setOwner, deleteOwner): each owner's entry encoded, and the owners
	// in order. A write after one change encodes that change, not every
	// allocation: encoding a thousand with encoding/json took each pod's
	// add milliseconds, more with every pod.
	lines map[string][]byte
	order []string
	// An allocation is in memory (under mu) before it is on disk, and
	// returns once a write covered it (commit): version counts the
	// changes, saved is the version the file holds. saveMu orders the
	// writes; it is taken before mu.
	version, saved uint64
	saveMu         sync.Mutex
	writes         atomic.Int64 // state files written, for tests
}

// pool is one CIDR and the range of addresses it may hand out.
type pool struct {
	prefix      netip.Prefix
	first, last netip.Addr // usable range, inclusive
	size        uint64     // usable addresses, saturated at MaxUint64
	cursor      netip.Addr // last address handed out; invalid = none yet
}

func newPool(p netip.Prefix) (*pool, error) {
	switch {
	case !p.IsValid():
		return nil, errors.New("invalid CIDR")
	case p.Addr().Zone() != "":
		return nil, fmt.Errorf("CIDR %s: zones are not allowed", p)
	case p.Addr().Is4In6():
		return nil, fmt.Errorf("CIDR %s: IPv4-mapped IPv6 prefixes are not allowed, use the IPv4 form", p)
	case p.Masked() != p:
		return nil, fmt.Errorf("CIDR %s has host bits set, use %s", p, p.Masked())
	}
	if p.IsSingleIP() {
		// An external workload's own address (agent --join): a pool
		// with nothing to hand out, so adding a pod there fails with
		// ErrExhausted instead of the agent refusing to start.
		return &pool{prefix: p, first: p.Addr(), last: p.Addr(), size: 0}, nil
	}
	hostBits := p.Addr().BitLen() - p.Bits()
	// Reserved: the network address and the node's first host address,
	// plus the broadcast address for IPv4.
	reserved := uint64(2)
	last := lastAddr(p)
	if p.Addr().Is4() {
		reserved = 3
		last = last.Prev()
	}
	size := uint64(math.MaxUint64)
	if hostBits < 64 {
		total := uint64(1) << hostBits
		if total <= reserved {
			return nil, fmt.Errorf("CIDR %s is too small: no address left after the reserved ones", p)
		}
		size = total - reserved
	}
	return &pool{prefix: p, first: p.Addr().Next().Next(), last: last, size: size}, nil
}

// lastAddr returns the address of p with all host bits set.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().As16()
	offset := 128 - p.Addr().BitLen() // IPv4 lives in the last 4 bytes
	for bit := offset + p.Bits(); bit < 128; bit++ {
		b[bit/8] |= 0x80 >> (bit % 8)
	}
	a := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		return a.Unmap()
	}
	return a
}

func (p *pool) contains(a netip.Addr) bool {
	return a.Compare(p.first) >= 0 && a.Compare(p.last) <= 0
}

// after returns the address the round-robin visits after a.
func (p *pool) after(a netip.Addr) netip.Addr {
	if !p.contains(a) || a == p.last {
		return p.first
	}
	return a.Next()
}

// pick returns the first free address after the cursor. Every miss lands on
// a used address of the pool, so at most inUse+1 steps are needed; that is
// what keeps a /64 cheap.
func (p *pool) pick(used map[netip.Addr]string) (netip.Addr, error) {
	inUse := 0
	for a := range used {
		if p.contains(a) {
			inUse++
		}
	}
	if uint64(inUse) >= p.size {
		return netip.Addr{}, fmt.Errorf("CIDR %s %w (%d addresses in use)", p.prefix, ErrExhausted, inUse)
	}
	a := p.after(p.cursor)
	for range inUse + 1 {
		if _, taken := used[a]; !taken {
			return a, nil
		}
		a = p.after(a)
	}
	// Unreachable: inUse < size guarantees a free address within inUse+1
	// steps.
	return netip.Addr{}, fmt.Errorf("CIDR %s: no free address found", p.prefix)
}

// New opens the IPAM state in stateFile for the given CIDRs (at least one,
// at most one per family). A state file that cannot be read or parsed is an
// error: starting empty would hand out addresses that are in use.
func New(stateFile string, cidrs ...netip.Prefix) (*IPAM, error) {
	if stateFile == "" {
		return nil, errors.New("ipam: state file path is empty")
	}
	if len(cidrs) == 0 {
		return nil, errors.New("ipam: no CIDR configured")
	}
	a := &IPAM{path: stateFile, owners: map[string][]netip.Addr{}, used: map[netip.Addr]string{}, lines: map[string][]byte{}}
	for _, c := range cidrs {
		p, err := newPool(c)
		if err != nil {
			return nil, fmt.Errorf("ipam: %w", err)
		}
		for _, q := range a.pools {
			if q.prefix.Addr().Is4() == c.Addr().Is4() {
				return nil, fmt.Errorf("ipam: CIDRs %s and %s are of the same family, at most one IPv4 and one IPv6 CIDR allowed", q.prefix, c)
			}
		}
		a.pools = append(a.pools, p)
	}

	data, err := os.ReadFile(stateFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return a, nil
	case err != nil:
		return nil, fmt.Errorf("ipam: %w", err)
	}
	if err := a.load(data); err != nil {
		return nil, fmt.Errorf("ipam: state file %s is corrupt: %w", stateFile, err)
	}
	if outside := a.outside(); len(outside) > 0 {
		return a, fmt.Errorf("ipam: %w %s: %s", ErrOutsideCIDRs, a.cidrList(), strings.Join(outside, ", "))
	}
	return a, nil
}

const stateVersion = 1

type state struct {
	Version     int                     `json:"version"`
	Allocations map[string][]netip.Addr `json:"allocations"`
	// Cursors holds the last address handed out, per CIDR.
	Cursors map[string]netip.Addr `json:"cursors"`
}

func (a *IPAM) load(data []byte) error {
	var st state
	if err := strictjson.Decode(data, &st); err != nil {
		return err
	}
	if st.Version != stateVersion {
		return fmt.Errorf("version %d, want %d", st.Version, stateVersion)
	}
	for _, owner := range slices.Sorted(maps.Keys(st.Allocations)) {
		addrs := st.Allocations[owner]
		if owner == "" {
			return errors.New("allocation with an empty owner")
		}
		if len(addrs) == 0 {
			return fmt.Errorf("owner %q has no addresses", owner)
		}
		for _, ip := range addrs {
			if !ip.IsValid() || ip.Zone() != "" {
				return fmt.Errorf("owner %q: invalid address %q", owner, ip)
			}
			if other, dup := a.used[ip]; dup {
				return fmt.Errorf("address %s belongs to both %q and %q", ip, other, owner)
			}
			a.used[ip] = owner
		}
		a.setOwner(owner, slices.Clone(addrs))
	}
	for _, p := range a.pools {
		if c, ok := st.Cursors[p.prefix.String()]; ok && p.contains(c) {
			p.cursor = c
		}
	}
	return nil
}

// outside lists "owner=addr" for every allocated address that no pool could
// hand out.
func (a *IPAM) outside() []string {
	var out []string
	for _, owner := range slices.Sorted(maps.Keys(a.owners)) {
		for _, ip := range a.owners[owner] {
			if !slices.ContainsFunc(a.pools, func(p *pool) bool { return p.contains(ip) }) {
				out = append(out, owner+"="+ip.String())
			}
		}
	}
	return out
}

func (a *IPAM) cidrList() string {
	s := make([]string, len(a.pools))
	for i, p := range a.pools {
		s[i] = p.prefix.String()
	}
	return "(" + strings.Join(s, ", ") + ")"
}

// Allocate hands owner one address from every CIDR, in CIDR order. Either
// all are allocated and persisted, or none.
func (a *IPAM) Allocate(owner string) ([]netip.Addr, error) {
	addrs, durable, err := a.AllocateAsync(owner)
	if err != nil {
		return nil, err
	}
	if err := durable(); err != nil {
		return nil, err
	}
	return addrs, nil
}

// AllocateAsync is Allocate without waiting for the write: it returns the
// addresses, taken in memory, and durable, which returns once they are on
// disk (or the error of the write, which took them back). A caller may use
// the addresses meanwhile, but must call durable before it records
// anything that needs them to survive a restart: the CNI add plumbs the
// pod's veth while the state file is written. durable writes once; every
// call (concurrent ones wait) returns that write's result.
func (a *IPAM) AllocateAsync(owner string) (addrs []netip.Addr, durable func() error, err error) {
	if owner == "" {
		return nil, nil, errors.New("ipam: allocate: empty owner")
	}
	a.mu.Lock()
	if addrs, ok := a.owners[owner]; ok {
		a.mu.Unlock()
		return nil, nil, fmt.Errorf("ipam: allocate for %q: %w: %v", owner, ErrAllocated, addrs)
	}

	addrs = make([]netip.Addr, 0, len(a.pools))
	for _, p := range a.pools {
		ip, err := p.pick(a.used)
		if err != nil {
			a.mu.Unlock()
			return nil, nil, fmt.Errorf("ipam: allocate for %q: %w", owner, err)
		}
		addrs = append(addrs, ip)
	}

	prevCursors := make([]netip.Addr, len(a.pools))
	for i, p := range a.pools {
		prevCursors[i] = p.cursor
		p.cursor = addrs[i]
		a.used[addrs[i]] = owner
	}
	a.setOwner(owner, addrs)
	a.version++
	v := a.version
	a.mu.Unlock()

	// Saved outside a.mu: allocations made meanwhile share the write.
	undo := func() {
		for i, p := range a.pools {
			if p.cursor == addrs[i] { // no allocation moved it since
				p.cursor = prevCursors[i]
			}
			delete(a.used, addrs[i])
		}
		a.deleteOwner(owner)
	}
	durable = sync.OnceValue(func() error { return a.commit(v, undo) })
	return slices.Clone(addrs), durable, nil
}

// commit makes the state up to version v durable: a group commit. Writes
// are one at a time (saveMu); each writes the whole state as it is when it
// starts, which covers every change made before, so the allocations of
// pods created together share one write (two fsyncs) rather than queue one
// write each. When the write covering v fails, undo (called under a.mu and
// saveMu, before another write starts) takes the caller's change back, so
// no later write persists it.
func (a *IPAM) commit(v uint64, undo func()) error {
	a.saveMu.Lock()
	defer a.saveMu.Unlock()
	a.mu.Lock()
	if a.saved >= v {
		a.mu.Unlock()
		return nil // a write that started after the change covered it
	}
	data, err := a.encode()
	cur := a.version
	a.mu.Unlock()
	if err == nil {
		err = a.write(data)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		undo()
		a.version++ // the state written no longer matches memory
		return err
	}
	a.saved = max(a.saved, cur)
	return nil
}

// Release frees the addresses of owner. The cursors do not move back, so
// the addresses are handed out again only after a full round.
func (a *IPAM) Release(owner string) error {
	// Saved under a.mu: a release is not on the path of a pod's start,
	// and a failed one is restored before its addresses can be taken.
	a.saveMu.Lock()
	defer a.saveMu.Unlock()
	a.mu.Lock()
	defer a.mu.Unlock()
	addrs, ok := a.owners[owner]
	if !ok {
		return fmt.Errorf("ipam: release %q: %w", owner, ErrNotFound)
	}
	a.deleteOwner(owner)
	for _, ip := range addrs {
		delete(a.used, ip)
	}
	a.version++
	if err := a.save(); err != nil {
		a.setOwner(owner, addrs)
		for _, ip := range addrs {
			a.used[ip] = owner
		}
		return err
	}
	a.saved = a.version
	return nil
}

// Get returns a copy of the addresses of owner.
func (a *IPAM) Get(owner string) ([]netip.Addr, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	addrs, ok := a.owners[owner]
	return slices.Clone(addrs), ok
}

// Allocations returns a copy of all allocations, by owner.
func (a *IPAM) Allocations() map[string][]netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string][]netip.Addr, len(a.owners))
	for owner, addrs := range a.owners {
		out[owner] = slices.Clone(addrs)
	}
	return out
}

// CIDRs returns the configured CIDRs in their configured order.
func (a *IPAM) CIDRs() []netip.Prefix {
	out := make([]netip.Prefix, len(a.pools))
	for i, p := range a.pools {
		out[i] = p.prefix
	}
	return out
}

// save writes the whole state; callers hold a.mu and saveMu and undo
// their change when it fails, so memory never runs ahead of disk for them.
func (a *IPAM) save() error {
	data, err := a.encode()
	if err != nil {
		return err
	}
	return a.write(data)
}

// encode is the whole state as saved, as json.MarshalIndent(state, "",
// "  ") writes it, from the owners' encoded entries; callers hold a.mu.
func (a *IPAM) encode() ([]byte, error) {
	size := 128
	for _, l := range a.lines {
		size += len(l) + 6
	}
	b := make([]byte, 0, size)
	b = fmt.Appendf(b, "{\n  \"version\": %d,\n  \"allocations\": {", stateVersion)
	for i, owner := range a.order {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, "\n    "...)
		b = append(b, a.lines[owner]...)
	}
	if len(a.order) > 0 {
		b = append(b, "\n  "...)
	}
	cursors := map[string]netip.Addr{}
	for _, p := range a.pools {
		if p.cursor.IsValid() {
			cursors[p.prefix.String()] = p.cursor
		}
	}
	c, err := json.MarshalIndent(cursors, "  ", "  ")
	if err != nil {
		return nil, fmt.Errorf("ipam: encode state: %w", err)
	}
	b = append(b, "},\n  \"cursors\": "...)
	b = append(b, c...)
	return append(b, "\n}\n"...), nil
}

// setOwner records owner's addresses, and their entry in the state file;
// callers hold a.mu.
func (a *IPAM) setOwner(owner string, addrs []netip.Addr) {
	if _, ok := a.owners[owner]; !ok {
		i, _ := slices.BinarySearch(a.order, owner)
		a.order = slices.Insert(a.order, i, owner)
	}
	a.owners[owner] = addrs
	key, _ := json.Marshal(owner)                      // a string always encodes
	list, _ := json.MarshalIndent(addrs, "    ", "  ") // and so do addresses
	a.lines[owner] = append(append(key, ": "...), list...)
}

// deleteOwner forgets owner's addresses and their entry; callers hold a.mu.
func (a *IPAM) deleteOwner(owner string) {
	if i, ok := slices.BinarySearch(a.order, owner); ok {
		a.order = slices.Delete(a.order, i, i+1)
	}
	delete(a.owners, owner)
	delete(a.lines, owner)
}

// write replaces the state file; callers hold saveMu.
func (a *IPAM) write(data []byte) error {
	a.writes.Add(1)
	if err := atomicfile.Write(a.path, data, 0o600); err != nil {
		return fmt.Errorf("ipam: save state: %w", err)
	}
	return nil
}
