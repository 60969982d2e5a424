package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

var bgpPerf = flag.String("bgp-perf", "", "bgp: `dir` for perf profiles (perf record -g) of both agents and the server during the 10,000 services")

// bgpBench: a cluster of two nodes whose router runs BIRD, peered with
// both agents (as in tests/e2e/bgp_test.go), and a LoadBalancerIPPool.
// It measures, from `isthmus apply` of a `type: LoadBalancer` service to
// its load-balancer address (allocated by LB-IPAM from the pool) in the
// router's kernel table (where BIRD installs what it learned), 50
// services one by one; then 10,000 LoadBalancer services applied at once
// until all 10,000 addresses are in the kernel table.
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
	bird, err := c.Router.StartBIRD(ctx, lab.BIRDOptions{RouterID: c.RouterIPs()[0], ASN: 65000, Neighbors: ns})
	if err != nil {
		return err
	}
	a := c.Agents[0]
	// The pool hands out its lowest free address first, so the k-th
	// service applied gets bgpPoolBase + k: the benchmark knows which
	// route to wait for without asking.
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
    - type: LoadBalancerIP
---
apiVersion: isthmus.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: bench}
spec:
  blocks: [{cidr: %s}]
`, c.RouterIPs()[0], bgpPool)
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
		pfx := netip.PrefixFrom(poolAddr(i), 32)
		start := time.Now()
		if err := apply(ctx, a, bgpServiceYAML(fmt.Sprintf("bgp-%02d", i), vipAddr(i))); err != nil {
			return err
		}
		if _, err := waitKernelRoutes(c.Router, 10*time.Second, pfx); err != nil {
			return err
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	line("bgp-route-visible-p50", ms(pct(lat, 50)), "ms", fmt.Sprintf("info: isthmus apply of a LoadBalancer service to its LB-IPAM address in BIRD's kernel table, %d services", n))
	line("bgp-route-visible-p99", ms(pct(lat, 99)), "ms", "<= 1000")

	// An apply in cluster mode is one etcd transaction (the embedded
	// etcd takes 1,024 operations): ten applies of 1,000 services, one
	// after the other, timed from the start of the first.
	const vips, perApply = 10000, 1000
	var docs []string
	var all []netip.Prefix
	for k := 0; k < vips; k += perApply {
		var b strings.Builder
		for i := k; i < k+perApply; i++ {
			// Names sort in the order of the addresses they get.
			b.WriteString(bgpServiceYAML(fmt.Sprintf("vip-%05d", i), vipAddr(n+i)))
			b.WriteString("---\n")
			all = append(all, netip.PrefixFrom(poolAddr(n+i), 32))
		}
		docs = append(docs, b.String())
	}
	var stopPerf []func() error
	if *bgpPerf != "" {
		if err := os.MkdirAll(*bgpPerf, 0o755); err != nil {
			return err
		}
		for name, pid := range map[string]int{"agent1": a.Proc.Pid(), "agent2": c.Agents[1].Proc.Pid(), "server": c.Server.Pid()} {
			stop, err := perfRecord(pid, filepath.Join(*bgpPerf, name+".perf"))
			if err != nil {
				return err
			}
			stopPerf = append(stopPerf, stop)
		}
	}
	// The agents and the server, then what else shares the two cores:
	// BIRD and this process (the applies' CLI runs are not counted).
	pids := []int{a.Proc.Pid(), c.Agents[1].Proc.Pid(), c.Server.Pid(), bird.Proc.Pid(), os.Getpid()}
	cpu0 := make([]float64, len(pids))
	for i, pid := range pids {
		if cpu0[i], err = cpuSeconds([]int{pid}); err != nil {
			return err
		}
	}
	runs0, err := reconcileRuns(ctx, a)
	if err != nil {
		return err
	}
	start := time.Now()
	for k, d := range docs {
		t := time.Now()
		if err := apply(ctx, a, d); err != nil {
			return err
		}
		progress("bgp: apply %d of %d took %v", k+1, len(docs), time.Since(t).Round(time.Millisecond))
	}
	applied := time.Since(start)
	if _, err := waitKernelRoutes(c.Router, 60*time.Second, all...); err != nil {
		return err
	}
	total := time.Since(start)
	for _, stop := range stopPerf {
		if err := stop(); err != nil {
			fmt.Fprintln(os.Stderr, "bench bgp: perf:", err)
		}
	}
	progress("bgp: %d LoadBalancer services: apply returned after %v, all addresses in BIRD's kernel table after %v", vips, applied.Round(time.Millisecond), total.Round(time.Millisecond))
	line(fmt.Sprintf("bgp-%d-vips-advertised", vips), total.Seconds(), "s", "<= 5")
	// Where the time went: CPU of the applying agent, the other agent
	// and the server (etcd included), and the applying agent's runs.
	var cpus []string
	for i, pid := range pids {
		cs, err := cpuSeconds([]int{pid})
		if err != nil {
			return err
		}
		cpus = append(cpus, fmt.Sprintf("%.2f", cs-cpu0[i]))
	}
	runs1, err := reconcileRuns(ctx, a)
	if err != nil {
		return err
	}
	line("bgp-10000-vips-reconciles", float64(runs1-runs0), "runs",
		fmt.Sprintf("info: reconcile runs of the applying agent; CPU-s of it / the other agent / the server: %s; of BIRD / the benchmark's polling: %s",
			strings.Join(cpus[:3], " / "), strings.Join(cpus[3:], " / ")))
	return nil
}

// bgpPool is the benchmark's LoadBalancerIPPool (65,536 addresses).
const bgpPool = "100.64.0.0/16"

// poolAddr is the pool's i-th address; vipAddr the i-th service VIP.
func poolAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}) }
func vipAddr(i int) string      { return netip.AddrFrom4([4]byte{10, 98, byte(i >> 8), byte(i)}).String() }

func bgpServiceYAML(name, vip string) string {
	return fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: %s}
spec:
  type: LoadBalancer
  vips: [%s]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: %s}
`, name, vip, name)
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
