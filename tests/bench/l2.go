package main

// The L2 announcement benchmark (section "l2", tracker issue 15): a
// cluster of three nodes on one segment, all selected by an
// L2AnnouncementPolicy, a service with an external IP in the segment's
// subnet, and an outside client on the segment.
//
//   - l2-failover: -l2-kills times, the leader's agent is SIGKILLed; the
//     figure is the time from the kill until the client kernel's neighbour
//     entry for the address holds another node's MAC (read through netlink
//     every millisecond) and then a new TCP connection from the client to
//     the address is accepted by a backend (through the new leader's
//     from_external). -l2-connect=false measures the neighbour entry only.
//   - l2-ifdown-failover: the same when the leader's segment interface
//     goes down instead.
//   - l2-garp: how soon after the kill the new leader's first gratuitous
//     ARP is on the wire, and how long its burst lasts (captured with
//     tcpdump on the client).
//
// L2_AGENT_ARGS in the environment adds agent flags (e.g. "--l2-refresh 1s").

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/agent/api"

	"github.com/isthmus-mesh/isthmus/lab"
)

var (
	l2Kills   = flag.Int("l2-kills", 20, "l2: leader kills measured")
	l2IfDowns = flag.Int("l2-ifdowns", 5, "l2: leader interface-down events measured")
	l2Connect = flag.Bool("l2-connect", true, "l2: the failover ends only when a new TCP connection through the address is accepted too (false: when the neighbour entry moved)")
)

func l2Bench(ctx context.Context) error {
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 3, AgentArgs: append([]string{"--node-labels", "l2=yes"}, strings.Fields(os.Getenv("L2_AGENT_ARGS"))...)})
	if err != nil {
		return err
	}
	client, err := c.AddSegmentClient("l2client", 200)
	if err != nil {
		return err
	}
	addr := c.SegmentAddr(100, false)
	macs := map[string]string{}
	for j := range c.Nodes {
		m, err := c.NodeMAC(j + 1)
		if err != nil {
			return err
		}
		macs[m.String()] = c.Nodes[j].NodeName()
	}
	// A backend on every node (accepting and closing connections), so a
	// connection through the address works whichever node leads and
	// whichever agent is down.
	for j, a := range c.Agents {
		p, err := a.AddPod(ctx, fmt.Sprintf("l2-backend%d", j+1), "default", map[string]string{"app": "l2web"})
		if err != nil {
			return err
		}
		ln, err := serveAcceptClose(p.Netns, 8080)
		if err != nil {
			return err
		}
		defer ln.Close()
	}
	// The address comes from LB-IPAM: a pool of one address in the node
	// segment, a service of type LoadBalancer.
	manifest := fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: lan}
spec:
  nodeSelector: {matchLabels: {l2: "yes"}}
  interfaces: [eth0]
---
apiVersion: isthmus.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: segment}
spec:
  blocks: [{cidr: %s/32}]
---
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  vips: ["10.96.0.50"]
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: l2web}
`, addr)
	f := filepath.Join(l.Dir(), "l2.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		return err
	}
	if out, err := c.Agents[0].CLI(ctx, "apply", "-f", f); err != nil {
		return fmt.Errorf("apply: %w: %s", err, out)
	}
	h, err := client.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	link, err := h.LinkByName(client.Dev)
	if err != nil {
		return err
	}
	neigh := func() string {
		ns, _ := h.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
		for _, n := range ns {
			if n.IP.Equal(addr.AsSlice()) && n.State&(netlink.NUD_REACHABLE|netlink.NUD_STALE|netlink.NUD_DELAY|netlink.NUD_PROBE|netlink.NUD_PERMANENT) != 0 {
				return n.HardwareAddr.String()
			}
		}
		return ""
	}
	// leader primes the client's entry and returns the MAC it points at
	// once every running agent is a member again.
	leader := func() (string, error) {
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			_, _ = client.Exec(ctx, "ping", "-c", "1", "-W", "1", addr.String())
			if m := neigh(); m != "" {
				if n := macs[m]; n != "" && allMembers(ctx, c, n) && (!*l2Connect || dialOnce(client, addr)) {
					return m, nil
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
		var sts []string
		for _, a := range c.Agents {
			out, _ := a.CLI(ctx, "l2", "status")
			sts = append(sts, a.Node.NodeName()+":\n"+string(out))
		}
		return "", fmt.Errorf("l2: no stable leader within 30s (client's entry %q, nodes by MAC %v):\n%s", neigh(), macs, strings.Join(sts, "\n"))
	}
	agentOf := func(mac string) *lab.Agent {
		for _, a := range c.Agents {
			if a.Node.NodeName() == macs[mac] {
				return a
			}
		}
		return nil
	}
	moved := func(from string, start time.Time) (time.Duration, error) {
		for time.Since(start) < 5*time.Second {
			if m := neigh(); m != "" && m != from && (!*l2Connect || dialOnce(client, addr)) {
				return time.Since(start), nil
			}
			time.Sleep(time.Millisecond)
		}
		return 0, fmt.Errorf("l2: 5s after the event the client's entry is %q (was %s) or no TCP connect through %s succeeded", neigh(), from, addr)
	}

	var kills []time.Duration
	var garpFirst, garpSpan []time.Duration
	for i := range *l2Kills {
		old, err := leader()
		if err != nil {
			return err
		}
		a := agentOf(old)
		var took time.Duration
		var start time.Time
		first, span, err := captureGARP(ctx, client, addr, old, func() error {
			start = time.Now()
			if err := a.Proc.Kill(); err != nil {
				return err
			}
			took, err = moved(old, start)
			return err
		}, func() time.Time { return start })
		if err != nil {
			return err
		}
		kills = append(kills, took)
		if first > 0 {
			garpFirst, garpSpan = append(garpFirst, first), append(garpSpan, span)
		}
		fmt.Fprintf(os.Stderr, "l2: kill %d: %v\n", i+1, took)
		if err := a.Start(ctx); err != nil {
			return err
		}
	}
	var downs []time.Duration
	for i := range *l2IfDowns {
		old, err := leader()
		if err != nil {
			return err
		}
		n := agentOf(old).Node
		if _, err := n.Exec(ctx, "sysctl", "-qw", "net.ipv6.conf.eth0.keep_addr_on_down=1"); err != nil {
			return err
		}
		start := time.Now()
		if _, err := n.Exec(ctx, "ip", "link", "set", "eth0", "down"); err != nil {
			return err
		}
		took, err := moved(old, start)
		if err != nil {
			return err
		}
		downs = append(downs, took)
		fmt.Fprintf(os.Stderr, "l2: interface down %d: %v\n", i+1, took)
		if _, err := n.Exec(ctx, "ip", "link", "set", "eth0", "up"); err != nil {
			return err
		}
		for _, gw := range c.RouterIPs() {
			for j := 0; j < 50; j++ {
				if _, err := n.Exec(ctx, "ip", "route", "replace", "default", "via", gw.String()); err == nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	for _, s := range [][]time.Duration{kills, downs, garpFirst, garpSpan} {
		slices.Sort(s)
	}
	what := "neighbour entry"
	if *l2Connect {
		what = "neighbour entry and a TCP connect through the address"
	}
	line("l2-failover-p99", ms(pct(kills, 99)), "ms", fmt.Sprintf("<= 1000 (SIGKILL to %s on the new leader, p50 %.0f ms, %d kills)", what, ms(pct(kills, 50)), len(kills)))
	line("l2-failover-p50", ms(pct(kills, 50)), "ms", "info")
	if len(downs) > 0 {
		line("l2-ifdown-failover-p99", ms(pct(downs, 99)), "ms", fmt.Sprintf("<= 1000 (leader's interface down to %s on the new leader, p50 %.0f ms, %d events)", what, ms(pct(downs, 50)), len(downs)))
	}
	if len(garpFirst) > 0 {
		line("l2-garp-first-after-kill-p50", ms(pct(garpFirst, 50)), "ms", "info: SIGKILL to the new leader's first gratuitous ARP on the wire")
		line("l2-garp-burst-span-p50", ms(pct(garpSpan, 50)), "ms", "info: first to last gratuitous ARP of a takeover burst (3 frames, 50 ms apart)")
	}
	return nil
}

// allMembers reports whether node's agent counts every running agent as
// a member (a restarted agent is back in the election).
func allMembers(ctx context.Context, c *lab.Cluster, node string) bool {
	running := 0
	for _, a := range c.Agents {
		if !a.Proc.Exited() {
			running++
		}
	}
	for _, a := range c.Agents {
		if a.Node.NodeName() != node {
			continue
		}
		out, err := a.CLI(ctx, "l2", "status", "-o", "json")
		if err != nil {
			return false
		}
		return membersIn(out) == running
	}
	return false
}

// membersIn counts the members of an l2 status document.
func membersIn(doc []byte) int {
	var st api.L2Status
	if json.Unmarshal(doc, &st) != nil {
		return -1
	}
	return len(st.Members)
}

// captureGARP runs fn with tcpdump on the client and returns how long
// after start() the first gratuitous ARP for addr from a MAC other than
// old arrived, and the span of that MAC's burst.
func captureGARP(ctx context.Context, client *lab.SegmentClient, addr netip.Addr, old string, fn func() error, start func() time.Time) (time.Duration, time.Duration, error) {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := client.Command(cctx, "tcpdump", "-l", "-nn", "-e", "--time-stamp-precision=micro", "-tt", "-i", client.Dev, "arp")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := lab.StartCommand(cmd); err != nil {
		return 0, 0, err
	}
	for i := 0; i < 250 && !strings.Contains(out.String(), "listening on"); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	err := fn()
	time.Sleep(300 * time.Millisecond)
	_ = cmd.Process.Signal(syscall.SIGINT)
	_ = cmd.Wait()
	if err != nil {
		return 0, 0, err
	}
	var times []time.Time
	for _, ln := range strings.Split(out.String(), "\n") {
		// "<epoch.usec> <src> > ff:ff:ff:ff:ff:ff, ethertype ARP ..., Request who-has A tell A, length 28"
		f := strings.Fields(ln)
		if len(f) < 2 || f[1] == old || !strings.Contains(ln, "who-has "+addr.String()+" tell "+addr.String()) {
			continue
		}
		secs, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		times = append(times, time.Unix(0, int64(secs*1e9)))
	}
	if len(times) == 0 {
		return 0, 0, nil
	}
	slices.SortFunc(times, func(a, b time.Time) int { return a.Compare(b) })
	return times[0].Sub(start()), times[len(times)-1].Sub(times[0]), nil
}

// dialOnce reports whether a TCP connect to addr:80 from the client
// succeeds within 200ms.
func dialOnce(client *lab.SegmentClient, addr netip.Addr) bool {
	ok := false
	_ = client.Do(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, 80).String(), 200*time.Millisecond)
		if err == nil {
			ok = true
			c.Close()
		}
		return nil
	})
	return ok
}
