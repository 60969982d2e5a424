package main

// The WireGuard benchmark (section "wireguard", tracker issue 4):
// single-stream TCP pod to pod across two nodes, four ways in one run.
//
//   - (a) plain: cluster c1, two nodes with Isthmus agents, no encryption.
//   - (b) isthmus: cluster c2, the same with --encryption wireguard (the
//     agents' embedded wireguard-go, gateway/wireguard).
//   - (c) debian: Debian's packaged wireguard-go (0.0.20220316, before
//     wireguard-go had TUN and UDP offloads).
//   - (d) standalone: the wireguard-go command of the module version in
//     go.mod, built for the run.
//
// Every path is pod netns -> node -> node's eth0 -> bridge in a router
// namespace -> other node's eth0 -> node -> pod netns, over 1500-byte
// veths. (c) and (d) get the MTU the agents of (b) chose for their device
// (1440 on an IPv4 underlay of 1500, wireguard.MTUFor), so all three
// tunnels carry packets of the same size.
//
// (c) and (d) run on two plain nodes (no agent) built like a cluster's
// nodes, with one pod namespace behind each on a veth pair and kernel
// routes. Both daemons run side by side in the same node namespaces (one
// device each, different ports); a route switch picks which tunnel the
// pods' traffic takes. What differs from (a)/(b): the pods' veths carry no
// BPF programs (kernel forwarding instead of the Isthmus datapath), and the
// route into the tunnel sits in the main table (the agent's in a table of
// its own behind a policy rule). The pods' MTU is the tunnel's, as the
// agent gives its pods when it encrypts.
//
// Each setup gets -wireguard-rounds iperf3 runs of -duration/2, interleaved
// (a c b d a c b d ...) so that drift on the shared machine hits all four,
// with (b) next to both setups it is compared with; the figure is the
// median run (stderr shows every run, to judge the noise). After each run
// the sending side's WireGuard transfer counter must have grown by at least
// the bytes iperf3 moved: proof that the traffic went through the tunnel.
//
// CPU seconds per GB: utime+stime of the processes that run WireGuard (both
// agents for (b), both daemons for (c) and (d)) across the iperf3 runs, per
// GB received. A write to a TUN runs the receive path in the writer's
// context, so the receiving side's stime also holds the forwarding to the
// pod (with the agents: the policy rule and the to_pod BPF program).

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
)

// wantWireGuardMode is the device mode the agents of (b) must report.
const wantWireGuardMode = "userspace"

var wgRounds = flag.Int("wireguard-rounds", 5, "wireguard: iperf3 runs of -duration/2 per setup, interleaved (the figure is their median)")

const (
	// debianWireGuardGo is what Debian's package wireguard-go installs.
	debianWireGuardGo = "/usr/bin/wireguard-go"
	// userHZ is the unit of utime and stime in /proc/<pid>/stat: 100 on
	// amd64 and arm64 (sysconf(_SC_CLK_TCK) would need cgo).
	userHZ = 100
)

// wgSetup is one of the four ways, with what its runs added up.
type wgSetup struct {
	name, goal string
	client     *lab.Netns
	server     netip.Addr
	mtu        int                   // of the WireGuard device; 0 for (a)
	mode       string                // the agents' WireGuard device mode ("userspace", "kernel"); "" for (a), (c), (d)
	cpuPids    []int                 // processes doing the WireGuard work; none for (a)
	prepare    func() error          // before each run (the route switch of (c) and (d))
	sent       func() (int64, error) // the client side's WireGuard tx bytes so far; nil for (a)
	gbps       []float64             // of each run
	bytes, cpu float64               // received bytes and CPU seconds, summed
}

func wireguardBench(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if _, err := os.Stat(debianWireGuardGo); err != nil {
		return fmt.Errorf("wireguard-go of Debian: %w (run: make deps)", err)
	}
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	t0 := time.Now()
	standalone := filepath.Join(l.Dir(), "wireguard-go")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", standalone, "golang.zx2c4.com/wireguard").CombinedOutput(); err != nil {
		return fmt.Errorf("build the standalone wireguard-go: %v: %s", err, out)
	}

	a, err := agentSetup(ctx, l, 1, "", "a")
	if err != nil {
		return fmt.Errorf("(a): %w", err)
	}
	a.name, a.goal = "wireguard-a-plain", "info: Isthmus without encryption"
	b, err := agentSetup(ctx, l, 2, "wireguard", "b")
	if err != nil {
		return fmt.Errorf("(b): %w", err)
	}
	// The comparison with (c) and (d) is between userspace engines: a
	// kernel device (where the module exists) would measure something else.
	if b.mode != wantWireGuardMode {
		return fmt.Errorf("(b): the agents' WireGuard device is %q, this benchmark measures %q", b.mode, wantWireGuardMode)
	}
	b.name, b.goal = "wireguard-b-isthmus", fmt.Sprintf("info: Isthmus WireGuard, %s device (embedded wireguard-go), MTU %d", b.mode, b.mtu)
	if b.mtu < 1280 {
		return fmt.Errorf("(b): the agents report WireGuard MTU %d", b.mtu)
	}
	c, d, err := routedSetups(ctx, l, b.mtu, debianWireGuardGo, standalone)
	if err != nil {
		return fmt.Errorf("(c), (d): %w", err)
	}
	c.name, c.goal = "wireguard-c-debian", "info: Debian's wireguard-go "+version(ctx, debianWireGuardGo)
	d.name, d.goal = "wireguard-d-standalone", "info: wireguard-go "+version(ctx, standalone)+" from go.mod"
	progress("wireguard: 4 setups up in %s", time.Since(t0).Round(time.Second))

	order := []*wgSetup{a, c, b, d}
	if *wgRounds < 1 {
		return fmt.Errorf("-wireguard-rounds %d: want at least 1", *wgRounds)
	}
	for range *wgRounds {
		for _, s := range order {
			if err := s.run(ctx); err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
		}
	}
	for _, s := range []*wgSetup{a, b, c, d} {
		progress("wireguard: %s runs %.2f Gbit/s", s.name, s.gbps)
	}
	for _, s := range []*wgSetup{a, b, c, d} {
		line(s.name, s.median(), "Gbit/s", s.goal)
	}
	ga, gb, gc, gd := a.median(), b.median(), c.median(), d.median()
	line("wireguard-b/c", gb/gc, "x", ">= 4")
	line("wireguard-b/d", gb/gd, "x", ">= 0.9")
	line("wireguard-b/a", gb/ga, "x", "info: what encryption costs")
	line("wireguard-b-cpu", b.cpuPerGB(), "s/GB", "info: utime+stime of both agents per GB received")
	line("wireguard-c-cpu", c.cpuPerGB(), "s/GB", "info: both Debian wireguard-go daemons")
	line("wireguard-d-cpu", d.cpuPerGB(), "s/GB", "info: both standalone wireguard-go daemons")
	return nil
}

func (s *wgSetup) cpuPerGB() float64 { return s.cpu / (s.bytes / 1e9) }

// median of the runs' Gbit/s: one run hit by a burst of the machine's
// other work does not move it.
func (s *wgSetup) median() float64 { return median(s.gbps) }

// run measures one iperf3 run and adds it to the sums.
func (s *wgSetup) run(ctx context.Context) error {
	if s.prepare != nil {
		if err := s.prepare(); err != nil {
			return err
		}
	}
	var sent0 int64
	if s.sent != nil {
		var err error
		if sent0, err = s.sent(); err != nil {
			return err
		}
	}
	cpu0, err := cpuSeconds(s.cpuPids)
	if err != nil {
		return err
	}
	gbps, bytes, err := iperfBytes(ctx, s.client, s.server.String())
	if err != nil {
		return err
	}
	cpu1, err := cpuSeconds(s.cpuPids)
	if err != nil {
		return err
	}
	if s.sent != nil {
		sent1, err := s.sent()
		if err != nil {
			return err
		}
		if sent1-sent0 < bytes {
			return fmt.Errorf("iperf3 moved %d bytes but WireGuard sent only %d: the traffic bypassed the tunnel", bytes, sent1-sent0)
		}
	}
	s.gbps = append(s.gbps, gbps)
	s.bytes += float64(bytes)
	s.cpu += cpu1 - cpu0
	return nil
}

// iperfBytes runs a single-stream iperf3 of -duration/2 from ns to server
// and returns Gbit/s and the bytes received.
func iperfBytes(ctx context.Context, ns *lab.Netns, server string) (float64, int64, error) {
	secs := strconv.Itoa(int((*duration / 2).Seconds()))
	var out []byte
	var err error
	for range 5 {
		if out, err = ns.Exec(ctx, "iperf3", "-c", server, "-t", secs, "-J"); err == nil {
			break
		}
		time.Sleep(300 * time.Millisecond) // the server may still be busy with the last test
	}
	if err != nil {
		return 0, 0, err
	}
	var r struct {
		End struct {
			SumReceived struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return 0, 0, fmt.Errorf("iperf3 output: %w", err)
	}
	return r.End.SumReceived.BitsPerSecond / 1e9, r.End.SumReceived.Bytes, nil
}

// cpuSeconds sums utime and stime (fields 14 and 15 of /proc/<pid>/stat,
// all threads, children excluded) of the processes.
func cpuSeconds(pids []int) (float64, error) {
	total := 0.0
	for _, pid := range pids {
		user, sys, err := procCPU(pid)
		if err != nil {
			return 0, err
		}
		total += user + sys
	}
	return total, nil
}

// procCPU returns the utime and stime of process pid, in seconds.
func procCPU(pid int) (user, sys float64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) may hold spaces; count from after it.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	var ticks [2]int64
	for i, v := range f[11:13] { // fields 14 and 15
		if ticks[i], err = strconv.ParseInt(v, 10, 64); err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
	}
	return float64(ticks[0]) / userHZ, float64(ticks[1]) / userHZ, nil
}

// agentSetup builds cluster index with two agents (encryption "" or
// "wireguard"), a client pod on the first node and an iperf3 server pod on
// the second, and waits until the client reaches the server.
func agentSetup(ctx context.Context, l *lab.Lab, index int, encryption, tag string) (*wgSetup, error) {
	c, err := l.AddCluster(ctx, index, lab.ClusterOptions{Nodes: 2, Encryption: encryption})
	if err != nil {
		return nil, err
	}
	client, err := c.Agents[0].AddPod(ctx, tag+"-client", "default", map[string]string{"app": "client"})
	if err != nil {
		return nil, err
	}
	server, err := c.Agents[1].AddPod(ctx, tag+"-server", "default", map[string]string{"app": "server"})
	if err != nil {
		return nil, err
	}
	if _, err := server.Start(ctx, "iperf3", "-s"); err != nil {
		return nil, err
	}
	s := &wgSetup{client: client.Netns, server: server.IPv4}
	if encryption != "" {
		for _, ag := range c.Agents {
			wg, err := waitPeer(ctx, ag)
			if err != nil {
				return nil, err
			}
			s.mtu = wg.MTU
			if s.mode != "" && s.mode != wg.Mode {
				return nil, fmt.Errorf("the agents run different WireGuard modes: %s and %s", s.mode, wg.Mode)
			}
			s.mode = wg.Mode
		}
		s.cpuPids = []int{c.Agents[0].Proc.Pid(), c.Agents[1].Proc.Pid()}
		s.sent = func() (int64, error) { return agentSent(ctx, c.Agents[0]) }
	}
	return s, waitPing(ctx, client.Netns, server.IPv4)
}

// wireguardStatus returns the wireguard section of an agent's status.
func wireguardStatus(ctx context.Context, a *lab.Agent) (*api.WireGuardStatus, error) {
	out, err := a.CLI(ctx, "status", "-o", "json")
	if err != nil {
		return nil, err
	}
	var st api.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("agent status: %w", err)
	}
	if st.WireGuard == nil {
		return nil, fmt.Errorf("agent on %s: no wireguard section in its status", a.Node.Name())
	}
	return st.WireGuard, nil
}

// waitPeer waits until the agent's device has a peer (the other node).
func waitPeer(ctx context.Context, a *lab.Agent) (*api.WireGuardStatus, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		wg, err := wireguardStatus(ctx, a)
		if err == nil && len(wg.Peers) > 0 {
			return wg, nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("agent on %s: no WireGuard peer after 60s (status: %+v)", a.Node.Name(), *wg)
			}
			return nil, err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// agentSent sums the tx bytes of the agent's WireGuard peers.
func agentSent(ctx context.Context, a *lab.Agent) (int64, error) {
	wg, err := wireguardStatus(ctx, a)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, p := range wg.Peers {
		n += p.TxBytes
	}
	return n, nil
}

// waitPing pings dst from ns until it answers (handshakes, routes and
// datapath programs settle in the first seconds).
func waitPing(ctx context.Context, ns *lab.Netns, dst netip.Addr) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := ns.Exec(ctx, "ping", "-c", "1", "-W", "1", dst.String())
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not reach %s: %w", ns.Name(), dst, err)
		}
		time.Sleep(200 * time.Millisecond) // ping fails at once while there is no route
	}
}

// version returns the first word after the command's name in its
// --version output ("v0.0.20220316").
func version(ctx context.Context, bin string) string {
	out, _ := exec.CommandContext(ctx, bin, "--version").Output()
	if f := strings.Fields(string(out)); len(f) > 1 {
		return f[1]
	}
	return "(unknown version)"
}

// Addresses of (c) and (d): the nodes' underlay and the pods behind them.
var (
	wgUnderlay = [2]netip.Prefix{netip.MustParsePrefix("10.250.0.11/24"), netip.MustParsePrefix("10.250.0.12/24")}
	wgPodNet   = [2]netip.Prefix{netip.MustParsePrefix("10.251.1.0/24"), netip.MustParsePrefix("10.251.2.0/24")}
)

// routedSetups builds the plain nodes and pods of (c) and (d), starts
// debianBin and standaloneBin in both nodes with devices of mtu, and
// returns the two setups.
func routedSetups(ctx context.Context, l *lab.Lab, mtu int, debianBin, standaloneBin string) (*wgSetup, *wgSetup, error) {
	rtr, err := l.AddRouter("wg-rtr")
	if err != nil {
		return nil, nil, err
	}
	h, err := rtr.Handle()
	if err != nil {
		return nil, nil, err
	}
	defer h.Close()
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}); err != nil {
		return nil, nil, fmt.Errorf("bridge: %w", err)
	}
	br, err := h.LinkByName("br0")
	if err != nil {
		return nil, nil, err
	}
	if err := h.LinkSetUp(br); err != nil {
		return nil, nil, err
	}
	var nodes [2]*lab.Node
	var pods [2]*lab.Netns
	for i := range 2 {
		if nodes[i], err = l.AddNode(fmt.Sprintf("wg-n%d", i+1)); err != nil {
			return nil, nil, err
		}
		lk, err := l.LinkWith(lab.LinkOptions{A: nodes[i], B: rtr, AName: "eth0", BName: fmt.Sprintf("n%d", i+1),
			AAddrs: []netip.Prefix{wgUnderlay[i]}})
		if err != nil {
			return nil, nil, err
		}
		port, err := h.LinkByName(lk.BName)
		if err != nil {
			return nil, nil, err
		}
		if err := h.LinkSetMaster(port, br); err != nil {
			return nil, nil, err
		}
		if pods[i], err = l.AddPodNetns(fmt.Sprintf("wg-p%d", i+1)); err != nil {
			return nil, nil, err
		}
		gw := wgPodNet[i].Addr().Next()
		if _, err := l.LinkWith(lab.LinkOptions{A: pods[i], B: nodes[i], AName: "eth0", BName: "pod", MTU: mtu,
			AAddrs: []netip.Prefix{netip.PrefixFrom(gw.Next(), 24)}, BAddrs: []netip.Prefix{netip.PrefixFrom(gw, 24)}}); err != nil {
			return nil, nil, err
		}
		if err := pods[i].AddRoute(netip.Prefix{}, gw); err != nil {
			return nil, nil, err
		}
	}
	server := wgPodNet[1].Addr().Next().Next()
	if _, err := pods[1].Start(ctx, "iperf3", "-s"); err != nil {
		return nil, nil, err
	}
	var setups [2]*wgSetup
	for k, bin := range []string{debianBin, standaloneBin} {
		s, err := tunnel(ctx, l, nodes, fmt.Sprintf("wg%c", 'c'+k), 51821+k, mtu, bin)
		if err != nil {
			return nil, nil, err
		}
		s.client, s.server = pods[0], server
		if err := s.prepare(); err != nil {
			return nil, nil, err
		}
		if err := waitPing(ctx, pods[0], server); err != nil {
			return nil, nil, err
		}
		setups[k] = s
	}
	return setups[0], setups[1], nil
}

// tunnel runs bin as device <prefix><tag><node> in both nodes, peers the
// two devices over the underlay, and returns a setup whose prepare routes
// each node's traffic to the other node's pods through this tunnel.
func tunnel(ctx context.Context, l *lab.Lab, nodes [2]*lab.Node, tag string, port, mtu int, bin string) (*wgSetup, error) {
	var keys [2]wgtypes.Key
	var devs [2]string
	s := &wgSetup{mtu: mtu}
	for i, n := range nodes {
		var err error
		if keys[i], err = wgtypes.GeneratePrivateKey(); err != nil {
			return nil, err
		}
		if devs[i], err = l.IfName(fmt.Sprintf("%s%d", tag, i+1)); err != nil {
			return nil, err
		}
		p, err := n.Start(ctx, bin, "-f", devs[i])
		if err != nil {
			return nil, err
		}
		s.cpuPids = append(s.cpuPids, p.Pid())
		sock := filepath.Join(lab.WireGuardSockDir, devs[i]+".sock")
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			if p.Exited() || time.Now().After(deadline) {
				return nil, fmt.Errorf("%s %s: no UAPI socket %s: %s", bin, devs[i], sock, p.Log())
			}
		}
	}
	for i, n := range nodes {
		peer := 1 - i
		conf := fmt.Sprintf("[Interface]\nPrivateKey = %s\nListenPort = %d\n\n[Peer]\nPublicKey = %s\nEndpoint = %s:%d\nAllowedIPs = %s\n",
			keys[i], port, keys[peer].PublicKey(), wgUnderlay[peer].Addr(), port, wgPodNet[peer])
		f := filepath.Join(n.Dir(), devs[i]+".conf")
		if err := os.WriteFile(f, []byte(conf), 0o600); err != nil {
			return nil, err
		}
		if _, err := n.Exec(ctx, "wg", "setconf", devs[i], f); err != nil {
			return nil, err
		}
		if _, err := n.Exec(ctx, "ip", "link", "set", "dev", devs[i], "mtu", strconv.Itoa(mtu), "up"); err != nil {
			return nil, err
		}
	}
	s.prepare = func() error {
		for i, n := range nodes {
			if _, err := n.Exec(ctx, "ip", "route", "replace", wgPodNet[1-i].String(), "dev", devs[i]); err != nil {
				return err
			}
		}
		return nil
	}
	s.sent = func() (int64, error) { return wgSent(ctx, nodes[0], devs[0]) }
	return s, nil
}

// wgSent sums the tx bytes of a device's peers (`wg show <dev> transfer`:
// public key, rx, tx per line).
func wgSent(ctx context.Context, n *lab.Node, dev string) (int64, error) {
	out, err := n.Exec(ctx, "wg", "show", dev, "transfer")
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, ln := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(ln)
		if len(f) != 3 {
			return 0, fmt.Errorf("wg show %s transfer: unexpected line %q", dev, ln)
		}
		tx, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("wg show %s transfer: %w", dev, err)
		}
		sum += tx
	}
	return sum, nil
}
