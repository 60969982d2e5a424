package e2e

import (
	"net/netip"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// Three pods on one node reach each other over TCP, UDP and ping, on IPv4
// and on IPv6, in every direction.
func TestPodToPod(t *testing.T) {
	n := startNode(t)
	const tcpPort, udpPort = 7000, 7001

	var pods []*lab.Pod
	for _, name := range []string{"alpha", "beta", "gamma"} {
		p := n.addPod(name, map[string]string{"app": name})
		serveTCP(t, p.Netns, tcpPort, echo)
		serveUDPEcho(t, p.Netns, udpPort)
		pods = append(pods, p)
	}
	seen := map[netip.Addr]string{}
	for _, p := range pods {
		for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
			if other, dup := seen[ip]; dup {
				t.Fatalf("pods %s and %s both got %s", other, p.PodName, ip)
			}
			seen[ip] = p.PodName
		}
	}

	// A fresh pod's first packets may race its address configuration (IPv6
	// DAD, neighbour entries): wait until the first pod reaches the others,
	// then hold every check to a short deadline.
	for _, dst := range pods[1:] {
		for _, v6 := range []bool{false, true} {
			dst := netip.AddrPortFrom(dst.Addr(v6), tcpPort)
			if err := eventually(5*time.Second, func() error { return tcpEcho(pods[0].Netns, dst) }); err != nil {
				t.Fatalf("pods do not reach each other: %v", err)
			}
		}
	}
	const settle = 2 * time.Second
	for _, src := range pods {
		for _, dst := range pods {
			if src == dst {
				continue
			}
			for _, v6 := range []bool{false, true} {
				ip := dst.Addr(v6)
				step(t, "%s -> %s (%s %s): TCP, UDP, ping", src.PodName, dst.PodName, familyName(v6), ip)
				if err := eventually(settle, func() error { return tcpEcho(src.Netns, netip.AddrPortFrom(ip, tcpPort)) }); err != nil {
					t.Errorf("TCP %s -> %s: %v", src.PodName, dst.PodName, err)
				}
				if err := eventually(settle, func() error { return udpEcho(src.Netns, netip.AddrPortFrom(ip, udpPort)) }); err != nil {
					t.Errorf("UDP %s -> %s: %v", src.PodName, dst.PodName, err)
				}
				if err := eventually(settle, func() error { return ping(n.ctx, src.Netns, ip, 2) }); err != nil {
					t.Errorf("ping %s -> %s: %v", src.PodName, dst.PodName, err)
				}
			}
		}
	}
}
