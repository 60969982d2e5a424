package l2

import (
	"crypto/sha256"
	"encoding/binary"
	"net/netip"
	"slices"
)

// Address is one service address to announce and what decides who may
// answer it.
type Address struct {
	Addr    netip.Addr
	Policy  string // objects.Key of the policy that covers it
	Service string // objects.Key of the service
	// Local: the service's externalTrafficPolicy is Local, so only nodes
	// with a ready local backend may answer.
	Local bool
}

// Member is a node that may lead: the policies it is eligible for (it is
// selected and has a selected interface with carrier) and the Local
// services it holds a ready backend of.
type Member struct {
	Node     string   `json:"node"`
	Policies []string `json:"policies,omitempty"` // sorted
	Local    []string `json:"local,omitempty"`    // sorted
}

// eligible reports whether m may lead a.
func (m Member) eligible(a Address) bool {
	if _, ok := slices.BinarySearch(m.Policies, a.Policy); !ok {
		return false
	}
	if a.Local {
		_, ok := slices.BinarySearch(m.Local, a.Service)
		return ok
	}
	return true
}

// score is the rendezvous (highest random weight) score of node for addr:
// every node computes the same scores, and removing a node moves only the
// addresses it led.
func score(addr netip.Addr, node string) uint64 {
	h := sha256.New()
	b, _ := addr.MarshalBinary()
	h.Write(b)
	h.Write([]byte{0})
	h.Write([]byte(node))
	return binary.BigEndian.Uint64(h.Sum(nil))
}

// Leader returns the member that leads a: the eligible one with the
// highest score (ties, which need a hash collision, go to the smaller
// name). ok is false when no member is eligible.
func Leader(a Address, members []Member) (leader string, ok bool) {
	var best uint64
	for _, m := range members {
		if !m.eligible(a) {
			continue
		}
		s := score(a.Addr, m.Node)
		if !ok || s > best || (s == best && m.Node < leader) {
			leader, best, ok = m.Node, s, true
		}
	}
	return leader, ok
}

// Elect returns the leader of every address that has one.
func Elect(addrs []Address, members []Member) map[netip.Addr]string {
	out := make(map[netip.Addr]string, len(addrs))
	for _, a := range addrs {
		if l, ok := Leader(a, members); ok {
			out[a.Addr] = l
		}
	}
	return out
}

// candidates counts the members eligible for a.
func candidates(a Address, members []Member) int {
	n := 0
	for _, m := range members {
		if m.eligible(a) {
			n++
		}
	}
	return n
}
