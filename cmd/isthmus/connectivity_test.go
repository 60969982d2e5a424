package main

import (
	"bytes"
	"encoding/binary"
	"io"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
)

func TestEchoReplyRoundTrip(t *testing.T) {
	rec := httptest.NewRecorder()
	echoHandler("c1-n1-echo1", "c1-n1", "c1").ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	body, _ := io.ReadAll(rec.Body)
	r, err := parseEchoReply(string(body))
	if err != nil {
		t.Fatal(err)
	}
	if r != (echoReply{Pod: "c1-n1-echo1", Node: "c1-n1", Cluster: "c1"}) {
		t.Fatalf("got %+v from %q", r, body)
	}
	for _, bad := range []string{"", "hello", "node=n1 cluster=c1", "pod=p1"} {
		if _, err := parseEchoReply(bad); err == nil {
			t.Errorf("parseEchoReply(%q) accepted", bad)
		}
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
	c := &capture{pods: map[netip.Addr]bool{pod4: true, pod6: true}, ports: map[uint16]bool{51871: true}}
	const tcp, udp = 6, 17
	for _, p := range [][]byte{
		packet(node4a, node4b, udp, 51871, 51871), // WireGuard
		packet(node6b, node6a, udp, 40000, 51871), // WireGuard
		packet(node4a, node4b, tcp, 40000, 2379),  // etcd: neither
		packet(pod4, node4b, tcp, 40000, 8080),    // a pod in the clear
		packet(node6a, pod6, udp, 53, 51871),      // both: counted as each
		{0x00, 0x01},                              // not IP
	} {
		c.inspect(p)
	}
	if c.total != 5 || c.wireguard != 3 || c.plaintext != 2 {
		t.Fatalf("total %d, wireguard %d, plaintext %d; want 5, 3, 2", c.total, c.wireguard, c.plaintext)
	}
	if !strings.HasPrefix(c.firstLeak, "10.1.1.2 -> 10.102.0.11") {
		t.Errorf("first leak %q", c.firstLeak)
	}
}

func TestPrintReport(t *testing.T) {
	var b bytes.Buffer
	rep := connectivityReport{Target: "lab ilabtest", Passed: 1, Skipped: 1, Results: []checkResult{
		{Check: "pod to pod, same node", From: "a", To: "b", Result: resultPass, Detail: "b answered"},
		{Check: "encryption (WireGuard)", Result: resultSkip, Detail: "encryption is off"},
	}}
	if err := printReport(&b, rep); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"CHECK", "pod to pod, same node", "SKIP", "lab ilabtest: 1 passed, 0 failed, 1 skipped"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}
