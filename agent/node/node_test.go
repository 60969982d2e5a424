package node

import (
	"net/netip"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
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
