package main

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// bgpBench: a cluster of two nodes whose router runs BIRD, peered with
// both agents (as in tests/e2e/bgp_test.go). It measures, from `isthmus
// apply` of a service with an external IP to its route in the router's
// kernel table (where BIRD installs what it learned), 50 services one by
// one; then 10,000 addresses applied at once (10 services of 1,000
// external IPs) until all are in the kernel table.
func bgpBench(ctx context.Context) error {
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 2, NoStaticPodRoutes: true, AgentArgs: []string{"--node-labels", "rack=r1"}})
	if err != nil {
		return err
	}
	var ns []lab.BIRDNeighbor
	for j := 1; j <= 2; j++ {
		ns = append(ns, lab.BIRDNeighbor{Address: c.NodeIPs(j)[0], ASN: 65010})
	}
	if _, err := c.Router.StartBIRD(ctx, lab.BIRDOptions{RouterID: c.RouterIPs()[0], ASN: 65000, Neighbors: ns}); err != nil {
		return err
	}
	a := c.Agents[0]
	policy := fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata: {name: tor}
spec:
  nodeSelector: {matchLabels: {rack: r1}}
  localASN: 65010
  neighbors:
    - {address: %s, peerASN: 65000, gracefulRestart: {enabled: true}, timers: {connectRetryTimeSeconds: 1}}
  advertisements:
    - type: PodCIDR
    - type: ExternalIP
`, c.RouterIPs()[0])
	if err := apply(ctx, a, policy); err != nil {
		return err
	}
	// The sessions are up once both nodes' pod CIDRs are routed.
	for j := 1; j <= 2; j++ {
		if _, err := waitKernelRoutes(c.Router, 60*time.Second, c.NodePodCIDRs(j)[0]); err != nil {
			return fmt.Errorf("BGP sessions: %w", err)
		}
	}

	const n = 50
	var lat []time.Duration
	for i := range n {
		pfx := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i + 1)}), 32)
		start := time.Now()
		if err := apply(ctx, a, bgpServiceYAML(fmt.Sprintf("bgp-%d", i), fmt.Sprintf("10.98.0.%d", i+1), []string{pfx.Addr().String()})); err != nil {
			return err
		}
		if _, err := waitKernelRoutes(c.Router, 10*time.Second, pfx); err != nil {
			return err
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	line("bgp-route-visible-p50", ms(pct(lat, 50)), "ms", fmt.Sprintf("info: isthmus apply of a service with an external IP to its route in BIRD's kernel table, %d services", n))
	line("bgp-route-visible-p99", ms(pct(lat, 99)), "ms", "<= 1000")

	const svcs, perSvc = 10, 1000
	var b strings.Builder
	var all []netip.Prefix
	for s := range svcs {
		var ips []string
		for i := range perSvc {
			a := netip.AddrFrom4([4]byte{100, 64 + byte(s), byte(i / 250), byte(i%250 + 1)})
			ips = append(ips, a.String())
			all = append(all, netip.PrefixFrom(a, 32))
		}
		b.WriteString(bgpServiceYAML(fmt.Sprintf("vips-%d", s), fmt.Sprintf("10.98.1.%d", s+1), ips))
		b.WriteString("---\n")
	}
	start := time.Now()
	if err := apply(ctx, a, b.String()); err != nil {
		return err
	}
	applied := time.Since(start)
	if _, err := waitKernelRoutes(c.Router, 60*time.Second, all...); err != nil {
		return err
	}
	total := time.Since(start)
	progress("bgp: %d addresses: apply returned after %v, all in BIRD's kernel table after %v", len(all), applied.Round(time.Millisecond), total.Round(time.Millisecond))
	line(fmt.Sprintf("bgp-%d-vips-advertised", len(all)), total.Seconds(), "s", "<= 5")
	return nil
}

func bgpServiceYAML(name, vip string, externalIPs []string) string {
	return fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: %s}
spec:
  vips: [%s]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: %s}
  externalIPs: [%s]
`, name, vip, name, strings.Join(externalIPs, ", "))
}

// waitKernelRoutes polls ns's main table until every prefix is routed.
func waitKernelRoutes(ns *lab.Node, within time.Duration, want ...netip.Prefix) (time.Duration, error) {
	start := time.Now()
	for {
		rs, err := ns.KernelRoutes()
		if err != nil {
			return 0, err
		}
		have := make(map[netip.Prefix]bool, len(rs))
		for _, r := range rs {
			have[r.Dst] = true
		}
		missing := 0
		for _, p := range want {
			if !have[p] {
				missing++
			}
		}
		if missing == 0 {
			return time.Since(start), nil
		}
		if time.Since(start) > within {
			return 0, fmt.Errorf("%d of %d prefixes not in %s's kernel table after %v", missing, len(want), ns.Name(), within)
		}
		if len(want) > 100 {
			time.Sleep(20 * time.Millisecond)
		} else {
			time.Sleep(2 * time.Millisecond)
		}
	}
}
