package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// External workloads (docs/vms.md): a host outside every cluster's node
// subnet, behind the fabric router, joins cluster c1 of the encrypted
// two-cluster mesh with a one-time token.

// vmPeers returns the node names the agent has WireGuard peers for.
func vmPeers(m *mesh, a *lab.Agent) (map[string]bool, error) {
	st, err := agentStatus(m.ctx, a)
	if err != nil {
		return nil, err
	}
	if st.WireGuard == nil {
		return nil, fmt.Errorf("%s: no wireguard status", a.Node.Name())
	}
	out := map[string]bool{}
	for _, p := range st.WireGuard.Peers {
		out[p.Node] = true
	}
	return out, nil
}

func TestVMJoinsTheMesh(t *testing.T) {
	m := startMesh(t, lab.ClusterOptions{Encryption: "wireguard"})
	nodes := []*lab.Agent{m.c1.Agents[0], m.c1.Agents[1], m.c2.Agents[0], m.c2.Agents[1]}
	step(t, "an ExternalWorkload in c1, a token, and the host's agent with --join")
	vm, err := m.c1.AddVMHost(m.ctx, 1, "db", map[string]string{"app": "db"})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := vm.CreateToken(m.ctx, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Join(m.ctx, tok); err != nil {
		t.Fatal(err)
	}
	addrs, err := vm.Addresses(m.ctx)
	if err != nil || len(addrs) != 2 {
		t.Fatalf("the host's addresses %v, %v", addrs, err)
	}
	t.Logf("host %s: uplink %v, mesh addresses %v", vm.Name, vm.Uplink, addrs)
	node := "c1/vm-" + vm.Name

	step(t, "every node of both clusters has the host as a WireGuard peer, and the host has all four nodes")
	if err := eventually(30*time.Second, func() error {
		for _, a := range nodes {
			peers, err := vmPeers(m, a)
			if err != nil {
				return err
			}
			if !peers[node] {
				return fmt.Errorf("%s has peers %v, not the host", a.Node.Name(), peers)
			}
		}
		peers, err := vmPeers(m, vm.Agent)
		if err != nil {
			return err
		}
		if len(peers) != 4 {
			return fmt.Errorf("the host has peers %v, want the 4 nodes", peers)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	s1 := m.pod(m.c1.Agents[0], "s1", map[string]string{"app": "server"})
	s2 := m.pod(m.c2.Agents[1], "s2", map[string]string{"app": "server"})
	k1 := m.pod(m.c1.Agents[1], "k1", map[string]string{"app": "client"})
	k2 := m.pod(m.c2.Agents[0], "k2", map[string]string{"app": "client"})
	for _, p := range []*lab.Pod{s1, s2} {
		serveTCP(t, p.Netns, 8080, echo)
	}
	serveTCP(t, vm.NS(), 5432, echo)

	step(t, "the host reaches pods in both clusters, and pods of both clusters reach a TCP service on the host, IPv4 and IPv6")
	for _, v6 := range []bool{false, true} {
		for _, p := range []*lab.Pod{s1, s2} {
			dst := netip.AddrPortFrom(p.Addr(v6), 8080)
			if err := eventually(20*time.Second, func() error { return tcpEcho(vm.NS(), dst) }); err != nil {
				t.Errorf("host -> %s %s: %v", p.PodName, dst, err)
			}
		}
		for _, p := range []*lab.Pod{k1, k2} {
			dst := netip.AddrPortFrom(pick(addrs, v6), 5432)
			if err := eventually(20*time.Second, func() error { return tcpEcho(p.Netns, dst) }); err != nil {
				t.Errorf("%s -> host %s: %v", p.PodName, dst, err)
			}
		}
	}
}

func pick(addrs []netip.Addr, v6 bool) netip.Addr {
	for _, a := range addrs {
		if a.Is6() == v6 {
			return a
		}
	}
	return netip.Addr{}
}

var _ = strings.Contains
