package identity

import (
	"context"
	"errors"
)

// Identity is an allocated numeric identity and its label set.
type Identity struct {
	ID     uint32 `json:"id"`
	Labels Labels `json:"labels"`
}

// Allocator hands out numeric identities for label sets.
type Allocator interface {
	// Allocate returns the identity of l, allocating it if needed. The same
	// labels give the same ID; every call takes one reference.
	Allocate(ctx context.Context, l Labels) (uint32, error)
	// Release drops one reference; the last one frees the ID.
	Release(ctx context.Context, id uint32) error
	// Get returns the labels of an allocated or reserved identity.
	Get(id uint32) (Labels, bool)
	// List returns the allocated (not reserved) identities sorted by ID.
	List() []Identity
}

// ErrNotFound is wrapped by errors about IDs that are not allocated.
var ErrNotFound = errors.New("identity not found")

const (
	// localBits is the width of the per-cluster part of an identity.
	localBits = 20
	// MaxLocal is the largest per-cluster identity number.
	MaxLocal = 1<<localBits - 1
	// MaxClusterID is the largest cluster ID that fits above localBits.
	MaxClusterID = 4095
	// MaxReserved is the largest reserved identity.
	MaxReserved = 255
)

// reserved lists the reserved identities. Keep in sync with the bpf
// package's Identity* constants (checked by a test).
var reserved = map[string]uint32{
	"host":        1,
	"world":       2,
	"unmanaged":   3,
	"health":      4,
	"remote-node": 6,
	"ingress":     8,
}

// ReservedIdentity returns the ID of a reserved identity by name.
func ReservedIdentity(name string) (uint32, bool) {
	id, ok := reserved[name]
	return id, ok
}

// ReservedName returns the name of a reserved identity.
func ReservedName(id uint32) (string, bool) {
	for name, rid := range reserved {
		if rid == id {
			return name, true
		}
	}
	return "", false
}

// ClusterIDOf returns the cluster part of a cluster-scoped identity (0 for
// reserved identities).
func ClusterIDOf(id uint32) uint32 {
	return id >> localBits
}
