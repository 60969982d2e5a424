package connectivity

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

func TestEchoReplyRoundTrip(t *testing.T) {
	rec := httptest.NewRecorder()
	EchoHandler("c1-n1-echo1", "c1-n1", "c1").ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	body, _ := io.ReadAll(rec.Body)
	r, err := ParseReply(string(body))
	if err != nil {
		t.Fatal(err)
	}
	if r != (Reply{Pod: "c1-n1-echo1", Node: "c1-n1", Cluster: "c1", Peer: netip.MustParseAddr("192.0.2.1")}) {
		t.Fatalf("got %+v from %q", r, body)
	}
	for _, bad := range []string{"", "hello", "node=n1 cluster=c1", "pod=p1"} {
		if _, err := ParseReply(bad); err == nil {
			t.Errorf("ParseReply(%q) accepted", bad)
		}
	}
}

// The echo server and client over real sockets in this namespace: an
// answer names the server; a stopped server is refused; a request to an
// address that drops it times out; the probe records all of it.
func TestEchoServerAndProbe(t *testing.T) {
	ln, err := ListenIn("", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeEcho(ctx, ln, "p1", "n1", "c1") }()

	pr := newProbe("client", addr)
	for range 2 {
		reply, err := FetchEcho(context.Background(), "", addr, 2*time.Second)
		pr.record(reply, err)
		if err != nil || reply != (Reply{Pod: "p1", Node: "n1", Cluster: "c1", Peer: netip.MustParseAddr("127.0.0.1")}) {
			t.Fatalf("FetchEcho = %+v, %v", reply, err)
		}
	}
	stop()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeEcho after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeEcho did not return after cancel")
	}

	// Nothing listens any more: refused.
	reply, err := FetchEcho(context.Background(), "", addr, 2*time.Second)
	pr.record(reply, err)
	if err == nil || Outcome(err) != "refused" {
		t.Fatalf("after stop: %v (%s)", err, Outcome(err))
	}

	// A listener that accepts and never answers: connected, the answer
	// times out.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	_, err = FetchEcho(context.Background(), "", netip.MustParseAddrPort(silent.Addr().String()), 300*time.Millisecond)
	if err == nil || Outcome(err) != "answer timed out" {
		t.Fatalf("silent server: %v (%s)", err, Outcome(err))
	}
	pr.record(Reply{}, err)

	if pr.Sent != 4 || pr.Answers["pod=p1 node=n1 cluster=c1"] != 2 || pr.Failures["refused"] != 1 || pr.Failures["answer timed out"] != 1 {
		t.Fatalf("probe %+v", pr)
	}
	s := pr.String()
	for _, want := range []string{"client -> " + addr.String() + ": 4 sent", "answered by pod=p1 node=n1 cluster=c1 (2)", "1 refused", "1 answer timed out", "last error:"} {
		if !strings.Contains(s, want) {
			t.Errorf("probe line lacks %q: %s", want, s)
		}
	}
	if Outcome(errors.New("something else")) != "error" {
		t.Error("Outcome of an unknown error")
	}
}

// packet builds a minimal IPv4 or IPv6 header plus 4 bytes of ports.
func packet(src, dst netip.Addr, proto byte, sport, dport uint16) []byte {
	ports := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, sport), dport)
	if src.Is4() {
		h := make([]byte, 20)
		h[0], h[9] = 0x45, proto
		copy(h[12:16], src.AsSlice())
		copy(h[16:20], dst.AsSlice())
		return append(h, ports...)
	}
	h := make([]byte, 40)
	h[0], h[6] = 0x60, proto
	copy(h[8:24], src.AsSlice())
	copy(h[24:40], dst.AsSlice())
	return append(h, ports...)
}

func TestCaptureClassifies(t *testing.T) {
	pod4, pod6 := netip.MustParseAddr("10.1.1.2"), netip.MustParseAddr("fd00:1:0:1::2")
	node4a, node4b := netip.MustParseAddr("10.101.0.11"), netip.MustParseAddr("10.102.0.11")
	node6a, node6b := netip.MustParseAddr("fd10:1::b"), netip.MustParseAddr("fd10:2::b")
	c := &capture{ifName: "eth0", pods: map[netip.Addr]bool{pod4: true, pod6: true}, ports: map[uint16]bool{51871: true}}
	const tcp, udp = 6, 17
	for _, p := range [][]byte{
		packet(node4a, node4b, udp, 51871, 51871), // WireGuard
		packet(node6b, node6a, udp, 40000, 51871), // WireGuard
		packet(node4a, node4b, tcp, 40000, 2379),  // etcd: neither
		packet(pod4, node4b, tcp, 40000, 8080),    // a pod in the clear
		packet(node6a, pod6, udp, 53, 51871),      // both: counted as each
		packet(node4a, node4b, tcp, 51871, 51871), // TCP on the port: not WireGuard
		{0x00, 0x01}, // not IP
		{0x45, 0x00}, // truncated IPv4
	} {
		c.inspect(p)
	}
	res := c.result()
	if res.Total != 6 || res.WireGuard != 3 || res.Plaintext != 2 || res.Interface != "eth0" || res.Watched != 2 || len(res.Ports) != 1 || res.Ports[0] != 51871 {
		t.Fatalf("result %+v; want total 6, wireguard 3, plaintext 2", res)
	}
	if !strings.HasPrefix(res.FirstLeak, "10.1.1.2 -> 10.102.0.11 proto 6") {
		t.Errorf("first leak %q", res.FirstLeak)
	}
	res.Node = "c1-n1"
	if s := res.String(); !strings.Contains(s, "captured on c1-n1/eth0: 6 packets, 3 WireGuard (udp/51871), 2 with one of 2 pod addresses or VIPs in the clear (first: 10.1.1.2 -> 10.102.0.11 proto 6)") {
		t.Errorf("capture line: %s", s)
	}
}

// A real AF_PACKET capture on the loopback interface (needs root): UDP to
// a "WireGuard" port counts as WireGuard, a packet to a watched address as
// a leak.
func TestCaptureOnLoopback(t *testing.T) {
	testenv.Root(t, "AF_PACKET capture")
	wg, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer wg.Close()
	port := uint16(wg.LocalAddr().(*net.UDPAddr).Port)
	watched := netip.MustParseAddr("127.0.0.77")
	c, err := startCapture("", []netip.Addr{netip.MustParseAddr("127.0.0.1")}, map[netip.Addr]bool{watched: true}, map[uint16]bool{port: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, to := range []string{wg.LocalAddr().String(), "127.0.0.77:9"} {
		conn, err := net.Dial("udp4", to)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		conn.Close()
	}
	res, err := c.stopCapture()
	if err != nil {
		t.Fatal(err)
	}
	if res.Interface != "lo" || res.WireGuard < 1 || res.Plaintext < 1 || res.Total < 2 {
		t.Fatalf("capture on lo: %+v", res)
	}
}

func sampleReport() Report {
	return Report{Target: "lab ilabtest", Passed: 3, Skipped: 1, Results: []Result{
		{Check: "pod to pod, same node", From: "a", To: "b", Result: Pass, Detail: "b answered over IPv4",
			Evidence: Evidence{Probes: []Probe{{From: "a", To: netip.MustParseAddrPort("10.1.1.3:8080"), Sent: 1, Answers: map[string]int{"pod=b node=n1 cluster=c1": 1}}}}},
		{Check: "encryption (WireGuard)", From: "a", To: "c", Result: Pass, Detail: "on n1/eth0 ...",
			Evidence: Evidence{
				Probes:  []Probe{{From: "a", To: netip.MustParseAddrPort("10.2.1.2:8080"), Sent: 5, Answers: map[string]int{"pod=c node=n2 cluster=c2": 5}}},
				Capture: &CaptureResult{Node: "n1", Interface: "eth0", Ports: []uint16{51871}, Watched: 8, Total: 40, WireGuard: 40}}},
		{Check: "policy denies", Result: Skip, Detail: "no denied pod"},
		{Check: "policy denies", From: "d1", To: "b", Result: Pass, Detail: "all 1 connection attempts timed out after 2s (IPv4) ...",
			Evidence: Evidence{Probes: []Probe{
				{From: "a", To: netip.MustParseAddrPort("10.1.1.3:8080"), Sent: 1, Answers: map[string]int{"pod=b node=n1 cluster=c1": 1}, Purpose: PurposeAdmitted},
				{From: "a", To: netip.MustParseAddrPort("10.1.1.9:8080"), Sent: 1, Answers: map[string]int{"pod=d1 node=n1 cluster=c1": 1}, Purpose: PurposeOwnNetwork},
				{From: "d1", To: netip.MustParseAddrPort("10.1.1.3:8080"), Sent: 1, Failures: map[string]int{OutcomeTimedOut: 1}, LastError: "dial tcp 10.1.1.3:8080: i/o timeout", Purpose: PurposeDeny},
			}}},
	}}
}

func TestReportTable(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteTable(&b, false); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"CHECK", "pod to pod, same node", "SKIP", "lab ilabtest: 3 passed, 0 failed, 1 skipped"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "Evidence") {
		t.Errorf("evidence without verbose:\n%s", out)
	}

	b.Reset()
	if err := sampleReport().WriteTable(&b, true); err != nil {
		t.Fatal(err)
	}
	out = b.String()
	for _, want := range []string{
		"Evidence:",
		"[1] pod to pod, same node a -> b: PASS",
		"sent a -> 10.1.1.3:8080: 1 sent; answered by pod=b node=n1 cluster=c1 (1)",
		"[2] encryption (WireGuard) a -> c: PASS",
		"captured on n1/eth0: 40 packets, 40 WireGuard (udp/51871), 0 with one of 8 pod addresses or VIPs in the clear",
		"[3] policy denies -: SKIP",
		"nothing sent: no denied pod",
		"[4] policy denies d1 -> b: PASS",
		"precondition (the target answers an admitted pod): sent a -> 10.1.1.3:8080: 1 sent; answered by pod=b node=n1 cluster=c1 (1)",
		"precondition (the denied pod's own network): sent a -> 10.1.1.9:8080: 1 sent; answered by pod=d1 node=n1 cluster=c1 (1)",
		"must time out (denied): sent d1 -> 10.1.1.3:8080: 1 sent; no answer; 1 timed out (last error: dial tcp 10.1.1.3:8080: i/o timeout)",
		"lab ilabtest: 3 passed, 0 failed, 1 skipped",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("verbose report lacks %q:\n%s", want, out)
		}
	}
}

// -o json carries the evidence of every verdict.
func TestReportJSONHasEvidence(t *testing.T) {
	b, err := json.Marshal(sampleReport())
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	e := back.Results[1].Evidence
	if len(e.Probes) != 1 || e.Probes[0].Sent != 5 || e.Probes[0].To.Port() != 8080 || e.Capture == nil || e.Capture.WireGuard != 40 {
		t.Fatalf("evidence after a JSON round trip: %+v\n%s", e, b)
	}
	for _, want := range []string{`"evidence":{"probes":[{"from":"a","to":"10.1.1.3:8080","sent":1,"answers":{"pod=b node=n1 cluster=c1":1}}]}`, `"capture":{"node":"n1","interface":"eth0"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON lacks %s:\n%s", want, b)
		}
	}
}

func TestTargetCleanupNewestFirst(t *testing.T) {
	var order []int
	tg := &Target{}
	for i := range 3 {
		tg.cleanup = append(tg.cleanup, func(context.Context) error {
			order = append(order, i)
			if i == 1 {
				return errors.New("step 1 failed")
			}
			return nil
		})
	}
	err := tg.Cleanup(context.Background())
	if err == nil || !strings.Contains(err.Error(), "step 1 failed") || len(order) != 3 || order[0] != 2 || order[2] != 0 {
		t.Fatalf("cleanup: %v, order %v", err, order)
	}
	if err := tg.Cleanup(context.Background()); err != nil || len(order) != 3 {
		t.Fatalf("second cleanup ran steps again: %v %v", err, order)
	}
}
