package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

const (
	torASN  = 65000
	nodeASN = 65010
)

// bgpLab is a cluster of two nodes whose router runs BIRD as the
// top-of-rack router, peered with both nodes over IPv4 and IPv6, and
// without static pod-CIDR routes: BGP supplies them.
type bgpLab struct {
	ctx  context.Context
	c    *lab.Cluster
	bird *lab.BIRD
}

func newBGPLab(t *testing.T) *bgpLab {
	labtest.SkipUnlessRoot(t)
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	step(t, "building a cluster of two nodes (labels rack=r1), no static pod routes on its router")
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 2, NoStaticPodRoutes: true, AgentArgs: []string{"--node-labels", "rack=r1"}})
	if err != nil {
		t.Fatal(err)
	}
	return &bgpLab{ctx: ctx, c: c, bird: startTOR(t, ctx, c)}
}

// startTOR starts BIRD in c's router as its top-of-rack router, peered
// with every node of c over IPv4 and IPv6 (AS nodeASN); on failure the
// test logs BIRD's protocols, routes and log.
func startTOR(t *testing.T, ctx context.Context, c *lab.Cluster) *lab.BIRD {
	t.Helper()
	step(t, "starting BIRD in the router of %s, peered with its %d nodes over IPv4 and IPv6", c.Name, len(c.Agents))
	var ns []lab.BIRDNeighbor
	for j := 1; j <= len(c.Agents); j++ {
		for _, a := range c.NodeIPs(j) {
			ns = append(ns, lab.BIRDNeighbor{Address: a, ASN: nodeASN})
		}
	}
	b, err := c.Router.StartBIRD(ctx, lab.BIRDOptions{RouterID: c.RouterIPs()[0], ASN: torASN, Neighbors: ns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := b.Birdc(context.Background(), "show", "protocols")
			routes, _ := b.Routes(context.Background())
			t.Logf("bird protocols:\n%s\nbird routes:\n%s\nbird log:\n%s", out, lab.Tail(routes, 4000), lab.Tail(b.Log(), 4000))
		}
	})
	return b
}

func (b *bgpLab) policy(passwordFile string) string {
	return b.policyWith(passwordFile, `    - type: PodCIDR
    - type: ExternalIP
      selector: {matchLabels: {bgp: announce}}
      communities: ["65010:100"]
`)
}

// policyWith is the BGPPeeringPolicy "tor" of the nodes labelled rack=r1:
// both of the router's addresses as neighbours (graceful restart, 60 s),
// the IPv4 one with the password file if any, and the given
// advertisements (YAML list items indented by four spaces).
func (b *bgpLab) policyWith(passwordFile, advertisements string) string {
	r4, r6 := b.c.RouterIPs()[0], b.c.RouterIPs()[1]
	pw := ""
	if passwordFile != "" {
		pw = "\n      passwordFile: " + passwordFile
	}
	return fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata:
  name: tor
spec:
  nodeSelector: {matchLabels: {rack: r1}}
  localASN: %d
  neighbors:
    - address: %s
      peerASN: %d
      timers: {holdTimeSeconds: 9, keepaliveTimeSeconds: 3, connectRetryTimeSeconds: 1}
      gracefulRestart: {enabled: true, restartTimeSeconds: 60}%s
    - address: "%s"
      peerASN: %d
      timers: {holdTimeSeconds: 9, keepaliveTimeSeconds: 3, connectRetryTimeSeconds: 1}
      gracefulRestart: {enabled: true, restartTimeSeconds: 60}
  advertisements:
%s`, nodeASN, r4, torASN, pw, r6, torASN, advertisements)
}

func (b *bgpLab) apply(t *testing.T, a *lab.Agent, yaml string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "obj.yaml")
	if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := a.CLI(b.ctx, "apply", "-f", f); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
}

func (b *bgpLab) peers(t *testing.T, a *lab.Agent) api.BGPStatus {
	t.Helper()
	out, err := a.CLI(b.ctx, "bgp", "peers", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st api.BGPStatus
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("isthmus bgp peers -o json: %v\n%s", err, out)
	}
	return st
}

// waitRoute waits until the router's kernel table routes dst through
// exactly gws (nil: no route).
func (b *bgpLab) waitRoute(t *testing.T, dst netip.Prefix, gws []netip.Addr, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	var last lab.KernelRoute
	for {
		r, ok, err := b.c.Router.KernelRoute(dst)
		if err != nil {
			t.Fatal(err)
		}
		last = r
		if (gws == nil && !ok) || (gws != nil && ok && slices.Equal(r.Gateways, gws)) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("router's kernel table: %s not via %v within %v (have %v, present %v)", dst, gws, within, last.Gateways, ok)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// watchRoute polls the router's kernel table every 10 ms until the
// returned stop is called; stop returns "" when dst was routed through
// exactly gws at every look, or the first moment it was not.
func (b *bgpLab) watchRoute(dst netip.Prefix, gws []netip.Addr) (stop func() string) {
	done := make(chan struct{})
	broken := make(chan string, 1)
	go func() {
		defer close(broken)
		for {
			select {
			case <-done:
				return
			default:
			}
			r, ok, err := b.c.Router.KernelRoute(dst)
			if err != nil || !ok || !slices.Equal(r.Gateways, gws) {
				broken <- fmt.Sprintf("at %s: %s via %v, present %v, err %v", time.Now().Format(time.StampMilli), dst, r.Gateways, ok, err)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return func() string {
		close(done)
		return <-broken // "" once closed without a message
	}
}

// killAndRestart SIGKILLs the agent of node j (from 1), starts it again,
// waits until BIRD has its IPv4 session with the node established again
// and then two more seconds: past the End-of-RIB, when BIRD would drop
// the routes the restarted speaker did not send again.
func (b *bgpLab) killAndRestart(t *testing.T, a *lab.Agent, j int) {
	t.Helper()
	if err := a.Proc.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.Proc.Done()
	if err := a.Start(b.ctx); err != nil {
		t.Fatal(err)
	}
	nb := b.c.NodeIPs(j)[0]
	if err := eventually(30*time.Second, func() error {
		p, err := b.bird.Protocol(b.ctx, nb)
		if err != nil || p.Info != "Established" {
			return fmt.Errorf("%+v %v", p, err)
		}
		return nil
	}); err != nil {
		t.Fatalf("the restarted agent of %s did not re-establish: %v", a.Node.Name(), err)
	}
	time.Sleep(2 * time.Second)
}

// waitSessions waits until every node's speaker has both sessions
// established (its own view and BIRD's) and each node's pod CIDRs are in
// the router's kernel table via the node.
func (b *bgpLab) waitSessions(t *testing.T) {
	t.Helper()
	c := b.c
	for _, a := range c.Agents {
		if err := eventually(30*time.Second, func() error {
			st := b.peers(t, a)
			if len(st.Peers) != 2 {
				return fmt.Errorf("peers: %+v", st)
			}
			for _, p := range st.Peers {
				if p.State != "established" {
					return fmt.Errorf("%s: %s (%s)", p.Address, p.State, p.LastError)
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("%s: sessions not established: %v", a.Node.Name(), err)
		}
	}
	for _, nb := range b.bird.Options().Neighbors {
		p, err := b.bird.Protocol(b.ctx, nb.Address)
		if err != nil || p.Info != "Established" {
			t.Fatalf("BIRD's session with %s: %+v %v", nb.Address, p, err)
		}
	}

	for j := 1; j <= len(c.Agents); j++ {
		for i, pfx := range c.NodePodCIDRs(j) {
			b.waitRoute(t, pfx, []netip.Addr{c.NodeIPs(j)[i]}, 10*time.Second)
		}
	}
}

func bgpService(name, policy string, labels map[string]string, externalIPs ...string) string {
	var l []string
	for k, v := range labels {
		l = append(l, k+": "+v)
	}
	tp := ""
	if policy != "" {
		tp = "\n  externalTrafficPolicy: " + policy
	}
	return fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: %s
  labels: {%s}
spec:
  vips: [10.96.9.%d]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: %s}
  externalIPs: ["%s"]%s
`, name, strings.Join(l, ", "), len(name)+int(name[0]), name, strings.Join(externalIPs, `", "`), tp)
}

func TestBGPTopOfRack(t *testing.T) {
	b := newBGPLab(t)
	c := b.c
	n1, n2 := c.Agents[0], c.Agents[1]
	gw4 := []netip.Addr{c.NodeIPs(1)[0], c.NodeIPs(2)[0]}
	gw6 := []netip.Addr{c.NodeIPs(1)[1], c.NodeIPs(2)[1]}

	step(t, "apply a BGPPeeringPolicy: both nodes peer with BIRD over IPv4 and IPv6")
	b.apply(t, n1, b.policy(""))
	b.waitSessions(t)

	ext4, ext6 := netip.MustParsePrefix("192.0.2.10/32"), netip.MustParsePrefix("2001:db8::10/128")
	step(t, "apply a service with externalIPs %s and %s: ECMP across both nodes", ext4.Addr(), ext6.Addr())
	web := bgpService("web", "", map[string]string{"bgp": "announce"}, ext4.Addr().String(), ext6.Addr().String())
	b.apply(t, n1, web)
	b.waitRoute(t, ext4, gw4, 5*time.Second)
	b.waitRoute(t, ext6, gw6, 5*time.Second)
	out, _ := b.bird.Birdc(b.ctx, "show", "route", "all", ext4.String())
	if !strings.Contains(out, "(65010,100)") {
		t.Errorf("BIRD's route lacks community 65010:100:\n%s", out)
	}
	routes, err := n1.CLI(b.ctx, "bgp", "routes")
	if err != nil || !strings.Contains(string(routes), "ExternalIP default/web") {
		t.Errorf("isthmus bgp routes does not name the service: %v\n%s", err, routes)
	}

	step(t, "a service not selected by the advertisement is not announced")
	b.apply(t, n1, bgpService("quiet", "", map[string]string{"bgp": "skip"}, "192.0.2.30"))
	time.Sleep(500 * time.Millisecond)
	if _, ok, _ := c.Router.KernelRoute(netip.MustParsePrefix("192.0.2.30/32")); ok {
		t.Error("192.0.2.30 is announced although the advertisement's selector does not pick its service")
	}

	step(t, "delete the service: withdrawn within a second")
	start := time.Now()
	if _, err := n1.CLI(b.ctx, "delete", "service", "web"); err != nil {
		t.Fatal(err)
	}
	b.waitRoute(t, ext4, nil, time.Second-time.Since(start))
	b.waitRoute(t, ext6, nil, time.Second-time.Since(start))
	t.Logf("withdrawn %v after the delete started", time.Since(start).Round(time.Millisecond))

	step(t, "re-apply, SIGKILL the agent of node 1 and restart it: the route never leaves the router")
	b.apply(t, n1, web)
	b.waitRoute(t, ext4, gw4, 5*time.Second)
	stop := b.watchRoute(ext4, gw4)
	b.killAndRestart(t, n1, 1)
	if msg := stop(); msg != "" {
		t.Fatalf("the route changed while the agent restarted: %s", msg)
	}
	nb1 := c.NodeIPs(1)[0]
	if d, _ := b.bird.ProtocolDetails(b.ctx, nb1); !strings.Contains(d, "Established") {
		t.Fatalf("BIRD's session with node 1:\n%s", d)
	}

	step(t, "externalTrafficPolicy Local: only nodes with a ready local backend announce")
	ext20 := netip.MustParsePrefix("192.0.2.20/32")
	b.apply(t, n1, bgpService("local", "Local", map[string]string{"bgp": "announce"}, ext20.Addr().String()))
	time.Sleep(500 * time.Millisecond)
	if _, ok, _ := c.Router.KernelRoute(ext20); ok {
		t.Fatal("a Local service without backends is announced")
	}
	if _, err := n2.AddPod(b.ctx, "local-1", "default", map[string]string{"app": "local"}); err != nil {
		t.Fatal(err)
	}
	b.waitRoute(t, ext20, gw4[1:], 5*time.Second)
	if _, err := n1.AddPod(b.ctx, "local-2", "default", map[string]string{"app": "local"}); err != nil {
		t.Fatal(err)
	}
	b.waitRoute(t, ext20, gw4, 5*time.Second)
	if _, err := n2.CLI(b.ctx, "endpoint", "del", "local-1"); err != nil {
		t.Fatal(err)
	}
	b.waitRoute(t, ext20, gw4[:1], 5*time.Second)

	step(t, "TCP MD5: BIRD wants a password on the IPv4 sessions; the right one works, a wrong one is reported")
	dir := t.TempDir()
	good, bad := filepath.Join(dir, "good"), filepath.Join(dir, "bad")
	if err := os.WriteFile(good, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte("wrong"), 0o600); err != nil {
		t.Fatal(err)
	}
	o := b.bird.Options()
	for i := range o.Neighbors {
		if o.Neighbors[i].Address.Is4() {
			o.Neighbors[i].Password = "s3cret"
		}
	}
	if err := b.bird.Reconfigure(b.ctx, o); err != nil {
		t.Fatal(err)
	}
	b.apply(t, n1, b.policy(good))
	if err := eventually(30*time.Second, func() error {
		for _, nb := range o.Neighbors {
			if p, err := b.bird.Protocol(b.ctx, nb.Address); err != nil || p.Info != "Established" {
				return fmt.Errorf("%s: %+v %v", nb.Address, p, err)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("MD5 sessions: %v", err)
	}
	b.waitRoute(t, c.NodePodCIDRs(1)[0], gw4[:1], 10*time.Second)
	b.apply(t, n1, b.policy(bad))
	if err := eventually(30*time.Second, func() error {
		for _, p := range b.peers(t, n2).Peers {
			if p.Address.Is4() && p.State != "established" && strings.Contains(p.LastError, "MD5") {
				return nil
			}
		}
		return fmt.Errorf("%+v", b.peers(t, n2).Peers)
	}); err != nil {
		t.Fatalf("a wrong password is not reported in isthmus bgp peers: %v", err)
	}
	peersOut, _ := n2.CLI(b.ctx, "bgp", "peers")
	t.Logf("isthmus bgp peers on node 2 with a wrong password:\n%s", peersOut)

	step(t, "a missing password file is reported, and removing the policy withdraws everything")
	b.apply(t, n1, b.policy(filepath.Join(dir, "missing")))
	if err := eventually(10*time.Second, func() error {
		for _, p := range b.peers(t, n1).Peers {
			if p.Address.Is4() && strings.Contains(p.LastError, "password file") && strings.Contains(p.LastError, "no such file") {
				return nil
			}
		}
		return fmt.Errorf("%+v", b.peers(t, n1).Peers)
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := n1.CLI(b.ctx, "delete", "bgppeeringpolicy", "tor"); err != nil {
		t.Fatal(err)
	}
	b.waitRoute(t, ext6, nil, 2*time.Second)
	b.waitRoute(t, c.NodePodCIDRs(2)[1], nil, 2*time.Second)
}
