package e2e

import (
	"net/netip"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// The datapath at its edges (docs/datapath.md, "Fragments, extension
// headers and ICMP errors"): fragmented datagrams under policy and through
// a service, TCP behind IPv6 extension headers, path MTU discovery through
// a service address, and ICMP errors forged by a denied pod.

// edgesPolicy lets app=client reach app=server on udp/5353 and tcp/8080;
// nothing else reaches app=server.
const edgesPolicy = `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: server-edges
spec:
  endpointSelector:
    matchLabels: {app: server}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: client}
      toPorts:
        - {port: 5353, protocol: UDP}
        - {port: 8080, protocol: TCP}
`

// Service dns: VIPs 10.96.0.70 and fd00:96::70, udp/53 -> app=server:5353.
const edgesService = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: dns
spec:
  vips: [10.96.0.70, "fd00:96::70"]
  ports:
    - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
  selector: {app: server}
`

var (
	dnsVIP4 = netip.MustParseAddr("10.96.0.70")
	dnsVIP6 = netip.MustParseAddr("fd00:96::70")
)

// edgesNode starts a node with a client, a server (UDP echo on 5353 and
// 9999, TCP echo on 8080 and 9090), the policy and the service applied.
func edgesNode(t *testing.T) (n *node, client, server *lab.Pod) {
	n = startNode(t)
	client = n.addPod("client", map[string]string{"app": "client"})
	server = n.addPod("server", map[string]string{"app": "server"})
	for _, port := range []int{5353, 9999} {
		serveUDPEcho(t, server.Netns, port)
	}
	for _, port := range []int{8080, 9090} {
		serveTCP(t, server.Netns, port, echo)
	}
	step(t, "apply NetworkPolicy server-edges (client -> server on udp/5353 and tcp/8080) and Service dns (udp/53 -> server:5353)")
	n.apply(edgesPolicy)
	n.apply(edgesService)
	if err := eventually(enforceWithin, func() error {
		return connectTimesOut(client.Netns, netip.AddrPortFrom(server.IPv4, 9090), 300*time.Millisecond)
	}); err != nil {
		t.Fatalf("the policy is not enforced %v after apply: %v", enforceWithin, err)
	}
	return n, client, server
}

// UDP datagrams of 500, 3,000 and 8,000 bytes (one packet, three and six
// fragments) between pods under a UDP port policy arrive intact, over IPv4
// and IPv6, with echoes of the same size; and through a service address,
// with the echoes coming back from that address.
func TestEdgeFragmentedUDPUnderPolicyAndService(t *testing.T) {
	n, client, server := edgesNode(t)
	dropsBefore := n.counter("drop_frag_unknown")
	for _, v6 := range []bool{false, true} {
		fam := familyName(v6)
		vip := dnsVIP4
		if v6 {
			vip = dnsVIP6
		}
		for _, dst := range []netip.AddrPort{netip.AddrPortFrom(server.Addr(v6), 5353), netip.AddrPortFrom(vip, 53)} {
			for _, size := range []int{500, 3000, 8000} {
				step(t, "%s: %d-byte datagram client -> %s and its echo", fam, size, dst)
				if err := eventually(enforceWithin, func() error { return udpEchoSize(client.Netns, dst, size) }); err != nil {
					t.Errorf("%s: %v", fam, err)
				}
			}
		}
	}
	if after := n.counter("drop_frag_unknown"); after != dropsBefore {
		t.Errorf("drop_frag_unknown rose from %d to %d: fragments lost their first fragment's verdict", dropsBefore, after)
	}
}

// A port the policy denies stays denied when reached by fragments, or by
// TCP behind IPv6 extension headers (a destination options header, and a
// hop-by-hop one before it); the allowed port works the same way. The
// drops are counted as policy drops, each fragment as its first.
func TestEdgeDeniedPortStaysDeniedForFragmentsAndExtensionHeaders(t *testing.T) {
	n, client, server := edgesNode(t)
	for _, v6 := range []bool{false, true} {
		fam := familyName(v6)
		step(t, "%s: 8,000-byte datagram to the denied udp/9999 is dropped, every fragment", fam)
		before := n.counter("drop_policy_ingress")
		if err := udpNoAnswer(client.Netns, netip.AddrPortFrom(server.Addr(v6), 9999), 8000, time.Second); err != nil {
			t.Errorf("%s: %v", fam, err)
		}
		// 8,008 bytes of UDP in 1,480-byte (IPv4) or 1,448-byte (IPv6) pieces: 6 fragments.
		if got := n.counter("drop_policy_ingress") - before; got < 6 {
			t.Errorf("%s: drop_policy_ingress rose by %d for a 6-fragment datagram to a denied port, want at least 6", fam, got)
		} else {
			t.Logf("%s: drop_policy_ingress +%d", fam, got)
		}
		step(t, "%s: the same datagram to the allowed udp/5353 is echoed", fam)
		if err := udpEchoSize(client.Netns, netip.AddrPortFrom(server.Addr(v6), 5353), 8000); err != nil {
			t.Errorf("%s: %v", fam, err)
		}
	}

	extBefore := n.counter("drop_ext_header")
	for _, hop := range []bool{false, true} {
		what := "a destination options header"
		if hop {
			what = "hop-by-hop and destination options headers"
		}
		step(t, "IPv6: TCP behind %s to the allowed tcp/8080 works", what)
		c, err := dialTCPExt(client.Netns, netip.AddrPortFrom(server.IPv6, 8080), hop, 2*time.Second)
		if err != nil {
			t.Errorf("TCP behind %s to the allowed port: %v", what, err)
		} else {
			if err := echoOver(c, 20000, 5*time.Second); err != nil {
				t.Errorf("TCP behind %s to the allowed port: %v", what, err)
			}
			c.Close()
		}
		step(t, "IPv6: TCP behind %s to the denied tcp/9090 is dropped", what)
		before := n.counter("drop_policy_ingress")
		c, err = dialTCPExt(client.Netns, netip.AddrPortFrom(server.IPv6, 9090), hop, deniedDial)
		if err == nil {
			c.Close()
			t.Errorf("TCP behind %s to the denied port connected", what)
		} else if !isTimeout(err) {
			t.Errorf("TCP behind %s to the denied port: want a timeout, got %v", what, err)
		}
		if n.counter("drop_policy_ingress") <= before {
			t.Errorf("TCP behind %s to the denied port: not counted in drop_policy_ingress", what)
		}
	}
	if after := n.counter("drop_ext_header"); after != extBefore {
		t.Errorf("drop_ext_header rose from %d to %d for short, known chains", extBefore, after)
	}
}

// Path MTU discovery through a service address: the service's backend sits
// behind a router reached over a 1,280-byte link. The client's full-size
// segments to the backend make the node send frag-needed (IPv4) and
// packet-too-big (IPv6) about the translated packet; the datapath
// translates them back to the service address, the client lowers its
// segment size, and a large transfer through the address completes.
func TestEdgePathMTUDiscoveryThroughAService(t *testing.T) {
	n := startNode(t)
	client := n.addPod("client", map[string]string{"app": "client"})

	step(t, "a router behind a 1,280-byte link from the node, and a backend behind it on 1,500 bytes")
	rtr, err := n.lab.AddRouter("rtr")
	if err != nil {
		t.Fatal(err)
	}
	far, err := n.lab.AddNode("far")
	if err != nil {
		t.Fatal(err)
	}
	pfx := netip.MustParsePrefix
	if _, err := n.lab.LinkWith(lab.LinkOptions{A: n.node, B: rtr, MTU: 1280,
		AAddrs: []netip.Prefix{pfx("10.250.1.1/30"), pfx("fd00:250:1::1/64")},
		BAddrs: []netip.Prefix{pfx("10.250.1.2/30"), pfx("fd00:250:1::2/64")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.lab.LinkWith(lab.LinkOptions{A: rtr, B: far,
		AAddrs: []netip.Prefix{pfx("10.250.2.1/30"), pfx("fd00:250:2::1/64")},
		BAddrs: []netip.Prefix{pfx("10.250.2.2/30"), pfx("fd00:250:2::2/64")}}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct {
		ns  *lab.Node
		dst string
		via string
	}{
		{n.node, "10.250.2.0/30", "10.250.1.2"}, {n.node, "fd00:250:2::/64", "fd00:250:1::2"},
		{rtr, podCIDR4.String(), "10.250.1.1"}, {rtr, podCIDR6.String(), "fd00:250:1::1"},
		{far, "", "10.250.2.1"}, {far, "", "fd00:250:2::1"},
	} {
		var dst netip.Prefix
		if r.dst != "" {
			dst = pfx(r.dst)
		}
		if err := r.ns.AddRoute(dst, netip.MustParseAddr(r.via)); err != nil {
			t.Fatal(err)
		}
	}
	serveTCP(t, far.Netns, 8080, echo)

	step(t, "apply Service far: 10.96.0.80 and fd00:96::80 port 80 -> the backend's addresses:8080")
	n.apply(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: far
spec:
  vips: [10.96.0.80, "fd00:96::80"]
  ports:
    - {name: http, port: 80, targetPort: 8080}
  backends: [{ip: 10.250.2.2}, {ip: "fd00:250:2::2"}]
`)
	for _, vip := range []netip.Addr{netip.MustParseAddr("10.96.0.80"), netip.MustParseAddr("fd00:96::80")} {
		fam := familyName(vip.Is6())
		dst := netip.AddrPortFrom(vip, 80)
		if mtu, err := routeMTU(n.ctx, client.Netns, vip); err != nil || mtu != 0 {
			t.Fatalf("%s: the client knows a path MTU to %s before any traffic: %d, %v", fam, vip, mtu, err)
		}
		step(t, "%s: 1 MB through %s and back, over the 1,280-byte link", fam, dst)
		before := n.counter("drop_icmp_unrelated")
		err := eventually(enforceWithin, func() error {
			c, err := dialTCP(client.Netns, dst, 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			return echoOver(c, 1<<20, 15*time.Second)
		})
		if err != nil {
			t.Errorf("%s: transfer through %s: %v", fam, dst, err)
		}
		mtu, err := routeMTU(n.ctx, client.Netns, vip)
		if err != nil {
			t.Fatal(err)
		}
		if mtu != 1280 {
			t.Errorf("%s: the client's path MTU to %s is %d, want 1280 (learned from the translated %s)", fam, vip, mtu, map[bool]string{false: "frag-needed", true: "packet-too-big"}[vip.Is6()])
		} else {
			t.Logf("%s: the client learned path MTU %d for %s", fam, mtu, vip)
		}
		if after := n.counter("drop_icmp_unrelated"); after != before {
			t.Errorf("%s: drop_icmp_unrelated rose from %d to %d: an error about the service flow was not related", fam, before, after)
		}
	}
}

// A pod denied by the policy forges ICMP port-unreachable and
// frag-needed/packet-too-big messages at another pod's live UDP flow. They
// are dropped and counted, and the flow is unaffected: no error on its
// socket, no path MTU learned, its datagrams still echoed. (A forged error
// about a UDP flow is the one a kernel acts on without checking a
// sequence number, so it is the one that would do harm.)
func TestEdgeForgedICMPErrorsFromADeniedPodAreDropped(t *testing.T) {
	n, client, server := edgesNode(t)
	attacker := n.addPod("attacker", map[string]string{"app": "attacker"})
	step(t, "the client admits only the server (the attacker is denied)")
	n.apply(`apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: client-from-server
spec:
  endpointSelector:
    matchLabels: {app: client}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: server}
`)
	for _, v6 := range []bool{false, true} {
		fam := familyName(v6)
		srv := netip.AddrPortFrom(server.Addr(v6), 5353)
		c, err := udpConn(client.Netns, srv)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		step(t, "%s: the client's live flow %s -> %s", fam, c.LocalAddr(), srv)
		if err := eventually(enforceWithin, func() error { return udpEchoOn(c, 1000) }); err != nil {
			t.Fatalf("%s: the live flow does not work: %v", fam, err)
		}
		local := netip.MustParseAddrPort(c.LocalAddr().String())
		local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
		quoted := quotedUDP(local, srv)

		before := n.counter("drop_icmp_unrelated")
		for _, k := range []struct {
			kind icmpKind
			name string
		}{{portUnreachable, "port unreachable"}, {tooBig, map[bool]string{false: "frag-needed (MTU 1000)", true: "packet-too-big (MTU 1280)"}[v6]}} {
			step(t, "%s: the attacker sends a forged %s about the flow to the client", fam, k.name)
			mtu := 1000
			if v6 {
				mtu = 1280
			}
			for range 3 {
				if err := sendICMPError(attacker.Netns, client.Addr(v6), k.kind, mtu, quoted); err != nil {
					t.Fatalf("%s: send forged %s: %v", fam, k.name, err)
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
		if got := n.counter("drop_icmp_unrelated") - before; got < 6 {
			t.Errorf("%s: drop_icmp_unrelated rose by %d for 6 forged errors, want 6", fam, got)
		} else {
			t.Logf("%s: drop_icmp_unrelated +%d", fam, got)
		}
		step(t, "%s: the flow is unaffected", fam)
		if err := udpEchoOn(c, 1000); err != nil {
			if softErr(err) {
				t.Errorf("%s: a forged error reached the client's socket: %v", fam, err)
			} else {
				t.Errorf("%s: the live flow broke: %v", fam, err)
			}
		}
		if mtu, err := routeMTU(n.ctx, client.Netns, srv.Addr()); err != nil {
			t.Fatal(err)
		} else if mtu != 0 {
			t.Errorf("%s: the client learned path MTU %d to %s from a forged error", fam, mtu, srv.Addr())
		}
	}
	step(t, "the attacker's own traffic to the client stays denied")
	if err := connectTimesOut(attacker.Netns, netip.AddrPortFrom(client.IPv4, 8080), deniedDial); err != nil {
		t.Errorf("%v", err)
	}
}
