package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// Node ports on a standalone node: a client outside the mesh (its own
// namespace, linked to the node's external device eth0) reaches a
// Service at <node address>:<nodePort>, TCP and UDP over both families,
// and so do the node's pods; Local keeps the client's address and, with no
// local backend, answers nothing; a port that is no node port stays the
// node's own.

var (
	npNode4   = netip.MustParseAddr("198.51.100.1")
	npNode6   = netip.MustParseAddr("2001:db8:1::1")
	npClient4 = netip.MustParseAddr("198.51.100.2")
	npClient6 = netip.MustParseAddr("2001:db8:1::2")
)

const npService = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  vips: [10.96.0.80, "fd00:96::80"]
  externalTrafficPolicy: %s
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30080}
  selector: {app: web}
`

// Its backend is an address on no node: under Local, no node has one.
const npFarService = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: far}
spec:
  type: NodePort
  vips: [10.96.0.81, "fd00:96::81"]
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30090}]
  backends: [{ip: 10.99.0.1}, {ip: "fd00:99::1"}]
`

func TestNodePortStandalone(t *testing.T) {
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	ln, err := l.AddNode("node")
	if err != nil {
		t.Fatal(err)
	}
	client, err := l.AddNode("outside") // a node's namespace: no IPv6 DAD to wait for
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.LinkWith(lab.LinkOptions{A: ln.Netns, B: client.Netns, AName: "eth0", BName: "eth0",
		AAddrs: []netip.Prefix{netip.PrefixFrom(npNode4, 24), netip.PrefixFrom(npNode6, 64)},
		BAddrs: []netip.Prefix{netip.PrefixFrom(npClient4, 24), netip.PrefixFrom(npClient6, 64)}}); err != nil {
		t.Fatal(err)
	}
	step(t, "starting isthmus-agent on %s (external device eth0: %s, %s), the outside client at %s, %s", ln.NodeName(), npNode4, npNode6, npClient4, npClient6)
	a, err := ln.StartAgent(ctx, lab.AgentOptions{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}, Args: []string{"--external-devices", "eth0"}})
	if err != nil {
		t.Fatal(err)
	}
	n := &node{t: t, ctx: ctx, lab: l, node: ln, agent: a}
	for _, name := range []string{"web-1", "web-2"} {
		p := n.addPod(name, map[string]string{"app": "web"})
		lis, err := connectivity.ListenIn(p.Path(), ":8080")
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = connectivity.ServeEcho(ctx, lis, name, ln.NodeName(), "default") }()
		serveUDPEcho(t, p.Netns, 5353)
	}
	pod := n.addPod("pod", map[string]string{"app": "client"})
	// The node's own server on a port that is no node port.
	serveTCP(t, ln.Netns, 30081, sayName("the node itself"))

	step(t, "apply Service web, type NodePort 30080 (TCP and UDP), externalTrafficPolicy Cluster")
	n.apply(fmt.Sprintf(npService, "Cluster"))

	t.Run("Cluster: from outside, both families, spread, SNAT; UDP too", func(t *testing.T) {
		for _, v6 := range []bool{false, true} {
			node, self := npNode4, npClient4
			if v6 {
				node, self = npNode6, npClient6
			}
			dst := netip.AddrPortFrom(node, 30080)
			rs := spreadOver(t, client.Path(), dst, "web-1", "web-2")
			for _, r := range rs {
				if r.Peer == self {
					t.Fatalf("under Cluster, %s saw the client's own address %s: no SNAT", r.Pod, r.Peer)
				}
			}
			if err := eventually(5*time.Second, func() error { return udpEcho(client.Netns, dst) }); err != nil {
				t.Fatalf("outside -> %s/udp: %v", dst, err)
			}
		}
		ns := n.status().NorthSouth
		if ns == nil || ns.FrontendsCluster != 4 || !ns.SNATPresent || len(ns.Devices) != 1 || !ns.Devices[0].Attached {
			t.Fatalf("north-south status: %+v (want 4 Cluster frontends: 2 node ports x 2 addresses)", ns)
		}
	})

	t.Run("from a pod, at the node's addresses", func(t *testing.T) {
		for _, node := range []netip.Addr{npNode4, npNode6} {
			dst := netip.AddrPortFrom(node, 30080)
			spreadOver(t, pod.Path(), dst, "web-1", "web-2")
			if err := udpEcho(pod.Netns, dst); err != nil {
				t.Fatalf("pod -> %s/udp: %v", dst, err)
			}
		}
	})

	t.Run("a port that is no node port is the node's own", func(t *testing.T) {
		for _, node := range []netip.Addr{npNode4, npNode6} {
			dst := netip.AddrPortFrom(node, 30081)
			if got, err := fetchName(client.Netns, dst); err != nil || got != "the node itself" {
				t.Fatalf("outside -> %s: %q, %v; want the node's own server", dst, got, err)
			}
		}
		if n := n.counter("drop_no_frontend"); n != 0 {
			t.Fatalf("drop_no_frontend = %d: the node's own traffic was dropped", n)
		}
	})

	t.Run("Local: the client's address kept", func(t *testing.T) {
		n.in(t).apply(fmt.Sprintf(npService, "Local"))
		for _, self := range []netip.Addr{npClient4, npClient6} {
			node := npNode4
			if self.Is6() {
				node = npNode6
			}
			err := eventually(10*time.Second, func() error {
				r, err := connectivity.FetchEcho(ctx, client.Path(), netip.AddrPortFrom(node, 30080), 2*time.Second)
				if err == nil && r.Peer != self {
					err = fmt.Errorf("%s saw %s, want the client's address %s", r.Pod, r.Peer, self)
				}
				return err
			})
			if err != nil {
				t.Fatalf("outside -> %s:30080 under Local: %v", node, err)
			}
		}
	})

	t.Run("Local without a local backend: no answer", func(t *testing.T) {
		n.in(t).apply(npFarService)
		before := n.counter("drop_no_backend")
		for _, node := range []netip.Addr{npNode4, npNode6} {
			if err := connectTimesOut(client.Netns, netip.AddrPortFrom(node, 30090), time.Second); err != nil {
				t.Fatal(err)
			}
		}
		if after := n.counter("drop_no_backend"); after <= before {
			t.Fatalf("drop_no_backend %d -> %d", before, after)
		}
	})

	t.Run("bad input: a node port in use or out of range is refused", func(t *testing.T) {
		clash := strings.NewReplacer("name: web", "name: clash", "10.96.0.80", "10.96.0.82", "fd00:96::80", "fd00:96::82").Replace(fmt.Sprintf(npService, "Cluster"))
		out := n.in(t).isthmusFails("apply", "-f", n.writeFile(clash))
		if !strings.Contains(out, "service default/clash: node port 30080/tcp is already used by service default/web") {
			t.Fatalf("apply of a clashing node port: %s", out)
		}
		out = n.in(t).isthmusFails("apply", "-f", n.writeFile(strings.ReplaceAll(npFarService, "30090", "8080")))
		if !strings.Contains(out, "spec.ports[0].nodePort: must be in 30000-32767, got 8080") {
			t.Fatalf("apply of a node port out of range: %s", out)
		}
		// Nothing was lost: web still answers at its node port.
		if _, err := connectivity.FetchEcho(ctx, client.Path(), netip.AddrPortFrom(npNode4, 30080), 2*time.Second); err != nil {
			t.Fatalf("after the refused applies: %v", err)
		}
	})
}

// spreadOver makes requests from the namespace at nsPath to dst until every
// one of pods answered (at most 10 s) and returns the replies.
func spreadOver(t *testing.T, nsPath string, dst netip.AddrPort, pods ...string) []connectivity.Reply {
	t.Helper()
	var rs []connectivity.Reply
	err := eventually(10*time.Second, func() error {
		rs = rs[:0]
		for range 20 {
			r, err := connectivity.FetchEcho(context.Background(), nsPath, dst, 2*time.Second)
			if err != nil {
				return err
			}
			rs = append(rs, r)
		}
		got := byPod(rs)
		for _, p := range pods {
			if got[p] == 0 {
				return fmt.Errorf("20 requests to %s reached %v; want every one of %v", dst, got, pods)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("-> %s: %v", dst, err)
	}
	t.Logf("-> %s: %v", dst, byPod(rs))
	return rs
}
