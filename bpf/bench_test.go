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
