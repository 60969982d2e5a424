package bpf

import (
	"bytes"
	"net/netip"
	"testing"
)

// The host's own programs (from_host, to_host) run on an L3 device: the
// packets start with the IP header. The tests build the usual frames and
// cut the Ethernet header off; what comes back gets one again for the
// checks (parsePkt, parseICMPErr).

func l3(frame []byte) []byte { return bytes.Clone(frame[14:]) }

func withEth(pkt []byte) []byte { return append(ethHdr(pkt[0]>>4 == 6), pkt...) }

// hostSetup makes podA (and podA6) the host's own address: an endpoint
// like a pod's (the WireGuard device's ifindex, no MACs), with its ingress
// policy enforced or not.
func hostSetup(t *testing.T, d *Datapath, ingress bool) {
	t.Helper()
	for _, ip := range []netip.Addr{podA, podA6} {
		if err := d.EndpointUpsert(ip, EndpointInfo{ID: 7, IfIndex: 42, Identity: idA, PolicyIngress: ingress}); err != nil {
			t.Fatal(err)
		}
		if err := d.IPCacheUpsert(netip.PrefixFrom(ip, ip.BitLen()), IPCacheEntry{Identity: idA}); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []netip.Addr{remote, rem6} {
		if err := d.IPCacheUpsert(netip.PrefixFrom(r, r.BitLen()), IPCacheEntry{Identity: idRemote, HostIP: netip.MustParseAddr("192.168.1.2")}); err != nil {
			t.Fatal(err)
		}
	}
}

func TestHostServiceDNATAndReverseNATOnL3(t *testing.T) {
	d := openTest(t)
	hostSetup(t, d, false)
	for _, f := range families {
		for _, proto := range []Proto{ProtoTCP, ProtoUDP} {
			if err := d.ServiceUpsert(Frontend{VIP: f.vip, Port: 80, Proto: proto}, []Backend{{Addr: f.remote, Port: 8080}}); err != nil {
				t.Fatal(err)
			}
			req := l3(testPkt{src: f.a, dst: f.vip, proto: proto, sport: 50000, dport: 80, payload: []byte("hello")}.bytes())
			ret, out := run(t, d.FromHost(), req)
			if ret != tcActOK {
				t.Fatalf("%s %s host -> VIP: ret %d", f.name, proto, ret)
			}
			if out[0]>>4 != req[0]>>4 {
				t.Fatalf("%s %s: the packet no longer starts with its IP header: % x", f.name, proto, out[:4])
			}
			p := parsePkt(t, withEth(out), proto)
			if p.src != f.a || p.sport != 50000 || p.dst != f.remote || p.dport != 8080 {
				t.Fatalf("%s %s DNAT on L3: %s:%d -> %s:%d, want %s:50000 -> %s:8080", f.name, proto, p.src, p.sport, p.dst, p.dport, f.a, f.remote)
			}
			// The backend's reply arrives decrypted on the device.
			rep := l3(testPkt{src: f.remote, dst: f.a, proto: proto, sport: 8080, dport: 50000, tcpFlags: 0x12, payload: []byte("world")}.bytes())
			ret, out = run(t, d.ToHost(), rep)
			if ret != tcActOK {
				t.Fatalf("%s %s reply to the host: ret %d", f.name, proto, ret)
			}
			p = parsePkt(t, withEth(out), proto)
			if p.src != f.vip || p.sport != 80 || p.dst != f.a || p.dport != 50000 {
				t.Fatalf("%s %s reverse NAT on L3: %s:%d -> %s:%d, want %s:80 -> %s:50000", f.name, proto, p.src, p.sport, p.dst, p.dport, f.vip, f.a)
			}
		}
	}
	if got := metric(t, d, ReasonServiceNAT); got != 4 {
		t.Fatalf("service_nat = %d, want 4", got)
	}
}

func TestHostICMPErrorTranslatedOnL3(t *testing.T) {
	d := openTest(t)
	hostSetup(t, d, true) // ingress enforced, no rule: only related errors pass
	router4, router6 := netip.MustParseAddr("192.168.7.1"), netip.MustParseAddr("fd00:7::1")
	for _, f := range families {
		router, typ, code := router4, uint8(icmp4DestUnreach), uint8(icmp4FragNeeded)
		if f.a.Is6() {
			router, typ, code = router6, icmp6PktTooBig, 0
		}
		if err := d.ServiceUpsert(Frontend{VIP: f.vip, Port: 80, Proto: ProtoTCP}, []Backend{{Addr: f.remote, Port: 8080}}); err != nil {
			t.Fatal(err)
		}
		ret, sent := run(t, d.FromHost(), l3(testPkt{src: f.a, dst: f.vip, proto: ProtoTCP, sport: 50001, dport: 80, tcpFlags: 0x18, payload: payload(200)}.bytes()))
		if ret != tcActOK {
			t.Fatalf("%s host -> VIP: ret %d", f.name, ret)
		}
		ret, out := run(t, d.ToHost(), l3(icmpError(router, f.a, typ, code, 1280, withEth(sent), 0)))
		if ret != tcActOK {
			t.Fatalf("%s packet-too-big about the host's service flow: ret %d", f.name, ret)
		}
		e := parseICMPErr(t, withEth(out))
		if e.inDst != f.vip || e.inDport != 80 || e.src != router {
			t.Errorf("%s error: quotes -> %s:%d from %s, want -> %s:80 from %s", f.name, e.inDst, e.inDport, e.src, f.vip, router)
		}
		// An error about a flow the host does not have is dropped.
		before := metric(t, d, ReasonDropICMPUnrelated)
		other := l3(testPkt{src: f.a, dst: f.remote, proto: ProtoTCP, sport: 50002, dport: 8080}.bytes())
		if ret, _ := run(t, d.ToHost(), l3(icmpError(router, f.a, typ, code, 1280, withEth(other), 0))); ret != tcActShot {
			t.Errorf("%s an unrelated error to the host: ret %d, want drop", f.name, ret)
		}
		if metric(t, d, ReasonDropICMPUnrelated) != before+1 {
			t.Errorf("%s the unrelated error is not counted", f.name)
		}
	}
}

func TestHostIngressPolicyOnL3(t *testing.T) {
	d := openTest(t)
	hostSetup(t, d, true)
	const idOther = 1<<20 | 9
	other4, other6 := netip.MustParseAddr("10.2.0.99"), netip.MustParseAddr("fd00:2::99")
	for _, o := range []netip.Addr{other4, other6} {
		if err := d.IPCacheUpsert(netip.PrefixFrom(o, o.BitLen()), IPCacheEntry{Identity: idOther}); err != nil {
			t.Fatal(err)
		}
	}
	// The host admits the remote identity on tcp/5432 only.
	if err := d.PolicySync([]PolicyKey{{EndpointID: 7, PeerIdentity: idRemote, Port: 5432, Proto: ProtoTCP, Direction: Ingress}}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		name            string
		host, rem, othr netip.Addr
	}{{"IPv4", podA, remote, other4}, {"IPv6", podA6, rem6, other6}} {
		cases := []struct {
			name string
			pkt  testPkt
			want uint32
		}{
			{"admitted identity, admitted port", testPkt{src: f.rem, dst: f.host, proto: ProtoTCP, sport: 40000, dport: 5432}, tcActOK},
			{"admitted identity, other port", testPkt{src: f.rem, dst: f.host, proto: ProtoTCP, sport: 40001, dport: 22}, tcActShot},
			{"other identity, admitted port", testPkt{src: f.othr, dst: f.host, proto: ProtoTCP, sport: 40002, dport: 5432}, tcActShot},
			{"other identity, udp", testPkt{src: f.othr, dst: f.host, proto: ProtoUDP, sport: 40003, dport: 5432}, tcActShot},
		}
		for _, c := range cases {
			before := metric(t, d, ReasonDropPolicyIngr)
			ret, _ := run(t, d.ToHost(), l3(c.pkt.bytes()))
			if ret != c.want {
				t.Errorf("%s %s: ret %d, want %d", f.name, c.name, ret, c.want)
			}
			wantDrops := before
			if c.want == tcActShot {
				wantDrops++
			}
			if got := metric(t, d, ReasonDropPolicyIngr); got != wantDrops {
				t.Errorf("%s %s: drop_policy_ingress %d, want %d", f.name, c.name, got, wantDrops)
			}
		}
		// The admitted flow goes on; the host's answer leaves untouched.
		if ret, _ := run(t, d.ToHost(), l3(testPkt{src: f.rem, dst: f.host, proto: ProtoTCP, sport: 40000, dport: 5432, tcpFlags: 0x10}.bytes())); ret != tcActOK {
			t.Errorf("%s the admitted flow's next packet: ret %d", f.name, ret)
		}
		if ret, _ := run(t, d.FromHost(), l3(testPkt{src: f.host, dst: f.rem, proto: ProtoTCP, sport: 5432, dport: 40000, tcpFlags: 0x12}.bytes())); ret != tcActOK {
			t.Errorf("%s the host's answer: ret %d", f.name, ret)
		}
		// A flow the host opens: its replies pass although the policy
		// admits nobody of that identity.
		if ret, _ := run(t, d.FromHost(), l3(testPkt{src: f.host, dst: f.othr, proto: ProtoTCP, sport: 33000, dport: 443}.bytes())); ret != tcActOK {
			t.Errorf("%s host -> other: ret %d", f.name, ret)
		}
		if ret, _ := run(t, d.ToHost(), l3(testPkt{src: f.othr, dst: f.host, proto: ProtoTCP, sport: 443, dport: 33000, tcpFlags: 0x12}.bytes())); ret != tcActOK {
			t.Errorf("%s reply other -> host: ret %d", f.name, ret)
		}
	}
}

// The host's node traffic (its agent's, to its peers' node addresses,
// under an address that is not its endpoint) leaves and arrives on the
// same device: untouched, also to an address that is a service's.
func TestHostNodeTrafficUntouchedOnL3(t *testing.T) {
	d := openTest(t)
	hostSetup(t, d, true)
	if err := d.ServiceUpsert(Frontend{VIP: vip, Port: 80, Proto: ProtoTCP}, []Backend{{Addr: remote, Port: 8080}}); err != nil {
		t.Fatal(err)
	}
	node := netip.MustParseAddr("192.168.1.9")
	out := l3(testPkt{src: node, dst: vip, proto: ProtoTCP, sport: 1234, dport: 80}.bytes())
	ret, got := run(t, d.FromHost(), out)
	if ret != tcActOK || !bytes.Equal(got, out) {
		t.Fatalf("node traffic out: ret %d, changed %v", ret, !bytes.Equal(got, out))
	}
	in := l3(testPkt{src: remote, dst: node, proto: ProtoTCP, sport: 2379, dport: 1234}.bytes())
	ret, got = run(t, d.ToHost(), in)
	if ret != tcActOK || !bytes.Equal(got, in) {
		t.Fatalf("node traffic in: ret %d, changed %v", ret, !bytes.Equal(got, in))
	}
	// Not IP at all (a tun device carries nothing else, but a stray
	// packet must not be judged as one).
	junk := []byte{0x00, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}
	if ret, _ := run(t, d.ToHost(), junk); ret != tcActOK {
		t.Fatalf("non-IP: ret %d", ret)
	}
	if metric(t, d, ReasonDropPolicyIngr) != 0 || metric(t, d, ReasonServiceNAT) != 0 {
		t.Fatal("node traffic was judged or translated")
	}
}

func TestHostEgressPolicyOnL3(t *testing.T) {
	d := openTest(t)
	hostSetup(t, d, false)
	for _, ip := range []netip.Addr{podA, podA6} {
		if err := d.EndpointUpsert(ip, EndpointInfo{ID: 7, IfIndex: 42, Identity: idA, PolicyEgress: true}); err != nil {
			t.Fatal(err)
		}
	}
	// The host may reach the remote identity on tcp/8080, through a VIP
	// too: policy judges the backend.
	if err := d.PolicySync([]PolicyKey{{EndpointID: 7, PeerIdentity: idRemote, Port: 8080, Proto: ProtoTCP, Direction: Egress}}); err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if err := d.ServiceUpsert(Frontend{VIP: f.vip, Port: 80, Proto: ProtoTCP}, []Backend{{Addr: f.remote, Port: 8080}}); err != nil {
			t.Fatal(err)
		}
		if err := d.ServiceUpsert(Frontend{VIP: f.vip, Port: 81, Proto: ProtoTCP}, []Backend{{Addr: f.remote, Port: 9090}}); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name string
			pkt  testPkt
			want uint32
		}{
			{"to the allowed port", testPkt{src: f.a, dst: f.remote, proto: ProtoTCP, sport: 30000, dport: 8080}, tcActOK},
			{"through a VIP to the allowed port", testPkt{src: f.a, dst: f.vip, proto: ProtoTCP, sport: 30001, dport: 80}, tcActOK},
			{"to another port", testPkt{src: f.a, dst: f.remote, proto: ProtoTCP, sport: 30002, dport: 9090}, tcActShot},
			{"through a VIP to another port", testPkt{src: f.a, dst: f.vip, proto: ProtoTCP, sport: 30003, dport: 81}, tcActShot},
		} {
			before := metric(t, d, ReasonDropPolicyEgr)
			if ret, _ := run(t, d.FromHost(), l3(c.pkt.bytes())); ret != c.want {
				t.Errorf("%s host %s: ret %d, want %d", f.name, c.name, ret, c.want)
			}
			if c.want == tcActShot && metric(t, d, ReasonDropPolicyEgr) != before+1 {
				t.Errorf("%s host %s: not counted as drop_policy_egress", f.name, c.name)
			}
		}
	}
}
