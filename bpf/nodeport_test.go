package bpf

import (
	"bytes"
	"net/netip"
	"testing"
)

// Node ports: from_external at the node's own addresses (isth_lb node
// entries) and from_pod towards any node's address (the services map's
// entry at the unspecified address).

var (
	otherNode  = netip.MustParseAddr("192.168.1.2")
	otherNode6 = netip.MustParseAddr("fd10:1::2")
)

// nodePortSetup makes f.node a node address with node port 30080/tcp and
// 30053/udp under policy, backed by bes.
func nodePortSetup(t *testing.T, d *Datapath, f extFamily, policy ExternalPolicy, bes ...Backend) {
	t.Helper()
	for _, fe := range []Frontend{{VIP: f.node, Port: 30080, Proto: ProtoTCP}, {VIP: f.node, Port: 30053, Proto: ProtoUDP}} {
		if err := d.ExternalUpsert(fe, External{Policy: policy, Backends: bes}); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.ExternalUpsert(ExternalAddr(f.node), External{Node: true}); err != nil {
		t.Fatal(err)
	}
}

// A node port at a node address is translated like a load-balancer
// address (Cluster: DNAT, SNAT mark, reverse NAT on the way out), TCP and
// UDP.
func TestNodePortFromOutside(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		nodePortSetup(t, d, f, ExternalCluster, Backend{Addr: f.remote, Port: 8080})
		for _, proto := range []Proto{ProtoTCP, ProtoUDP} {
			port := uint16(30080)
			if proto == ProtoUDP {
				port = 30053
			}
			in := testPkt{src: f.client, dst: f.node, proto: proto, sport: 40000, dport: port}
			ret, out, mark := runMark(t, d.FromExternal(), in.bytes(), 0)
			p := parsePkt(t, out, proto)
			if ret != tcActOK || p.dst != f.remote || p.dport != 8080 || p.src != f.client || mark != SNATMark {
				t.Fatalf("%s %s to the node port: verdict %d, %s:%d -> %s:%d, mark %#x; want -> %s:8080 marked", f.name, proto, ret, p.src, p.sport, p.dst, p.dport, mark, f.remote)
			}
			reply := testPkt{src: f.remote, dst: f.client, proto: proto, sport: 8080, dport: 40000, tcpFlags: 0x12}
			ret, out, _ = runMark(t, d.ToExternal(), reply.bytes(), 0)
			p = parsePkt(t, out, proto)
			if ret != tcActOK || p.src != f.node || p.sport != port {
				t.Fatalf("%s %s reply: verdict %d, from %s:%d, want %s:%d", f.name, proto, ret, p.src, p.sport, f.node, port)
			}
		}
	}
	if n := metric(t, d, ReasonServiceNAT); n != 4 {
		t.Fatalf("service_nat = %d, want 4", n)
	}
}

// The node's own traffic to its address passes untouched: other ports,
// a node port of the other protocol, a TCP segment other than a SYN
// without a flow (a reply to the node's own connection from a port that is
// a node port), ICMP, fragments; nothing is dropped or counted.
func TestNodePortNodeTrafficUntouched(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		nodePortSetup(t, d, f, ExternalCluster, Backend{Addr: f.remote, Port: 8080})
		icmp := ProtoICMP
		if f.node.Is6() {
			icmp = ProtoICMPv6
		}
		for _, p := range []testPkt{
			{src: f.client, dst: f.node, proto: ProtoTCP, sport: 40000, dport: 22},
			{src: f.client, dst: f.node, proto: ProtoTCP, sport: 40000, dport: 30081},
			{src: f.client, dst: f.node, proto: ProtoUDP, sport: 40000, dport: 30080},
			{src: f.client, dst: f.node, proto: ProtoTCP, sport: 443, dport: 30080, tcpFlags: 0x12},
			{src: f.client, dst: f.node, proto: ProtoTCP, sport: 443, dport: 30080, tcpFlags: 0x10},
			{src: f.client, dst: f.node, proto: icmp, sport: 9},
		} {
			in := p.bytes()
			ret, out, mark := runMark(t, d.FromExternal(), in, 0x77)
			if ret != tcActOK || !bytes.Equal(in, out) || mark != 0x77 {
				t.Fatalf("%s %s :%d -> :%d flags %#x: verdict %d, changed %v, mark %#x; want untouched", f.name, p.proto, p.sport, p.dport, p.tcpFlags, ret, !bytes.Equal(in, out), mark)
			}
		}
		for _, fr := range fragments(testPkt{src: f.client, dst: f.node, proto: ProtoUDP, sport: 1, dport: 2, payload: payload(3000)}, 77, 1448) {
			if ret, out, _ := runMark(t, d.FromExternal(), fr, 0); ret != tcActOK || !bytes.Equal(fr, out) {
				t.Fatalf("%s: a fragment of the node's traffic changed or dropped (%d)", f.name, ret)
			}
		}
	}
	for _, r := range []Reason{ReasonExternalIn, ReasonServiceNAT, ReasonDropNoFrontend, ReasonDropFragUnknown} {
		if n := metric(t, d, r); n != 0 {
			t.Fatalf("%s = %d after the node's own traffic, want 0", r, n)
		}
	}
}

// Local: this node's backends only, the client's address kept; without one
// the connection gets no answer (dropped, counted).
func TestNodePortLocal(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		nodePortSetup(t, d, f, ExternalLocal, Backend{Addr: f.local, Port: 8080})
		syn := testPkt{src: f.client, dst: f.node, proto: ProtoTCP, sport: 41000, dport: 30080}
		ret, out, mark := runMark(t, d.FromExternal(), syn.bytes(), 0)
		if p := parsePkt(t, out, ProtoTCP); ret != tcActOK || p.dst != f.local || p.src != f.client || mark != 0 {
			t.Fatalf("%s Local: verdict %d, %s -> %s, mark %#x", f.name, ret, p.src, p.dst, mark)
		}
		nodePortSetup(t, d, f, ExternalLocal)
		before := metric(t, d, ReasonDropNoBackend)
		syn.sport = 41001
		if ret, _, _ := runMark(t, d.FromExternal(), syn.bytes(), 0); ret != tcActShot {
			t.Fatalf("%s Local without a local backend: verdict %d, want drop", f.name, ret)
		}
		if n := metric(t, d, ReasonDropNoBackend); n != before+1 {
			t.Fatalf("%s: drop_no_backend %d, want %d", f.name, n, before+1)
		}
	}
}

// A pod reaching <a node's address>:<node port> is translated at the pod
// (the entry at the unspecified address), for this node's addresses
// (host) and the own cluster's other nodes' (remote-node), and the reply
// gets the node's address back; the same port at an address that is not a
// node's, and another port at a node's, are not translated.
func TestNodePortFromPod(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, c := range []struct {
		client, self, other, backend, world netip.Addr
	}{
		{podA, nodeIP, otherNode, remote, client},
		{podA6, nodeIP6, otherNode6, rem6, client6},
	} {
		if err := d.IPCacheUpsert(netip.PrefixFrom(c.self, c.self.BitLen()), IPCacheEntry{Identity: IdentityHost}); err != nil {
			t.Fatal(err)
		}
		if err := d.IPCacheUpsert(netip.PrefixFrom(c.other, c.other.BitLen()), IPCacheEntry{Identity: IdentityRemote}); err != nil {
			t.Fatal(err)
		}
		if err := d.ServiceUpsert(NodePort(c.self.Is6(), 30080, ProtoTCP), []Backend{{Addr: c.backend, Port: 8080}}); err != nil {
			t.Fatal(err)
		}
		for i, node := range []netip.Addr{c.self, c.other} {
			sport := uint16(50000 + i)
			ret, out := run(t, d.FromPod(), testPkt{src: c.client, dst: node, proto: ProtoTCP, sport: sport, dport: 30080}.bytes())
			p := parsePkt(t, out, ProtoTCP)
			if ret != tcActOK || p.dst != c.backend || p.dport != 8080 {
				t.Fatalf("pod -> %s:30080: verdict %d, to %s:%d, want %s:8080", node, ret, p.dst, p.dport, c.backend)
			}
			ret, out = run(t, d.ToPod(), testPkt{src: c.backend, dst: c.client, proto: ProtoTCP, sport: 8080, dport: sport, tcpFlags: 0x12}.bytes())
			if p := parsePkt(t, out, ProtoTCP); ret != tcActOK || p.src != node || p.sport != 30080 {
				t.Fatalf("reply to pod: verdict %d, from %s:%d, want %s:30080", ret, p.src, p.sport, node)
			}
		}
		for _, pk := range []testPkt{
			{src: c.client, dst: c.world, proto: ProtoTCP, sport: 50010, dport: 30080},
			{src: c.client, dst: c.self, proto: ProtoTCP, sport: 50011, dport: 30081},
			{src: c.client, dst: c.other, proto: ProtoUDP, sport: 50012, dport: 30080},
		} {
			ret, out := run(t, d.FromPod(), pk.bytes())
			if p := parsePkt(t, out, pk.proto); ret != tcActOK || p.dst != pk.dst || p.dport != pk.dport {
				t.Fatalf("pod -> %s:%d/%s: translated to %s:%d (verdict %d), want untouched", pk.dst, pk.dport, pk.proto, p.dst, p.dport, ret)
			}
		}
	}
	if n := metric(t, d, ReasonServiceNAT); n != 4 {
		t.Fatalf("service_nat = %d, want 4", n)
	}
}

// The node flag of an address entry round-trips, and only address entries
// take it.
func TestNodeAddrEntryRoundTrip(t *testing.T) {
	d := openTest(t)
	if err := d.ExternalUpsert(ExternalAddr(nodeIP), External{Node: true}); err != nil {
		t.Fatal(err)
	}
	if err := d.ExternalUpsert(ExternalAddr(extIP), External{}); err != nil {
		t.Fatal(err)
	}
	if err := d.ExternalUpsert(Frontend{VIP: nodeIP, Port: 30080, Proto: ProtoTCP}, External{Policy: ExternalCluster, Node: true}); err == nil {
		t.Fatal("a frontend with the node flag was accepted")
	}
	got, err := d.ExternalList()
	if err != nil {
		t.Fatal(err)
	}
	if !got[ExternalAddr(nodeIP)].Node || got[ExternalAddr(extIP)].Node {
		t.Fatalf("ExternalList = %+v", got)
	}
}
