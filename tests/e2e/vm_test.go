package e2e

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// External workloads (docs/vms.md): a host outside every cluster's node
// subnet, behind the fabric router with its own uplink, joins cluster c1
// of the encrypted two-cluster mesh with a one-time token.

// vmPeers returns the peers ("cluster/node") of the agent's WireGuard
// device and their public keys.
func vmPeers(m *mesh, a *lab.Agent) (map[string]string, error) {
	st, err := agentStatus(m.ctx, a)
	if err != nil {
		return nil, err
	}
	if st.WireGuard == nil {
		return nil, fmt.Errorf("%s: no wireguard status", a.Node.Name())
	}
	out := map[string]string{}
	for _, p := range st.WireGuard.Peers {
		out[p.Node] = p.PublicKey
	}
	return out, nil
}

// vmStatus reads the workload's status from the cluster.
type vmRecord struct {
	Metadata struct{ Name string }
	Status   struct {
		Enrolled, Revoked bool
		Addresses         []netip.Addr
	}
}

func vmState(m *mesh, c *lab.Cluster, name string) (vmRecord, error) {
	out, err := c.CLI(m.ctx, "vm", "list", "-o", "json")
	if err != nil {
		return vmRecord{}, err
	}
	var ws []vmRecord
	if err := json.Unmarshal(out, &ws); err != nil {
		return vmRecord{}, err
	}
	for _, w := range ws {
		if w.Metadata.Name == name {
			return w, nil
		}
	}
	return vmRecord{}, fmt.Errorf("no workload %s", name)
}

// nodesWithPeer returns the nodes among agents that have peer.
func nodesWithPeer(m *mesh, agents []*lab.Agent, peer string) ([]string, error) {
	var out []string
	for _, a := range agents {
		peers, err := vmPeers(m, a)
		if err != nil {
			return nil, err
		}
		if _, ok := peers[peer]; ok {
			out = append(out, a.Node.Name())
		}
	}
	return out, nil
}

func pick(addrs []netip.Addr, v6 bool) netip.Addr {
	for _, a := range addrs {
		if a.Is6() == v6 {
			return a
		}
	}
	return netip.Addr{}
}

// stream keeps a TCP echo conversation going (a small message every 20 ms)
// and records when the last echo came back.
type echoStream struct {
	c        net.Conn
	lastEcho atomic.Int64 // unix nanos
	done     chan struct{}
}

func startEchoStream(t *testing.T, ns *lab.Netns, dst netip.AddrPort) *echoStream {
	t.Helper()
	c, err := dialTCP(ns, dst, 2*time.Second)
	if err != nil {
		t.Fatalf("stream to %s: %v", dst, err)
	}
	s := &echoStream{c: c, done: make(chan struct{})}
	s.lastEcho.Store(time.Now().UnixNano())
	go func() {
		defer close(s.done)
		buf := make([]byte, 16)
		for {
			_ = c.SetDeadline(time.Now().Add(200 * time.Millisecond))
			if _, err := c.Write([]byte("0123456789abcdef")); err != nil && !isTimeout(err) {
				return
			}
			if _, err := io.ReadFull(c, buf); err == nil {
				s.lastEcho.Store(time.Now().UnixNano())
			} else if !isTimeout(err) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { c.Close(); <-s.done })
	return s
}

func (s *echoStream) last() time.Time { return time.Unix(0, s.lastEcho.Load()) }

func TestVMJoinsTheMesh(t *testing.T) {
	m := startMesh(t, lab.ClusterOptions{Encryption: "wireguard"})
	nodes := []*lab.Agent{m.c1.Agents[0], m.c1.Agents[1], m.c2.Agents[0], m.c2.Agents[1]}
	agentBin, err := m.lab.Binary(lab.AgentBinary)
	if err != nil {
		t.Fatal(err)
	}
	step(t, "an ExternalWorkload app=db in c1 on a host behind the fabric")
	vm, err := m.c1.AddVMHost(m.ctx, 1, "db", map[string]string{"app": "db"})
	if err != nil {
		t.Fatal(err)
	}
	peerName := "c1/vm-" + vm.Name
	// The same name in c2, for a token of another cluster.
	vm2, err := m.c2.AddVMHost(m.ctx, 2, "db", map[string]string{"app": "db"})
	if err != nil {
		t.Fatal(err)
	}
	good, err := vm.CreateToken(m.ctx, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	other, err := vm2.CreateToken(m.ctx, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// join runs the agent's enrollment in the host with a fresh state dir
	// and returns its output (it exits when refused).
	seq := 0
	join := func(tok, fp string) (string, error) {
		seq++
		args := append([]string{agentBin, "--state-dir", filepath.Join(vm.Dir(), fmt.Sprintf("bad-%d", seq)),
			"--socket", filepath.Join(vm.Dir(), fmt.Sprintf("bad-%d.sock", seq))}, vm.JoinArgs(lab.Token{Server: good.Server, Token: tok, CAFingerprint: fp})...)
		out, err := vm.Exec(m.ctx, args...)
		return string(out), err
	}
	refusedCleanly := func(t *testing.T, what, tok, fp, want string) {
		t.Helper()
		out, err := join(tok, fp)
		if err == nil || !strings.Contains(out, want) {
			t.Fatalf("%s: agent --join = %v, output %q; want a failure saying %q", what, err, out, want)
		}
		st, err := vmState(m, m.c1, vm.Name)
		if err != nil {
			t.Fatal(err)
		}
		if st.Status.Enrolled || len(st.Status.Addresses) > 0 {
			t.Errorf("%s: the workload changed: %+v", what, st.Status)
		}
		time.Sleep(300 * time.Millisecond) // what a record would take to reach the nodes
		if with, err := nodesWithPeer(m, nodes, peerName); err != nil || len(with) > 0 {
			t.Errorf("%s: nodes with the host as a peer: %v, %v", what, with, err)
		}
		t.Logf("%s: refused: %s", what, lastLine(out))
	}
	t.Run("bad tokens are refused and create nothing", func(t *testing.T) {
		parts := strings.Split(good.Token, ".")
		forged := strings.Join(append(parts[:3], base64.RawURLEncoding.EncodeToString(make([]byte, 32))), ".")
		expired, err := vm.CreateToken(m.ctx, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(1100 * time.Millisecond)
		refusedCleanly(t, "forged token", forged, good.CAFingerprint, "unknown token")
		refusedCleanly(t, "expired token", expired.Token, good.CAFingerprint, "token expired")
		refusedCleanly(t, "token of cluster c2", other.Token, good.CAFingerprint, `the token is for cluster "c2"`)
		refusedCleanly(t, "wrong CA fingerprint (c2's)", good.Token, other.CAFingerprint, "does not match the pinned fingerprint")
	})

	step(t, "the host joins with the good token")
	if _, err := vm.Join(m.ctx, good); err != nil {
		t.Fatal(err)
	}
	st, err := vmState(m, m.c1, vm.Name)
	if err != nil || !st.Status.Enrolled || len(st.Status.Addresses) != 2 {
		t.Fatalf("after joining: %+v, %v", st, err)
	}
	addrs := st.Status.Addresses
	t.Logf("host %s: uplink %v, mesh addresses %v", vm.Name, vm.Uplink, addrs)
	t.Run("a replayed token and a second enrollment of the name are refused", func(t *testing.T) {
		out, err := join(good.Token, good.CAFingerprint)
		if err == nil || !strings.Contains(out, "token already used") {
			t.Fatalf("replay: %v %q", err, out)
		}
		if _, err := m.c1.CLI(m.ctx, "vm", "token", "create", vm.Name); err == nil || !strings.Contains(err.Error(), "already enrolled") {
			t.Fatalf("token for an enrolled name: %v", err)
		}
	})

	step(t, "every node of both clusters has the host as a WireGuard peer, and the host has all four nodes")
	if err := eventually(30*time.Second, func() error {
		if with, err := nodesWithPeer(m, nodes, peerName); err != nil || len(with) != 4 {
			return fmt.Errorf("nodes with the host as a peer: %v, %v", with, err)
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
	s3 := m.pod(m.c1.Agents[1], "s3", map[string]string{"app": "vault"})
	k1 := m.pod(m.c1.Agents[1], "k1", map[string]string{"app": "client"})
	k2 := m.pod(m.c2.Agents[0], "k2", map[string]string{"app": "client"})
	kx := m.pod(m.c1.Agents[0], "kx", map[string]string{"app": "intruder"})
	for _, p := range []*lab.Pod{s1, s2, s3} {
		serveTCP(t, p.Netns, 8080, echo)
	}
	serveTCP(t, vm.NS(), 5432, echo)

	t.Run("the host and pods of both clusters reach each other, only WireGuard on the host's uplink", func(t *testing.T) {
		capture := startCapture(t, m.ctx, vm.Node)
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
		lines := capture.stop(t, m.ctx)
		wg, control := 0, 0
		server := m.c1.RouterIPs()[0].String()
		for _, l := range lines {
			switch {
			case podAddr.MatchString(l):
				t.Errorf("the host's uplink carried a mesh address in plaintext: %s", l)
			case strings.Contains(l, ".51871:") || strings.Contains(l, ".51871 >"):
				wg++
			case strings.Contains(l, server+".2379") || strings.Contains(l, server+".8443"):
				control++ // the host's etcd connection (TLS), not mesh traffic
			case strings.Contains(l, "ICMP6, neighbor") || strings.Contains(l, "ICMP6, router"):
				control++ // neighbour discovery with the fabric router
			default:
				t.Errorf("the host's uplink carried something else than WireGuard: %s", l)
			}
		}
		if wg < 20 {
			t.Errorf("%d WireGuard packets among %d on the host's uplink, want the traffic there", wg, len(lines))
		}
		t.Logf("host uplink: %d packets, %d WireGuard, %d control (its server's etcd, neighbour discovery), none with a mesh address",
			len(lines), wg, control)
	})

	t.Run("policies select the host by its labels, in both directions", func(t *testing.T) {
		m.apply(m.c1.Agents[0], `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: clients-to-db}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: db}}]
      toPorts: [{port: 5432, protocol: TCP}]
---
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: intruder-to-server}
spec:
  endpointSelector: {matchLabels: {app: intruder}}
  egress:
    - toEndpoints: [{matchLabels: {app: server}}]
---
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: server-from-db}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: db}}]
      toPorts: [{port: 8080, protocol: TCP}]
---
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: vault-from-clients}
spec:
  endpointSelector: {matchLabels: {app: vault}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
`)
		for _, v6 := range []bool{false, true} {
			db := netip.AddrPortFrom(pick(addrs, v6), 5432)
			if err := eventually(enforceWithin, func() error { return tcpEcho(k1.Netns, db) }); err != nil {
				t.Errorf("k1 (app=client, egress allowed to app=db) -> host: %v", err)
			}
			if err := eventually(enforceWithin, func() error { return connectTimesOut(kx.Netns, db, deniedDial) }); err != nil {
				t.Errorf("kx (app=intruder, egress only to app=server) -> host: %v", err)
			}
			if err := eventually(enforceWithin, func() error { return tcpEcho(vm.NS(), netip.AddrPortFrom(s1.Addr(v6), 8080)) }); err != nil {
				t.Errorf("host -> s1 (app=server, ingress from app=db): %v", err)
			}
			if err := eventually(enforceWithin, func() error {
				return connectTimesOut(vm.NS(), netip.AddrPortFrom(s3.Addr(v6), 8080), deniedDial)
			}); err != nil {
				t.Errorf("host -> s3 (app=vault, ingress from app=client only): %v", err)
			}
		}
		for _, p := range []string{"clients-to-db", "intruder-to-server", "server-from-db", "vault-from-clients"} {
			m.cli(m.c1.Agents[0], "delete", "networkpolicy", p)
		}
	})

	t.Run("the host reaches a global service by its VIP, answered by both clusters' backends", func(t *testing.T) {
		w1 := m.pod(m.c1.Agents[0], "w1", map[string]string{"app": "web"})
		w2 := m.pod(m.c2.Agents[1], "w2", map[string]string{"app": "web"})
		serveTCP(t, w1.Netns, 8080, sayName("c1-w1"))
		serveTCP(t, w2.Netns, 8080, sayName("c2-w2"))
		m.apply(m.c1.Agents[0], fmt.Sprintf(globalWeb, "none"))
		m.apply(m.c2.Agents[0], fmt.Sprintf(globalWeb, "none"))
		t.Cleanup(func() {
			m.cli(m.c1.Agents[0], "delete", "service", "web")
			m.cli(m.c2.Agents[0], "delete", "service", "web")
		})
		nat := vmCounter(t, m, vm.Agent, "service_nat")
		for _, vip := range []netip.AddrPort{netip.MustParseAddrPort("10.96.0.50:80"), netip.MustParseAddrPort("[fd00:96::50]:80")} {
			if err := eventually(30*time.Second, func() error {
				got, err := answers(vm.NS(), vip, 40)
				if err != nil {
					return err
				}
				if got["c1-w1"] == 0 || got["c2-w2"] == 0 {
					return fmt.Errorf("40 connections from the host reached %v; want both clusters' backends", got)
				}
				return nil
			}); err != nil {
				t.Errorf("host -> %s: %v", vip, err)
			}
		}
		// The host's own datapath translated them (no node's did: the
		// packets leave the host with a backend's address).
		if got := vmCounter(t, m, vm.Agent, "service_nat") - nat; got < 80 {
			t.Errorf("the host's service_nat rose by %d, want at least 80", got)
		} else {
			t.Logf("the host's datapath translated %d new flows to the VIPs", got)
		}
	})

	t.Run("a policy selecting the host admits one pod and denies another, at the host", func(t *testing.T) {
		m.apply(m.c1.Agents[0], `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: db-from-clients}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{port: 5432, protocol: TCP}]
`)
		t.Cleanup(func() { m.cli(m.c1.Agents[0], "delete", "networkpolicy", "db-from-clients") })
		// No policy selects kx, k1 or their nodes' pods: only the host can
		// drop kx's connections.
		kxNode := m.c1.Agents[0]
		for _, v6 := range []bool{false, true} {
			db := netip.AddrPortFrom(pick(addrs, v6), 5432)
			hostDrops := vmCounter(t, m, vm.Agent, "drop_policy_ingress")
			nodeDrops := vmCounter(t, m, kxNode, "drop_policy_egress") + vmCounter(t, m, kxNode, "drop_policy_ingress")
			if err := eventually(enforceWithin, func() error { return connectTimesOut(kx.Netns, db, deniedDial) }); err != nil {
				t.Errorf("kx (app=intruder) -> host %s: %v", db, err)
			}
			if got := vmCounter(t, m, vm.Agent, "drop_policy_ingress") - hostDrops; got == 0 {
				t.Errorf("kx -> host %s: the host's drop_policy_ingress did not rise", db)
			} else {
				t.Logf("kx -> host %s denied: the host's drop_policy_ingress +%d", db, got)
			}
			if got := vmCounter(t, m, kxNode, "drop_policy_egress") + vmCounter(t, m, kxNode, "drop_policy_ingress") - nodeDrops; got != 0 {
				t.Errorf("kx's node dropped %d packets by policy: the denial must be the host's", got)
			}
			if err := eventually(enforceWithin, func() error { return tcpEcho(k1.Netns, db) }); err != nil {
				t.Errorf("k1 (app=client) -> host %s: %v", db, err)
			}
			// The host's own connections get their answers: conntrack,
			// not the policy, admits replies.
			if err := tcpEcho(vm.NS(), netip.AddrPortFrom(s1.Addr(v6), 8080)); err != nil {
				t.Errorf("host -> s1 under the host's ingress policy: %v", err)
			}
		}
	})

	t.Run("a restarted host agent keeps its key and its tunnels, without a new token", func(t *testing.T) {
		before, err := vmPeers(m, m.c1.Agents[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.Agent.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		restart := time.Now()
		if err := vm.Agent.Start(m.ctx); err != nil {
			t.Fatal(err)
		}
		dst := netip.AddrPortFrom(s2.IPv4, 8080)
		if err := eventually(10*time.Second, func() error { return tcpEcho(vm.NS(), dst) }); err != nil {
			t.Fatalf("after the restart, host -> s2: %v", err)
		}
		t.Logf("traffic to c2 again %s after the restart began", time.Since(restart).Round(time.Millisecond))
		after, err := vmPeers(m, m.c1.Agents[0])
		if err != nil {
			t.Fatal(err)
		}
		if after[peerName] == "" || after[peerName] != before[peerName] {
			t.Errorf("the host's key as c1-n1 sees it: %q before, %q after the restart", before[peerName], after[peerName])
		}
		if st, err := vmState(m, m.c1, vm.Name); err != nil || !st.Status.Enrolled {
			t.Errorf("after the restart: %+v, %v", st, err)
		}
	})

	t.Run("revocation cuts a running stream within two seconds, everywhere", func(t *testing.T) {
		s := startEchoStream(t, vm.NS(), netip.AddrPortFrom(s2.IPv4, 8080))
		time.Sleep(300 * time.Millisecond)
		if time.Since(s.last()) > 200*time.Millisecond {
			t.Fatalf("the stream does not flow before the revocation (last echo %s ago)", time.Since(s.last()))
		}
		revoke := time.Now()
		if _, err := m.c1.CLI(m.ctx, "vm", "revoke", vm.Name); err != nil {
			t.Fatal(err)
		}
		if err := eventually(2*time.Second, func() error {
			with, err := nodesWithPeer(m, nodes, peerName)
			if err != nil || len(with) > 0 {
				return fmt.Errorf("nodes that still have the host as a peer: %v, %v", with, err)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		time.Sleep(time.Second)
		cut := s.last().Sub(revoke)
		if time.Since(s.last()) < 500*time.Millisecond {
			t.Errorf("the stream still flows %s after the revocation", time.Since(revoke).Round(time.Millisecond))
		}
		if cut > 2*time.Second {
			t.Errorf("last echo %s after the revocation, want within 2s", cut)
		}
		t.Logf("revocation: last echo %s after the revoke command started", cut.Round(time.Millisecond))
		for _, dst := range []netip.AddrPort{netip.AddrPortFrom(s1.IPv4, 8080), netip.AddrPortFrom(s2.IPv6, 8080)} {
			if c, err := dialTCP(vm.NS(), dst, deniedDial); err == nil {
				c.Close()
				t.Errorf("the revoked host still connects to %s", dst)
			}
		}
		if err := connectTimesOut(k1.Netns, netip.AddrPortFrom(pick(addrs, false), 5432), deniedDial); err != nil && !strings.Contains(err.Error(), "unreachable") && !strings.Contains(err.Error(), syscall.EHOSTUNREACH.Error()) {
			t.Errorf("a pod to the revoked host: %v", err)
		}
		if st, err := vmState(m, m.c1, vm.Name); err != nil || st.Status.Enrolled || !st.Status.Revoked {
			t.Errorf("after the revocation: %+v, %v", st, err)
		}
	})
}

// vmCounter is a datapath counter (packets) of an agent: a node's or the
// host's.
func vmCounter(t *testing.T, m *mesh, a *lab.Agent, reason string) uint64 {
	t.Helper()
	st, err := agentStatus(m.ctx, a)
	if err != nil {
		t.Fatalf("status of %s: %v", a.Node.Name(), err)
	}
	for _, c := range st.Metrics {
		if c.Reason == reason {
			return c.Packets
		}
	}
	return 0
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
