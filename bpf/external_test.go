package bpf

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
)

// Traffic from outside the mesh: from_external and to_external on crafted
// packets.

var (
	client  = netip.MustParseAddr("198.51.100.7")
	client6 = netip.MustParseAddr("2001:db8:c::7")
	extIP   = netip.MustParseAddr("203.0.113.10")
	extIP6  = netip.MustParseAddr("2001:db8:e::10")
	nodeIP  = netip.MustParseAddr("192.168.1.1")
	nodeIP6 = netip.MustParseAddr("fd10:1::1")
)

type extFamily struct {
	name                             string
	client, ext, node, local, remote netip.Addr
}

var extFamilies = []extFamily{
	{"IPv4", client, extIP, nodeIP, podB, remote},
	{"IPv6", client6, extIP6, nodeIP6, podB6, rem6},
}

// skbCtx is the start of struct __sk_buff, up to mark: what a test gives a
// program. The kernel writes the whole struct back (skbCtxOut, with room
// to spare).
type skbCtx struct {
	Len, PktType, Mark uint32
}

type skbCtxOut struct {
	skbCtx
	_ [256]byte
}

// runMark runs prog on pkt with skb->mark set to mark, and returns the
// verdict, the packet and the mark as the program left them.
func runMark(t *testing.T, prog *ebpf.Program, pkt []byte, mark uint32) (uint32, []byte, uint32) {
	t.Helper()
	out := make([]byte, len(pkt)+256)
	in := skbCtx{Mark: mark}
	var ctxOut skbCtxOut
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt, DataOut: out, Context: in, ContextOut: &ctxOut})
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
	}
	return ret, out[:len(pkt)], ctxOut.Mark
}

func externalSetup(t *testing.T, d *Datapath, f extFamily, policy ExternalPolicy, backends ...Backend) Frontend {
	t.Helper()
	fe := Frontend{VIP: f.ext, Port: 80, Proto: ProtoTCP}
	if err := d.ExternalUpsert(fe, External{Policy: policy, Backends: backends}); err != nil {
		t.Fatal(err)
	}
	if err := d.ExternalUpsert(ExternalAddr(f.ext), External{}); err != nil {
		t.Fatal(err)
	}
	return fe
}

// Cluster: a new flow from outside is translated to the backend with valid
// checksums and marked for the node's SNAT; its later packets follow it;
// the backend's replies leave with the frontend's address and port.
func TestExternalClusterDNATAndReverseNAT(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		externalSetup(t, d, f, ExternalCluster, Backend{Addr: f.remote, Port: 8080})
		syn := testPkt{src: f.client, dst: f.ext, proto: ProtoTCP, sport: 40000, dport: 80}
		ret, out, mark := runMark(t, d.FromExternal(), syn.bytes(), 0x1234)
		if ret != tcActOK {
			t.Fatalf("%s SYN: verdict %d, want pass", f.name, ret)
		}
		p := parsePkt(t, out, ProtoTCP)
		if p.src != f.client || p.dst != f.remote || p.sport != 40000 || p.dport != 8080 {
			t.Fatalf("%s SYN after DNAT: %s:%d -> %s:%d, want %s:40000 -> %s:8080", f.name, p.src, p.sport, p.dst, p.dport, f.client, f.remote)
		}
		if mark != SNATMark|0x1234 {
			t.Fatalf("%s SYN: mark %#x, want %#x (SNAT mark, low bits kept)", f.name, mark, SNATMark|0x1234)
		}
		ack := syn
		ack.tcpFlags = 0x10
		ack.payload = []byte("GET / HTTP/1.0\r\n\r\n")
		ret, out, mark = runMark(t, d.FromExternal(), ack.bytes(), 0)
		if p := parsePkt(t, out, ProtoTCP); ret != tcActOK || p.dst != f.remote || p.dport != 8080 || mark != SNATMark {
			t.Fatalf("%s established: verdict %d, to %s:%d, mark %#x", f.name, ret, p.dst, p.dport, mark)
		}
		reply := testPkt{src: f.remote, dst: f.client, proto: ProtoTCP, sport: 8080, dport: 40000, tcpFlags: 0x12, payload: []byte("HTTP/1.0 200 OK")}
		ret, out, _ = runMark(t, d.ToExternal(), reply.bytes(), 0)
		p = parsePkt(t, out, ProtoTCP)
		if ret != tcActOK || p.src != f.ext || p.sport != 80 || p.dst != f.client || p.dport != 40000 {
			t.Fatalf("%s reply after reverse NAT: verdict %d, %s:%d -> %s:%d, want %s:80 -> %s:40000", f.name, ret, p.src, p.sport, p.dst, p.dport, f.ext, f.client)
		}
	}
	if n := metric(t, d, ReasonServiceNAT); n != 2 {
		t.Fatalf("service_nat = %d, want 2 (one new flow per family)", n)
	}
	if in, out := metric(t, d, ReasonExternalIn), metric(t, d, ReasonExternalOut); in != 4 || out != 2 {
		t.Fatalf("external_in %d, external_out %d; want 4, 2", in, out)
	}
}

// Local: only the backends written (this node's), no SNAT mark, the
// client's address kept; without a backend the flow is dropped and
// counted.
func TestExternalLocal(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		fe := externalSetup(t, d, f, ExternalLocal, Backend{Addr: f.local, Port: 8080})
		for i := range 20 {
			syn := testPkt{src: f.client, dst: f.ext, proto: ProtoTCP, sport: uint16(41000 + i), dport: 80}
			ret, out, mark := runMark(t, d.FromExternal(), syn.bytes(), 0)
			p := parsePkt(t, out, ProtoTCP)
			if ret != tcActOK || p.dst != f.local || p.src != f.client || mark != 0 {
				t.Fatalf("%s Local: verdict %d, %s -> %s, mark %#x; want pass, %s -> %s, no mark", f.name, ret, p.src, p.dst, mark, f.client, f.local)
			}
		}
		// No local backend: dropped, counted.
		if err := d.ExternalUpsert(fe, External{Policy: ExternalLocal}); err != nil {
			t.Fatal(err)
		}
		before := metric(t, d, ReasonDropNoBackend)
		syn := testPkt{src: f.client, dst: f.ext, proto: ProtoTCP, sport: 42000, dport: 80}
		if ret, _, _ := runMark(t, d.FromExternal(), syn.bytes(), 0); ret != tcActShot {
			t.Fatalf("%s Local without a local backend: verdict %d, want drop", f.name, ret)
		}
		if n := metric(t, d, ReasonDropNoBackend); n != before+1 {
			t.Fatalf("%s: drop_no_backend %d, want %d", f.name, n, before+1)
		}
	}
}

// A known external address on a port, protocol or kind of packet without a
// frontend: dropped and counted, never passed to the kernel (which would
// route it back out).
func TestExternalUnknownPortDropped(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		externalSetup(t, d, f, ExternalCluster, Backend{Addr: f.remote, Port: 8080})
		icmp := ProtoICMP
		if f.ext.Is6() {
			icmp = ProtoICMPv6
		}
		for _, p := range []testPkt{
			{src: f.client, dst: f.ext, proto: ProtoTCP, sport: 40000, dport: 81},
			{src: f.client, dst: f.ext, proto: ProtoUDP, sport: 40000, dport: 80},
			{src: f.client, dst: f.ext, proto: icmp, sport: 7},
		} {
			before := metric(t, d, ReasonDropNoFrontend)
			if ret, _, _ := runMark(t, d.FromExternal(), p.bytes(), 0); ret != tcActShot {
				t.Fatalf("%s %s to port %d: verdict %d, want drop", f.name, p.proto, p.dport, ret)
			}
			if n := metric(t, d, ReasonDropNoFrontend); n != before+1 {
				t.Fatalf("%s %s port %d: drop_no_frontend %d, want %d", f.name, p.proto, p.dport, n, before+1)
			}
		}
	}
}

// The node's own traffic crosses the external devices untouched, both
// ways: to and from the node's address, to pods, the mesh's traffic, and a
// reply-shaped packet of no external flow; so does its mark.
func TestExternalUnrelatedTrafficUntouched(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		externalSetup(t, d, f, ExternalCluster, Backend{Addr: f.remote, Port: 8080})
		icmp := ProtoICMP
		if f.ext.Is6() {
			icmp = ProtoICMPv6
		}
		pkts := []testPkt{
			{src: f.client, dst: f.node, proto: ProtoTCP, sport: 40000, dport: 80},
			{src: f.client, dst: f.node, proto: ProtoTCP, sport: 40000, dport: 22, tcpFlags: 0x10},
			{src: f.remote, dst: f.node, proto: ProtoTCP, sport: 8080, dport: 40000, tcpFlags: 0x12},
			{src: f.remote, dst: f.local, proto: ProtoUDP, sport: 5000, dport: 53},
			{src: f.node, dst: f.client, proto: ProtoTCP, sport: 80, dport: 40000, tcpFlags: 0x12},
			{src: f.local, dst: f.client, proto: ProtoTCP, sport: 8080, dport: 40001, tcpFlags: 0x12},
			{src: f.client, dst: f.node, proto: icmp, sport: 9},
		}
		for _, prog := range []*ebpf.Program{d.FromExternal(), d.ToExternal()} {
			for _, p := range pkts {
				in := p.bytes()
				ret, out, mark := runMark(t, prog, in, 0x77)
				if ret != tcActOK || !bytes.Equal(in, out) || mark != 0x77 {
					t.Fatalf("%s %s %s:%d -> %s:%d: verdict %d, changed %v, mark %#x; want it untouched", f.name, prog, p.src, p.sport, p.dst, p.dport, ret, !bytes.Equal(in, out), mark)
				}
			}
			// Fragments of the node's traffic, later ones included.
			for _, fr := range fragments(testPkt{src: f.client, dst: f.node, proto: ProtoUDP, sport: 1, dport: 2, payload: payload(3000)}, 77, 1448) {
				if ret, out, _ := runMark(t, prog, fr, 0); ret != tcActOK || !bytes.Equal(fr, out) {
					t.Fatalf("%s %s: a fragment of the node's traffic changed or dropped (%d)", f.name, prog, ret)
				}
			}
		}
	}
	for _, r := range []Reason{ReasonExternalIn, ReasonExternalOut, ReasonServiceNAT, ReasonDropNoFrontend} {
		if n := metric(t, d, r); n != 0 {
			t.Fatalf("%s = %d after the node's own traffic, want 0", r, n)
		}
	}
}

// Fragmented datagrams from outside follow their first fragment through the
// translation both ways.
func TestExternalFragments(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		fe := Frontend{VIP: f.ext, Port: 53, Proto: ProtoUDP}
		if err := d.ExternalUpsert(fe, External{Policy: ExternalCluster, Backends: []Backend{{Addr: f.remote, Port: 5353}}}); err != nil {
			t.Fatal(err)
		}
		if err := d.ExternalUpsert(ExternalAddr(f.ext), External{}); err != nil {
			t.Fatal(err)
		}
		var outs [][]byte
		for _, fr := range fragments(testPkt{src: f.client, dst: f.ext, proto: ProtoUDP, sport: 41000, dport: 53, payload: payload(8000)}, 0x5678, 1448) {
			ret, out, _ := runMark(t, d.FromExternal(), fr, 0)
			if ret != tcActOK {
				t.Fatalf("%s fragment in: verdict %d", f.name, ret)
			}
			outs = append(outs, out)
		}
		src, dst, l4 := reassemble(t, outs)
		if src != f.client || dst != f.remote || int(l4[2])<<8|int(l4[3]) != 5353 {
			t.Fatalf("%s datagram in: %s -> %s port %d", f.name, src, dst, int(l4[2])<<8|int(l4[3]))
		}
		outs = nil
		for _, fr := range fragments(testPkt{src: f.remote, dst: f.client, proto: ProtoUDP, sport: 5353, dport: 41000, payload: payload(8000)}, 0x8765, 1448) {
			ret, out, _ := runMark(t, d.ToExternal(), fr, 0)
			if ret != tcActOK {
				t.Fatalf("%s fragment out: verdict %d", f.name, ret)
			}
			outs = append(outs, out)
		}
		src, dst, l4 = reassemble(t, outs)
		if src != f.ext || dst != f.client || int(l4[0])<<8|int(l4[1]) != 53 {
			t.Fatalf("%s datagram out: %s:%d -> %s", f.name, src, int(l4[0])<<8|int(l4[1]), dst)
		}
		// A later fragment whose first was not seen: dropped.
		later := fragments(testPkt{src: f.client, dst: f.ext, proto: ProtoUDP, sport: 41001, dport: 53, payload: payload(3000)}, 0x9999, 1448)[1]
		if ret, _, _ := runMark(t, d.FromExternal(), later, 0); ret != tcActShot {
			t.Fatalf("%s later fragment without its first: verdict %d, want drop", f.name, ret)
		}
	}
}

// The map: round trip, validation, and IDs that survive a reopen without
// colliding with the services'.
func TestExternalMapRoundTrip(t *testing.T) {
	d := openTest(t)
	fe := Frontend{VIP: extIP, Port: 80, Proto: ProtoTCP}
	want := External{Policy: ExternalLocal, Backends: []Backend{{Addr: podB, Port: 8080}, {Addr: remote, Port: 8080, ClusterID: 2}}}
	if err := d.ExternalUpsert(fe, want); err != nil {
		t.Fatal(err)
	}
	if err := d.ExternalUpsert(ExternalAddr(extIP), External{}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct {
		f Frontend
		e External
	}{
		{Frontend{VIP: extIP, Port: 80, Proto: ProtoICMP}, External{Policy: ExternalCluster}},
		{Frontend{VIP: extIP, Port: 80, Proto: ProtoTCP}, External{}},
		{Frontend{VIP: extIP, Port: 80, Proto: ProtoTCP}, External{Policy: ExternalCluster, Backends: []Backend{{Addr: podB6, Port: 1}}}},
		{ExternalAddr(extIP6), External{Backends: []Backend{{Addr: podB6, Port: 1}}}},
	} {
		if err := d.ExternalUpsert(bad.f, bad.e); err == nil {
			t.Fatalf("ExternalUpsert(%s, %+v) accepted", bad.f, bad.e)
		}
	}
	got, err := d.ExternalList()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[fe].Policy != ExternalLocal || len(got[fe].Backends) != 2 || got[fe].Backends[1] != want.Backends[1] {
		t.Fatalf("ExternalList = %+v", got)
	}
	if _, ok := got[ExternalAddr(extIP)]; !ok {
		t.Fatalf("the known address is missing: %+v", got)
	}
	// Reopen: a service added now must not take the external frontend's ID.
	d2, err := Open(d.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	sv := Frontend{VIP: vip, Port: 80, Proto: ProtoTCP}
	if err := d2.ServiceUpsert(sv, []Backend{{Addr: podA, Port: 1}}); err != nil {
		t.Fatal(err)
	}
	got2, err := d2.ExternalList()
	if err != nil {
		t.Fatal(err)
	}
	if len(got2[fe].Backends) != 2 || got2[fe].Backends[0] != want.Backends[0] {
		t.Fatalf("after reopen and a new service, the external backends are %+v", got2[fe].Backends)
	}
	if err := d2.ExternalDelete(fe); err != nil {
		t.Fatal(err)
	}
	if err := d2.ExternalDelete(ExternalAddr(extIP)); err != nil {
		t.Fatal(err)
	}
	if got, _ := d2.ExternalList(); len(got) != 0 {
		t.Fatalf("after delete: %+v", got)
	}
}

// A client that dials a backend directly, from the port of an external
// flow to that backend that closed, gets the backend's answers untouched:
// the closed flow's reply entry does not capture the new connection.
func TestExternalStaleReplyEntryDoesNotCaptureADirectFlow(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range extFamilies {
		externalSetup(t, d, f, ExternalCluster, Backend{Addr: f.remote, Port: 8080})
		syn := testPkt{src: f.client, dst: f.ext, proto: ProtoTCP, sport: 43000, dport: 80}
		if ret, _, _ := runMark(t, d.FromExternal(), syn.bytes(), 0); ret != tcActOK {
			t.Fatalf("%s SYN: %d", f.name, ret)
		}
		rst := syn
		rst.tcpFlags = 0x04
		if ret, _, _ := runMark(t, d.FromExternal(), rst.bytes(), 0); ret != tcActOK {
			t.Fatalf("%s RST: %d", f.name, ret)
		}
		// The same client port, straight to the backend.
		for _, flags := range []uint8{0x12, 0x10} {
			reply := testPkt{src: f.remote, dst: f.client, proto: ProtoTCP, sport: 8080, dport: 43000, tcpFlags: flags}
			in := reply.bytes()
			ret, out, _ := runMark(t, d.ToExternal(), in, 0)
			if ret != tcActOK || !bytes.Equal(in, out) {
				p := parsePkt(t, out, ProtoTCP)
				t.Fatalf("%s direct flow's answer (flags %#x) changed to %s:%d", f.name, flags, p.src, p.sport)
			}
		}
	}
}
