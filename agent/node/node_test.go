package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

func TestDefaultRouteAddrs(t *testing.T) {
	h, ip := agenttest.Netns(t)
	ips, err := defaultRouteAddrsOf(h)
	if err != nil || len(ips) != 0 {
		t.Fatalf("without a default route: %v, %v", ips, err)
	}
	ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
	ip("addr", "add", "203.0.113.5/24", "dev", "other0")
	ip("link", "set", "other0", "up")
	ip("route", "add", "default", "via", "192.0.2.254")
	ip("-6", "route", "add", "default", "via", "2001:db8::fe")
	ips, err = defaultRouteAddrsOf(h)
	if err != nil || len(ips) != 2 || ips[0] != netip.MustParseAddr("192.0.2.1") || ips[1] != netip.MustParseAddr("2001:db8::1") {
		t.Errorf("node IPs %v, %v; want the default route's interface's 192.0.2.1 and 2001:db8::1", ips, err)
	}
}

// The default route watch reports a default route coming and going, and
// not the routes of pods (one per pod: reporting them would throw the
// cache of DefaultRouteAddrs away at every pod).
func TestWatchDefaultRoutes(t *testing.T) {
	testenv.Root(t, "creates a network namespace")
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "isthrt-" + hex.EncodeToString(b)
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	ip("link", "add", "under0", "type", "veth", "peer", "name", "pod0")
	ip("addr", "add", "192.0.2.1/24", "dev", "under0")
	ip("link", "set", "under0", "up")
	ip("link", "set", "pod0", "up")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changed := make(chan struct{}, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchDefaultRoutes(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), &ns, func() { changed <- struct{}{} })
	}()
	defer func() { cancel(); <-done }()
	time.Sleep(200 * time.Millisecond) // subscribed

	ip("route", "add", "10.200.0.5/32", "dev", "pod0") // a pod's route
	ip("route", "del", "10.200.0.5/32", "dev", "pod0")
	select {
	case <-changed:
		t.Fatal("a pod's route was reported as a default route change")
	case <-time.After(300 * time.Millisecond):
	}
	for _, step := range [][]string{{"route", "add", "default", "via", "192.0.2.254"}, {"route", "del", "default"}} {
		ip(step...)
		select {
		case <-changed:
		case <-time.After(5 * time.Second):
			t.Fatalf("ip %s: not reported", strings.Join(step, " "))
		}
	}
}
