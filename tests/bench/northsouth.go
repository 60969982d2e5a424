package main

// The north-south benchmark (section "northsouth"): a client outside the
// mesh, behind a cluster's router, opens new TCP connections to a
// Service's external IP (routed to the node, translated by from_external,
// SNATed by the node under externalTrafficPolicy Cluster) and, in
// interleaved rounds, to the same backend pod directly (routed to the same
// node, through the same external device and the same pod program, no
// translation). The ratio is what the way in costs a new connection.

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

const nsExtIP = "203.0.113.80"

func northSouthBench(ctx context.Context) error {
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 1})
	if err != nil {
		return err
	}
	a := c.Agents[0]
	backend, err := a.AddPod(ctx, "ns-backend", "default", map[string]string{"app": "ns-cps"})
	if err != nil {
		return err
	}
	ln, err := serveAcceptClose(backend.Netns, 8080)
	if err != nil {
		return err
	}
	defer ln.Close()
	out, err := c.AddOutside("ns-client")
	if err != nil {
		return err
	}
	ext := netip.MustParseAddr(nsExtIP)
	if err := out.RouteVia(netip.PrefixFrom(ext, 32), 1); err != nil {
		return err
	}
	if err := apply(ctx, a, fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: ns-cps}
spec:
  vips: [10.96.0.80]
  externalIPs: [%s]
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: ns-cps}
`, nsExtIP)); err != nil {
		return err
	}
	viaExt := netip.AddrPortFrom(ext, 80).String()
	direct := netip.AddrPortFrom(backend.IPv4, 8080).String()
	// The service is applied once apply returns; the route and the
	// nftables table are in place after the run that wrote it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := connectRate(out.Netns, viaExt, 200*time.Millisecond, 1); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("outside client -> %s: %w", viaExt, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	const rounds = 3
	var rExt, rDirect []float64
	for range rounds {
		r, err := connectRate(out.Netns, direct, *duration/2, 2)
		if err != nil {
			return fmt.Errorf("direct to the backend: %w", err)
		}
		rDirect = append(rDirect, r)
		if r, err = connectRate(out.Netns, viaExt, *duration/2, 2); err != nil {
			return fmt.Errorf("through the external IP: %w", err)
		}
		rExt = append(rExt, r)
	}
	progress("northsouth: through %s %.0f conn/s, direct %.0f conn/s per round", viaExt, rExt, rDirect)
	e, d := median(rExt), median(rDirect)
	line("lb-external-cps", e, "conn/s", fmt.Sprintf("info: outside client -> external IP (Cluster, SNAT) -> backend, median of %d interleaved rounds", rounds))
	line("lb-external-cps-direct", d, "conn/s", "info: the same client -> the backend's address")
	line("lb-external-cps-vs-direct", e/d, "ratio", ">= 0.9")
	return nil
}
