// Package identity owns security labels and the numeric identities allocated
// for label sets.
//
// An identity is the sorted label set of a workload (always including
// LabelCluster and LabelNamespace) mapped to a 32-bit number:
//
//	0         unknown
//	1..255    reserved (host=1 world=2 unmanaged=3 health=4 remote-node=6 ingress=8)
//	cluster-scoped: clusterID<<20 | n, clusterID 1..4095, n 1..2^20-1
//
// Contract:
//
//	type Labels map[string]string
//	func (l Labels) String() string               // sorted "k=v,k2=v2"
//	func ParseLabels(s string) (Labels, error)    // inverse of String; spaces around commas allowed
//	func (l Labels) Has(sel map[string]string) bool
//	func ValidateLabelKey(k string) error         // Kubernetes label key rules
//	func ValidateLabelValue(v string) error       // Kubernetes label value rules
//	type Allocator interface {
//		Allocate(ctx context.Context, l Labels) (uint32, error)
//		Release(ctx context.Context, id uint32) error
//		Get(id uint32) (Labels, bool)
//		List() []Identity
//	}
//	func NewLocal(stateFile string, clusterID uint32) (*Local, error)
//	func ReservedIdentity(name string) (uint32, bool)
//	func ReservedName(id uint32) (string, bool)
//	func ClusterIDOf(id uint32) uint32
//
// Local is the node-local allocator that persists to a JSON file; an
// etcd-backed allocator replaces it later behind the same Allocator interface.
package identity
