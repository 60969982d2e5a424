package bgp

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// The speaker runs in the test process, in the host namespace; BIRD runs
// in a lab namespace behind a veth pair with random addresses (unique per
// run) on both families.

const (
	birdASN = 65000
	nodeASN = 65010
)

type rig struct {
	lab      *lab.Lab
	router   *lab.Node
	bird     *lab.BIRD
	local4   netip.Addr // the speaker's end
	local6   netip.Addr
	remote4  netip.Addr // BIRD's end
	remote6  netip.Addr
	exported netip.Prefix // what BIRD announces
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func newRig(t *testing.T, neighbors func(r *rig) []lab.BIRDNeighbor) *rig {
	t.Helper()
	labtest.SkipUnlessRoot(t)
	l := labtest.New(t)
	router, err := l.AddRouter("tor")
	if err != nil {
		t.Fatal(err)
	}
	b := randBytes(6)
	base := netip.AddrFrom4([4]byte{198, 18 + b[0]&1, b[1], b[2] &^ 3})
	r := &rig{lab: l, router: router, local4: base.Next(), remote4: base.Next().Next()}
	var v6 [16]byte
	v6[0], v6[1], v6[2], v6[3], v6[4], v6[5] = 0xfd, 0x7b, b[3], b[4], b[5], 0x42
	r.local6 = netip.AddrFrom16(v6).Next()
	r.remote6 = r.local6.Next()
	r.exported = netip.PrefixFrom(netip.AddrFrom4([4]byte{203, 0, 113, b[5]}), 32)
	lk, err := l.Link(nil, router, netip.PrefixFrom(r.local4, 30), netip.PrefixFrom(r.remote4, 30))
	if err != nil {
		t.Fatal(err)
	}
	if err := lk.AddAddrs(netip.PrefixFrom(r.local6, 64), netip.PrefixFrom(r.remote6, 64)); err != nil {
		t.Fatal(err)
	}
	r.bird, err = router.StartBIRD(t.Context(), lab.BIRDOptions{
		RouterID: r.remote4, ASN: birdASN, Neighbors: neighbors(r), Export: []netip.Prefix{r.exported},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := r.bird.Birdc(context.Background(), "show", "protocols", "all")
			t.Logf("bird protocols:\n%s\nbird log:\n%s", out, lab.Tail(r.bird.Log(), 6000))
		}
	})
	return r
}

func newSpeaker(t *testing.T) *Speaker {
	s := New(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	t.Cleanup(func() { _ = s.Withdraw(context.Background()) })
	return s
}

func peer(a netip.Addr, asn uint32) Peer {
	return Peer{Address: a, ASN: asn, HoldTime: 9 * time.Second, Keepalive: 3 * time.Second, ConnectRetry: time.Second,
		GracefulRestart: true, RestartTime: 30 * time.Second}
}

func (r *rig) config(paths ...Path) Config {
	return Config{ASN: nodeASN, RouterID: r.local4, Peers: []Peer{peer(r.remote4, birdASN), peer(r.remote6, birdASN)}, Paths: paths}
}

func (r *rig) birdNeighbors() []lab.BIRDNeighbor {
	return []lab.BIRDNeighbor{{Address: r.local4, ASN: nodeASN}, {Address: r.local6, ASN: nodeASN}}
}

func eventually(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	last := ""
	for {
		ok, info := cond()
		if ok {
			return
		}
		last = info
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v (last: %s)", what, d, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *rig) established(t *testing.T, s *Speaker, addrs ...netip.Addr) {
	t.Helper()
	for _, a := range addrs {
		eventually(t, 20*time.Second, "session with "+a.String()+" established", func() (bool, string) {
			for _, p := range s.Peers(t.Context()) {
				if p.Address == a {
					return p.State == StateEstablished, fmt.Sprintf("%+v", p)
				}
			}
			return false, "no such peer"
		})
	}
}

// kernelHas reports whether BIRD installed pfx into its namespace's
// table, with the gateways it has.
func (r *rig) kernelHas(t *testing.T, pfx netip.Prefix) (bool, []netip.Addr) {
	kr, ok, err := r.router.KernelRoute(pfx)
	if err != nil {
		t.Fatal(err)
	}
	return ok, kr.Gateways
}

func TestSessionsAnnounceWithdraw(t *testing.T) {
	r := newRig(t, (*rig).birdNeighbors)
	s := newSpeaker(t)
	lp := uint32(200)
	p4 := Path{Prefix: netip.MustParsePrefix("10.77.1.0/24"), Communities: []uint32{65010<<16 | 7}, Large: [][3]uint32{{65010, 1, 2}}, LocalPref: lp}
	p6 := Path{Prefix: netip.MustParsePrefix("fd00:77:0:1::/64")}
	if err := s.Reconcile(t.Context(), r.config(p4, p6)); err != nil {
		t.Fatal(err)
	}
	r.established(t, s, r.remote4, r.remote6)
	for _, p := range []struct {
		pfx netip.Prefix
		gw  netip.Addr
	}{{p4.Prefix, r.local4}, {p6.Prefix, r.local6}} {
		eventually(t, 5*time.Second, p.pfx.String()+" in the router's kernel table", func() (bool, string) {
			ok, gws := r.kernelHas(t, p.pfx)
			return ok && slices.Equal(gws, []netip.Addr{p.gw}), fmt.Sprint(gws)
		})
	}
	routes, err := r.bird.Birdc(t.Context(), "show", "route", "all", p4.Prefix.String())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(routes, "(65010,7)") || !strings.Contains(routes, "(65010, 1, 2)") {
		t.Errorf("BIRD's route lacks the communities:\n%s", routes)
	}
	st := s.Peers(t.Context())
	if len(st) != 2 || st[0].Advertised != 1 || st[1].Advertised != 1 {
		t.Errorf("peer status: want one path advertised on each session, got %+v", st)
	}

	// Withdraw the IPv4 path only: it leaves the kernel table, the IPv6 one stays.
	if err := s.Reconcile(t.Context(), r.config(p6)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "withdrawn path leaves the router's kernel table", func() (bool, string) {
		ok, _ := r.kernelHas(t, p4.Prefix)
		return !ok, "still there"
	})
	if ok, _ := r.kernelHas(t, p6.Prefix); !ok {
		t.Error("the IPv6 path went with the IPv4 one")
	}
	rs, err := s.Routes(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0].Prefix != p6.Prefix {
		t.Errorf("speaker routes: want only %s, got %+v", p6.Prefix, rs)
	}
}

// TestImportRejected: BIRD announces a prefix; the speaker receives it and
// installs it nowhere (not in its RIB, not in the kernel).
func TestImportRejected(t *testing.T) {
	r := newRig(t, (*rig).birdNeighbors)
	s := newSpeaker(t)
	if err := s.Reconcile(t.Context(), r.config()); err != nil {
		t.Fatal(err)
	}
	r.established(t, s, r.remote4)
	eventually(t, 5*time.Second, "the speaker received BIRD's route", func() (bool, string) {
		for _, p := range s.Peers(t.Context()) {
			if p.Address == r.remote4 {
				return p.Received >= 1, fmt.Sprintf("%+v", p)
			}
		}
		return false, ""
	})
	rs, err := s.Routes(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, rt := range rs {
		if rt.Prefix == r.exported {
			t.Errorf("BIRD's route %s is in the speaker's RIB: %+v", r.exported, rt)
		}
	}
	host, err := os.ReadFile("/proc/net/route")
	if err != nil {
		t.Fatal(err)
	}
	// /proc/net/route holds destinations in little-endian hex.
	a := r.exported.Addr().As4()
	hex := fmt.Sprintf("%02X%02X%02X%02X", a[3], a[2], a[1], a[0])
	if strings.Contains(string(host), hex) {
		t.Errorf("BIRD's route %s was installed into the kernel", r.exported)
	}
}

func TestWrongASNReported(t *testing.T) {
	r := newRig(t, func(r *rig) []lab.BIRDNeighbor {
		return []lab.BIRDNeighbor{
			{Address: r.local4, ASN: nodeASN + 1}, // BIRD expects another AS of us
			{Address: r.local6, ASN: nodeASN},
		}
	})
	s := newSpeaker(t)
	c := r.config()
	c.Peers[1].ASN = birdASN + 1 // we expect another AS of BIRD
	if err := s.Reconcile(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "both refusals in the status", func() (bool, string) {
		ps := s.Peers(t.Context())
		refused := strings.Contains(ps[0].LastError, "notification received in answer to our OPEN")
		badAS := strings.Contains(ps[1].LastError, "notification sent") && strings.Contains(ps[1].LastError, "bad peer as") &&
			strings.Contains(ps[1].LastError, "expected 65001, received 65000")
		return refused && badAS && ps[0].State != StateEstablished && ps[1].State != StateEstablished, ps[0].LastError + " | " + ps[1].LastError
	})
}

func TestMD5(t *testing.T) {
	r := newRig(t, func(r *rig) []lab.BIRDNeighbor {
		return []lab.BIRDNeighbor{{Address: r.local4, ASN: nodeASN, Password: "s3cret"}}
	})
	s := newSpeaker(t)
	c := r.config(Path{Prefix: netip.MustParsePrefix("10.77.2.0/24")})
	c.Peers = c.Peers[:1]
	c.Peers[0].Password = "wrong"
	if err := s.Reconcile(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "a wrong password shows as a connect error", func() (bool, string) {
		p := s.Peers(t.Context())[0]
		return p.State != StateEstablished && strings.Contains(p.LastError, "connect:") && strings.Contains(p.LastError, "MD5"), fmt.Sprintf("%+v", p)
	})
	c.Peers[0].Password = "s3cret"
	if err := s.Reconcile(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	r.established(t, s, r.remote4)
	eventually(t, 5*time.Second, "route over the MD5 session", func() (bool, string) {
		ok, _ := r.kernelHas(t, netip.MustParsePrefix("10.77.2.0/24"))
		return ok, ""
	})
}

// TestGracefulRestart: a detached speaker's routes stay at the peer (the
// kernel table is polled throughout); a new speaker re-establishes,
// announces again and ends with End-of-RIB, after which the peer drops the
// stale routes the new speaker no longer has. The IPv6 session is held
// back until the IPv4 one has finished (End-of-RIB sent): a session that
// comes up after another must still open as "restarted, forwarding kept"
// (GoBGP v3 ended restarting for every neighbour at the first End-of-RIB,
// so the late session opened without the bits and BIRD dropped that
// family's routes at session start). A withdrawal drops the routes at once.
func TestGracefulRestart(t *testing.T) {
	r := newRig(t, (*rig).birdNeighbors)
	keep4, gone4 := Path{Prefix: netip.MustParsePrefix("10.77.3.0/24")}, Path{Prefix: netip.MustParsePrefix("10.77.4.0/24")}
	keep6, gone6 := Path{Prefix: netip.MustParsePrefix("fd00:77:0:3::/64")}, Path{Prefix: netip.MustParsePrefix("fd00:77:0:4::/64")}
	kept, all := []netip.Prefix{keep4.Prefix, keep6.Prefix}, []netip.Prefix{keep4.Prefix, keep6.Prefix, gone4.Prefix, gone6.Prefix}
	s1 := New(nil)
	if err := s1.Reconcile(t.Context(), r.config(keep4, keep6, gone4, gone6)); err != nil {
		t.Fatal(err)
	}
	r.established(t, s1, r.remote4, r.remote6)
	eventually(t, 5*time.Second, "routes in the router's table", func() (bool, string) {
		return r.missing(t, all) == "", r.missing(t, all)
	})

	s1.Detach(t.Context())
	// The sessions are down at BIRD, in graceful restart, routes kept.
	for _, a := range []netip.Addr{r.local4, r.local6} {
		eventually(t, 5*time.Second, "BIRD notices the closed session with "+a.String(), func() (bool, string) {
			p, err := r.bird.Protocol(t.Context(), a)
			return err == nil && p.Info != "Established", fmt.Sprintf("%+v", p)
		})
	}
	hold := time.Now().Add(3 * time.Second)
	for time.Now().Before(hold) {
		if m := r.missing(t, all); m != "" {
			t.Fatalf("%s left the router's table while the speaker was away:\n%s", m, r.details(t))
		}
		time.Sleep(20 * time.Millisecond)
	}

	unblock := r.blockSessions(t, r.local6)
	s2 := newSpeaker(t)
	done := make(chan error, 1)
	go func() { done <- s2.Reconcile(t.Context(), r.config(keep4, keep6)) }()
	// Throughout the re-establishment the kept routes never leave; each
	// family's stale route goes at its session's End-of-RIB.
	r.restartedUntil(t, kept, r.local4, gone4.Prefix)
	unblock()
	r.restartedUntil(t, kept, r.local6, gone6.Prefix)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Each new session said "restarted, forwarding preserved" (R and F
	// bits), so BIRD kept the stale routes until End-of-RIB rather than
	// flushing them at session start.
	for _, c := range []struct {
		a  netip.Addr
		af string
	}{{r.local4, "ipv4"}, {r.local6, "ipv6"}} {
		d, err := r.bird.ProtocolDetails(t.Context(), c.a)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(d, "Restart recovery") || !strings.Contains(d, "AF preserved: "+c.af) {
			t.Errorf("BIRD did not see the restart and forwarding bits from %s:\n%s", c.a, d)
		}
	}

	// A deliberate withdrawal: the routes go at once.
	if err := s2.Withdraw(t.Context()); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "withdrawn at once", func() (bool, string) {
		ok, _ := r.kernelHas(t, keep4.Prefix)
		return !ok, "still there"
	})
}

// missing returns the first of pfxs the router's kernel table lacks, ""
// when it has them all.
func (r *rig) missing(t *testing.T, pfxs []netip.Prefix) string {
	for _, p := range pfxs {
		if ok, _ := r.kernelHas(t, p); !ok {
			return p.String()
		}
	}
	return ""
}

func (r *rig) details(t *testing.T) string {
	var b strings.Builder
	for _, a := range []netip.Addr{r.local4, r.local6} {
		d, _ := r.bird.ProtocolDetails(t.Context(), a)
		b.WriteString(d)
	}
	return b.String()
}

// restartedUntil polls the router's table until BIRD's session with
// local is established and the stale prefix gone has been flushed (the
// speaker's End-of-RIB arrived), failing if a kept prefix leaves it.
func (r *rig) restartedUntil(t *testing.T, kept []netip.Prefix, local netip.Addr, gone netip.Prefix) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if m := r.missing(t, kept); m != "" {
			t.Fatalf("%s left the router's table during the restart:\n%s", m, r.details(t))
		}
		goneThere, _ := r.kernelHas(t, gone)
		p, _ := r.bird.Protocol(t.Context(), local)
		if p.Info == "Established" && !goneThere {
			return // End-of-RIB arrived: the stale route was flushed
		}
		if time.Now().After(deadline) {
			t.Fatalf("no End-of-RIB flush from %s within 20s (stale %s still there: %v):\n%s", local, gone, goneThere, r.details(t))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// blockSessions drops BGP packets from the speaker's address a at the
// router until the returned func is called.
func (r *rig) blockSessions(t *testing.T, a netip.Addr) (unblock func()) {
	t.Helper()
	table := fmt.Sprintf("bgphold%x", randBytes(3))
	rule := fmt.Sprintf("table inet %s { chain in { type filter hook input priority 0; ip6 saddr %s tcp dport 179 drop; ip6 saddr %s tcp sport 179 drop; }; }", table, a, a)
	if a.Is4() {
		rule = strings.ReplaceAll(rule, "ip6 saddr", "ip saddr")
	}
	if _, err := r.router.Exec(t.Context(), "nft", rule); err != nil {
		t.Fatal(err)
	}
	done := false
	unblock = func() {
		if !done {
			done = true
			if _, err := r.router.Exec(context.Background(), "nft", "delete", "table", "inet", table); err != nil {
				t.Error(err)
			}
		}
	}
	t.Cleanup(unblock)
	return unblock
}
