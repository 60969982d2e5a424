package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// The encryption stories: the mesh of mesh_test.go (startMesh) with
// --encryption=wireguard on every node.

// wgPeers returns the agent's WireGuard public key and its peers' keys by
// node.
func wgPeers(ctx context.Context, a *lab.Agent) (string, map[string]string, error) {
	st, err := agentStatus(ctx, a)
	if err != nil {
		return "", nil, err
	}
	if st.WireGuard == nil {
		return "", nil, fmt.Errorf("%s: no wireguard section in the status", a.Node.Name())
	}
	peers := map[string]string{}
	for _, p := range st.WireGuard.Peers {
		peers[p.Node] = p.PublicKey
	}
	return st.WireGuard.PublicKey, peers, nil
}

// capture runs tcpdump on a node's underlay interface until stop is called,
// and returns the decoded packet lines. Immediate mode: without it, packets
// sit in the kernel's ring for up to a second and a stop loses them.
type capture struct {
	proc *lab.Proc
	file string
	ns   *lab.Netns
}

func startCapture(t *testing.T, ctx context.Context, n *lab.Node) *capture {
	t.Helper()
	f := filepath.Join(n.Dir(), fmt.Sprintf("capture-%d.pcap", time.Now().UnixNano()))
	p, err := n.Start(ctx, "tcpdump", "-i", "eth0", "-nn", "-U", "--immediate-mode", "-s", "128", "-w", f)
	if err != nil {
		t.Fatal(err)
	}
	// tcpdump says "listening on" once the socket is bound.
	if err := eventually(10*time.Second, func() error {
		if !strings.Contains(p.Log(), "listening on") {
			return fmt.Errorf("tcpdump on %s not listening yet: %s", n.Name(), p.Log())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return &capture{proc: p, file: f, ns: n.NS()}
}

func (c *capture) stop(t *testing.T, ctx context.Context) []string {
	t.Helper()
	time.Sleep(200 * time.Millisecond) // let the last packets reach the file
	_ = c.proc.Signal(syscall.SIGINT)
	_ = c.proc.Wait()
	out, err := c.ns.Exec(ctx, "tcpdump", "-nn", "-r", c.file)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(c.file)
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, " IP") {
			lines = append(lines, l)
		}
	}
	return lines
}

// podAddr matches the lab's pod addresses (10.<cluster>.<node>.x and
// fd00:<cluster>:0:<node>::x) as tcpdump prints them.
var podAddr = regexp.MustCompile(`\b10\.[12]\.\d+\.\d+\b|\bfd00:[12]:0:`)

func TestWireGuardMesh(t *testing.T) {
	m := startMesh(t, lab.ClusterOptions{Encryption: "wireguard"})
	c1a, c1b := m.c1.Agents[0], m.c1.Agents[1]
	c2a, c2b := m.c2.Agents[0], m.c2.Agents[1]
	agents := []*lab.Agent{c1a, c1b, c2a, c2b}

	step(t, "every node has a WireGuard peer for each of the 3 others")
	if err := eventually(30*time.Second, func() error {
		for _, a := range agents {
			_, peers, err := wgPeers(m.ctx, a)
			if err != nil {
				return err
			}
			if len(peers) != 3 {
				return fmt.Errorf("%s has peers %v, want 3", a.Node.Name(), peers)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	s1 := m.pod(c1a, "s1", map[string]string{"app": "server"})
	k1 := m.pod(c1b, "k1", map[string]string{"app": "client"})
	s2 := m.pod(c2a, "s2", map[string]string{"app": "server"})
	k2 := m.pod(c2b, "k2", map[string]string{"app": "client"})
	for _, p := range []*lab.Pod{s1, s2} {
		serveTCP(t, p.Netns, 8080, echo)
	}

	t.Run("pod to pod across nodes and clusters, only WireGuard UDP on the underlay", func(t *testing.T) {
		capC1b := startCapture(t, m.ctx, c1b.Node)
		capC2a := startCapture(t, m.ctx, c2a.Node)
		m.checkPaths(t, []podPath{{k1, s1, "c1 node 2 -> c1 node 1"}, {k1, s2, "c1 -> c2"}, {k2, s1, "c2 -> c1"}, {k2, s2, "c2 node 2 -> c2 node 1"}})
		for name, cp := range map[string]*capture{"c1 node 2": capC1b, "c2 node 1": capC2a} {
			lines := cp.stop(t, m.ctx)
			wg := 0
			for _, l := range lines {
				if podAddr.MatchString(l) {
					t.Errorf("%s's underlay carried a plaintext pod address: %s", name, l)
				}
				if strings.Contains(l, ".51871:") || strings.Contains(l, ".51871 >") {
					wg++
				}
			}
			if wg < 10 {
				t.Errorf("%s's underlay saw %d WireGuard packets among %d, want the traffic there:\n%s", name, wg, len(lines), strings.Join(lines, "\n"))
			}
			t.Logf("%s's underlay: %d packets, %d of them WireGuard UDP, none with a pod address", name, len(lines), wg)
		}
	})

	t.Run("wg show works on the device", func(t *testing.T) {
		st, err := agentStatus(m.ctx, c1a)
		if err != nil {
			t.Fatal(err)
		}
		out, err := c1a.Node.Exec(m.ctx, "wg", "show", st.WireGuard.Device)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(out), "peer: "); n != 3 {
			t.Fatalf("wg show %s lists %d peers, want 3:\n%s", st.WireGuard.Device, n, out)
		}
		if !strings.Contains(string(out), "latest handshake") {
			t.Fatalf("wg show %s shows no handshake after traffic:\n%s", st.WireGuard.Device, out)
		}
	})

	t.Run("BIG TCP: the embedded WireGuard device carries 64 KiB at most, said in the status; same node stays on", func(t *testing.T) {
		st, err := agentStatus(m.ctx, c1a)
		if err != nil {
			t.Fatal(err)
		}
		b := st.BigTCP
		if b == nil {
			t.Fatal("no BIG TCP in the status")
		}
		for _, p := range b.Paths {
			switch p.Path {
			case api.BigTCPPathWireGuard:
				if p.On || !strings.Contains(p.Reason, st.WireGuard.Device) || !strings.Contains(p.Reason, "tso_max_size") {
					t.Errorf("%s %s: %+v, want off naming %s and its tso_max_size", p.Path, p.Family, p, st.WireGuard.Device)
				}
			case api.BigTCPPathSameNode:
				if !p.On {
					t.Errorf("%s %s went off with WireGuard: %s", p.Path, p.Family, p.Reason)
				}
			case api.BigTCPPathCrossNode:
				if p.On || !strings.Contains(p.Reason, "through WireGuard") {
					t.Errorf("%s %s: %+v, want not used", p.Path, p.Family, p)
				}
			}
		}
	})

	t.Run("global service across clusters, encrypted", func(t *testing.T) {
		w1 := m.pod(c1a, "w1", map[string]string{"app": "web"})
		w2 := m.pod(c2b, "w2", map[string]string{"app": "web"})
		serveTCP(t, w1.Netns, 8080, sayName("c1-w1"))
		serveTCP(t, w2.Netns, 8080, sayName("c2-w2"))
		m.apply(c1a, fmt.Sprintf(globalWeb, "none"))
		m.apply(c2a, fmt.Sprintf(globalWeb, "none"))
		vip := netip.MustParseAddrPort("10.96.0.50:80")
		for _, from := range []*lab.Pod{k1, k2} {
			if err := eventually(30*time.Second, func() error {
				got, err := answers(from.Netns, vip, 40)
				if err != nil {
					return err
				}
				if got["c1-w1"] == 0 || got["c2-w2"] == 0 {
					return fmt.Errorf("from %s, 40 connections reached %v; want both clusters' backends", from.PodName, got)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("key rotation during a TCP stream", func(t *testing.T) {
		oldKey, _, err := wgPeers(m.ctx, c2a)
		if err != nil {
			t.Fatal(err)
		}
		s := startStream(t, k1.Netns, netip.AddrPortFrom(s2.IPv4, 8080))
		time.Sleep(time.Second)
		mark := s.echoed.Load()
		step(t, "rotating the key of c2's node 1 (the server's) while c1's client streams to it")
		s.event("rotate")
		out := m.cli(c2a, "wireguard", "rotate-key", "-o", "json")
		newKey, _, err := wgPeers(m.ctx, c2a)
		if err != nil {
			t.Fatal(err)
		}
		if newKey == oldKey || !strings.Contains(out, newKey) {
			t.Fatalf("rotate-key: key %s -> %s; output %s", oldKey, newKey, out)
		}
		if err := eventually(10*time.Second, func() error {
			for _, a := range []*lab.Agent{c1a, c1b, c2b} {
				_, peers, err := wgPeers(m.ctx, a)
				if err != nil {
					return err
				}
				if k := peers[m.c2.Name+"/"+c2a.Node.NodeName()]; k != newKey {
					return fmt.Errorf("%s still knows c2's node 1 by %q, want %s", a.Node.Name(), k, newKey)
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		if err := s.progressedSince(mark); err != nil {
			t.Fatal(err)
		}
		if err := s.finish(); err != nil {
			t.Fatalf("stream across the rotation: %v [%s]", err, s.report())
		}
		t.Logf("stream across the rotation: %s", s.report())
		after, err := os.ReadFile(filepath.Join(c2a.StateDir, "wireguard.key"))
		if err != nil {
			t.Fatal(err)
		}
		if fi, err := os.Stat(filepath.Join(c2a.StateDir, "wireguard.key")); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("key file mode: %v %v", fi, err)
		}
		if len(strings.TrimSpace(string(after))) == 0 {
			t.Fatal("empty key file after rotation")
		}
	})

	t.Run("an agent restart keeps its key and the tunnel", func(t *testing.T) {
		key, _, err := wgPeers(m.ctx, c1b)
		if err != nil {
			t.Fatal(err)
		}
		step(t, "restarting c1's node 2 agent; while it is down, its pods' traffic must not leave in plaintext")
		if err := c1b.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		cp := startCapture(t, m.ctx, c1b.Node)
		if err := tcpEcho(k1.Netns, netip.AddrPortFrom(s2.IPv4, 8080)); err == nil {
			t.Error("with the agent (and its WireGuard device) down, k1 still reached s2: through which path?")
		}
		for _, l := range cp.stop(t, m.ctx) {
			if podAddr.MatchString(l) {
				t.Errorf("with the agent down, the underlay carried a plaintext pod address: %s", l)
			}
		}
		if err := c1b.Start(m.ctx); err != nil {
			t.Fatal(err)
		}
		again, _, err := wgPeers(m.ctx, c1b)
		if err != nil {
			t.Fatal(err)
		}
		if again != key {
			t.Fatalf("public key changed across the restart: %s -> %s", key, again)
		}
		for _, dst := range []*lab.Pod{s1, s2} {
			if err := eventually(30*time.Second, func() error { return tcpEcho(k1.Netns, netip.AddrPortFrom(dst.IPv4, 8080)) }); err != nil {
				t.Fatalf("after the restart, k1 -> %s: %v", dst.PodName, err)
			}
		}
	})

	t.Run("an agent restarted while its cluster's etcd is down brings its tunnels back", func(t *testing.T) {
		step(t, "stopping c1's server, then restarting c1's node 2 agent")
		if err := m.c1.Server.Kill(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if m.c1.Server.Exited() {
				if err := m.c1.StartServer(m.ctx); err != nil {
					t.Error(err)
				}
			}
		})
		if err := c1b.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := c1b.Start(m.ctx); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		for _, dst := range []*lab.Pod{s1, s2} {
			if err := eventually(15*time.Second, func() error { return tcpEcho(k1.Netns, netip.AddrPortFrom(dst.IPv4, 8080)) }); err != nil {
				t.Fatalf("with etcd down, after the restart, k1 -> %s: %v", dst.PodName, err)
			}
		}
		t.Logf("tunnels back %v after the restart, without etcd", time.Since(start).Round(10*time.Millisecond))
		step(t, "restarting c1's server")
		if err := m.c1.StartServer(m.ctx); err != nil {
			t.Fatal(err)
		}
		if err := eventually(45*time.Second, func() error {
			st, err := agentStatus(m.ctx, c1b)
			if err != nil {
				return err
			}
			if st.ClusterMesh == nil || !st.ClusterMesh.Connected || !st.ClusterMesh.Published {
				return fmt.Errorf("c1 node 2 not reconnected yet: %+v", st.ClusterMesh)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := tcpEcho(k1.Netns, netip.AddrPortFrom(s2.IPv4, 8080)); err != nil {
			t.Fatalf("after etcd is back: %v", err)
		}
	})
}

func TestWireGuardNodeEncryption(t *testing.T) {
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	step(t, "one cluster of two nodes with --encryption=wireguard --node-encryption")
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Encryption: "wireguard", NodeEncryption: true})
	if err != nil {
		t.Fatal(err)
	}
	a, b := c.Agents[0], c.Agents[1]
	var peerIP netip.Addr
	if err := eventually(30*time.Second, func() error {
		st, err := agentStatus(ctx, a)
		if err != nil {
			return err
		}
		if st.WireGuard == nil || !st.WireGuard.NodeEncryption || len(st.WireGuard.Peers) != 1 {
			return fmt.Errorf("wireguard status %+v, want node encryption and one peer", st.WireGuard)
		}
		for _, p := range st.WireGuard.Peers[0].AllowedIPs {
			if p.IsSingleIP() && p.Addr().Is4() {
				peerIP = p.Addr()
			}
		}
		if !peerIP.IsValid() {
			return fmt.Errorf("peer AllowedIPs %v lack the node address", st.WireGuard.Peers[0].AllowedIPs)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	cp := startCapture(t, ctx, a.Node)
	if _, err := a.Node.Exec(ctx, "ping", "-c", "3", "-i", "0.2", "-W", "2", peerIP.String()); err != nil {
		t.Fatalf("node to node over the tunnel: %v", err)
	}
	wg := 0
	for _, line := range cp.stop(t, ctx) {
		if strings.Contains(line, "ICMP echo") {
			t.Errorf("node-to-node ping in plaintext on the underlay: %s", line)
		}
		if strings.Contains(line, ".51871") {
			wg++
		}
	}
	if wg < 6 {
		t.Errorf("saw %d WireGuard packets for 3 pings, want at least 6", wg)
	}
	// The agents still reach their server (not a node: not tunneled), and
	// a restarted agent comes back.
	if err := b.Proc.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := eventually(30*time.Second, func() error {
		_, err := a.Node.Exec(ctx, "ping", "-c", "1", "-W", "1", peerIP.String())
		return err
	}); err != nil {
		t.Fatalf("after a restart of the peer: %v", err)
	}
}
