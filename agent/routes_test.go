package agent

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/agent/desired"
)

// routeNetns creates a netns with an underlay device (one end of a veth pair) (192.0.2.1/24,
// 2001:db8::1/64) and returns a router bound to it.
func routeNetns(t *testing.T) (netlinkRouter, func(args ...string) string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (creates a network namespace)")
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "isthrt-" + hex.EncodeToString(b)
	ip := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ip("link", "add", "under0", "type", "veth", "peer", "name", "under1")
	ip("link", "set", "under1", "up")
	ip("addr", "add", "192.0.2.1/24", "dev", "under0")
	ip("-6", "addr", "add", "2001:db8::1/64", "dev", "under0", "nodad")
	ip("link", "set", "under0", "up")

	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return netlinkRouter{h: h}, ip
}

func TestNetlinkRouter(t *testing.T) {
	r, ip := routeNetns(t)
	pfx := netip.MustParsePrefix
	addr := netip.MustParseAddr
	ip("route", "add", "10.1.9.0/24", "via", "192.0.2.9") // someone else's

	want := []desired.PodRoute{
		{Dst: pfx("10.1.2.0/24"), Via: addr("192.0.2.12")},
		{Dst: pfx("fd00:1:2::/64"), Via: addr("2001:db8::12")},
		{Dst: pfx("10.2.1.0/24"), Via: addr("198.51.100.1")}, // not on a connected subnet: the underlay's job
		{Dst: pfx("10.1.9.0/24"), Via: addr("192.0.2.13")},   // taken by a route the agent did not make
	}
	n, err := r.SyncRoutes(want, true)
	if n != 2 || err == nil || !strings.Contains(err.Error(), "another route to 10.1.9.0/24 exists") {
		t.Fatalf("SyncRoutes = %d, %v", n, err)
	}
	v4 := ip("route", "show", "proto", "73")
	v6 := ip("-6", "route", "show", "proto", "73")
	if !strings.Contains(v4, "10.1.2.0/24 via 192.0.2.12 dev under0") || strings.Contains(v4, "10.2.1.0") ||
		!strings.Contains(v6, "fd00:1:2::/64 via 2001:db8::12 dev under0") {
		t.Errorf("routes after sync:\n%s%s", v4, v6)
	}
	if got := ip("route", "show", "10.1.9.0/24"); !strings.Contains(got, "via 192.0.2.9") {
		t.Errorf("foreign route changed: %s", got)
	}

	// Idempotent.
	if n, _ := r.SyncRoutes(want, true); n != 0 {
		t.Errorf("second sync changed %d routes", n)
	}
	// A node that moved: replaced in place.
	want[0].Via = addr("192.0.2.22")
	if n, _ := r.SyncRoutes(want, true); n != 1 {
		t.Errorf("moved node: %d changes", n)
	}
	if got := ip("route", "show", "proto", "73"); !strings.Contains(got, "10.1.2.0/24 via 192.0.2.22") {
		t.Errorf("after move: %s", got)
	}
	// Without prune nothing goes; with prune the stale ones go, and only ours.
	if n, _ := r.SyncRoutes(nil, false); n != 0 {
		t.Errorf("sync without prune changed %d", n)
	}
	if n, _ := r.SyncRoutes(nil, true); n != 2 {
		t.Errorf("prune removed %d routes, want 2", n)
	}
	if got := ip("route", "show", "proto", "73") + ip("-6", "route", "show", "proto", "73"); strings.TrimSpace(got) != "" {
		t.Errorf("left after prune: %s", got)
	}
	if got := ip("route", "show", "10.1.9.0/24"); !strings.Contains(got, "via 192.0.2.9") {
		t.Errorf("prune touched a foreign route: %s", got)
	}
}

func TestDefaultRouteAddrs(t *testing.T) {
	r, ip := routeNetns(t)
	ips, err := defaultRouteAddrsOf(r.h)
	if err != nil || len(ips) != 0 {
		t.Fatalf("without a default route: %v, %v", ips, err)
	}
	ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
	ip("addr", "add", "203.0.113.5/24", "dev", "other0")
	ip("link", "set", "other0", "up")
	ip("route", "add", "default", "via", "192.0.2.254")
	ip("-6", "route", "add", "default", "via", "2001:db8::fe")
	ips, err = defaultRouteAddrsOf(r.h)
	if err != nil || len(ips) != 2 || ips[0] != netip.MustParseAddr("192.0.2.1") || ips[1] != netip.MustParseAddr("2001:db8::1") {
		t.Errorf("node IPs %v, %v; want the default route's interface's 192.0.2.1 and 2001:db8::1", ips, err)
	}
}
