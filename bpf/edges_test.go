package bpf

import (
	"fmt"
	"net/netip"
	"testing"
)

// The edges of the datapath: fragments, IPv6 extension headers, ICMP errors.

type family struct {
	name              string
	a, b, remote, vip netip.Addr
}

var families = []family{
	{"IPv4", podA, podB, remote, vip},
	{"IPv6", podA6, podB6, rem6, vip6},
}

// runAll runs every packet through prog and returns the verdicts and the
// packets as the program left them.
func runAll(t *testing.T, d *Datapath, to bool, pkts [][]byte) ([]uint32, [][]byte) {
	t.Helper()
	prog := d.FromPod()
	if to {
		prog = d.ToPod()
	}
	var rets []uint32
	var outs [][]byte
	for _, p := range pkts {
		ret, out := run(t, prog, p)
		rets = append(rets, ret)
		outs = append(outs, out)
	}
	return rets, outs
}

func allAre(rets []uint32, want uint32) bool {
	for _, r := range rets {
		if r != want {
			return false
		}
	}
	return true
}

// B admits A on udp/5353 only. A's datagrams of 3,000 and 8,000 bytes to
// 5353 arrive whole: every fragment follows the first into B. To another
// port the first fragment is denied and the later ones get the same verdict,
// counted as the policy drop they are.
func TestFragmentsFollowTheFirstFragmentsVerdict(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{true, false})
	if err := d.PolicySync([]PolicyKey{{EndpointID: 2, PeerIdentity: idA, Port: 5353, Proto: ProtoUDP, Direction: Ingress}}); err != nil {
		t.Fatal(err)
	}
	id := uint32(100)
	for _, f := range families {
		for _, size := range []int{3000, 8000} {
			id++
			frags := fragments(testPkt{src: f.a, dst: f.b, proto: ProtoUDP, sport: 40000, dport: 5353, payload: payload(size)}, id, 1448)
			rets, outs := runAll(t, d, false, frags)
			if !allAre(rets, tcActRedirect) {
				t.Fatalf("%s %d bytes to the allowed port: verdicts %v, want all redirected into B", f.name, size, rets)
			}
			if _, _, l4 := reassemble(t, outs); len(l4) != 8+size {
				t.Fatalf("%s: reassembled %d bytes, want %d", f.name, len(l4), 8+size)
			}

			id++
			before := metric(t, d, ReasonDropPolicyIngr)
			frags = fragments(testPkt{src: f.a, dst: f.b, proto: ProtoUDP, sport: 40001, dport: 9999, payload: payload(size)}, id, 1448)
			rets, _ = runAll(t, d, false, frags)
			if !allAre(rets, tcActShot) {
				t.Fatalf("%s %d bytes to a denied port: verdicts %v, want all dropped", f.name, size, rets)
			}
			if got := metric(t, d, ReasonDropPolicyIngr) - before; got != uint64(len(frags)) {
				t.Fatalf("%s: drop_policy_ingress rose by %d, want %d (every fragment, judged as the first)", f.name, got, len(frags))
			}
		}
	}
	if n := metric(t, d, ReasonDropFragUnknown); n != 0 {
		t.Fatalf("drop_frag_unknown = %d, want 0", n)
	}
}

// Fragments from the stack into a pod (to_pod) follow their first fragment
// the same way, and a later fragment whose first fragment was never seen is
// dropped and counted, in both programs.
func TestFragmentWithoutItsFirstIsDropped(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{true, false}, [2]bool{})
	if err := d.PolicySync([]PolicyKey{{EndpointID: 1, PeerIdentity: idRemote, Port: 5353, Proto: ProtoUDP, Direction: Ingress}}); err != nil {
		t.Fatal(err)
	}
	for i, f := range families {
		frags := fragments(testPkt{src: f.remote, dst: f.a, proto: ProtoUDP, sport: 1000, dport: 5353, payload: payload(3000)}, uint32(7+i), 1232)
		if rets, _ := runAll(t, d, true, frags); !allAre(rets, tcActOK) {
			t.Fatalf("%s remote -> A fragments: verdicts %v, want all delivered", f.name, rets)
		}
		// The same datagram again with another ID, without its first fragment.
		frags = fragments(testPkt{src: f.remote, dst: f.a, proto: ProtoUDP, sport: 1000, dport: 5353, payload: payload(3000)}, uint32(70+i), 1232)
		if rets, _ := runAll(t, d, true, frags[1:]); !allAre(rets, tcActShot) {
			t.Fatalf("%s to_pod: later fragments without the first: verdicts %v, want dropped", f.name, rets)
		}
		frags = fragments(testPkt{src: f.a, dst: f.remote, proto: ProtoUDP, sport: 1000, dport: 53, payload: payload(3000)}, uint32(700+i), 1232)
		if rets, _ := runAll(t, d, false, frags[1:]); !allAre(rets, tcActShot) {
			t.Fatalf("%s from_pod: later fragments without the first: verdicts %v, want dropped", f.name, rets)
		}
		// Then the first fragment arrives: the rest of that datagram passes.
		if rets, _ := runAll(t, d, false, frags); !allAre(rets, tcActOK) {
			t.Fatalf("%s from_pod: the whole datagram: verdicts %v", f.name, rets)
		}
	}
	// 3 fragments of 3,000 bytes at 1,232: 2 later ones, twice per family.
	if got := metric(t, d, ReasonDropFragUnknown); got != 8 {
		t.Fatalf("drop_frag_unknown = %d, want 8", got)
	}
	if got := metric(t, d, ReasonDropPolicyIngr); got != 0 {
		t.Fatalf("drop_policy_ingress = %d, want 0 (fragments without a first are not policy drops)", got)
	}
}

// Through a service address, the first fragment picks the backend and is
// translated; the later ones go to the same backend (address only: the
// ports are in the first), and the datagram reassembles with a valid
// checksum. Replies of the same size are translated back, fragment by
// fragment, for a remote backend (to_pod) and a local one (from_pod).
func TestFragmentsThroughAService(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, f := range families {
		for _, be := range []netip.Addr{f.remote, f.b} {
			if err := d.ConntrackFlush(); err != nil {
				t.Fatal(err)
			}
			fe := Frontend{VIP: f.vip, Port: 53, Proto: ProtoUDP}
			if err := d.ServiceUpsert(fe, []Backend{{Addr: be, Port: 5353}}); err != nil {
				t.Fatal(err)
			}
			local := be == f.b
			want := uint32(tcActOK)
			if local {
				want = tcActRedirect
			}
			frags := fragments(testPkt{src: f.a, dst: f.vip, proto: ProtoUDP, sport: 41000, dport: 53, payload: payload(8000)}, 0x1234, 1448)
			rets, outs := runAll(t, d, false, frags)
			if !allAre(rets, want) {
				t.Fatalf("%s A -> VIP (backend %s): verdicts %v, want all %d", f.name, be, rets, want)
			}
			src, dst, l4 := reassemble(t, outs)
			if src != f.a || dst != be || l4[2] != 5353>>8 || l4[3] != 5353&0xff {
				t.Fatalf("%s: datagram after DNAT %s -> %s port %d, want -> %s:5353", f.name, src, dst, int(l4[2])<<8|int(l4[3]), be)
			}

			reply := fragments(testPkt{src: be, dst: f.a, proto: ProtoUDP, sport: 5353, dport: 41000, payload: payload(8000)}, 0x4321, 1448)
			rets, outs = runAll(t, d, !local, reply)
			if !allAre(rets, want) {
				t.Fatalf("%s reply from %s: verdicts %v, want all %d", f.name, be, rets, want)
			}
			src, dst, l4 = reassemble(t, outs)
			if src != f.vip || dst != f.a || l4[0] != 0 || l4[1] != 53 {
				t.Fatalf("%s: reply after reverse NAT %s:%d -> %s, want %s:53", f.name, src, int(l4[0])<<8|int(l4[1]), dst, f.vip)
			}
		}
	}
}

// TCP behind IPv6 extension headers is judged by its real protocol and port
// (policy, conntrack, service translation); an over-long chain or an
// unknown extension header is dropped and counted.
func TestIPv6ExtensionHeaders(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{true, false}, [2]bool{true, false})
	if err := d.PolicySync([]PolicyKey{{EndpointID: 2, PeerIdentity: idA, Port: 8080, Proto: ProtoTCP, Direction: Ingress}}); err != nil {
		t.Fatal(err)
	}
	chains := [][]uint8{
		{extDest},
		{extHop, extDest},
		{extHop, extRouting, extDest},
		{extAuth},
		{extHop, extRouting, extAuth, extDest},
	}
	for i, chain := range chains {
		sport := uint16(42000 + i)
		pkt := v6WithExt(testPkt{src: podA6, dst: podB6, proto: ProtoTCP, sport: sport, dport: 8080}, chain...)
		if ret, _ := run(t, d.FromPod(), pkt); ret != tcActRedirect {
			t.Fatalf("TCP to the allowed port behind %v: ret %d, want redirect", chain, ret)
		}
		// Conntrack saw TCP: the reply (without extension headers) is
		// admitted into A, which admits nobody.
		if ret, _ := run(t, d.FromPod(), testPkt{src: podB6, dst: podA6, proto: ProtoTCP, sport: 8080, dport: sport, tcpFlags: 0x12}.bytes()); ret != tcActRedirect {
			t.Fatalf("reply to a flow behind %v: ret %d", chain, ret)
		}
		pkt = v6WithExt(testPkt{src: podA6, dst: podB6, proto: ProtoTCP, sport: sport, dport: 9090}, chain...)
		if ret, _ := run(t, d.FromPod(), pkt); ret != tcActShot {
			t.Fatalf("TCP to a denied port behind %v: ret %d, want drop", chain, ret)
		}
	}
	if got := metric(t, d, ReasonDropPolicyIngr); got != uint64(len(chains)) {
		t.Fatalf("drop_policy_ingress = %d, want %d", got, len(chains))
	}

	// Service translation behind a destination options header: the TCP
	// header is found and rewritten, its checksum right.
	if err := d.ServiceUpsert(Frontend{VIP: vip6, Port: 80, Proto: ProtoTCP}, []Backend{{Addr: rem6, Port: 8080}}); err != nil {
		t.Fatal(err)
	}
	ret, out := run(t, d.FromPod(), v6WithExt(testPkt{src: podA6, dst: vip6, proto: ProtoTCP, sport: 43000, dport: 80, payload: []byte("through a service")}, extHop, extDest))
	if ret != tcActOK {
		t.Fatalf("A -> VIP behind extension headers: ret %d", ret)
	}
	if _, dst, _, dport := l4At(t, out, 14+40+16, ProtoTCP); dst != rem6 || dport != 8080 {
		t.Fatalf("DNAT behind extension headers: -> %s:%d", dst, dport)
	}

	// Over-long and unknown chains.
	before := metric(t, d, ReasonDropExtHeader)
	long := make([]uint8, 9)
	for i := range long {
		long[i] = extDest
	}
	for _, chain := range [][]uint8{long, {extExp1}, {extDest, extHop}, {extFragment, extFragment}} {
		for _, to := range []bool{false, true} {
			pkt := v6WithExt(testPkt{src: podA6, dst: podB6, proto: ProtoTCP, sport: 44000, dport: 8080}, chain...)
			if to {
				pkt = v6WithExt(testPkt{src: rem6, dst: podB6, proto: ProtoTCP, sport: 44000, dport: 8080}, chain...)
			}
			ret, _ := runAll(t, d, to, [][]byte{pkt})
			if ret[0] != tcActShot {
				t.Fatalf("chain %v (to_pod %v): ret %d, want drop", chain, to, ret[0])
			}
		}
	}
	if got := metric(t, d, ReasonDropExtHeader) - before; got != 8 {
		t.Fatalf("drop_ext_header rose by %d, want 8", got)
	}
	// Eight headers are still walked.
	if ret, _ := run(t, d.FromPod(), v6WithExt(testPkt{src: podA6, dst: podB6, proto: ProtoTCP, sport: 45000, dport: 8080}, long[:8]...)); ret != tcActRedirect {
		t.Fatalf("eight destination options headers: ret %d, want redirect", ret)
	}
}

// An ICMP error reaches a pod only when it quotes a packet of a flow the
// pod has: errors about the pod's own flows (from a router or the peer) and
// about flows into it pass; errors quoting anything else, or sent by a pod
// about a flow that is not its own, are dropped and counted.
func TestICMPErrorsOnlyForRelatedFlows(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{true, true}, [2]bool{true, true})
	// A may talk to the remote peer; B admits nobody and may send nowhere.
	if err := d.PolicySync([]PolicyKey{
		{EndpointID: 1, PeerIdentity: idRemote, Proto: ProtoUDP, Direction: Egress},
		{EndpointID: 1, PeerIdentity: idRemote, Proto: ProtoTCP, Direction: Ingress},
	}); err != nil {
		t.Fatal(err)
	}
	router4, router6 := netip.MustParseAddr("192.168.7.1"), netip.MustParseAddr("fd00:7::1")
	for _, f := range families {
		router, typ, code, ptb := router4, uint8(icmp4DestUnreach), uint8(icmp4FragNeeded), uint8(icmp4DestUnreach)
		portCode := uint8(icmp4PortUnreach)
		if f.a.Is6() {
			router, typ, code, ptb, portCode = router6, icmp6PktTooBig, 0, icmp6DestUnreach, icmp6PortUnreach
		}
		flow := testPkt{src: f.a, dst: f.remote, proto: ProtoUDP, sport: 5000, dport: 53, payload: payload(1400)}
		if ret, _ := run(t, d.FromPod(), flow.bytes()); ret != tcActOK {
			t.Fatalf("%s A -> remote: ret %d", f.name, ret)
		}
		cases := []struct {
			name string
			to   bool
			pkt  []byte
			want uint32
		}{
			{"frag-needed/packet-too-big from a router about A's flow", true, icmpError(router, f.a, typ, code, 1280, flow.bytes(), 0), tcActOK},
			{"port unreachable from the peer about A's flow", true, icmpError(f.remote, f.a, ptb, portCode, 0, flow.bytes(), 0), tcActOK},
			{"error about a flow A does not have", true, icmpError(router, f.a, typ, code, 1280, testPkt{src: f.a, dst: f.remote, proto: ProtoUDP, sport: 5001, dport: 53}.bytes(), 0), tcActShot},
			{"error to A about a packet A did not send", true, icmpError(router, f.a, typ, code, 1280, testPkt{src: f.remote, dst: f.a, proto: ProtoUDP, sport: 53, dport: 5000}.bytes(), 0), tcActShot},
			{"forged by B about A's flow", false, icmpError(f.b, f.a, ptb, portCode, 0, flow.bytes(), 0), tcActShot},
			{"forged by B about A's flow, packet-too-big", false, icmpError(f.b, f.a, typ, code, 1280, flow.bytes(), 0), tcActShot},
			{"forged by B about a flow A -> B that does not exist", false, icmpError(f.b, f.a, ptb, portCode, 0, testPkt{src: f.a, dst: f.b, proto: ProtoUDP, sport: 5000, dport: 53}.bytes(), 0), tcActShot},
			{"quoting a truncated packet", true, icmpError(router, f.a, typ, code, 1280, flow.bytes(), 20), tcActShot},
		}
		for _, c := range cases {
			before := metric(t, d, ReasonDropICMPUnrelated)
			ret, _ := runAll(t, d, c.to, [][]byte{c.pkt})
			if ret[0] != c.want {
				t.Errorf("%s %s: ret %d, want %d", f.name, c.name, ret[0], c.want)
			}
			if c.want == tcActShot && metric(t, d, ReasonDropICMPUnrelated) != before+1 {
				t.Errorf("%s %s: not counted as drop_icmp_unrelated", f.name, c.name)
			}
		}

		// A flow that entered B: B may report errors about it to A, and
		// A's error about B's reply is related too.
		if err := d.PolicySync([]PolicyKey{{EndpointID: 2, PeerIdentity: idA, Direction: Ingress}, {EndpointID: 1, PeerIdentity: idB, Direction: Egress}}); err != nil {
			t.Fatal(err)
		}
		in := testPkt{src: f.a, dst: f.b, proto: ProtoUDP, sport: 6000, dport: 7000}
		if ret, _ := run(t, d.FromPod(), in.bytes()); ret != tcActRedirect {
			t.Fatalf("%s A -> B: ret %d", f.name, ret)
		}
		if ret, _ := run(t, d.FromPod(), icmpError(f.b, f.a, ptb, portCode, 0, in.bytes(), 0)); ret != tcActRedirect {
			t.Errorf("%s B's port unreachable about A -> B: ret %d, want redirect into A", f.name, ret)
		}
		rep := testPkt{src: f.b, dst: f.a, proto: ProtoUDP, sport: 7000, dport: 6000}
		if ret, _ := run(t, d.FromPod(), icmpError(f.a, f.b, ptb, portCode, 0, rep.bytes(), 0)); ret != tcActRedirect {
			t.Errorf("%s A's port unreachable about B's reply: ret %d, want redirect into B", f.name, ret)
		}
		if err := d.PolicySync([]PolicyKey{
			{EndpointID: 1, PeerIdentity: idRemote, Proto: ProtoUDP, Direction: Egress},
			{EndpointID: 1, PeerIdentity: idRemote, Proto: ProtoTCP, Direction: Ingress},
		}); err != nil {
			t.Fatal(err)
		}
	}
	// Echo and neighbour discovery are not errors: unchanged.
	if ret, _ := run(t, d.FromPod(), testPkt{src: podA, dst: remote, proto: ProtoICMP, sport: 9}.bytes()); ret != tcActShot {
		t.Fatalf("echo request A -> remote (egress allows only udp): ret %d, want policy drop", ret)
	}
	ns := testPkt{src: podA6, dst: podB6, proto: ProtoICMPv6, payload: make([]byte, 16)}.bytes()
	ns[54] = 135 // neighbour solicitation (checksum not looked at)
	if ret, _ := run(t, d.FromPod(), ns); ret != tcActOK {
		t.Fatalf("neighbour solicitation: ret %d, want pass to the stack", ret)
	}
}

// An ICMP error about a flow that went through a service address is
// translated back before the client sees it: the quoted destination and
// port become the service's, the outer source too when the error comes from
// the backend itself, with every checksum (outer, quoted IPv4 header, quoted
// TCP/UDP, ICMP with its IPv6 pseudo header) right. This is what makes path
// MTU discovery work through a service address.
func TestICMPErrorReverseTranslationForServiceFlows(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	router4, router6 := netip.MustParseAddr("192.168.7.1"), netip.MustParseAddr("fd00:7::1")
	for _, f := range families {
		router, ptbType, ptbCode, du, portCode := router4, uint8(icmp4DestUnreach), uint8(icmp4FragNeeded), uint8(icmp4DestUnreach), uint8(icmp4PortUnreach)
		if f.a.Is6() {
			router, ptbType, ptbCode, du, portCode = router6, icmp6PktTooBig, 0, icmp6DestUnreach, icmp6PortUnreach
		}
		for _, proto := range []Proto{ProtoTCP, ProtoUDP} {
			if err := d.ServiceUpsert(Frontend{VIP: f.vip, Port: 80, Proto: proto}, []Backend{{Addr: f.remote, Port: 8080}}); err != nil {
				t.Fatal(err)
			}
			client := testPkt{src: f.a, dst: f.vip, proto: proto, sport: 50000, dport: 80, tcpFlags: 0x18, payload: []byte("a request that did not fit")}
			ret, sent := run(t, d.FromPod(), client.bytes())
			if ret != tcActOK {
				t.Fatalf("%s %s A -> VIP: ret %d", f.name, proto, ret)
			}
			for _, c := range []struct {
				name      string
				from      netip.Addr
				typ, code uint8
				wantSrc   netip.Addr
			}{
				{"from a router", router, ptbType, ptbCode, router},
				{"from the backend", f.remote, du, portCode, f.vip},
			} {
				ret, out := run(t, d.ToPod(), icmpError(c.from, f.a, c.typ, c.code, 1280, sent, 0))
				if ret != tcActOK {
					t.Fatalf("%s %s error %s: ret %d", f.name, proto, c.name, ret)
				}
				e := parseICMPErr(t, out)
				if e.src != c.wantSrc || e.dst != f.a {
					t.Errorf("%s %s error %s: outer %s -> %s, want %s -> %s", f.name, proto, c.name, e.src, e.dst, c.wantSrc, f.a)
				}
				if e.inSrc != f.a || e.inDst != f.vip || e.inSport != 50000 || e.inDport != 80 {
					t.Errorf("%s %s error %s: quotes %s:%d -> %s:%d, want %s:50000 -> %s:80", f.name, proto, c.name, e.inSrc, e.inSport, e.inDst, e.inDport, f.a, f.vip)
				}
				if !e.inFull || !e.inL4CsumOK {
					t.Errorf("%s %s error %s: quoted %s checksum wrong after translation", f.name, proto, c.name, proto)
				}
			}
			// A's own error about a reply from the service goes to the
			// backend, the quote translated to what the backend sent.
			reply := testPkt{src: f.vip, dst: f.a, proto: proto, sport: 80, dport: 50000, tcpFlags: 0x18, payload: []byte("reply")}
			ret, out := run(t, d.FromPod(), icmpError(f.a, f.vip, du, portCode, 0, reply.bytes(), 0))
			if ret != tcActOK {
				t.Fatalf("%s %s A's error about a service reply: ret %d", f.name, proto, ret)
			}
			e := parseICMPErr(t, out)
			if e.dst != f.remote || e.inSrc != f.remote || e.inSport != 8080 || !e.inL4CsumOK {
				t.Errorf("%s %s A's error about a service reply: to %s quoting %s:%d (checksum ok %v), want the backend %s:8080", f.name, proto, e.dst, e.inSrc, e.inSport, e.inL4CsumOK, f.remote)
			}
			if err := d.ConntrackFlush(); err != nil {
				t.Fatal(err)
			}
		}

		// A local backend: B's port unreachable about A's datagram reaches
		// A from the service address.
		if err := d.ServiceUpsert(Frontend{VIP: f.vip, Port: 53, Proto: ProtoUDP}, []Backend{{Addr: f.b, Port: 5353}}); err != nil {
			t.Fatal(err)
		}
		ret, sent := run(t, d.FromPod(), testPkt{src: f.a, dst: f.vip, proto: ProtoUDP, sport: 51000, dport: 53, payload: []byte("query")}.bytes())
		if ret != tcActRedirect {
			t.Fatalf("%s A -> VIP (local backend): ret %d", f.name, ret)
		}
		ret, out := run(t, d.FromPod(), icmpError(f.b, f.a, du, portCode, 0, sent, 0))
		if ret != tcActRedirect {
			t.Fatalf("%s B's port unreachable to A: ret %d", f.name, ret)
		}
		e := parseICMPErr(t, out)
		if e.src != f.vip || e.inDst != f.vip || e.inDport != 53 || !e.inL4CsumOK {
			t.Errorf("%s B's error to A: from %s quoting -> %s:%d (checksum ok %v), want from and about %s:53", f.name, e.src, e.inDst, e.inDport, e.inL4CsumOK, f.vip)
		}
	}
}

func payload(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	copy(b, fmt.Sprintf("%d bytes|", n))
	return b
}
