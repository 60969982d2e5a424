package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// Service web: VIPs 10.96.0.10 and fd00:96::10, port 80 -> app=web:8080.
var (
	webVIP4 = netip.MustParseAddr("10.96.0.10")
	webVIP6 = netip.MustParseAddr("fd00:96::10")
)

const webService = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: web
spec:
  vips: [10.96.0.10, "fd00:96::10"]
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  selector: {app: web}
`

// A service with three backends spreads 300 connections over all of them,
// works on both VIPs, and stops sending to a backend once it is deleted.
func TestServiceSpreadsAcrossBackends(t *testing.T) {
	n := startNode(t)
	backends := []string{"web-1", "web-2", "web-3"}
	pods := map[string]*lab.Pod{}
	for _, name := range backends {
		pods[name] = n.addPod(name, map[string]string{"app": "web"})
		serveTCP(t, pods[name].Netns, 8080, sayName(name))
	}
	// Same labels, other namespace: not selected by a service in default.
	elsewhere, err := n.agent.AddPod(n.ctx, "web-staging", "staging", map[string]string{"app": "web"})
	if err != nil {
		t.Fatal(err)
	}
	serveTCP(t, elsewhere.Netns, 8080, sayName("web-staging"))
	client := n.addPod("client", map[string]string{"app": "client"})
	vip4 := netip.AddrPortFrom(webVIP4, 80)
	vip6 := netip.AddrPortFrom(webVIP6, 80)

	step(t, "apply Service web")
	n.apply(webService)
	if err := eventually(enforceWithin, func() error { _, err := fetchName(client.Netns, vip4); return err }); err != nil {
		t.Fatalf("client -> %s does not answer %v after apply: %v", vip4, enforceWithin, err)
	}

	const conns = 300
	step(t, "%d connections from client to %s", conns, vip4)
	count := map[string]int{}
	start := time.Now()
	for i := range conns {
		name, err := fetchName(client.Netns, vip4)
		if err != nil {
			t.Fatalf("connection %d of %d to %s: %v", i+1, conns, vip4, err)
		}
		count[name]++
	}
	t.Logf("%d connections in %v: %v", conns, time.Since(start).Round(time.Millisecond), count)
	for name := range count {
		if !slices.Contains(backends, name) {
			t.Errorf("a connection was answered by %q, which is not a backend", name)
		}
	}
	for _, name := range backends {
		// Each gets 100 on average (standard deviation ~8); 15% is 45.
		if got := count[name]; got < conns*15/100 {
			t.Errorf("backend %s got %d of %d connections, want at least 15%% (%d): %v", name, got, conns, conns*15/100, count)
		}
	}

	step(t, "connections to %s work too", vip6)
	for i := range 10 {
		name, err := fetchName(client.Netns, vip6)
		if err != nil {
			t.Fatalf("connection %d to %s: %v", i+1, vip6, err)
		}
		if !slices.Contains(backends, name) {
			t.Errorf("connection to %s answered by %q, not a backend", vip6, name)
		}
	}

	step(t, "delete backend web-2; new connections never go to it")
	n.isthmus("endpoint", "del", "web-2")
	for _, vip := range []netip.AddrPort{vip4, vip6} {
		count := map[string]int{}
		for i := range 60 {
			name, err := fetchName(client.Netns, vip)
			if err != nil {
				t.Fatalf("connection %d to %s after web-2 was deleted: %v (a connection sent to the deleted backend?)", i+1, vip, err)
			}
			count[name]++
		}
		t.Logf("%s after deleting web-2: %v", vip, count)
		if count["web-2"] > 0 {
			t.Errorf("%s: %d connections still went to the deleted web-2", vip, count["web-2"])
		}
		for _, name := range []string{"web-1", "web-3"} {
			if count[name] == 0 {
				t.Errorf("%s: backend %s got none of 60 connections: %v", vip, name, count)
			}
		}
	}

	step(t, "delete Service web: the VIPs stop answering")
	n.isthmus("delete", "service", "web")
	deleted := time.Now()
	for _, vip := range []netip.AddrPort{vip4, vip6} {
		err := eventually(enforceWithin, func() error {
			c, err := dialTCP(client.Netns, vip, 500*time.Millisecond)
			if err != nil {
				return nil
			}
			c.Close()
			return fmt.Errorf("%s still accepts connections", vip)
		})
		if err != nil {
			t.Errorf("%v after the service was deleted: %v", time.Since(deleted).Round(time.Millisecond), err)
		}
	}
	step(t, "the backends themselves still answer on their pod addresses")
	for _, name := range []string{"web-1", "web-3"} {
		ip := pods[name].IPv4
		if got, err := fetchName(client.Netns, netip.AddrPortFrom(ip, 8080)); err != nil || got != name {
			t.Errorf("client -> %s (%s:8080): got %q, %v", name, ip, got, err)
		}
	}
}
