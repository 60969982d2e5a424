package objects

import (
	"fmt"
	"math/big"
	"net/netip"
	"slices"
)

// KindLoadBalancerIPPool names the pools LB-IPAM allocates load-balancer
// addresses from.
const KindLoadBalancerIPPool = "LoadBalancerIPPool"

// Size limits of one pool block: more addresses than these is a typo (a
// /0, a /8 meant as /28) rather than a plan.
const (
	// MinPoolPrefixIPv4 is the shortest IPv4 prefix a block may span
	// (a /8: 16,777,216 addresses).
	MinPoolPrefixIPv4 = 8
	// MinPoolPrefixIPv6 is the shortest IPv6 prefix a block may span
	// (a /64).
	MinPoolPrefixIPv6 = 64
)

// LoadBalancerIPPool is a cluster-scoped set of addresses LB-IPAM hands to
// Services of type LoadBalancer. Pools have no namespace: Decode sets
// "default" (the one namespace of their keys) and refuses any other.
type LoadBalancerIPPool struct {
	APIVersion string                   `json:"apiVersion"`
	Kind       string                   `json:"kind"`
	Metadata   Meta                     `json:"metadata"`
	Spec       LoadBalancerIPPoolSpec   `json:"spec"`
	Status     LoadBalancerIPPoolStatus `json:"status,omitzero"`
}

// LoadBalancerIPPoolSpec lists the pool's addresses and which services it
// serves.
type LoadBalancerIPPoolSpec struct {
	// Blocks are the pool's addresses: CIDRs or start-stop ranges, IPv4
	// and IPv6 mixed. Every address of a block is handed out, the first
	// and last of a CIDR included (use a range to leave some out).
	Blocks []PoolBlock `json:"blocks"`
	// ServiceSelector picks the LoadBalancer services (by their labels)
	// the pool serves; empty serves all of them.
	ServiceSelector Selector `json:"serviceSelector,omitzero"`
	// Disabled stops new allocations from the pool; addresses in use stay.
	Disabled bool `json:"disabled,omitempty"`
}

// PoolBlock is one block of a pool: either CIDR or Start and Stop (both
// included).
type PoolBlock struct {
	CIDR  string `json:"cidr,omitempty"`
	Start string `json:"start,omitempty"`
	Stop  string `json:"stop,omitempty"`
}

// LoadBalancerIPPoolStatus is what LB-IPAM reports about a pool (filled in
// by the agent for `isthmus get`; Decode drops it from user input).
type LoadBalancerIPPoolStatus struct {
	// Total is the number of addresses in the pool's blocks (decimal: an
	// IPv6 pool can hold more than 2^64).
	Total string `json:"total,omitempty"`
	// Used counts the addresses assigned from the pool, including those
	// kept after an edit took them out of its blocks.
	Used int `json:"used"`
	// Kept lists assigned addresses the pool no longer covers (an edit
	// removed them): they stay with their services, never moved.
	Kept []string `json:"kept,omitempty"`
}

// AddrRange is an inclusive range of addresses of one family.
type AddrRange struct{ From, To netip.Addr }

// Contains reports whether a is in the range.
func (r AddrRange) Contains(a netip.Addr) bool {
	return a.BitLen() == r.From.BitLen() && r.From.Compare(a) <= 0 && a.Compare(r.To) <= 0
}

// Overlaps reports whether two ranges share an address.
func (r AddrRange) Overlaps(o AddrRange) bool {
	return r.From.BitLen() == o.From.BitLen() && r.From.Compare(o.To) <= 0 && o.From.Compare(r.To) <= 0
}

// Size returns the number of addresses in the range.
func (r AddrRange) Size() *big.Int {
	n := new(big.Int).Sub(new(big.Int).SetBytes(r.To.AsSlice()), new(big.Int).SetBytes(r.From.AsSlice()))
	return n.Add(n, big.NewInt(1))
}

func (r AddrRange) String() string {
	if r.From == r.To {
		return r.From.String()
	}
	return r.From.String() + "-" + r.To.String()
}

// Ranges returns the pool's blocks as address ranges, in spec order.
// Blocks that do not parse are left out (Validate refuses them).
func (p LoadBalancerIPPool) Ranges() []AddrRange {
	var out []AddrRange
	for _, b := range p.Spec.Blocks {
		if r, err := b.parse(); err == nil {
			out = append(out, r)
		}
	}
	return out
}

// TotalAddresses returns the number of addresses in the pool's blocks.
func (p LoadBalancerIPPool) TotalAddresses() *big.Int {
	n := new(big.Int)
	for _, r := range p.Ranges() {
		n.Add(n, r.Size())
	}
	return n
}

// parse turns a block into its range.
func (b PoolBlock) parse() (AddrRange, error) {
	switch {
	case b.CIDR != "" && (b.Start != "" || b.Stop != ""):
		return AddrRange{}, fmt.Errorf("give either cidr or start and stop, not both")
	case b.CIDR != "":
		p, err := netip.ParsePrefix(b.CIDR)
		if err != nil {
			return AddrRange{}, fmt.Errorf("cidr: invalid CIDR %q", b.CIDR)
		}
		if _, err := parseUnicast(p.Addr().String()); err != nil {
			return AddrRange{}, fmt.Errorf("cidr: %v", err)
		}
		if p.Masked() != p {
			return AddrRange{}, fmt.Errorf("cidr: %q has host bits set, did you mean %s?", b.CIDR, p.Masked())
		}
		min := MinPoolPrefixIPv4
		if p.Addr().Is6() {
			min = MinPoolPrefixIPv6
		}
		if p.Bits() < min {
			return AddrRange{}, fmt.Errorf("cidr: %s is too large: at most a /%d per block", p, min)
		}
		return AddrRange{From: p.Addr(), To: lastAddr(p)}, nil
	case b.Start == "" || b.Stop == "":
		return AddrRange{}, fmt.Errorf("needs cidr, or start and stop")
	}
	parse := func(field, s string) (netip.Addr, error) {
		a, err := parseUnicast(s)
		if err != nil {
			return a, fmt.Errorf("%s: %v", field, err)
		}
		return a, nil
	}
	from, err := parse("start", b.Start)
	if err != nil {
		return AddrRange{}, err
	}
	to, err := parse("stop", b.Stop)
	if err != nil {
		return AddrRange{}, err
	}
	if from.BitLen() != to.BitLen() {
		return AddrRange{}, fmt.Errorf("start %s and stop %s are of different families", from, to)
	}
	if from.Compare(to) > 0 {
		return AddrRange{}, fmt.Errorf("start %s is after stop %s", from, to)
	}
	r := AddrRange{From: from, To: to}
	min := MinPoolPrefixIPv4
	if from.Is6() {
		min = MinPoolPrefixIPv6
	}
	if r.Size().Cmp(new(big.Int).Lsh(big.NewInt(1), uint(from.BitLen()-min))) > 0 {
		return AddrRange{}, fmt.Errorf("range %s is too large: at most as many addresses as a /%d per block", r, min)
	}
	return r, nil
}

// lastAddr returns the last address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// GetKind implements Object.
func (p LoadBalancerIPPool) GetKind() string { return KindLoadBalancerIPPool }

// GetMeta implements Object.
func (p LoadBalancerIPPool) GetMeta() Meta { return p.Metadata }

func (p *LoadBalancerIPPool) defaultNamespace() {
	p.Metadata.Namespace = namespaceOrDefault(p.Metadata.Namespace)
}

func (p *LoadBalancerIPPool) normalize() { p.Status = LoadBalancerIPPoolStatus{} }

// Validate checks a LoadBalancerIPPool as Decode leaves it (namespace
// "default").
func (p LoadBalancerIPPool) Validate() error {
	if err := validateHeader(p.APIVersion, p.Kind, KindLoadBalancerIPPool, p.Metadata); err != nil {
		return err
	}
	if p.Metadata.Namespace != DefaultNamespace {
		return fieldError("metadata.namespace", "a %s is cluster-scoped: leave the namespace out (got %q)", KindLoadBalancerIPPool, p.Metadata.Namespace)
	}
	if len(p.Spec.Blocks) == 0 {
		return fieldError("spec.blocks", "must list at least one block (cidr, or start and stop)")
	}
	var seen []AddrRange
	for i, b := range p.Spec.Blocks {
		path := fmt.Sprintf("spec.blocks[%d]", i)
		r, err := b.parse()
		if err != nil {
			return fieldError(path, "%v", err)
		}
		if j := slices.IndexFunc(seen, r.Overlaps); j >= 0 {
			return fieldError(path, "%s overlaps spec.blocks[%d] (%s)", r, j, seen[j])
		}
		seen = append(seen, r)
	}
	return validateSelector("spec.serviceSelector", p.Spec.ServiceSelector)
}

// PoolName is the name a pool is known by in LB-IPAM's records and
// messages (pools are cluster-scoped: the name alone).
func PoolName(p LoadBalancerIPPool) string { return p.Metadata.Name }

// CheckPoolOverlap returns an error naming both pools when a block of p
// shares an address with a block of another pool in existing (a pool
// with p's name is the one being replaced and never conflicts).
func CheckPoolOverlap(existing []LoadBalancerIPPool, p LoadBalancerIPPool) error {
	mine := p.Ranges()
	for _, e := range existing {
		if e.Metadata.Name == p.Metadata.Name {
			continue
		}
		for _, theirs := range e.Ranges() {
			for _, r := range mine {
				if r.Overlaps(theirs) {
					return fmt.Errorf("%s %s: block %s overlaps block %s of %s %s: pools must not share addresses",
						KindLoadBalancerIPPool, p.Metadata.Name, r, theirs, KindLoadBalancerIPPool, e.Metadata.Name)
				}
			}
		}
	}
	return nil
}
