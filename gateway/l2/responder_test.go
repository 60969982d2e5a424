package l2_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/gateway/l2"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// segment is a node and a client on one link: the node runs the
// responders in this process, the client runs arping, ndisc6, tcpdump.
type segment struct {
	lab          *lab.Lab
	node, client *lab.Node
	link         *lab.Link
}

var (
	led4    = netip.MustParseAddr("10.77.0.100")
	led6    = netip.MustParseAddr("fd77::100")
	other4  = netip.MustParseAddr("10.77.0.101")
	other6  = netip.MustParseAddr("fd77::101")
	testLog = slog.Default()
)

func newSegment(t *testing.T) *segment {
	labtest.SkipUnlessRoot(t)
	for _, tool := range []string{"arping", "ndisc6", "tcpdump"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (make deps): %v", tool, err)
		}
	}
	l := labtest.New(t)
	node, err := l.AddNode("l2n")
	if err != nil {
		t.Fatal(err)
	}
	client, err := l.AddNode("l2c")
	if err != nil {
		t.Fatal(err)
	}
	lk, err := l.LinkWith(lab.LinkOptions{A: node, B: client, AName: "eth0", BName: "eth0",
		AAddrs: []netip.Prefix{netip.MustParsePrefix("10.77.0.1/24"), netip.MustParsePrefix("fd77::1/64")},
		BAddrs: []netip.Prefix{netip.MustParsePrefix("10.77.0.2/24"), netip.MustParsePrefix("fd77::2/64")}})
	if err != nil {
		t.Fatal(err)
	}
	// The link is usable once the client reaches the node's addresses.
	waitFor(t, 10*time.Second, func() bool {
		_, err4 := client.Exec(context.Background(), "ping", "-c", "1", "-W", "1", "10.77.0.1")
		_, err6 := client.Exec(context.Background(), "ping", "-c", "1", "-W", "1", "fd77::1")
		// ndisc6 and the NDP group socket need a link-local address
		// that is no longer tentative.
		t1, _ := client.Exec(context.Background(), "ip", "-6", "addr", "show", "dev", "eth0", "tentative")
		t2, _ := node.Exec(context.Background(), "ip", "-6", "addr", "show", "dev", "eth0", "tentative")
		return err4 == nil && err6 == nil && len(t1) == 0 && len(t2) == 0
	}, "the segment to work")
	return &segment{lab: l, node: node, client: client, link: lk}
}

// announcer starts an announcer in the node's namespace answering want.
func (s *segment) announcer(t *testing.T, o l2.Options, want map[string][]netip.Addr) (*l2.Announcer, map[string]error) {
	a := l2.NewAnnouncer(o, testLog)
	var errs map[string]error
	if err := s.node.Do(func() error { errs = a.Sync(want); return nil }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a, errs
}

// arping resolves ip from the client; it returns the MAC that answered
// ("" when nothing did).
func (s *segment) arping(t *testing.T, dev string, ip netip.Addr) string {
	out, err := s.client.Exec(context.Background(), "arping", "-c", "2", "-w", "2", "-I", dev, ip.String())
	if err != nil {
		return ""
	}
	// "Unicast reply from 10.77.0.100 [AA:BB:...]  0.6ms"
	for _, line := range strings.Split(string(out), "\n") {
		if i := strings.Index(line, "["); i >= 0 && strings.Contains(line, "reply from "+ip.String()+" ") {
			return strings.ToLower(line[i+1 : i+18])
		}
	}
	return ""
}

// ndisc6 resolves ip from the client with a multicast solicitation.
func (s *segment) ndisc6(t *testing.T, dev string, ip netip.Addr) string {
	out, err := s.client.Exec(context.Background(), "ndisc6", "-q", "-1", "-r", "2", "-w", "500", ip.String(), dev)
	if err != nil {
		t.Logf("ndisc6: %v", err)
		return ""
	}
	return strings.ToLower(strings.TrimSpace(string(out)))
}

func TestResponderAnswersOnlyLedAddresses(t *testing.T) {
	s := newSegment(t)
	a, errs := s.announcer(t, l2.Options{}, map[string][]netip.Addr{"eth0": {led4, led6}})
	if len(errs) > 0 {
		t.Fatalf("sync: %v", errs)
	}
	mac := s.link.AMAC.String()
	if got := s.arping(t, "eth0", led4); got != mac {
		t.Errorf("arping %s: answered by %q, want %s", led4, got, mac)
	}
	if got := s.ndisc6(t, "eth0", led6); got != mac {
		t.Errorf("ndisc6 %s: answered by %q, want %s", led6, got, mac)
	}
	if got := s.arping(t, "eth0", other4); got != "" {
		t.Errorf("arping %s (not led): answered by %s", other4, got)
	}
	if got := s.ndisc6(t, "eth0", other6); got != "" {
		t.Errorf("ndisc6 %s (not led): answered by %s", other6, got)
	}
	st := a.Stats()
	if st.ARPReplies == 0 || st.NAReplies == 0 || st.Ignored == 0 {
		t.Errorf("counters %+v: want ARP and NA replies and ignored requests", st.Counters)
	}
	// Given up: silence.
	if err := s.node.Do(func() error { a.Sync(nil); return nil }); err != nil {
		t.Fatal(err)
	}
	if got := s.arping(t, "eth0", led4); got != "" {
		t.Errorf("arping %s after giving it up: answered by %s", led4, got)
	}
	if got := s.ndisc6(t, "eth0", led6); got != "" {
		t.Errorf("ndisc6 %s after giving it up: answered by %s", led6, got)
	}
}

// tcpdump captures ICMPv6 neighbour advertisements on the client while
// fn runs and returns tcpdump's verbose lines.
func (s *segment) captureNA(t *testing.T, fn func()) string {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := s.client.Command(ctx, "tcpdump", "-l", "-nn", "-vv", "-i", "eth0", "icmp6 and ip6[40] == 136")
	var out strings.Builder
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(out.String(), "listening on") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	fn()
	time.Sleep(300 * time.Millisecond)
	_ = cmd.Process.Signal(interruptSignal)
	_ = cmd.Wait()
	return out.String()
}

func TestNDPOverrideAndUnicastSolicitation(t *testing.T) {
	s := newSegment(t)
	mac := s.link.AMAC.String()
	var a *l2.Announcer
	// The takeover burst: unsolicited, Override set, to all nodes.
	got := s.captureNA(t, func() {
		a, _ = s.announcer(t, l2.Options{Burst: 2}, map[string][]netip.Addr{"eth0": {led6}})
	})
	if !strings.Contains(got, "> ff02::1: [icmp6 sum ok] ICMP6, neighbor advertisement") || !strings.Contains(got, "tgt is "+led6.String()+", Flags [override]") {
		t.Errorf("no unsolicited NA with only Override for %s in:\n%s", led6, got)
	}
	// A multicast solicitation: solicited and override.
	got = s.captureNA(t, func() {
		if m := s.ndisc6(t, "eth0", led6); m != mac {
			t.Errorf("ndisc6: %q", m)
		}
	})
	if !strings.Contains(got, "Flags [solicited, override]") {
		t.Errorf("no solicited NA with Override in:\n%s", got)
	}
	// A unicast solicitation: the client's kernel probes a stale entry
	// with a solicitation sent to the address itself and its cached MAC;
	// only an answer makes the entry REACHABLE again.
	ctx := context.Background()
	for _, args := range [][]string{
		{"sysctl", "-qw", "net.ipv6.neigh.eth0.delay_first_probe_time=1"},
		{"ip", "-6", "neigh", "replace", led6.String(), "lladdr", mac, "nud", "stale", "dev", "eth0"},
	} {
		if _, err := s.client.Exec(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	before := a.Stats().NAReplies
	got = s.captureNA(t, func() {
		_, _ = s.client.Exec(ctx, "ping", "-6", "-c", "1", "-W", "1", led6.String())
		waitFor(t, 4*time.Second, func() bool {
			out, _ := s.client.Exec(ctx, "ip", "-6", "neigh", "show", led6.String(), "dev", "eth0")
			return strings.Contains(string(out), "REACHABLE")
		}, "the client's entry for "+led6.String()+" to become REACHABLE through a unicast probe")
	})
	if !strings.Contains(got, "tgt is "+led6.String()+", Flags [solicited, override]") {
		t.Errorf("no NA sent back to the client's unicast solicitation:\n%s", got)
	}
	if a.Stats().NAReplies == before {
		t.Error("NA replies did not count the unicast solicitation")
	}
}

// secondLink adds eth<i> between node and client, the client's end with
// 10.78.<i>.2/24.
func (s *segment) secondLink(t *testing.T, i int) string {
	name := fmt.Sprintf("eth%d", i)
	addrs := []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.78.%d.2/24", i))}
	if _, err := s.lab.LinkWith(lab.LinkOptions{A: s.node, B: s.client, AName: name, BName: name, BAddrs: addrs}); err != nil {
		t.Fatal(err)
	}
	return name
}

func TestNOARPNeverAnswers(t *testing.T) {
	s := newSegment(t)
	ctx := context.Background()
	dev := s.secondLink(t, 2)
	for _, args := range [][]string{
		{"ip", "link", "set", dev, "arp", "off"},
		{"ip", "addr", "add", "10.78.2.1/24", "dev", dev},
	} {
		if _, err := s.node.Exec(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	addr := netip.MustParseAddr("10.78.2.100")
	_, errs := s.announcer(t, l2.Options{}, map[string][]netip.Addr{dev: {addr}, "eth0": {led4}})
	if err := errs[dev]; err == nil || !strings.Contains(err.Error(), "NOARP") {
		t.Errorf("%s (NOARP): %v", dev, err)
	}
	if got := s.arping(t, dev, addr); got != "" {
		t.Errorf("answered on a NOARP interface by %s", got)
	}
	// The good interface is not held back by the bad one.
	if got := s.arping(t, "eth0", led4); got != s.link.AMAC.String() {
		t.Errorf("eth0: answered by %q", got)
	}
}

func TestBondMemberNeverAnswers(t *testing.T) {
	s := newSegment(t)
	ctx := context.Background()
	if out, err := s.node.Exec(ctx, "ip", "link", "add", "bond0", "type", "bond"); err != nil {
		if strings.Contains(string(out), "Unknown device type") {
			t.Skip("this kernel has no bonding driver (CONFIG_BONDING)")
		}
		t.Fatal(err)
	}
	dev := s.secondLink(t, 1)
	for _, args := range [][]string{
		{"ip", "link", "set", dev, "down"},
		{"ip", "link", "set", dev, "master", "bond0"},
		{"ip", "link", "set", "bond0", "up"},
		{"ip", "addr", "add", "10.78.1.1/24", "dev", "bond0"},
	} {
		if _, err := s.node.Exec(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	addr := netip.MustParseAddr("10.78.1.100")
	_, errs := s.announcer(t, l2.Options{}, map[string][]netip.Addr{dev: {addr}})
	if err := errs[dev]; err == nil || !strings.Contains(err.Error(), "bond member") {
		t.Errorf("%s (bond member): %v", dev, err)
	}
	if got := s.arping(t, dev, addr); got != "" {
		t.Errorf("answered on a bond member by %s", got)
	}
}

func TestCarrierLossStopsAnswers(t *testing.T) {
	s := newSegment(t)
	a, _ := s.announcer(t, l2.Options{}, map[string][]netip.Addr{"eth0": {led4, led6}})
	ctx, cancel := context.WithCancel(context.Background())
	changed := make(chan struct{}, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.node.Do(func() error {
			a.Run(ctx, func() {
				select {
				case changed <- struct{}{}:
				default:
				}
			})
			return nil
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	if got := s.arping(t, "eth0", led4); got != s.link.AMAC.String() {
		t.Fatalf("before: answered by %q", got)
	}
	// The client's end goes down: the node's end loses carrier.
	if _, err := s.client.Exec(ctx, "ip", "link", "set", "eth0", "down"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Second, func() bool { return len(a.Answering()) == 0 }, "the responder to stop answering on carrier loss")
	select {
	case <-changed:
	case <-time.After(time.Second):
		t.Error("no link change reported")
	}
	// Carrier back: answering again (whether it should lead is agent/l2's call).
	if _, err := s.client.Exec(ctx, "ip", "link", "set", "eth0", "up"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, func() bool { return len(a.Answering()) == 1 }, "answering again with carrier")
	if got := s.arping(t, "eth0", led4); got != s.link.AMAC.String() {
		t.Errorf("after carrier came back: answered by %q", got)
	}
}

func waitFor(t *testing.T, d time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// After an interface comes up its link-local address is tentative for a
// while (or absent), so the NDP group socket cannot open when the
// responder does; a later Sync must open it (an agent whose interface
// flapped otherwise never answered NDP again).
func TestNDPOpensOnceLinkLocalIsUsable(t *testing.T) {
	s := newSegment(t)
	ctx := context.Background()
	if _, err := s.node.Exec(ctx, "ip", "-6", "addr", "flush", "dev", "eth0", "scope", "link"); err != nil {
		t.Fatal(err)
	}
	want := map[string][]netip.Addr{"eth0": {led4, led6}}
	a, errs := s.announcer(t, l2.Options{}, want)
	if errs["eth0"] == nil {
		t.Fatal("sync without a link-local address reported no NDP error")
	}
	if got := s.arping(t, "eth0", led4); got != s.link.AMAC.String() {
		t.Errorf("IPv4 while IPv6 cannot open: answered by %q", got)
	}
	if got := s.ndisc6(t, "eth0", led6); got != "" {
		t.Fatalf("ndisc6 answered by %s without a link-local address", got)
	}
	if _, err := s.node.Exec(ctx, "ip", "-6", "addr", "add", "fe80::77:1/64", "dev", "eth0", "nodad"); err != nil {
		t.Fatal(err)
	}
	// The agent's election syncs every 25ms.
	waitFor(t, 2*time.Second, func() bool {
		_ = s.node.Do(func() error { errs = a.Sync(want); return nil })
		return errs["eth0"] == nil
	}, "NDP to open once the link-local address is usable")
	if got := s.ndisc6(t, "eth0", led6); got != s.link.AMAC.String() {
		t.Errorf("ndisc6 %s after the link-local address came: answered by %q", led6, got)
	}
}
