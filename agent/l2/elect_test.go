package l2

import (
	"fmt"
	"net/netip"
	"testing"
)

func addrs(n int, policy string) []Address {
	var out []Address
	for i := range n {
		out = append(out, Address{Addr: netip.AddrFrom4([4]byte{10, 200, byte(i >> 8), byte(i)}), Policy: policy, Service: "Service/default/web"})
	}
	return out
}

func members(n int, policies ...string) []Member {
	var out []Member
	for i := range n {
		out = append(out, Member{Node: fmt.Sprintf("n%d", i+1), Policies: policies})
	}
	return out
}

// Every node computes the same leader whatever order it lists the members in.
func TestLeaderIsOrderIndependent(t *testing.T) {
	ms := members(5, "p")
	rev := append([]Member(nil), ms...)
	for i, j := 0, len(rev)-1; i < j; i, j = i+1, j-1 {
		rev[i], rev[j] = rev[j], rev[i]
	}
	for _, a := range addrs(200, "p") {
		l1, _ := Leader(a, ms)
		l2, _ := Leader(a, rev)
		if l1 != l2 {
			t.Fatalf("%s: leader %s in one order, %s in the other", a.Addr, l1, l2)
		}
	}
}

// Rendezvous hashing spreads addresses and moves only the dead node's.
func TestLeaderSpreadsAndMovesOnlyTheDeadNodes(t *testing.T) {
	as := addrs(1000, "p")
	ms := members(4, "p")
	before := Elect(as, ms)
	count := map[string]int{}
	for _, l := range before {
		count[l]++
	}
	for _, m := range ms {
		if c := count[m.Node]; c < 180 || c > 320 {
			t.Errorf("%s leads %d of 1000 addresses: not spread (%v)", m.Node, c, count)
		}
	}
	after := Elect(as, ms[1:]) // n1 died
	for a, l := range before {
		if l != "n1" && after[a] != l {
			t.Errorf("%s moved from %s to %s although %s is alive", a, l, after[a], l)
		}
		if after[a] == "n1" {
			t.Errorf("%s still led by the dead n1", a)
		}
	}
}

func TestEligibility(t *testing.T) {
	a := Address{Addr: netip.MustParseAddr("fd00::1"), Policy: "p", Service: "Service/default/web", Local: true}
	ms := []Member{
		{Node: "n1", Policies: []string{"p"}},                                             // no local backend
		{Node: "n2", Policies: []string{"other"}, Local: []string{"Service/default/web"}}, // not selected
		{Node: "n3", Policies: []string{"a", "p"}, Local: []string{"Service/default/web"}},
	}
	if l, ok := Leader(a, ms); !ok || l != "n3" {
		t.Errorf("Local service: leader %q %v, want n3 (the only node with a local backend)", l, ok)
	}
	if n := candidates(a, ms); n != 1 {
		t.Errorf("candidates %d", n)
	}
	a.Local = false
	if n := candidates(a, ms); n != 2 {
		t.Errorf("Cluster service: candidates %d, want n1 and n3", n)
	}
	if _, ok := Leader(a, nil); ok {
		t.Error("a leader without members")
	}
}
