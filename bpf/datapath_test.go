package bpf

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

const (
	tcActOK       = 0
	tcActShot     = 2
	tcActRedirect = 7
)

// openTest loads the datapath with its maps pinned in a unique directory that
// is removed at the end of the test.
func openTest(t testing.TB) *Datapath {
	t.Helper()
	testenv.Root(t, "loading eBPF programs")
	b := make([]byte, 4)
	rand.Read(b)
	pin := filepath.Join("/sys/fs/bpf/isthmus", "test-"+hex.EncodeToString(b))
	// Registered first: a load the verifier refuses has pinned the maps already.
	t.Cleanup(func() { RemovePins(pin) })
	d, err := Open(pin)
	if err != nil {
		t.Fatalf("open datapath: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func run(t *testing.T, prog *ebpf.Program, pkt []byte) (uint32, []byte) {
	t.Helper()
	out := make([]byte, len(pkt)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt, DataOut: out})
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
	}
	return ret, out[:len(pkt)]
}

func metric(t *testing.T, d *Datapath, r Reason) uint64 {
	t.Helper()
	m, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return m[r].Packets
}

var (
	podA   = netip.MustParseAddr("10.1.0.10")
	podB   = netip.MustParseAddr("10.1.0.11")
	remote = netip.MustParseAddr("10.2.0.20")
	vip    = netip.MustParseAddr("10.96.0.10")
	podA6  = netip.MustParseAddr("fd00:1::10")
	podB6  = netip.MustParseAddr("fd00:1::11")
	rem6   = netip.MustParseAddr("fd00:2::20")
	vip6   = netip.MustParseAddr("fd00:96::10")
)

const (
	idA      = 1<<20 | 1
	idB      = 1<<20 | 2
	idRemote = 1<<20 | 3
)

// setup installs two local pods (A, B) and one remote address, both
// families.
func setup(t *testing.T, d *Datapath, polA, polB [2]bool) {
	t.Helper()
	eps := []struct {
		ip    netip.Addr
		info  EndpointInfo
		ident uint32
	}{
		{podA, EndpointInfo{ID: 1, IfIndex: 101, Identity: idA, PodMAC: macA, HostMAC: macB, PolicyIngress: polA[0], PolicyEgress: polA[1]}, idA},
		{podA6, EndpointInfo{ID: 1, IfIndex: 101, Identity: idA, PodMAC: macA, HostMAC: macB, PolicyIngress: polA[0], PolicyEgress: polA[1]}, idA},
		{podB, EndpointInfo{ID: 2, IfIndex: 102, Identity: idB, PodMAC: macB, HostMAC: macA, PolicyIngress: polB[0], PolicyEgress: polB[1]}, idB},
		{podB6, EndpointInfo{ID: 2, IfIndex: 102, Identity: idB, PodMAC: macB, HostMAC: macA, PolicyIngress: polB[0], PolicyEgress: polB[1]}, idB},
	}
	for _, e := range eps {
		if err := d.EndpointUpsert(e.ip, e.info); err != nil {
			t.Fatal(err)
		}
		if err := d.IPCacheUpsert(netip.PrefixFrom(e.ip, e.ip.BitLen()), IPCacheEntry{Identity: e.ident}); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []netip.Addr{remote, rem6} {
		if err := d.IPCacheUpsert(netip.PrefixFrom(r, r.BitLen()), IPCacheEntry{Identity: idRemote, HostIP: netip.MustParseAddr("192.168.1.2")}); err != nil {
			t.Fatal(err)
		}
	}
}

func TestLocalDeliveryRedirectsToPeer(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, fam := range []struct{ a, b netip.Addr }{{podA, podB}, {podA6, podB6}} {
		for _, proto := range []Proto{ProtoTCP, ProtoUDP} {
			ret, out := run(t, d.FromPod(), testPkt{src: fam.a, dst: fam.b, proto: proto, sport: 40000, dport: 8080}.bytes())
			if ret != tcActRedirect {
				t.Fatalf("%s %s: want redirect, got %d", fam.b, proto, ret)
			}
			p := parsePkt(t, out, proto)
			if p.dstMAC.String() != macB.String() || p.srcMAC.String() != macA.String() {
				t.Fatalf("MACs not rewritten for B: dst %s src %s", p.dstMAC, p.srcMAC)
			}
		}
	}
	if metric(t, d, ReasonForwardLocal) != 4 {
		t.Fatalf("forward_local = %d, want 4", metric(t, d, ReasonForwardLocal))
	}
}

func TestSpoofedSourceDropped(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	ret, _ := run(t, d.FromPod(), testPkt{src: netip.MustParseAddr("10.1.0.99"), dst: podB, proto: ProtoTCP, sport: 1, dport: 2}.bytes())
	if ret != tcActShot || metric(t, d, ReasonDropSpoofed) != 1 {
		t.Fatalf("spoofed source: ret %d, drops %d", ret, metric(t, d, ReasonDropSpoofed))
	}
}

func TestMalformedPacketsDropped(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	full := testPkt{src: podA, dst: podB, proto: ProtoTCP, sport: 1, dport: 2}.bytes()
	// The kernel's test runner itself refuses packets shorter than an IP
	// header, so: a truncated TCP header, and an IPv4 header length below 5.
	if ret, _ := run(t, d.FromPod(), full[:14+20+8]); ret != tcActShot {
		t.Fatalf("truncated TCP header: ret %d, want drop", ret)
	}
	badIHL := append([]byte(nil), full...)
	badIHL[14] = 0x44
	if ret, _ := run(t, d.FromPod(), badIHL); ret != tcActShot {
		t.Fatalf("IPv4 IHL 4: ret %d, want drop", ret)
	}
	if got := metric(t, d, ReasonDropInvalid); got != 2 {
		t.Fatalf("drop_invalid = %d, want 2", got)
	}
	// ARP is not ours: it goes to the stack.
	arp := make([]byte, 42)
	arp[12], arp[13] = 0x08, 0x06
	if ret, _ := run(t, d.FromPod(), arp); ret != tcActOK {
		t.Fatalf("ARP: ret %d, want pass", ret)
	}
}

func TestEgressPolicy(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{false, true}, [2]bool{})
	if err := d.PolicySync([]PolicyKey{{EndpointID: 1, PeerIdentity: idRemote, Port: 8080, Proto: ProtoTCP, Direction: Egress}}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		dst   netip.Addr
		proto Proto
		port  uint16
		want  uint32
	}{
		{remote, ProtoTCP, 8080, tcActOK},
		{rem6, ProtoTCP, 8080, tcActOK},
		{remote, ProtoTCP, 8081, tcActShot},
		{remote, ProtoUDP, 8080, tcActShot},
		{podB, ProtoTCP, 8080, tcActShot}, // B's identity is not allowed
		{podB6, ProtoTCP, 8080, tcActShot},
	}
	src := map[bool]netip.Addr{true: podA, false: podA6}
	for i, c := range cases {
		ret, _ := run(t, d.FromPod(), testPkt{src: src[c.dst.Is4()], dst: c.dst, proto: c.proto, sport: uint16(30000 + i), dport: c.port}.bytes())
		if ret != c.want {
			t.Errorf("case %d: A -> %s %s/%d: ret %d, want %d", i, c.dst, c.proto, c.port, ret, c.want)
		}
	}
	if got := metric(t, d, ReasonDropPolicyEgr); got != 4 {
		t.Fatalf("drop_policy_egress = %d, want 4", got)
	}
	// Wildcard identity, any port of UDP.
	if err := d.PolicySync([]PolicyKey{{EndpointID: 1, Proto: ProtoUDP, Direction: Egress}}); err != nil {
		t.Fatal(err)
	}
	if ret, _ := run(t, d.FromPod(), testPkt{src: podA, dst: podB, proto: ProtoUDP, sport: 5353, dport: 53}.bytes()); ret != tcActRedirect {
		t.Fatalf("wildcard udp rule: ret %d", ret)
	}
	if ret, _ := run(t, d.FromPod(), testPkt{src: podA, dst: podB, proto: ProtoTCP, sport: 5353, dport: 53}.bytes()); ret != tcActShot {
		t.Fatalf("wildcard udp rule let tcp through: ret %d", ret)
	}
}

func TestIngressPolicyAndReplies(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{true, false}, [2]bool{true, false})
	// B admits A on tcp/8080 only; A admits nobody.
	if err := d.PolicySync([]PolicyKey{{EndpointID: 2, PeerIdentity: idA, Port: 8080, Proto: ProtoTCP, Direction: Ingress}}); err != nil {
		t.Fatal(err)
	}
	for _, fam := range []struct{ a, b netip.Addr }{{podA, podB}, {podA6, podB6}} {
		// Local A -> B: judged inline by from_pod, B's ingress policy.
		if ret, _ := run(t, d.FromPod(), testPkt{src: fam.a, dst: fam.b, proto: ProtoTCP, sport: 41000, dport: 8080}.bytes()); ret != tcActRedirect {
			t.Fatalf("A -> B:8080 allowed by B's ingress: ret %d", ret)
		}
		if ret, _ := run(t, d.FromPod(), testPkt{src: fam.a, dst: fam.b, proto: ProtoTCP, sport: 41001, dport: 9090}.bytes()); ret != tcActShot {
			t.Fatalf("A -> B:9090 must be denied: ret %d", ret)
		}
		// The reply B -> A passes A's ingress policy through conntrack,
		// although A admits nobody.
		if ret, _ := run(t, d.FromPod(), testPkt{src: fam.b, dst: fam.a, proto: ProtoTCP, sport: 8080, dport: 41000, tcpFlags: 0x12}.bytes()); ret != tcActRedirect {
			t.Fatalf("reply B -> A: ret %d", ret)
		}
		// B opening a connection to A is new and denied by A's policy.
		if ret, _ := run(t, d.FromPod(), testPkt{src: fam.b, dst: fam.a, proto: ProtoTCP, sport: 8080, dport: 41999}.bytes()); ret != tcActShot {
			t.Fatalf("new flow B -> A: ret %d, want drop", ret)
		}
	}
	// From the stack (another node): remote -> B is judged by to_pod.
	if ret, _ := run(t, d.ToPod(), testPkt{src: remote, dst: podB, proto: ProtoTCP, sport: 5000, dport: 8080}.bytes()); ret != tcActShot {
		t.Fatalf("remote -> B: ret %d, want drop (identity not allowed)", ret)
	}
	// A talks to a remote peer; the reply through to_pod is admitted.
	if ret, _ := run(t, d.FromPod(), testPkt{src: podA, dst: remote, proto: ProtoUDP, sport: 7000, dport: 53}.bytes()); ret != tcActOK {
		t.Fatalf("A -> remote: ret %d", ret)
	}
	if ret, _ := run(t, d.ToPod(), testPkt{src: remote, dst: podA, proto: ProtoUDP, sport: 53, dport: 7000}.bytes()); ret != tcActOK {
		t.Fatalf("reply remote -> A: ret %d", ret)
	}
	if ret, _ := run(t, d.ToPod(), testPkt{src: remote, dst: podA, proto: ProtoUDP, sport: 53, dport: 7001}.bytes()); ret != tcActShot {
		t.Fatalf("unsolicited remote -> A: ret %d, want drop", ret)
	}
	if got := metric(t, d, ReasonDropPolicyIngr); got != 6 {
		t.Fatalf("drop_policy_ingress = %d, want 6", got)
	}
}

func TestICMPEcho(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{true, false}, [2]bool{})
	for _, c := range []struct {
		a, r  netip.Addr
		proto Proto
	}{{podA, remote, ProtoICMP}, {podA6, rem6, ProtoICMPv6}} {
		if ret, _ := run(t, d.FromPod(), testPkt{src: c.a, dst: c.r, proto: c.proto, sport: 77}.bytes()); ret != tcActOK {
			t.Fatalf("%s echo request: ret %d", c.proto, ret)
		}
		if ret, _ := run(t, d.ToPod(), testPkt{src: c.r, dst: c.a, proto: c.proto, dport: 77, icmpReply: true}.bytes()); ret != tcActOK {
			t.Fatalf("%s echo reply: ret %d", c.proto, ret)
		}
		// An echo request towards A is a new inbound flow: A admits nobody.
		if ret, _ := run(t, d.ToPod(), testPkt{src: c.r, dst: c.a, proto: c.proto, sport: 78}.bytes()); ret != tcActShot {
			t.Fatalf("%s echo request to A: ret %d, want drop", c.proto, ret)
		}
	}
}

func TestServiceTranslation(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, c := range []struct {
		client, vip, backend netip.Addr
	}{{podA, vip, remote}, {podA6, vip6, rem6}} {
		f := Frontend{VIP: c.vip, Port: 80, Proto: ProtoTCP}
		if err := d.ServiceUpsert(f, []Backend{{Addr: c.backend, Port: 8080}}); err != nil {
			t.Fatal(err)
		}
		ret, out := run(t, d.FromPod(), testPkt{src: c.client, dst: c.vip, proto: ProtoTCP, sport: 50000, dport: 80, payload: []byte("hello")}.bytes())
		if ret != tcActOK {
			t.Fatalf("client -> VIP (remote backend): ret %d", ret)
		}
		p := parsePkt(t, out, ProtoTCP)
		if p.dst != c.backend || p.dport != 8080 || p.src != c.client || p.sport != 50000 {
			t.Fatalf("DNAT: got %s:%d -> %s:%d", p.src, p.sport, p.dst, p.dport)
		}
		// Reply from the backend arrives through the stack: reverse NAT.
		ret, out = run(t, d.ToPod(), testPkt{src: c.backend, dst: c.client, proto: ProtoTCP, sport: 8080, dport: 50000, tcpFlags: 0x12, payload: []byte("world")}.bytes())
		if ret != tcActOK {
			t.Fatalf("reply: ret %d", ret)
		}
		p = parsePkt(t, out, ProtoTCP)
		if p.src != c.vip || p.sport != 80 {
			t.Fatalf("reverse NAT: reply source %s:%d, want %s:80", p.src, p.sport, c.vip)
		}
		// UDP has no frontend: it is not translated.
		ret, out = run(t, d.FromPod(), testPkt{src: c.client, dst: c.vip, proto: ProtoUDP, sport: 50000, dport: 80}.bytes())
		if p := parsePkt(t, out, ProtoUDP); ret != tcActOK || p.dst != c.vip {
			t.Fatalf("udp to tcp-only VIP was translated: %s", p.dst)
		}
	}
	if got := metric(t, d, ReasonServiceNAT); got != 2 {
		t.Fatalf("service_nat = %d, want 2", got)
	}
}

func TestServiceLocalBackendAndReverseNAT(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{true, false})
	f := Frontend{VIP: vip, Port: 80, Proto: ProtoUDP}
	if err := d.ServiceUpsert(f, []Backend{{Addr: podB, Port: 5353}}); err != nil {
		t.Fatal(err)
	}
	// B's ingress policy judges the backend port, not the VIP port.
	if err := d.PolicySync([]PolicyKey{{EndpointID: 2, PeerIdentity: idA, Port: 5353, Proto: ProtoUDP, Direction: Ingress}}); err != nil {
		t.Fatal(err)
	}
	ret, out := run(t, d.FromPod(), testPkt{src: podA, dst: vip, proto: ProtoUDP, sport: 6000, dport: 80}.bytes())
	if ret != tcActRedirect {
		t.Fatalf("A -> VIP (local backend B): ret %d", ret)
	}
	if p := parsePkt(t, out, ProtoUDP); p.dst != podB || p.dport != 5353 {
		t.Fatalf("DNAT to local backend: %s:%d", p.dst, p.dport)
	}
	ret, out = run(t, d.FromPod(), testPkt{src: podB, dst: podA, proto: ProtoUDP, sport: 5353, dport: 6000}.bytes())
	if ret != tcActRedirect {
		t.Fatalf("reply B -> A: ret %d", ret)
	}
	if p := parsePkt(t, out, ProtoUDP); p.src != vip || p.sport != 80 {
		t.Fatalf("reverse NAT on local reply: %s:%d", p.src, p.sport)
	}
}

func TestServiceNoBackendAndStickiness(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	f := Frontend{VIP: vip, Port: 443, Proto: ProtoTCP}
	if err := d.ServiceUpsert(f, nil); err != nil {
		t.Fatal(err)
	}
	if ret, _ := run(t, d.FromPod(), testPkt{src: podA, dst: vip, proto: ProtoTCP, sport: 1234, dport: 443}.bytes()); ret != tcActShot {
		t.Fatalf("no backends: ret %d, want drop", ret)
	}
	if metric(t, d, ReasonDropNoBackend) != 1 {
		t.Fatal("drop_no_backend not counted")
	}
	backends := []Backend{
		{Addr: netip.MustParseAddr("10.2.0.1"), Port: 443},
		{Addr: netip.MustParseAddr("10.2.0.2"), Port: 443},
		{Addr: netip.MustParseAddr("10.2.0.3"), Port: 443},
	}
	if err := d.ServiceUpsert(f, backends); err != nil {
		t.Fatal(err)
	}
	hits := map[netip.Addr]int{}
	for i := 0; i < 300; i++ {
		sport := uint16(20000 + i)
		_, out := run(t, d.FromPod(), testPkt{src: podA, dst: vip, proto: ProtoTCP, sport: sport, dport: 443}.bytes())
		first := parsePkt(t, out, ProtoTCP).dst
		hits[first]++
		// Later packets of the same flow stick to the first choice.
		for j := 0; j < 3; j++ {
			_, out = run(t, d.FromPod(), testPkt{src: podA, dst: vip, proto: ProtoTCP, sport: sport, dport: 443, tcpFlags: 0x10}.bytes())
			if got := parsePkt(t, out, ProtoTCP).dst; got != first {
				t.Fatalf("flow %d moved from %s to %s", i, first, got)
			}
		}
	}
	for _, b := range backends {
		if hits[b.Addr] < 45 {
			t.Fatalf("backend %s got %d of 300 flows: %v", b.Addr, hits[b.Addr], hits)
		}
	}
	// Shrinking the set keeps the map consistent.
	if err := d.ServiceUpsert(f, backends[:1]); err != nil {
		t.Fatal(err)
	}
	got, err := d.ServiceList()
	if err != nil {
		t.Fatal(err)
	}
	if len(got[f]) != 1 || got[f][0] != backends[0] {
		t.Fatalf("after shrink: %v", got[f])
	}
}

func TestMapsRoundTripAndReuseAfterReopen(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{true, true}, [2]bool{})
	f := Frontend{VIP: vip6, Port: 53, Proto: ProtoUDP}
	if err := d.ServiceUpsert(f, []Backend{{Addr: podB6, Port: 5353, ClusterID: 1}}); err != nil {
		t.Fatal(err)
	}
	want := []PolicyKey{{EndpointID: 1, PeerIdentity: 0, Port: 0, Proto: ProtoAny, Direction: Ingress}}
	if err := d.PolicySync(want); err != nil {
		t.Fatal(err)
	}
	if err := d.IPCacheUpsert(netip.MustParsePrefix("10.3.0.0/16"), IPCacheEntry{Identity: 77}); err != nil {
		t.Fatal(err)
	}
	// A second Open of the same pin directory (a restarted agent) sees it all.
	d2, err := Open(d.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	eps, _ := d2.EndpointList()
	if e := eps[podA]; e.ID != 1 || !e.PolicyIngress || !e.PolicyEgress || e.PodMAC.String() != macA.String() {
		t.Fatalf("endpoint after reopen: %+v", e)
	}
	svcs, _ := d2.ServiceList()
	if len(svcs[f]) != 1 || svcs[f][0].Addr != podB6 || svcs[f][0].ClusterID != 1 {
		t.Fatalf("service after reopen: %+v", svcs)
	}
	pol, _ := d2.PolicyList()
	if len(pol) != 1 || pol[0] != want[0] {
		t.Fatalf("policy after reopen: %+v", pol)
	}
	ipc, _ := d2.IPCacheList()
	if ipc[netip.MustParsePrefix("10.3.0.0/16")].Identity != 77 || ipc[netip.MustParsePrefix("10.2.0.20/32")].HostIP != netip.MustParseAddr("192.168.1.2") {
		t.Fatalf("ipcache after reopen: %+v", ipc)
	}
	if e, ok := d2.IPCacheLookup(netip.MustParseAddr("10.3.4.5")); !ok || e.Identity != 77 {
		t.Fatalf("LPM lookup: %+v %v", e, ok)
	}
	// A new frontend on the reopened datapath gets a fresh ID, not a reused one.
	f2 := Frontend{VIP: vip, Port: 53, Proto: ProtoUDP}
	if err := d2.ServiceUpsert(f2, []Backend{{Addr: podB, Port: 53}}); err != nil {
		t.Fatal(err)
	}
	svcs, _ = d2.ServiceList()
	if svcs[f][0].Addr != podB6 || svcs[f2][0].Addr != podB {
		t.Fatalf("service IDs collided after reopen: %+v", svcs)
	}
}

func TestValidation(t *testing.T) {
	d := openTest(t)
	if err := d.ServiceUpsert(Frontend{VIP: vip, Port: 80, Proto: ProtoTCP}, []Backend{{Addr: podB6, Port: 80}}); err == nil {
		t.Fatal("mixed-family backend accepted")
	}
	if err := d.ServiceUpsert(Frontend{VIP: vip, Port: 80, Proto: ProtoICMP}, nil); err == nil {
		t.Fatal("icmp frontend accepted")
	}
	if err := d.EndpointUpsert(podA, EndpointInfo{ID: 0}); err == nil {
		t.Fatal("endpoint ID 0 accepted")
	}
	if err := d.PolicySync([]PolicyKey{{EndpointID: 1, Port: 80, Direction: Ingress}}); err == nil {
		t.Fatal("port without protocol accepted")
	}
}

func TestConntrackGC(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	run(t, d.FromPod(), testPkt{src: podA, dst: remote, proto: ProtoUDP, sport: 1, dport: 2}.bytes())
	n, err := d.ConntrackCount()
	if err != nil || n != 1 {
		t.Fatalf("conntrack count %d, %v", n, err)
	}
	// A fresh flow survives GC; one idle past its lifetime does not.
	if del, err := d.ConntrackGC(); err != nil || del != 0 {
		t.Fatalf("gc removed a live flow: %d %v", del, err)
	}
	var k datapathCtKey
	var v datapathCtVal
	it := d.objs.IsthCt.Iterate()
	for it.Next(&k, &v) {
		v.LastSeen -= uint64(2 * ctTimeoutOther)
		if err := d.objs.IsthCt.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	if del, err := d.ConntrackGC(); err != nil || del != 1 {
		t.Fatalf("gc of an idle flow: removed %d, %v", del, err)
	}
}

func TestLinkLocalAndMulticastStayOnTheLink(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{true, true}, [2]bool{})
	for _, p := range []testPkt{
		{src: netip.MustParseAddr("fe80::1"), dst: netip.MustParseAddr("ff02::16"), proto: 0},
		{src: netip.MustParseAddr("fe80::1"), dst: netip.MustParseAddr("fe80::2"), proto: ProtoUDP, sport: 546, dport: 547},
		{src: podA, dst: netip.MustParseAddr("224.0.0.251"), proto: ProtoUDP, sport: 5353, dport: 5353},
	} {
		if ret, _ := run(t, d.FromPod(), p.bytes()); ret != tcActOK {
			t.Fatalf("%s -> %s: ret %d, want pass to the stack", p.src, p.dst, ret)
		}
	}
	if n := metric(t, d, ReasonDropSpoofed); n != 0 {
		t.Fatalf("link-local traffic counted as spoofed: %d", n)
	}
}

// A pod reaching a service whose chosen backend is itself: the source is
// translated to the VIP as well, so the pod's kernel accepts the packet and
// its replies come back through from_pod to be translated back.
func TestServiceHairpin(t *testing.T) {
	d := openTest(t)
	setup(t, d, [2]bool{}, [2]bool{})
	for _, c := range []struct{ pod, vip netip.Addr }{{podA, vip}, {podA6, vip6}} {
		for _, proto := range []Proto{ProtoTCP, ProtoUDP} {
			f := Frontend{VIP: c.vip, Port: 80, Proto: proto}
			if err := d.ServiceUpsert(f, []Backend{{Addr: c.pod, Port: 8080}}); err != nil {
				t.Fatal(err)
			}
			for i, flags := range []uint8{0x02, 0x10} { // new flow, then established
				ret, out := run(t, d.FromPod(), testPkt{src: c.pod, dst: c.vip, proto: proto, sport: 40000, dport: 80, tcpFlags: flags}.bytes())
				if ret != tcActRedirect {
					t.Fatalf("%s %s packet %d: ret %d", c.vip, proto, i, ret)
				}
				if p := parsePkt(t, out, proto); p.src != c.vip || p.sport != 40000 || p.dst != c.pod || p.dport != 8080 {
					t.Fatalf("%s %s packet %d to itself: %s:%d -> %s:%d", c.vip, proto, i, p.src, p.sport, p.dst, p.dport)
				}
			}
			ret, out := run(t, d.FromPod(), testPkt{src: c.pod, dst: c.vip, proto: proto, sport: 8080, dport: 40000, tcpFlags: 0x12}.bytes())
			if ret != tcActRedirect {
				t.Fatalf("hairpin reply: ret %d", ret)
			}
			if p := parsePkt(t, out, proto); p.src != c.vip || p.sport != 80 || p.dst != c.pod || p.dport != 40000 {
				t.Fatalf("hairpin reply: %s:%d -> %s:%d, want %s:80 -> %s:40000", p.src, p.sport, p.dst, p.dport, c.vip, c.pod)
			}
			if err := d.ConntrackFlush(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestReadIPCacheFromPins(t *testing.T) {
	d := openTest(t)
	if err := d.IPCacheUpsert(netip.MustParsePrefix("10.9.0.1/32"), IPCacheEntry{Identity: 42, HostIP: netip.MustParseAddr("192.0.2.1")}); err != nil {
		t.Fatal(err)
	}
	got, err := ReadIPCache(d.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	if e := got[netip.MustParsePrefix("10.9.0.1/32")]; e.Identity != 42 || e.HostIP != netip.MustParseAddr("192.0.2.1") {
		t.Fatalf("ReadIPCache: %+v", got)
	}
}

// IPCacheUpsertBatch writes more than one batch of IPv4 and IPv6 entries
// as IPCacheUpsert would, on the kernel's batch call and on the fallback
// one by one, and an invalid prefix stops it there, after the ones before
// were written.
func TestIPCacheUpsertBatch(t *testing.T) {
	for _, oneByOne := range []bool{false, true} {
		d := openTest(t)
		d.noBatch.Store(oneByOne)
		var ps []netip.Prefix
		var es []IPCacheEntry
		for i := range IPCacheBatch + 10 {
			ps = append(ps, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 7, byte(i >> 8), byte(i)}), 32))
			es = append(es, IPCacheEntry{Identity: uint32(1<<20 + i), HostIP: netip.MustParseAddr("192.0.2.7")})
		}
		ps = append(ps, netip.MustParsePrefix("fd00:7::/64"), netip.MustParsePrefix("10.8.0.0/16"))
		es = append(es, IPCacheEntry{Identity: 77, HostIP: netip.MustParseAddr("fd00::7")}, IPCacheEntry{Identity: 78})
		if n, err := d.IPCacheUpsertBatch(ps, es); err != nil || n != len(ps) {
			t.Fatalf("one by one %v: %d of %d written: %v", oneByOne, n, len(ps), err)
		}
		got, err := d.IPCacheList()
		if err != nil {
			t.Fatal(err)
		}
		for i, p := range ps {
			if got[p] != es[i] {
				t.Errorf("one by one %v: %s: %+v, want %+v", oneByOne, p, got[p], es[i])
			}
		}
		bad := []netip.Prefix{netip.MustParsePrefix("10.9.0.1/32"), netip.MustParsePrefix("::ffff:10.9.0.2/128"), netip.MustParsePrefix("10.9.0.3/32")}
		n, err := d.IPCacheUpsertBatch(bad, make([]IPCacheEntry, 3))
		if err == nil || n != 1 || !strings.Contains(err.Error(), "::ffff:10.9.0.2/128") {
			t.Errorf("one by one %v: an invalid prefix second: %d written, %v", oneByOne, n, err)
		}
		if _, ok := d.IPCacheLookup(netip.MustParseAddr("10.9.0.1")); !ok {
			t.Errorf("one by one %v: the entry before the invalid one is missing", oneByOne)
		}
	}
}
