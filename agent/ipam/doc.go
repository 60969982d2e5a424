// Package ipam owns node-local pod address allocation: at most one IPv4 and
// one IPv6 pod CIDR per node, one address per family per owner (an
// endpoint), persisted in the agent's state directory so a restarted agent
// hands out the same addresses to the same owners and never one in use.
//
// Contract:
//
//	func New(stateFile string, cidrs ...netip.Prefix) (*IPAM, error)
//	func (a *IPAM) Allocate(owner string) ([]netip.Addr, error) // one per CIDR, in CIDR order
//	func (a *IPAM) AllocateAsync(owner string) ([]netip.Addr, func() error, error) // the write goes on; the func waits for it
//	func (a *IPAM) Release(owner string) error                   // unknown owner: wraps ErrNotFound
//	func (a *IPAM) Get(owner string) ([]netip.Addr, bool)
//	func (a *IPAM) Allocations() map[string][]netip.Addr
//	func (a *IPAM) CIDRs() []netip.Prefix
//
// Never handed out: the network address, the IPv4 broadcast address and the
// first host address (the node's own address on the pod network). A cursor
// per CIDR moves forward round-robin and is persisted, so a just-released
// address is not handed out again right away (a peer that still caches the
// old owner would otherwise reach the new one). Allocation steps over used
// addresses only, so a /64 works without enumerating it.
//
// Allocate and Release return once the change is on disk. Allocations made
// together (pods created at once) share one write of the state file (a
// group commit); Get and Allocations may show an allocation whose write is
// still under way.
//
// When persisted allocations lie outside the configured CIDRs (the node's
// CIDR changed), New returns a working IPAM that keeps them together with an
// error wrapping ErrOutsideCIDRs that names them; the caller decides whether
// to go on and Release them as their endpoints go away.
package ipam
