package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// The cluster-mesh stories: two clusters of two nodes, each cluster on its
// own subnet behind a lab router, one isthmus-clustermesh server per
// cluster, connected both ways.

type mesh struct {
	t      *testing.T
	ctx    context.Context
	lab    *lab.Lab
	c1, c2 *lab.Cluster
}

// startMesh builds clusters c1 and c2 with opts and connects them.
func startMesh(t *testing.T, opts lab.ClusterOptions) *mesh {
	t.Helper()
	return startMeshWith(t, opts, opts)
}

// startMeshWith builds c1 with opts and c2 with opts2 and connects them.
func startMeshWith(t *testing.T, opts, opts2 lab.ClusterOptions) *mesh {
	t.Helper()
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	m := &mesh{t: t, ctx: ctx, lab: l}
	var err error
	what := "building cluster c1 (2 nodes) and c2 (2 nodes), each with its own server"
	if opts.Encryption != "" {
		what += ", encryption " + opts.Encryption
	}
	step(t, what)
	if m.c1, err = l.AddCluster(ctx, 1, opts); err != nil {
		t.Fatal(err)
	}
	if m.c2, err = l.AddCluster(ctx, 2, opts2); err != nil {
		t.Fatal(err)
	}
	step(t, "connecting c1 and c2")
	if err := lab.Connect(ctx, m.c1, m.c2); err != nil {
		t.Fatal(err)
	}
	return m
}

func (m *mesh) cli(a *lab.Agent, args ...string) string {
	m.t.Helper()
	out, err := a.CLI(m.ctx, args...)
	if err != nil {
		m.t.Fatal(err)
	}
	return string(out)
}

func (m *mesh) apply(a *lab.Agent, yaml string) {
	m.t.Helper()
	f := filepath.Join(m.lab.Dir(), fmt.Sprintf("apply-%d.yaml", time.Now().UnixNano()))
	if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
		m.t.Fatal(err)
	}
	m.cli(a, "apply", "-f", f)
}

func (m *mesh) pod(a *lab.Agent, name string, labels map[string]string) *lab.Pod {
	m.t.Helper()
	p, err := a.AddPod(m.ctx, name, "default", labels)
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Logf("pod %s on %s %v: %s %s", name, a.Node.Name(), labels, p.IPv4, p.IPv6)
	return p
}

func agentStatus(ctx context.Context, a *lab.Agent) (api.Status, error) {
	var st api.Status
	out, err := a.CLI(ctx, "status", "-o", "json")
	if err != nil {
		return st, err
	}
	err = json.Unmarshal(out, &st)
	return st, err
}

// inIPCache reports whether addr is in the BPF ipcache of the agent's node.
func inIPCache(a *lab.Agent, addr netip.Addr) (bool, error) {
	entries, err := bpf.ReadIPCache(a.Node.PinDir())
	if err != nil {
		return false, err
	}
	_, ok := entries[netip.PrefixFrom(addr, addr.BitLen())]
	return ok, nil
}

// etcdctl runs etcdctl against a cluster's etcd with its root credentials.
func etcdctl(ctx context.Context, c *lab.Cluster, args ...string) (string, error) {
	b := c.Bundle("root")
	full := append([]string{"etcdctl", "--endpoints", strings.TrimPrefix(c.ServerAddr(), "https://"),
		"--cacert", filepath.Join(b, "ca.crt"), "--cert", filepath.Join(b, "client.crt"), "--key", filepath.Join(b, "client.key")}, args...)
	out, err := c.Router.Exec(ctx, full...)
	return string(out), err
}

const globalWeb = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: web
  annotations: {isthmus.io/global: "true", isthmus.io/affinity: %s}
spec:
  vips: [10.96.0.50, "fd00:96::50"]
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: web}
`

// podPath is a connection between pods that the mesh must carry.
type podPath struct {
	from, to *lab.Pod
	what     string
}

// checkPaths connects over TCP (IPv4 and IPv6, each within 30 s) and pings
// along every path.
func (m *mesh) checkPaths(t *testing.T, paths []podPath) {
	t.Helper()
	for _, c := range paths {
		for _, v6 := range []bool{false, true} {
			dst := netip.AddrPortFrom(c.to.Addr(v6), 8080)
			if err := eventually(30*time.Second, func() error { return tcpEcho(c.from.Netns, dst) }); err != nil {
				t.Fatalf("%s over %s: %v", c.what, familyName(v6), err)
			}
		}
		if err := ping(m.ctx, c.from.Netns, c.to.IPv4, 2); err != nil {
			t.Errorf("ping %s: %v", c.what, err)
		}
	}
}

// answers makes n connections to dst from ns and counts who answered.
func answers(ns *lab.Netns, dst netip.AddrPort, n int) (map[string]int, error) {
	got := map[string]int{}
	for i := 0; i < n; i++ {
		name, err := fetchName(ns, dst)
		if err != nil {
			return got, err
		}
		got[name]++
	}
	return got, nil
}

func TestMesh(t *testing.T) {
	m := startMesh(t, lab.ClusterOptions{})
	c1a, c1b := m.c1.Agents[0], m.c1.Agents[1]
	c2a, c2b := m.c2.Agents[0], m.c2.Agents[1]

	s1 := m.pod(c1a, "s1", map[string]string{"app": "server"})
	k1 := m.pod(c1b, "k1", map[string]string{"app": "client"})
	s2 := m.pod(c2a, "s2", map[string]string{"app": "server"})
	k2 := m.pod(c2b, "k2", map[string]string{"app": "client"})
	w1 := m.pod(c1a, "w1", map[string]string{"app": "web"})
	w2 := m.pod(c2b, "w2", map[string]string{"app": "web"})
	for _, p := range []*lab.Pod{s1, s2} {
		serveTCP(t, p.Netns, 8080, echo)
	}
	serveTCP(t, w1.Netns, 8080, sayName("c1-w1"))
	serveTCP(t, w2.Netns, 8080, sayName("c2-w2"))

	t.Run("pod to pod across nodes and clusters", func(t *testing.T) {
		m.checkPaths(t, []podPath{{k1, s1, "c1 node 2 -> c1 node 1"}, {k1, s2, "c1 -> c2"}, {k2, s1, "c2 -> c1"}, {k2, s2, "c2 node 2 -> c2 node 1"}})
	})

	t.Run("global service reaches both clusters; affinity local fails over", func(t *testing.T) {
		m.apply(c1a, fmt.Sprintf(globalWeb, "none"))
		m.apply(c2a, fmt.Sprintf(globalWeb, "none"))
		vip := netip.MustParseAddrPort("10.96.0.50:80")
		if err := eventually(30*time.Second, func() error {
			got, err := answers(k1.Netns, vip, 40)
			if err != nil {
				return err
			}
			if got["c1-w1"] == 0 || got["c2-w2"] == 0 {
				return fmt.Errorf("from c1, 40 connections reached %v; want both clusters' backends", got)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if _, err := fetchName(k1.Netns, netip.MustParseAddrPort("[fd00:96::50]:80")); err != nil {
			t.Fatalf("global service over IPv6: %v", err)
		}
		step(t, "affinity local: c1's clients stay in c1")
		m.apply(c1a, fmt.Sprintf(globalWeb, "local"))
		if err := eventually(10*time.Second, func() error {
			got, err := answers(k1.Netns, vip, 30)
			if err != nil {
				return err
			}
			if got["c2-w2"] > 0 {
				return fmt.Errorf("affinity local: %v", got)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		step(t, "removing c1's backend: traffic moves to c2")
		start := time.Now()
		m.cli(c1a, "endpoint", "del", "w1")
		if err := eventually(10*time.Second, func() error {
			got, err := answers(k1.Netns, vip, 20)
			if err != nil {
				return err
			}
			if got["c2-w2"] != 20 {
				return fmt.Errorf("after removing c1's backend: %v", got)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		t.Logf("traffic moved to c2 within %s", time.Since(start).Round(10*time.Millisecond))
	})

	t.Run("policy admits only cluster c2's clients", func(t *testing.T) {
		m.apply(c1a, `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: server-from-c2}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client, isthmus.io/cluster: c2}}]
      toPorts: [{port: 8080, protocol: TCP}]
`)
		dst := netip.AddrPortFrom(s1.IPv4, 8080)
		if err := eventually(10*time.Second, func() error { return connectTimesOut(k1.Netns, dst, time.Second) }); err != nil {
			t.Fatalf("c1's client must be denied: %v", err)
		}
		if err := tcpEcho(k2.Netns, dst); err != nil {
			t.Fatalf("c2's client must be admitted: %v", err)
		}
		if err := tcpEcho(k2.Netns, netip.AddrPortFrom(s1.IPv6, 8080)); err != nil {
			t.Fatalf("c2's client over IPv6: %v", err)
		}
	})

	t.Run("cluster c2's server down for 10s: c1 keeps forwarding, changes converge", func(t *testing.T) {
		gone := m.pod(c1a, "gone", map[string]string{"app": "gone"})
		if err := eventually(20*time.Second, func() error {
			if ok, err := inIPCache(c2a, gone.IPv4); err != nil || !ok {
				return fmt.Errorf("pod gone (%s) not yet in c2's ipcache (%v)", gone.IPv4, err)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		s := startStream(t, k1.Netns, netip.AddrPortFrom(s2.IPv4, 8080))
		time.Sleep(time.Second)
		step(t, "stopping c2's server")
		if err := m.c2.Server.Kill(); err != nil {
			t.Fatal(err)
		}
		mark := s.echoed.Load()
		outage := time.Now()
		// While it is down, things change on both sides: a pod of c2 goes
		// away (its agent cannot tell etcd yet); in c1 a pod goes away and
		// another arrives.
		m.cli(c2b, "endpoint", "del", "k2")
		m.cli(c1a, "endpoint", "del", "gone")
		fresh := m.pod(c1a, "fresh", map[string]string{"app": "fresh"})
		serveTCP(t, fresh.Netns, 8080, echo)
		time.Sleep(10*time.Second - time.Since(outage))
		if err := s.progressedSince(mark); err != nil {
			t.Fatalf("c1 -> c2 stream stalled while c2's server was down: %v", err)
		}
		step(t, "restarting c2's server")
		if err := m.c2.StartServer(m.ctx); err != nil {
			t.Fatal(err)
		}
		if err := eventually(45*time.Second, func() error {
			if ok, err := inIPCache(c1a, k2.IPv4); err != nil || ok {
				return fmt.Errorf("pod k2 (%s), deleted during the outage, still in c1's ipcache (%v)", k2.IPv4, err)
			}
			if ok, err := inIPCache(c2a, gone.IPv4); err != nil || ok {
				return fmt.Errorf("pod gone (%s), deleted during the outage, still in c2's ipcache (%v)", gone.IPv4, err)
			}
			if ok, err := inIPCache(c2a, fresh.IPv4); err != nil || !ok {
				return fmt.Errorf("pod fresh (%s), created during the outage, not in c2's ipcache (%v)", fresh.IPv4, err)
			}
			return tcpEcho(s2.Netns, netip.AddrPortFrom(fresh.IPv4, 8080))
		}); err != nil {
			t.Fatal(err)
		}
		if err := s.finish(); err != nil {
			t.Fatalf("stream across the outage: %v", err)
		}
	})

	t.Run("a killed agent's records expire from the other cluster", func(t *testing.T) {
		if ok, err := inIPCache(c1b, s2.IPv4); err != nil || !ok {
			t.Fatalf("s2 not in c1's ipcache before the kill (%v)", err)
		}
		if err := c2a.Proc.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := eventually(40*time.Second, func() error {
			if ok, err := inIPCache(c1b, s2.IPv4); err != nil || ok {
				return fmt.Errorf("s2 (%s) of the killed agent still in c1's ipcache (%v)", s2.IPv4, err)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("malformed and wrong-cluster records are rejected and counted", func(t *testing.T) {
		ctx := m.ctx
		bad := map[string]string{
			"isthmus/state/ip/v1/c2/n1/10.2.9.9":    `{"version":1,"prefix":`,
			"isthmus/state/ip/v1/c2/n1/10.2.9.10":   `{"version":1,"prefix":"10.2.9.10/32","identity":2097153,"cluster":"c1"}`,
			"isthmus/state/nodes/v1/c2/intruder-x1": `not json`,
		}
		for k, v := range bad {
			if out, err := etcdctl(ctx, m.c2, "put", k, v); err != nil {
				t.Fatalf("etcdctl put %s: %v %s", k, err, out)
			}
		}
		// A good record written after the bad ones still arrives.
		if err := eventually(20*time.Second, func() error {
			// c1's server refuses them at the mirror: they never reach c1's etcd.
			out, err := m.c1.CLI(ctx, "clustermesh", "status", "-o", "json")
			if err != nil {
				return err
			}
			var ms struct {
				Remotes []struct {
					Cluster string `json:"cluster"`
					Skipped uint64 `json:"skipped"`
				} `json:"remotes"`
			}
			if err := json.Unmarshal(out, &ms); err != nil {
				return err
			}
			if len(ms.Remotes) != 1 || ms.Remotes[0].Cluster != "c2" || ms.Remotes[0].Skipped < uint64(len(bad)) {
				return fmt.Errorf("c1's mirror of c2 skipped fewer than %d records: %s", len(bad), out)
			}
			// c2's own agents read them from their etcd and skip them.
			st2, err := agentStatus(ctx, c2b)
			if err != nil {
				return err
			}
			if st2.ClusterMesh == nil || st2.ClusterMesh.InvalidRecords == 0 {
				return fmt.Errorf("c2 agent counted no invalid records yet")
			}
			return nil
		}); err != nil {
			out, _ := m.c1.CLI(ctx, "clustermesh", "status")
			t.Fatalf("%v\nclustermesh status of c1:\n%s", err, out)
		}
		// The agents kept running and keep forwarding.
		if _, err := fetchName(k1.Netns, netip.AddrPortFrom(w2.IPv4, 8080)); err != nil {
			t.Fatalf("c1 -> c2 after the bad records: %v", err)
		}
	})
}

// A cluster with the ID of a connected one is refused, with a clear error,
// and the mesh keeps working.
func TestMeshRefusesDuplicateClusterID(t *testing.T) {
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c1, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 1})
	if err != nil {
		t.Fatal(err)
	}
	dup, err := l.AddCluster(ctx, 3, lab.ClusterOptions{Name: "c3", ID: 1, Nodes: 1})
	if err != nil {
		t.Fatal(err)
	}
	err = lab.Connect(ctx, c1, dup)
	if err == nil {
		t.Fatal("connecting two clusters with cluster ID 1 succeeded")
	}
	if !strings.Contains(err.Error(), "ID") {
		t.Fatalf("error does not name the conflict: %v", err)
	}
	t.Logf("refused as expected: %v", err)
}
