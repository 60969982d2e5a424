// Command bench runs the Isthmus datapath benchmarks of `make bench` in
// network namespaces and prints one line per figure:
//
//	bench: <name> <value> <unit> (goal <comparison>)
//
// Every ratio is measured side by side in the same run (datapath against a
// plain veth pair, 10,000 services against one, Isthmus against iptables),
// because the machines are shared and absolute numbers drift. The mesh
// section (mesh.go) measures the cluster mesh: propagation, full sync and
// agent memory. The wireguard section (wireguard.go) measures Isthmus's
// WireGuard against no encryption, Debian's wireguard-go and a current
// standalone wireguard-go. The bigtcp section (bigtcp.go) measures BIG TCP
// on against off across two nodes. The k8s section (k8s.go) measures
// Kubernetes mode: the CNI ADD, a new pod reached from another cluster, a
// deleted pod gone from it. The bgp section (bgp.go) measures how fast a
// service's address reaches a BIRD top-of-rack router's kernel table.
// deleted pod gone from it. The northsouth section (northsouth.go) measures
// new connections from outside the mesh through an external IP against
// the same client dialling the backend directly.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

var (
	only     = flag.String("run", "throughput|cps|mesh|mesh-scale|service-backend|wireguard|labup|bigtcp|k8s|k8s-lab|bgp|northsouth|l2|vm", "regexp of the sections to run, matched against the whole name: throughput, cps, mesh, mesh-scale, service-backend, wireguard, labup, bigtcp, k8s, k8s-lab, bgp, northsouth, l2, vm")
	duration = flag.Duration("duration", 8*time.Second, "length of each measurement")
	services = flag.Int("services", 10000, "services installed for the scaling measurement")
)

// missed counts the goals missed in this run; main exits non-zero if any.
var missed atomic.Int32

// line prints one figure and evaluates its goal: "info..." is not a goal;
// ">= X" and "<= X" are, and a miss prints MISSED and fails the run.
func line(name string, value float64, unit, goal string) {
	verdict := ""
	if ok, isGoal := meetsGoal(value, goal); isGoal {
		verdict = " ok"
		if !ok {
			verdict = " MISSED"
			missed.Add(1)
		}
	}
	fmt.Printf("bench: %s %.2f %s (goal %s)%s\n", name, value, unit, goal, verdict)
}

// meetsGoal evaluates goal (">= X" or "<= X", optionally followed by a
// comment) against value. Any other goal ("info: ...") is not evaluated;
// a goal that starts with >= or <= but has no number panics, so a typo
// cannot turn a goal into a pass.
func meetsGoal(value float64, goal string) (ok, isGoal bool) {
	var op string
	switch {
	case strings.HasPrefix(goal, ">="):
		op = ">="
	case strings.HasPrefix(goal, "<="):
		op = "<="
	default:
		return false, false
	}
	var want float64
	if _, err := fmt.Sscanf(strings.TrimSpace(goal[2:]), "%g", &want); err != nil {
		panic(fmt.Sprintf("bench goal %q: no number after %s", goal, op))
	}
	if op == ">=" {
		return value >= want, true
	}
	return value <= want, true
}

func main() {
	flag.Parse()
	re := regexp.MustCompile("^(?:" + *only + ")$")
	ctx := context.Background()
	defer labtest.Cleanup()
	sections := []struct {
		name string
		run  func(context.Context) error
	}{
		{"throughput", throughput},
		{"cps", cps},
		{"mesh", meshBench},
		{"mesh-scale", meshScaleBench},
		{"service-backend", serviceBackendBench},
		{"wireguard", wireguardBench},
		{"labup", labupBench},
		{"bigtcp", bigtcpBench},
		{"k8s", k8sBench},
		{"k8s-lab", k8sLabBench},
		{"bgp", bgpBench},
		{"northsouth", northSouthBench},
		{"l2", l2Bench},
		{"vm", vmBench},
	}
	ok := true
	for _, sec := range sections {
		if !re.MatchString(sec.name) {
			continue
		}
		if err := sec.run(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "bench %s: %v\n", sec.name, err)
			ok = false
		}
	}
	if n := missed.Load(); n > 0 {
		fmt.Fprintf(os.Stderr, "bench: %d goal(s) MISSED\n", n)
		ok = false
	}
	if !ok {
		labtest.Cleanup() // os.Exit skips the deferred call
		os.Exit(1)
	}
}

var (
	podCIDR4 = netip.MustParsePrefix("10.200.0.0/24")
	podCIDR6 = netip.MustParsePrefix("fd00:200::/64")
)

func newStandaloneLab() (*lab.Lab, *lab.Agent, error) {
	l, err := newLab()
	if err != nil {
		return nil, nil, err
	}
	n, err := l.AddNode("node")
	if err != nil {
		l.Close()
		return nil, nil, err
	}
	a, err := n.StartAgent(context.Background(), lab.AgentOptions{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}})
	if err != nil {
		l.Close()
		return nil, nil, err
	}
	return l, a, nil
}

// throughput: single-stream TCP pod to pod through the datapath, against
// the same through a plain veth pair between two namespaces.
func throughput(ctx context.Context) error {
	l, a, err := newStandaloneLab()
	if err != nil {
		return err
	}
	defer l.Close()
	client, err := a.AddPod(ctx, "client", "default", map[string]string{"app": "client"})
	if err != nil {
		return err
	}
	server, err := a.AddPod(ctx, "server", "default", map[string]string{"app": "server"})
	if err != nil {
		return err
	}
	va, err := l.AddPodNetns("veth-a")
	if err != nil {
		return err
	}
	vb, err := l.AddPodNetns("veth-b")
	if err != nil {
		return err
	}
	if _, err := l.Link(va, vb, netip.MustParsePrefix("10.201.0.1/24"), netip.MustParsePrefix("10.201.0.2/24")); err != nil {
		return err
	}
	for _, ns := range []*lab.Netns{server.Netns, vb} {
		if _, err := ns.Start(ctx, "iperf3", "-s"); err != nil {
			return err
		}
	}
	time.Sleep(500 * time.Millisecond)
	// Alternate the two setups so drift on a shared machine hits both.
	var sumVeth, sumDP float64
	rounds := 2
	for i := 0; i < rounds; i++ {
		g, err := iperf(ctx, va, "10.201.0.2")
		if err != nil {
			return fmt.Errorf("veth baseline: %w", err)
		}
		sumVeth += g
		g, err = iperf(ctx, client.Netns, server.IPv4.String())
		if err != nil {
			return fmt.Errorf("datapath: %w", err)
		}
		sumDP += g
	}
	veth, dp := sumVeth/float64(rounds), sumDP/float64(rounds)
	line("veth-throughput", veth, "Gbit/s", "info: baseline, plain veth pair")
	line("pod-to-pod-throughput", dp, "Gbit/s", "info: through the Isthmus datapath")
	line("pod-to-pod-throughput-vs-veth", dp/veth, "ratio", ">= 0.90")
	return nil
}

func iperf(ctx context.Context, ns *lab.Netns, server string) (float64, error) {
	secs := fmt.Sprintf("%d", int((*duration / 2).Seconds()))
	var out []byte
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		out, err = ns.Exec(ctx, "iperf3", "-c", server, "-t", secs, "-J")
		if err == nil {
			break
		}
		time.Sleep(300 * time.Millisecond) // the server may still be busy with the last test
	}
	if err != nil {
		return 0, err
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return 0, fmt.Errorf("iperf3 output: %w", err)
	}
	return r.End.SumReceived.BitsPerSecond / 1e9, nil
}

// serveAcceptClose listens on port in ns and closes every connection at once.
func serveAcceptClose(ns *lab.Netns, port int) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln, nil
}

// connectRate opens and closes TCP connections to addr from ns for d, with
// `workers` parallel dialers, and returns connections per second. Closing
// with RST keeps TIME_WAIT from exhausting ports.
func connectRate(ns *lab.Netns, addr string, d time.Duration, workers int) (float64, error) {
	var n, fails atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	stop := time.Now().Add(d)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = ns.Do(func() error {
				dialer := net.Dialer{Timeout: time.Second}
				for time.Now().Before(stop) {
					c, err := dialer.Dial("tcp", addr)
					if err != nil {
						fails.Add(1)
						firstErr.CompareAndSwap(nil, err)
						continue
					}
					c.(*net.TCPConn).SetLinger(0)
					c.Close()
					n.Add(1)
				}
				return nil
			})
		}()
	}
	wg.Wait()
	if n.Load() == 0 {
		return 0, fmt.Errorf("no connection to %s succeeded: %v", addr, firstErr.Load())
	}
	if f := fails.Load(); f*100 > n.Load() {
		return 0, fmt.Errorf("%d of %d connections to %s failed: %v", f, f+n.Load(), addr, firstErr.Load())
	}
	return float64(n.Load()) / d.Seconds(), nil
}

func serviceYAML(name, vip string, port int, selector string) string {
	return fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: %s
spec:
  vips: [%s]
  ports: [{port: %d, targetPort: 8080, protocol: TCP}]
  selector: {app: %s}
---
`, name, vip, port, selector)
}

// fillerVIP is the i-th VIP of the services that only fill the tables.
func fillerVIP(i int) string {
	return fmt.Sprintf("10.97.%d.%d", i/250, i%250+1)
}

// cps: new TCP connections per second to a service VIP through Isthmus,
// on a node with one service installed and on a node with -services
// installed, in interleaved rounds (one, many, one, many, ...) so that
// drift on the shared machine hits both; the figures are the medians. Then
// the same with kube-proxy-style iptables DNAT rules for comparison.
func cps(ctx context.Context) error {
	l, one, err := newStandaloneLab()
	if err != nil {
		return err
	}
	defer l.Close()
	n, err := l.AddNode("many")
	if err != nil {
		return err
	}
	many, err := n.StartAgent(ctx, lab.AgentOptions{PodCIDRs: []netip.Prefix{
		netip.MustParsePrefix("10.202.0.0/24"), netip.MustParsePrefix("fd00:202::/64")}})
	if err != nil {
		return err
	}
	type side struct {
		tag    string // pod names are unique in a lab
		agent  *lab.Agent
		client *lab.Pod
		rates  []float64
	}
	sides := []*side{{tag: "one", agent: one}, {tag: "many", agent: many}}
	for _, s := range sides {
		if s.client, err = s.agent.AddPod(ctx, "client-"+s.tag, "default", map[string]string{"app": "client"}); err != nil {
			return err
		}
		backend, err := s.agent.AddPod(ctx, "backend-"+s.tag, "default", map[string]string{"app": "cps"})
		if err != nil {
			return err
		}
		ln, err := serveAcceptClose(backend.Netns, 8080)
		if err != nil {
			return err
		}
		defer ln.Close()
		if err := apply(ctx, s.agent, serviceYAML("cps", "10.96.0.1", 80, "cps")); err != nil {
			return err
		}
	}
	// The API takes bodies up to 1 MiB: apply in batches of 2,000.
	start := time.Now()
	for lo := 1; lo < *services; lo += 2000 {
		var b strings.Builder
		for i := lo; i < min(lo+2000, *services); i++ {
			b.WriteString(serviceYAML(fmt.Sprintf("filler-%d", i), fillerVIP(i), 80, "nothing"))
		}
		if err := apply(ctx, many, b.String()); err != nil {
			return err
		}
	}
	applyDur := time.Since(start)
	time.Sleep(time.Second)
	const rounds = 3
	for range rounds {
		for i, s := range sides {
			r, err := connectRate(s.client.Netns, "10.96.0.1:80", *duration/2, 2)
			if err != nil {
				return fmt.Errorf("node with %d services: %w", []int{1, *services}[i], err)
			}
			s.rates = append(s.rates, r)
		}
	}
	progress("cps: 1 service %.0f conn/s, %d services %.0f conn/s per round", sides[0].rates, *services, sides[1].rates)
	r1, rMany := median(sides[0].rates), median(sides[1].rates)
	line("service-cps-1", r1, "conn/s", fmt.Sprintf("info: median of %d interleaved rounds", rounds))
	line(fmt.Sprintf("service-cps-%d", *services), rMany, "conn/s", "info")
	line(fmt.Sprintf("service-cps-%d-vs-1", *services), rMany/r1, "ratio", ">= 0.95")
	line(fmt.Sprintf("service-apply-%d", *services-1), applyDur.Seconds(), "s", "info: applying the filler services in batches of 2000")

	ipt1, iptMany, err := iptablesCPS(ctx, l)
	if err != nil {
		return fmt.Errorf("iptables comparison: %w", err)
	}
	line("iptables-cps-1", ipt1, "conn/s", "info: kube-proxy-style DNAT")
	line(fmt.Sprintf("iptables-cps-%d", *services), iptMany, "conn/s", "info")
	line(fmt.Sprintf("iptables-cps-%d-vs-1", *services), iptMany/ipt1, "ratio", "info")
	line(fmt.Sprintf("isthmus-vs-iptables-cps-%d", *services), rMany/iptMany, "ratio", "info: > 1 means Isthmus is faster")
	return nil
}

// median of xs (not empty).
func median(xs []float64) float64 {
	g := slices.Sorted(slices.Values(xs))
	if len(g)%2 == 0 {
		return (g[len(g)/2-1] + g[len(g)/2]) / 2
	}
	return g[len(g)/2]
}

func apply(ctx context.Context, a *lab.Agent, yaml string) error {
	f, err := os.CreateTemp(a.Node.Dir(), "apply-*.yaml")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(yaml); err != nil {
		return err
	}
	f.Close()
	_, err = a.CLI(ctx, "apply", "-f", f.Name())
	return err
}

// iptablesCPS builds client and backend namespaces behind a router
// namespace that DNATs service VIPs kube-proxy style (KUBE-SERVICES ->
// KUBE-SVC -> KUBE-SEP chains), and measures with 1 and -services rules. The
// measured service sits in the middle of the chain, kube-proxy's average case.
func iptablesCPS(ctx context.Context, l *lab.Lab) (float64, float64, error) {
	router, err := l.AddNode("ipt-router")
	if err != nil {
		return 0, 0, err
	}
	cl, err := l.AddPodNetns("ipt-client")
	if err != nil {
		return 0, 0, err
	}
	be, err := l.AddPodNetns("ipt-backend")
	if err != nil {
		return 0, 0, err
	}
	if _, err := l.Link(cl, router, netip.MustParsePrefix("10.210.1.2/24"), netip.MustParsePrefix("10.210.1.1/24")); err != nil {
		return 0, 0, err
	}
	if _, err := l.Link(be, router, netip.MustParsePrefix("10.210.2.2/24"), netip.MustParsePrefix("10.210.2.1/24")); err != nil {
		return 0, 0, err
	}
	if err := cl.AddRoute(netip.Prefix{}, netip.MustParseAddr("10.210.1.1")); err != nil {
		return 0, 0, err
	}
	if err := be.AddRoute(netip.Prefix{}, netip.MustParseAddr("10.210.2.1")); err != nil {
		return 0, 0, err
	}
	ln, err := serveAcceptClose(be, 8080)
	if err != nil {
		return 0, 0, err
	}
	defer ln.Close()

	restore := func(n int) error {
		var b strings.Builder
		b.WriteString("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n")
		target := n / 2
		for i := 0; i < n; i++ {
			fmt.Fprintf(&b, ":KUBE-SVC-%d - [0:0]\n:KUBE-SEP-%d - [0:0]\n", i, i)
		}
		b.WriteString("-A PREROUTING -j KUBE-SERVICES\n")
		for i := 0; i < n; i++ {
			vip := fillerVIP(i)
			if i == target {
				vip = "10.96.0.1"
			}
			fmt.Fprintf(&b, "-A KUBE-SERVICES -d %s/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-%d\n", vip, i)
			fmt.Fprintf(&b, "-A KUBE-SVC-%d -j KUBE-SEP-%d\n", i, i)
			fmt.Fprintf(&b, "-A KUBE-SEP-%d -p tcp -m tcp -j DNAT --to-destination 10.210.2.2:8080\n", i)
		}
		b.WriteString("COMMIT\n")
		cmd := router.Command(ctx, "iptables-restore")
		cmd.Stdin = strings.NewReader(b.String())
		if out, err := lab.CombinedOutput(cmd); err != nil {
			return fmt.Errorf("iptables-restore: %v: %s", err, out)
		}
		return nil
	}
	if err := restore(1); err != nil {
		return 0, 0, err
	}
	time.Sleep(500 * time.Millisecond)
	one, err := connectRate(cl, "10.96.0.1:80", *duration, 2)
	if err != nil {
		return 0, 0, err
	}
	if err := restore(*services); err != nil {
		return 0, 0, err
	}
	time.Sleep(500 * time.Millisecond)
	many, err := connectRate(cl, "10.96.0.1:80", *duration, 2)
	if err != nil {
		return 0, 0, err
	}
	return one, many, nil
}

var _ = exec.Command

// newLab starts a quiet lab from the binaries labtest finds (bin/, built
// by make build), removed on SIGINT/SIGTERM too: every section's.
func newLab() (*lab.Lab, error) {
	return lab.New(lab.Options{Logf: func(string, ...any) {}, Binaries: labtest.Binaries, CloseOnSignal: true})
}
