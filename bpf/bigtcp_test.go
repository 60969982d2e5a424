package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// BIG TCP packets as the programs see them: an IPv4 GSO packet beyond
// 64 KiB carries tot_len 0; an IPv6 one carries payload_len 0, either with
// the jumbo hop-by-hop option the kernel's ip6_xmit adds (what leaves a
// pod on Linux 6.18) or without it (what the kernels hand over
// after removing it). The real length is the skb's. The packets here are
// short (BPF_PROG_TEST_RUN takes a page at most), but carry exactly those
// headers, and their TCP checksums cover the real length: a program that
// trusted tot_len or payload_len, or got a checksum fix-up wrong, fails.

type bigForm int

const (
	bigV4        bigForm = iota // IPv4, tot_len 0
	bigV6                       // IPv6, payload_len 0, no extension header
	bigV6Jumbo                  // IPv6, payload_len 0, hop-by-hop jumbo option
	bigFormCount                // (the number of forms)
)

func (f bigForm) String() string {
	return [...]string{"IPv4 tot_len 0", "IPv6 payload_len 0", "IPv6 jumbo hop-by-hop"}[f]
}

func (f bigForm) v6() bool { return f != bigV4 }

// bigBytes is p in form f (p's addresses must be of f's family).
func bigBytes(p testPkt, f bigForm) []byte {
	l4 := p.l4() // checksum over the real length
	switch f {
	case bigV4:
		ip := ip4Hdr(p.src, p.dst, uint8(p.proto), 7, 0, false, 0)
		binary.BigEndian.PutUint16(ip[2:], 0)      // tot_len 0
		binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF, as TCP sends
		binary.BigEndian.PutUint16(ip[10:], 0)
		binary.BigEndian.PutUint16(ip[10:], csumFold(csumAdd(0, ip)))
		return append(append(ethHdr(false), ip...), l4...)
	case bigV6:
		return append(append(ethHdr(true), ip6Hdr(p.src, p.dst, uint8(p.proto), 0)...), l4...)
	default:
		// RFC 2675: next header, length 0, option 0xc2 of 4 bytes holding
		// the payload length (hop-by-hop header included).
		hbh := []byte{uint8(p.proto), 0, 0xc2, 4, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(hbh[4:], uint32(len(hbh)+len(l4)))
		out := append(ethHdr(true), ip6Hdr(p.src, p.dst, extHop, 0)...)
		return append(append(out, hbh...), l4...)
	}
}

// parseBig decodes a packet of form f as the program left it: the length
// fields must still say "BIG TCP" (0), the jumbo option must be intact, the
// IPv4 header checksum and the TCP checksum over the real length valid.
func parseBig(t *testing.T, b []byte, f bigForm) parsed {
	t.Helper()
	out := parsed{dstMAC: b[0:6], srcMAC: b[6:12]}
	var l4 []byte
	switch f {
	case bigV4:
		ip := b[14:34]
		if n := binary.BigEndian.Uint16(ip[2:]); n != 0 {
			t.Fatalf("%s: tot_len became %d", f, n)
		}
		if csumFold(csumAdd(0, ip)) != 0 {
			t.Fatalf("%s: bad IPv4 header checksum", f)
		}
		out.src, out.dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		l4 = b[34:]
	default:
		ip := b[14:54]
		if n := binary.BigEndian.Uint16(ip[4:]); n != 0 {
			t.Fatalf("%s: payload_len became %d", f, n)
		}
		out.src, out.dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		l4 = b[54:]
		if f == bigV6Jumbo {
			if ip[6] != extHop || b[54] != uint8(ProtoTCP) || b[56] != 0xc2 || int(binary.BigEndian.Uint32(b[58:])) != len(b)-54 {
				t.Fatalf("%s: hop-by-hop header changed: % x", f, b[54:62])
			}
			l4 = b[62:]
		} else if ip[6] != uint8(ProtoTCP) {
			t.Fatalf("%s: next header became %d", f, ip[6])
		}
	}
	out.sport, out.dport = binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
	if csumFold(csumAdd(pseudoSum(out.src, out.dst, ProtoTCP, len(l4)), l4)) != 0 {
		t.Fatalf("%s: bad TCP checksum over the real length %d", f, len(l4))
	}
	return out
}

func (f bigForm) addrs() (a, b, rem, v netip.Addr) {
	if f.v6() {
		return podA6, podB6, rem6, vip6
	}
	return podA, podB, remote, vip
}

// Pod to pod on the node, to a service with a backend on another node and
// its replies: delivered, translated and reverse-translated with the
// length fields untouched and the checksums right.
func TestBigTCPDeliveryAndServiceTranslation(t *testing.T) {
	for f := range bigFormCount {
		t.Run(f.String(), func(t *testing.T) {
			d := openTest(t)
			setup(t, d, [2]bool{}, [2]bool{})
			a, b, rem, v := f.addrs()
			data := payload(1400)

			// Same node: straight into B.
			ret, out := run(t, d.FromPod(), bigBytes(testPkt{src: a, dst: b, proto: ProtoTCP, sport: 40000, dport: 8080, tcpFlags: 0x18, payload: data}, f))
			if ret != tcActRedirect {
				t.Fatalf("A -> B: ret %d, want redirect", ret)
			}
			if p := parseBig(t, out, f); p.dstMAC.String() != macB.String() || p.src != a || p.dst != b {
				t.Fatalf("A -> B: %+v", p)
			}

			// Through a service to a backend on another node, and back.
			if err := d.ServiceUpsert(Frontend{VIP: v, Port: 80, Proto: ProtoTCP}, []Backend{{Addr: rem, Port: 8080}}); err != nil {
				t.Fatal(err)
			}
			ret, out = run(t, d.FromPod(), bigBytes(testPkt{src: a, dst: v, proto: ProtoTCP, sport: 50000, dport: 80, tcpFlags: 0x18, payload: data}, f))
			if ret != tcActOK {
				t.Fatalf("A -> VIP: ret %d", ret)
			}
			if p := parseBig(t, out, f); p.dst != rem || p.dport != 8080 || p.src != a || p.sport != 50000 {
				t.Fatalf("DNAT: %s:%d -> %s:%d", p.src, p.sport, p.dst, p.dport)
			}
			ret, out = run(t, d.ToPod(), bigBytes(testPkt{src: rem, dst: a, proto: ProtoTCP, sport: 8080, dport: 50000, tcpFlags: 0x18, payload: data}, f))
			if ret != tcActOK {
				t.Fatalf("backend -> A: ret %d", ret)
			}
			if p := parseBig(t, out, f); p.src != v || p.sport != 80 || p.dst != a {
				t.Fatalf("reverse NAT: %s:%d -> %s:%d", p.src, p.sport, p.dst, p.dport)
			}
			if n := metric(t, d, ReasonDropInvalid) + metric(t, d, ReasonDropExtHeader); n != 0 {
				t.Fatalf("%d packets dropped as invalid", n)
			}
		})
	}
}

// B admits A on tcp/8080 only and remote peers on nothing: BIG TCP packets
// get the same verdicts as any others, on both hooks, and the admitted
// flow stays tracked.
func TestBigTCPPolicy(t *testing.T) {
	for f := range bigFormCount {
		t.Run(f.String(), func(t *testing.T) {
			d := openTest(t)
			setup(t, d, [2]bool{}, [2]bool{true, false})
			if err := d.PolicySync([]PolicyKey{{EndpointID: 2, PeerIdentity: idA, Port: 8080, Proto: ProtoTCP, Direction: Ingress}}); err != nil {
				t.Fatal(err)
			}
			a, b, rem, _ := f.addrs()
			data := payload(1000)
			big := func(src netip.Addr, dport uint16) []byte {
				return bigBytes(testPkt{src: src, dst: b, proto: ProtoTCP, sport: 41000, dport: dport, tcpFlags: 0x18, payload: data}, f)
			}
			if ret, out := run(t, d.FromPod(), big(a, 8080)); ret != tcActRedirect {
				t.Fatalf("A -> B:8080 (allowed): ret %d", ret)
			} else {
				parseBig(t, out, f)
			}
			if ret, _ := run(t, d.FromPod(), big(a, 9090)); ret != tcActShot {
				t.Fatalf("A -> B:9090 (denied): ret %d", ret)
			}
			// From another node, through the stack into B.
			if ret, _ := run(t, d.ToPod(), big(rem, 8080)); ret != tcActShot {
				t.Fatalf("remote -> B:8080 (denied): ret %d", ret)
			}
			if got := metric(t, d, ReasonDropPolicyIngr); got != 2 {
				t.Fatalf("policy drops %d, want 2", got)
			}
			// B's reply in the admitted flow goes back to A.
			ret, out := run(t, d.FromPod(), bigBytes(testPkt{src: b, dst: a, proto: ProtoTCP, sport: 8080, dport: 41000, tcpFlags: 0x10, payload: data}, f))
			if ret != tcActRedirect {
				t.Fatalf("B -> A reply: ret %d", ret)
			}
			parseBig(t, out, f)
			if n, err := d.ConntrackCount(); err != nil || n == 0 {
				t.Fatalf("conntrack: %d entries, %v", n, err)
			}
		})
	}
}
