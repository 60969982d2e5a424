package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
)

// North-south: a client outside the mesh, behind cluster c1's router,
// reaches a Service at its external IPs. The router routes them to c1's
// nodes (ECMP over both, as a top-of-rack router would); the node the
// connection lands on balances it with from_external.

var (
	extWeb4 = netip.MustParseAddr("203.0.113.10")
	extWeb6 = netip.MustParseAddr("2001:db8:e::10")
)

const extWebService = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: extweb
  annotations: {isthmus.io/global: "true"}
spec:
  vips: [10.96.0.70, "fd00:96::70"]
  externalIPs: [203.0.113.10, "2001:db8:e::10"]
  externalTrafficPolicy: %s
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: extweb}
`

// c2 exports the same global service (its own VIPs, no external IP).
const extWebC2 = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: extweb
  annotations: {isthmus.io/global: "true"}
spec:
  vips: [10.96.0.70, "fd00:96::70"]
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: extweb}
`

// echoPod starts the connectivity echo server (it reports the peer
// address it sees) in a new pod.
func (m *mesh) echoPod(a *lab.Agent, name string, labels map[string]string) *lab.Pod {
	m.t.Helper()
	p := m.pod(a, name, labels)
	ln, err := connectivity.ListenIn(p.Path(), ":8080") // both families
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m.t.Cleanup(cancel)
	go func() { _ = connectivity.ServeEcho(ctx, ln, name, a.Node.Name(), a.Node.Name()) }()
	return p
}

// outsideAnswers makes n requests from the outside client to dst and
// returns the replies.
func outsideAnswers(o *lab.Outside, dst netip.AddrPort, n int) ([]connectivity.Reply, error) {
	var out []connectivity.Reply
	for range n {
		r, err := connectivity.FetchEcho(context.Background(), o.Path(), dst, 2*time.Second)
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	return out, nil
}

func byPod(rs []connectivity.Reply) map[string]int {
	got := map[string]int{}
	for _, r := range rs {
		got[r.Pod]++
	}
	return got
}

func northSouth(t *testing.T, ctx context.Context, a *lab.Agent) *api.NorthSouthStatus {
	t.Helper()
	st, err := agentStatus(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if st.NorthSouth == nil {
		t.Fatalf("%s: no north-south status", a.Node.Name())
	}
	return st.NorthSouth
}

// northSouthSetup builds the mesh, an echo pod per c1 node and one in c2,
// the outside client with routes to both c1 nodes, and applies extweb
// (Cluster, global).
func northSouthSetup(t *testing.T, opts lab.ClusterOptions) (*mesh, *lab.Outside) {
	m := startMesh(t, opts)
	c1a, c1b, c2a := m.c1.Agents[0], m.c1.Agents[1], m.c2.Agents[0]
	m.echoPod(c1a, "ext-c1n1", map[string]string{"app": "extweb"})
	m.echoPod(c1b, "ext-c1n2", map[string]string{"app": "extweb"})
	m.echoPod(c2a, "ext-c2n1", map[string]string{"app": "extweb"})
	out, err := m.c1.AddOutside("outside")
	if err != nil {
		t.Fatal(err)
	}
	for _, dst := range []netip.Prefix{netip.PrefixFrom(extWeb4, 32), netip.PrefixFrom(extWeb6, 128)} {
		if err := out.RouteVia(dst, 1, 2); err != nil {
			t.Fatal(err)
		}
	}
	step(t, "apply Service extweb (Cluster, global) in c1 and c2")
	m.apply(c1a, fmt.Sprintf(extWebService, "Cluster"))
	m.apply(c2a, extWebC2)
	return m, out
}

// checkCluster: from outside, both families reach the backends on both c1
// nodes and in c2, and no backend sees the client's address (SNAT).
func checkCluster(t *testing.T, m *mesh, out *lab.Outside) {
	t.Helper()
	checkSpreadSNAT(t, out, extWeb4, extWeb6, "ext-c1n1", "ext-c1n2", "ext-c2n1")
	for _, a := range m.c1.Agents {
		ns := northSouth(t, m.ctx, a)
		if !ns.SNATPresent || len(ns.Devices) == 0 || !ns.Devices[0].Attached || ns.FrontendsCluster != 2 {
			t.Fatalf("%s north-south status: %+v", a.Node.Name(), ns)
		}
	}
}

func TestNorthSouth(t *testing.T) {
	m, out := northSouthSetup(t, lab.ClusterOptions{})
	c1a, c1b := m.c1.Agents[0], m.c1.Agents[1]

	t.Run("Cluster: both families, spread over both nodes and c2, SNAT", func(t *testing.T) {
		checkCluster(t, m, out)
	})

	t.Run("a connection from outside survives its nodes' agents restarting", func(t *testing.T) {
		for _, v6 := range []bool{false, true} {
			dst := netip.AddrPortFrom(extWeb4, 80)
			if v6 {
				dst = netip.AddrPortFrom(extWeb6, 80)
			}
			c, err := dialTCP(out.Netns, dst, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			br := bufio.NewReader(c)
			first, err := requestOn(c, br)
			if err != nil {
				t.Fatal(err)
			}
			step(t, "SIGKILL both c1 agents, keep the connection to %s (answered by %s)", dst, first.Pod)
			for _, a := range m.c1.Agents {
				if err := a.Proc.Kill(); err != nil {
					t.Fatal(err)
				}
			}
			if r, err := requestOn(c, br); err != nil || r.Pod != first.Pod {
				t.Fatalf("while no agent runs: %+v, %v (want %s)", r, err, first.Pod)
			}
			for _, a := range m.c1.Agents {
				if err := a.Start(m.ctx); err != nil {
					t.Fatal(err)
				}
			}
			if r, err := requestOn(c, br); err != nil || r.Pod != first.Pod {
				t.Fatalf("after the restart: %+v, %v (want %s)", r, err, first.Pod)
			}
		}
	})

	t.Run("a port without a frontend is dropped", func(t *testing.T) {
		before := counterOf(t, m.ctx, c1a, "drop_no_frontend") + counterOf(t, m.ctx, c1b, "drop_no_frontend")
		if err := connectTimesOut(out.Netns, netip.AddrPortFrom(extWeb4, 81), 2*time.Second); err != nil {
			t.Fatalf("outside -> %s:81: %v", extWeb4, err)
		}
		if after := counterOf(t, m.ctx, c1a, "drop_no_frontend") + counterOf(t, m.ctx, c1b, "drop_no_frontend"); after <= before {
			t.Fatalf("drop_no_frontend %d -> %d", before, after)
		}
	})

	t.Run("NodePort: any node's address, from outside, another node and its pods; Cluster and Local", func(t *testing.T) {
		checkNodePort(t, m, out)
	})

	t.Run("Local: only the node's own backend, the client's address kept", func(t *testing.T) {
		m.apply(c1a, fmt.Sprintf(extWebService, "Local"))
		for _, dst := range []netip.Prefix{netip.PrefixFrom(extWeb4, 32), netip.PrefixFrom(extWeb6, 128)} {
			if err := out.RouteVia(dst, 2); err != nil {
				t.Fatal(err)
			}
		}
		for _, v6 := range []bool{false, true} {
			dst := netip.AddrPortFrom(extWeb4, 80)
			if v6 {
				dst = netip.AddrPortFrom(extWeb6, 80)
			}
			var rs []connectivity.Reply
			if err := eventually(30*time.Second, func() error {
				var err error
				rs, err = outsideAnswers(out, dst, 30)
				if err != nil {
					return err
				}
				if got := byPod(rs); got["ext-c1n2"] != 30 {
					return fmt.Errorf("30 requests to %s routed to c1-n2 reached %v; want only ext-c1n2", dst, got)
				}
				return nil
			}); err != nil {
				t.Fatalf("Local over %s: %v", familyName(v6), err)
			}
			for _, r := range rs {
				if r.Peer != out.Addr(v6) {
					t.Fatalf("under Local, the backend saw %s, want the client's address %s", r.Peer, out.Addr(v6))
				}
			}
		}
	})
}

// npWeb is extweb's pods at a node port, in c1 only.
const npWeb = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: npweb}
spec:
  type: NodePort
  vips: [10.96.0.71, "fd00:96::71"]
  externalTrafficPolicy: %s
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
  selector: {app: extweb}
`

// checkNodePort: a NodePort service answers at <node IP>:30080 of either
// c1 node, from outside, from the other node itself and from a pod on the
// other node, balanced over both nodes' backends under Cluster; under
// Local each node answers from outside with its own backend only and the
// client's address.
func checkNodePort(t *testing.T, m *mesh, out *lab.Outside) {
	c1a, c1b := m.c1.Agents[0], m.c1.Agents[1]
	m.apply(c1a, fmt.Sprintf(npWeb, "Cluster"))
	pod := m.pod(c1b, "np-client", map[string]string{"app": "np-client"})
	for i, v6 := range []bool{false, true} {
		node1 := netip.AddrPortFrom(m.c1.NodeIPs(1)[i], 30080)
		for _, from := range []struct{ what, path string }{
			{"outside", out.Path()}, {"node c1-n2", c1b.Node.Path()}, {"a pod on c1-n2", pod.Path()},
		} {
			rs := spreadOver(t, from.path, node1, "ext-c1n1", "ext-c1n2")
			if from.what == "outside" {
				for _, r := range rs {
					if r.Peer == out.Addr(v6) {
						t.Fatalf("under Cluster, %s saw the client's own address %s", r.Pod, r.Peer)
					}
				}
			}
		}
	}
	m.apply(c1a, fmt.Sprintf(npWeb, "Local"))
	for j, own := range map[int]string{1: "ext-c1n1", 2: "ext-c1n2"} {
		for i, v6 := range []bool{false, true} {
			dst := netip.AddrPortFrom(m.c1.NodeIPs(j)[i], 30080)
			err := eventually(10*time.Second, func() error {
				rs, err := outsideAnswers(out, dst, 10)
				if err != nil {
					return err
				}
				for _, r := range rs {
					if r.Pod != own || r.Peer != out.Addr(v6) {
						return fmt.Errorf("%s answered from %s seeing %s; want only %s seeing %s", dst, r.Pod, r.Peer, own, out.Addr(v6))
					}
				}
				return nil
			})
			if err != nil {
				t.Fatalf("Local: %v", err)
			}
		}
	}
}

func counterOf(t *testing.T, ctx context.Context, a *lab.Agent, reason string) uint64 {
	t.Helper()
	st, err := agentStatus(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Metrics {
		if m.Reason == reason {
			return m.Packets
		}
	}
	return 0
}

// requestOn sends one HTTP request to an echo server on an open
// connection and parses the answer.
func requestOn(c net.Conn, br *bufio.Reader) (connectivity.Reply, error) {
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: extweb\r\n\r\n"); err != nil {
		return connectivity.Reply{}, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return connectivity.Reply{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return connectivity.Reply{}, err
	}
	return connectivity.ParseReply(string(body))
}

// With WireGuard between the nodes, the way in works the same: the node's
// SNAT brings the replies of other nodes' and clusters' backends back.
func TestNorthSouthWireGuard(t *testing.T) {
	m, out := northSouthSetup(t, lab.ClusterOptions{Encryption: "wireguard"})
	checkCluster(t, m, out)
}

// checkSpreadSNAT: from outside, both families of the service address
// (addr4, addr6 port 80) reach every backend pod named, and none of them
// sees the client's own address (the node SNATed: externalTrafficPolicy
// Cluster).
func checkSpreadSNAT(t *testing.T, out *lab.Outside, addr4, addr6 netip.Addr, pods ...string) {
	t.Helper()
	for _, v6 := range []bool{false, true} {
		dst := netip.AddrPortFrom(addr4, 80)
		if v6 {
			dst = netip.AddrPortFrom(addr6, 80)
		}
		var rs []connectivity.Reply
		if err := eventually(30*time.Second, func() error {
			var err error
			rs, err = outsideAnswers(out, dst, 60)
			if err != nil {
				return err
			}
			got := byPod(rs)
			for _, p := range pods {
				if got[p] == 0 {
					return fmt.Errorf("60 requests to %s reached %v; want every one of %v", dst, got, pods)
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("outside -> %s over %s: %v", dst, familyName(v6), err)
		}
		t.Logf("outside -> %s: %v", dst, byPod(rs))
		for _, r := range rs {
			if r.Peer == out.Addr(v6) {
				t.Fatalf("under Cluster, backend %s saw the client's own address %s: no SNAT", r.Pod, r.Peer)
			}
		}
	}
}
