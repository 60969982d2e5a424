package routes

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
)

func TestNetlinkRouter(t *testing.T) {
	h, ip := agenttest.Netns(t)
	r := netlinkRouter{h: h}
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

type countingRouter struct {
	calls int
	err   error
}

func (c *countingRouter) SyncRoutes([]desired.PodRoute, bool) (int, error) {
	c.calls++
	return 0, c.err
}

// Shadowed passes a sync on only when the routes changed, the last one
// failed, or it is older than maxAge.
func TestShadowed(t *testing.T) {
	inner := &countingRouter{}
	s := NewShadowed(inner, time.Hour)
	a := []desired.PodRoute{{Dst: netip.MustParsePrefix("10.1.2.0/24"), Via: netip.MustParseAddr("192.0.2.12")}}
	b := append(slices.Clone(a), desired.PodRoute{Dst: netip.MustParsePrefix("10.1.3.0/24"), Via: netip.MustParseAddr("192.0.2.13")})
	for i, step := range []struct {
		want  []desired.PodRoute
		prune bool
		err   error
		calls int
	}{
		{a, true, nil, 1},
		{a, true, nil, 1},                   // unchanged: nothing listed
		{b, true, nil, 2},                   // changed
		{b, false, nil, 3},                  // prune changed
		{a, false, errors.New("no way"), 4}, // failed...
		{a, false, nil, 5},                  // ...so tried again
		{a, false, nil, 5},
	} {
		inner.err = step.err
		_, _ = s.SyncRoutes(step.want, step.prune)
		if inner.calls != step.calls {
			t.Fatalf("step %d: %d syncs passed on, want %d", i, inner.calls, step.calls)
		}
	}
	s.maxAge = 0 // drift check due
	_, _ = s.SyncRoutes(a, false)
	if inner.calls != 6 {
		t.Errorf("an old sync was not repeated: %d calls", inner.calls)
	}
}
