package bpf

import (
	"net/netip"
	"testing"
	"time"
)

// BenchmarkFromPod measures ns per packet of from_pod under
// BPF_PROG_TEST_RUN for the three paths named in the foundation issue. The
// packets go to a remote address so the program returns to the stack and
// the loop measures only our code. Conntrack entries are created on the
// first run and hit afterwards, as on a real established flow; the "new
// flow" variants defeat conntrack by flushing it.
func BenchmarkFromPod(b *testing.B) {
	d := openTest(b)
	if err := d.EndpointUpsert(podA, EndpointInfo{ID: 1, IfIndex: 101, Identity: idA, PodMAC: macA, HostMAC: macB}); err != nil {
		b.Fatal(err)
	}
	if err := d.EndpointUpsert(podB, EndpointInfo{ID: 2, IfIndex: 101, Identity: idB, PodMAC: macA, HostMAC: macB, PolicyEgress: true}); err != nil {
		b.Fatal(err)
	}
	if err := d.IPCacheUpsert(netip.PrefixFrom(remote, 32), IPCacheEntry{Identity: idRemote}); err != nil {
		b.Fatal(err)
	}
	if err := d.PolicySync([]PolicyKey{{EndpointID: 2, PeerIdentity: idRemote, Port: 8080, Proto: ProtoTCP, Direction: Egress}}); err != nil {
		b.Fatal(err)
	}
	if err := d.ServiceUpsert(Frontend{VIP: vip, Port: 80, Proto: ProtoTCP}, []Backend{{Addr: remote, Port: 8080}}); err != nil {
		b.Fatal(err)
	}
	cases := []struct {
		name string
		pkt  testPkt
	}{
		{"pass-through", testPkt{src: podA, dst: remote, proto: ProtoTCP, sport: 1000, dport: 8080, tcpFlags: 0x10}},
		{"policy", testPkt{src: podB, dst: remote, proto: ProtoTCP, sport: 1000, dport: 8080, tcpFlags: 0x10}},
		{"service", testPkt{src: podA, dst: vip, proto: ProtoTCP, sport: 1001, dport: 80, tcpFlags: 0x10}},
	}
	for _, c := range cases {
		for _, newFlow := range []bool{false, true} {
			name := c.name + "/established"
			if newFlow {
				name = c.name + "/new-flow"
			}
			b.Run(name, func(b *testing.B) {
				pkt := c.pkt.bytes()
				perPkt := benchProg(b, d, pkt, newFlow)
				b.ReportMetric(float64(perPkt.Nanoseconds()), "ns/pkt")
			})
		}
	}
	benchEdges(b, d)
}

// benchEdges measures the edges beside the plain path: a first fragment
// (its flow established, so the cost is the fragment map's), a later
// fragment (its first seen), plain IPv6 and IPv6 behind a hop-by-hop and a
// destination options header, and an ICMP error a pod sends about a flow
// into it (the tail call, the quoted packet and two conntrack lookups).
func benchEdges(b *testing.B, d *Datapath) {
	if err := d.EndpointUpsert(podA6, EndpointInfo{ID: 1, IfIndex: 101, Identity: idA, PodMAC: macA, HostMAC: macB}); err != nil {
		b.Fatal(err)
	}
	frags := fragments(testPkt{src: podA, dst: remote, proto: ProtoUDP, sport: 2000, dport: 53, payload: payload(3000)}, 77, 1448)
	flowIn := testPkt{src: remote, dst: podA, proto: ProtoUDP, sport: 3000, dport: 53, payload: payload(100)}
	cases := []struct {
		name string
		prep [][]byte // run once before measuring (from_pod), to_pod for prepTo
		to   []byte   // run once through to_pod before measuring
		pkt  []byte
	}{
		{"frag-first/established", nil, nil, frags[0]},
		{"frag-later/established", [][]byte{frags[0]}, nil, frags[1]},
		{"ipv6/established", nil, nil, testPkt{src: podA6, dst: rem6, proto: ProtoTCP, sport: 1000, dport: 8080, tcpFlags: 0x10}.bytes()},
		{"ipv6-ext2/established", nil, nil, v6WithExt(testPkt{src: podA6, dst: rem6, proto: ProtoTCP, sport: 1002, dport: 8080, tcpFlags: 0x10}, extHop, extDest)},
		{"icmp-error/related", nil, flowIn.bytes(), icmpError(podA, remote, icmp4DestUnreach, icmp4PortUnreach, 0, flowIn.bytes(), 0)},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			for _, p := range c.prep {
				if ret, _, err := d.FromPod().Benchmark(p, 1, nil); err != nil || ret == 2 {
					b.Fatalf("prepare: ret %d err %v", ret, err)
				}
			}
			if c.to != nil {
				if ret, _, err := d.ToPod().Benchmark(c.to, 1, nil); err != nil || ret == 2 {
					b.Fatalf("prepare to_pod: ret %d err %v", ret, err)
				}
			}
			perPkt := benchProg(b, d, c.pkt, false)
			b.ReportMetric(float64(perPkt.Nanoseconds()), "ns/pkt")
		})
	}
}

func benchProg(b *testing.B, d *Datapath, pkt []byte, newFlow bool) time.Duration {
	const repeat = 100000
	var total time.Duration
	runs := 0
	for i := 0; i < b.N; i++ {
		if newFlow {
			// A repeated packet would hit conntrack after its first run,
			// so a new flow is one packet on an empty table.
			if err := d.ConntrackFlush(); err != nil {
				b.Fatal(err)
			}
			ret, dur, err := d.FromPod().Benchmark(pkt, 1, nil)
			if err != nil || ret == 2 {
				b.Fatalf("run: ret %d err %v", ret, err)
			}
			total += dur
		} else {
			ret, dur, err := d.FromPod().Benchmark(pkt, repeat, nil)
			if err != nil || ret == 2 {
				b.Fatalf("run: ret %d err %v", ret, err)
			}
			total += dur
		}
		runs++
	}
	return total / time.Duration(runs)
}
