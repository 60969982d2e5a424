package e2e

import (
	"net/netip"
	"testing"
)

// A pod that calls a service it is itself a backend of reaches itself
// ("hairpin"), as Kubernetes users expect (the conformance test "Services
// should allow pods to hairpin back to themselves through services").
func TestPodReachesServiceBackedByItself(t *testing.T) {
	n := startNode(t)
	solo := n.addPod("solo", map[string]string{"app": "solo"})
	serveTCP(t, solo.Netns, 8080, sayName("solo"))
	serveUDPEcho(t, solo.Netns, 5353)
	client := n.addPod("client", map[string]string{"app": "client"})

	step(t, "apply Service solo with the pod solo as its only backend")
	n.apply(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: solo
spec:
  vips: [10.96.0.60, "fd00:96::60"]
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
  selector: {app: solo}
`)
	for _, vip := range []netip.Addr{netip.MustParseAddr("10.96.0.60"), netip.MustParseAddr("fd00:96::60")} {
		fam := familyName(vip.Is6())
		step(t, "%s: another pod reaches the service", fam)
		if err := eventually(enforceWithin, func() error { _, err := fetchName(client.Netns, netip.AddrPortFrom(vip, 80)); return err }); err != nil {
			t.Fatalf("client -> %s:80: %v", vip, err)
		}
		step(t, "%s: the backend itself reaches the service over TCP and UDP", fam)
		if got, err := fetchName(solo.Netns, netip.AddrPortFrom(vip, 80)); err != nil || got != "solo" {
			t.Errorf("solo -> %s:80 (hairpin): got %q, %v", vip, got, err)
		}
		if err := udpEcho(solo.Netns, netip.AddrPortFrom(vip, 53)); err != nil {
			t.Errorf("solo -> %s:53/udp (hairpin): %v", vip, err)
		}
	}
}
