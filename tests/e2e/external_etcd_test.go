package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// One cluster whose isthmus-clustermesh runs against an external 3-member
// etcd cluster (Debian's etcd-server, mutual TLS, certificate auth) instead
// of its embedded etcd. SIGKILL of the etcd leader loses nothing: what
// existed stays (in etcd, in the agents, in the datapath, and flows keep
// going), and what is changed afterwards through the CLI is written and
// converges on the other node.

const freshService = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: fresh
spec:
  vips: [10.96.0.60, "fd00:96::60"]
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: fresh}
`

// etcdKeys maps the keys of the cluster's etcd to the revision that created
// them: a key deleted and written again (a lost lease, a flushed record)
// has a new one.
type etcdKeys map[string]int64

// isthmusKeys lists every key under isthmus/ through the running members.
func isthmusKeys(ctx context.Context, e *lab.EtcdCluster) (etcdKeys, error) {
	out, err := e.Ctl(ctx, nil, "get", records.Root, "--prefix", "--keys-only", "-w", "json")
	if err != nil {
		return nil, err
	}
	var resp struct {
		KVs []struct {
			Key            string `json:"key"`
			CreateRevision int64  `json:"create_revision"`
		} `json:"kvs"`
	}
	if err := json.Unmarshal(out, &resp); err != nil {
		return nil, fmt.Errorf("etcdctl get -w json: %w: %.500s", err, out)
	}
	keys := etcdKeys{}
	for _, kv := range resp.KVs {
		k, err := base64.StdEncoding.DecodeString(kv.Key)
		if err != nil {
			return nil, err
		}
		keys[string(k)] = kv.CreateRevision
	}
	return keys, nil
}

// meshState is what the CLI shows of the cluster, per agent.
type meshState struct {
	services  []map[string]json.RawMessage // per agent: name -> object
	policies  []string
	endpoints []map[string]api.Endpoint // per agent: ns/name -> endpoint
}

func readMeshState(ctx context.Context, agents []*lab.Agent) (meshState, error) {
	var s meshState
	for _, a := range agents {
		out, err := a.CLI(ctx, "get", "services", "-o", "json")
		if err != nil {
			return s, err
		}
		var objs []json.RawMessage
		if err := json.Unmarshal(out, &objs); err != nil {
			return s, fmt.Errorf("get services -o json: %w: %s", err, out)
		}
		svcs := map[string]json.RawMessage{}
		for _, o := range objs {
			var meta struct {
				Metadata struct{ Namespace, Name string } `json:"metadata"`
			}
			if err := json.Unmarshal(o, &meta); err != nil {
				return s, err
			}
			svcs[meta.Metadata.Namespace+"/"+meta.Metadata.Name] = o
		}
		s.services = append(s.services, svcs)
		out, err = a.CLI(ctx, "get", "policies", "-o", "json")
		if err != nil {
			return s, err
		}
		s.policies = append(s.policies, string(out))
		out, err = a.CLI(ctx, "endpoint", "list", "-o", "json")
		if err != nil {
			return s, err
		}
		var eps []api.Endpoint
		if err := json.Unmarshal(out, &eps); err != nil {
			return s, fmt.Errorf("endpoint list -o json: %w: %s", err, out)
		}
		m := map[string]api.Endpoint{}
		for _, e := range eps {
			m[e.Namespace+"/"+e.Name] = e
		}
		s.endpoints = append(s.endpoints, m)
	}
	return s, nil
}

// ipcacheWatch samples the BPF ipcache of agents until stopped and
// remembers every address that was missing from a node that had it.
type ipcacheWatch struct {
	once    sync.Once
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	missing []string
	samples int
}

func watchIPCache(watch map[*lab.Agent][]netip.Addr) *ipcacheWatch {
	w := &ipcacheWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			for a, addrs := range watch {
				for _, ip := range addrs {
					ok, err := inIPCache(a, ip)
					if err != nil || !ok {
						w.mu.Lock()
						if len(w.missing) < 20 {
							w.missing = append(w.missing, fmt.Sprintf("%s missing from %s at %s (%v)", ip, a.Node.Name(), time.Now().Format("15:04:05.000"), err))
						}
						w.mu.Unlock()
					}
				}
			}
			w.mu.Lock()
			w.samples++
			w.mu.Unlock()
			select {
			case <-w.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return w
}

func (w *ipcacheWatch) finish() (samples int, missing []string) {
	w.once.Do(func() { close(w.stop) })
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.samples, w.missing
}

func TestExternalEtcdSurvivesMemberLoss(t *testing.T) {
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	start := time.Now()

	step(t, "external etcd of 3 members (mutual TLS, certificate auth); cluster c1's server on it; 2 nodes")
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{ExternalEtcd: 3})
	if err != nil {
		t.Fatal(err)
	}
	e := c.Etcd
	if out, err := c.CLI(ctx, "clustermesh", "status"); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("clustermesh status:\n%s", out)
	}
	m := &mesh{t: t, ctx: ctx, lab: l, c1: c}
	a1, a2 := c.Agents[0], c.Agents[1]
	agents := []*lab.Agent{a1, a2}
	for _, a := range agents {
		st, err := agentStatus(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		if st.ClusterMesh == nil || len(st.ClusterMesh.KVStoreEndpoints) != 3 {
			t.Fatalf("agent on %s does not use all 3 etcd members: %+v", a.Node.Name(), st.ClusterMesh)
		}
	}

	server := m.pod(a1, "server", map[string]string{"app": "server"})
	web1 := m.pod(a1, "web-1", map[string]string{"app": "web"})
	client := m.pod(a2, "client", map[string]string{"app": "client"})
	other := m.pod(a2, "other", map[string]string{"app": "other"})
	web2 := m.pod(a2, "web-2", map[string]string{"app": "web"})
	gone := m.pod(a2, "gone", map[string]string{"app": "gone"})
	serveTCP(t, server.Netns, 8080, echo)
	serveTCP(t, gone.Netns, 8080, echo)
	serveTCP(t, web1.Netns, 8080, sayName("web-1"))
	serveTCP(t, web2.Netns, 8080, sayName("web-2"))
	onNode := map[*lab.Agent][]*lab.Pod{a1: {server, web1}, a2: {client, other, web2, gone}}
	peer := map[*lab.Agent]*lab.Agent{a1: a2, a2: a1}

	step(t, "every pod is in the other node's ipcache; pods talk across nodes (IPv4 and IPv6)")
	if err := eventually(20*time.Second, func() error {
		for a, pods := range onNode {
			for _, p := range pods {
				for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
					if ok, err := inIPCache(peer[a], ip); err != nil || !ok {
						return fmt.Errorf("%s (%s) not in the ipcache of %s (%v)", p.PodName, ip, peer[a].Node.Name(), err)
					}
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, v6 := range []bool{false, true} {
		for _, c := range []struct{ from, to *lab.Pod }{{client, server}, {server, gone}} {
			dst := netip.AddrPortFrom(c.to.Addr(v6), 8080)
			if err := eventually(10*time.Second, func() error { return tcpEcho(c.from.Netns, dst) }); err != nil {
				t.Fatalf("%s -> %s over %s: %v", c.from.PodName, c.to.PodName, familyName(v6), err)
			}
		}
	}

	step(t, "Service web (backends on both nodes) and NetworkPolicy server-from-client, applied with the CLI")
	m.apply(a1, webService)
	m.apply(a2, serverPolicy)
	vip4 := netip.AddrPortFrom(webVIP4, 80)
	vip6 := netip.AddrPortFrom(webVIP6, 80)
	if err := eventually(10*time.Second, func() error {
		got, err := answers(client.Netns, vip4, 30)
		if err != nil {
			return err
		}
		if got["web-1"] == 0 || got["web-2"] == 0 {
			return fmt.Errorf("30 connections to %s reached %v, want both backends", vip4, got)
		}
		_, err = fetchName(client.Netns, vip6)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := eventually(5*time.Second, func() error { return connectTimesOut(other.Netns, netip.AddrPortFrom(server.IPv4, 8080), deniedDial) }); err != nil {
		t.Fatalf("policy: app=other must be denied: %v", err)
	}
	for _, v6 := range []bool{false, true} {
		if err := tcpEcho(client.Netns, netip.AddrPortFrom(server.Addr(v6), 8080)); err != nil {
			t.Fatalf("policy: app=client must be admitted over %s: %v", familyName(v6), err)
		}
	}

	step(t, "recording the state before the fault: CLI views of both agents and the etcd keys under %s", records.Root)
	var keysBefore etcdKeys
	// Settle: the server's service syncer and the identity references
	// write after the apply returns; wait for two equal reads.
	if err := eventually(10*time.Second, func() error {
		k1, err := isthmusKeys(ctx, e)
		if err != nil {
			return err
		}
		time.Sleep(500 * time.Millisecond)
		k2, err := isthmusKeys(ctx, e)
		if err != nil {
			return err
		}
		if !maps.Equal(k1, k2) {
			return fmt.Errorf("keys under %s still changing: %d then %d", records.Root, len(k1), len(k2))
		}
		keysBefore = k2
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	before, err := readMeshState(ctx, agents)
	if err != nil {
		t.Fatal(err)
	}
	goneEP, ok := before.endpoints[1]["default/gone"]
	if !ok {
		t.Fatalf("endpoint list of %s has no gone", a2.Node.Name())
	}
	t.Logf("%d keys under %s; %d services, %d+%d endpoints", len(keysBefore), records.Root, len(before.services[0]), len(before.endpoints[0]), len(before.endpoints[1]))

	// Across the fault: a flow from node 2 to node 1, and the ipcache of
	// both nodes sampled for every pod that stays.
	stream := startStream(t, client.Netns, netip.AddrPortFrom(server.IPv4, 8080))
	watch := map[*lab.Agent][]netip.Addr{}
	for a, pods := range onNode {
		for _, p := range pods {
			if p != gone {
				watch[peer[a]] = append(watch[peer[a]], p.IPv4, p.IPv6)
			}
		}
	}
	w := watchIPCache(watch)
	t.Cleanup(func() { w.finish() })
	time.Sleep(500 * time.Millisecond)

	// The worst member to lose: the raft leader, and the first endpoint
	// every client (server, agents, CLI) lists.
	victim := e.Members[0]
	if err := e.MoveLeader(ctx, victim); err != nil {
		t.Fatal(err)
	}
	if leader, err := e.Leader(ctx); err != nil || leader != victim {
		t.Fatalf("etcd leader is %v (%v), want %s", leader, err, victim.Name)
	}
	step(t, "SIGKILL of etcd member %s (%s): the leader, and the first of the endpoints every client lists", victim.Name, victim.IP)
	killed := time.Now()
	if err := victim.Kill(); err != nil {
		t.Fatal(err)
	}
	stream.event("etcd leader killed")

	t.Run("changes through the CLI converge and nothing is lost", func(t *testing.T) {
		m := &mesh{t: t, ctx: ctx, lab: l, c1: c}
		step(t, "with 2 of 3 members: a new Service, a new pod, a pod deleted, all through the CLI")
		timed := func(what string, f func()) {
			t0 := time.Now()
			f()
			t.Logf("%s: done in %v", what, time.Since(t0).Round(time.Millisecond))
		}
		timed("apply Service fresh on "+a2.Node.Name(), func() { m.apply(a2, freshService) })
		var fresh *lab.Pod
		timed("endpoint add fresh on "+a1.Node.Name(), func() { fresh = m.pod(a1, "fresh", map[string]string{"app": "fresh"}) })
		serveTCP(t, fresh.Netns, 8080, sayName("fresh"))
		timed("endpoint del gone on "+a2.Node.Name(), func() { m.cli(a2, "endpoint", "del", "gone") })
		if newLeader, err := e.Leader(ctx); err != nil {
			t.Errorf("the remaining members have no leader: %v", err)
		} else {
			t.Logf("new etcd leader: %s, %v after the kill", newLeader.Name, time.Since(killed).Round(time.Millisecond))
		}

		step(t, "the changes converge on the other node (ipcache, connectivity, service)")
		if err := eventually(20*time.Second, func() error {
			for _, ip := range []netip.Addr{fresh.IPv4, fresh.IPv6} {
				if ok, err := inIPCache(a2, ip); err != nil || !ok {
					return fmt.Errorf("new pod fresh (%s) not in the ipcache of %s (%v)", ip, a2.Node.Name(), err)
				}
			}
			for _, ip := range []netip.Addr{gone.IPv4, gone.IPv6} {
				if ok, err := inIPCache(a1, ip); err != nil || ok {
					return fmt.Errorf("deleted pod gone (%s) still in the ipcache of %s (%v)", ip, a1.Node.Name(), err)
				}
			}
			for _, dst := range []string{
				netip.AddrPortFrom(fresh.IPv4, 8080).String(), netip.AddrPortFrom(fresh.IPv6, 8080).String(), // the pod
				"10.96.0.60:80", "[fd00:96::60]:80", // Service fresh
			} {
				name, err := fetchName(client.Netns, netip.MustParseAddrPort(dst))
				if err != nil {
					return fmt.Errorf("client -> %s: %w", dst, err)
				}
				if name != "fresh" {
					return fmt.Errorf("client -> %s answered by %q, want fresh", dst, name)
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		t.Logf("converged %v after the kill", time.Since(killed).Round(time.Millisecond))

		step(t, "nothing that existed before is lost")
		samples, missing := w.finish()
		if len(missing) > 0 {
			t.Errorf("pods that stayed went missing from a node's BPF ipcache (%d samples):\n  %s", samples, strings.Join(missing, "\n  "))
		}
		if err := stream.finish(); err != nil {
			t.Errorf("flow client -> server across the kill: %v [%s]", err, stream.report())
		} else {
			t.Logf("flow across the kill: %s", stream.report())
		}
		// The old things still work.
		if err := eventually(5*time.Second, func() error {
			got, err := answers(client.Netns, vip4, 20)
			if err == nil && (got["web-1"] == 0 || got["web-2"] == 0) {
				err = fmt.Errorf("Service web after the kill: %v, want both backends", got)
			}
			return err
		}); err != nil {
			t.Error(err)
		}
		if err := connectTimesOut(other.Netns, netip.AddrPortFrom(server.IPv4, 8080), deniedDial); err != nil {
			t.Errorf("policy after the kill: %v", err)
		}

		after, err := readMeshState(ctx, agents)
		if err != nil {
			t.Fatal(err)
		}
		freshEP, ok := after.endpoints[0]["default/fresh"]
		if !ok {
			t.Fatalf("endpoint list of %s has no fresh", a1.Node.Name())
		}
		for i, a := range agents {
			for k, o := range before.services[i] {
				if got, ok := after.services[i][k]; !ok || string(got) != string(o) {
					t.Errorf("%s: `get services` lost or changed %s:\nbefore %s\nafter  %s", a.Node.Name(), k, o, got)
				}
			}
			if _, ok := after.services[i]["default/fresh"]; !ok || len(after.services[i]) != len(before.services[i])+1 {
				t.Errorf("%s: `get services` after: %v, want those before plus default/fresh", a.Node.Name(), slices.Sorted(maps.Keys(after.services[i])))
			}
			if after.policies[i] != before.policies[i] {
				t.Errorf("%s: `get policies` changed:\nbefore %s\nafter  %s", a.Node.Name(), before.policies[i], after.policies[i])
			}
			want := maps.Clone(before.endpoints[i])
			if a == a1 {
				want["default/fresh"] = freshEP
			} else {
				delete(want, "default/gone")
			}
			if got, w := fmt.Sprint(endpointSummary(after.endpoints[i])), fmt.Sprint(endpointSummary(want)); got != w {
				t.Errorf("%s: `endpoint list`:\ngot  %s\nwant %s", a.Node.Name(), got, w)
			}
		}

		// etcd, read through the two remaining members: the same keys, each
		// with its original create revision (never deleted and re-written),
		// except for the intended changes.
		keysAfter, err := isthmusKeys(ctx, e)
		if err != nil {
			t.Fatal(err)
		}
		ipKeys := func(p *lab.Pod) []string {
			return []string{records.IPCacheKey(c.Name, p.Node, netip.PrefixFrom(p.IPv4, 32)), records.IPCacheKey(c.Name, p.Node, netip.PrefixFrom(p.IPv6, 128))}
		}
		identityOf := func(k string, ep api.Endpoint, app string) bool {
			return k == records.IdentityIDKey(ep.Identity) ||
				(strings.HasPrefix(k, "isthmus/state/identities/") && strings.Contains(k, "app="+app))
		}
		mayAdd := func(k string) bool {
			return slices.Contains(ipKeys(fresh), k) || identityOf(k, freshEP, "fresh") ||
				k == "isthmus/config/Service/default/fresh" || k == records.ServiceKey(c.Name, "default", "fresh")
		}
		mayRemove := func(k string) bool { return slices.Contains(ipKeys(gone), k) || identityOf(k, goneEP, "gone") }
		var added, removed, recreated []string
		for k, rev := range keysAfter {
			if old, ok := keysBefore[k]; !ok {
				added = append(added, k)
				if !mayAdd(k) {
					t.Errorf("etcd: unexpected new key %s", k)
				}
			} else if old != rev {
				recreated = append(recreated, k)
				t.Errorf("etcd: key %s was deleted and written again (create revision %d, before %d)", k, rev, old)
			}
		}
		for k := range keysBefore {
			if _, ok := keysAfter[k]; !ok {
				removed = append(removed, k)
				if !mayRemove(k) {
					t.Errorf("etcd: key %s is lost", k)
				}
			}
		}
		for _, k := range append(ipKeys(fresh), "isthmus/config/Service/default/fresh") {
			if _, ok := keysAfter[k]; !ok {
				t.Errorf("etcd: %s missing", k)
			}
		}
		for _, k := range ipKeys(gone) {
			if _, ok := keysAfter[k]; ok {
				t.Errorf("etcd: %s of the deleted pod is still there", k)
			}
		}
		slices.Sort(added)
		slices.Sort(removed)
		t.Logf("etcd keys under %s: %d before, %d after; added %v; removed %v; re-created %d",
			records.Root, len(keysBefore), len(keysAfter), added, removed, len(recreated))
	})

	// A cluster with a member down must stay operable, also for clients
	// that connect afresh: each is given all three endpoints, the first of
	// them dead.
	t.Run("with the member down, the CLI, a restarted server and a restarted agent connect", func(t *testing.T) {
		step(t, "with %s still down: the CLI, a restarted server and a restarted agent connect through the other members", victim.Name)
		if out, err := c.CLI(ctx, "clustermesh", "status"); err != nil {
			t.Errorf("`isthmus clustermesh status` with %s down: %v", victim.Name, err)
		} else {
			t.Logf("clustermesh status with %s down:\n%s", victim.Name, out)
		}
		if err := c.Server.Stop(); err != nil {
			t.Error(err)
		}
		t0 := time.Now()
		if err := c.StartServer(ctx); err != nil {
			t.Errorf("isthmus-clustermesh restarted with %s down: %v", victim.Name, err)
		} else {
			t.Logf("isthmus-clustermesh restarted and answering in %v", time.Since(t0).Round(time.Millisecond))
		}
		if err := a2.Proc.Stop(); err != nil {
			t.Error(err)
		}
		t0 = time.Now()
		if err := a2.Start(ctx); err != nil {
			t.Fatal(err)
		}
		// Within the lease TTL (10 s): otherwise the records of its pods expire
		// from etcd and from the other node.
		if err := eventually(8*time.Second, func() error {
			st, err := agentStatus(ctx, a2)
			if err != nil {
				return err
			}
			if cm := st.ClusterMesh; cm == nil || !cm.Connected || !cm.Published {
				return fmt.Errorf("agent on %s restarted with %s down: not connected and published after %v: %+v",
					a2.Node.Name(), victim.Name, time.Since(t0).Round(time.Millisecond), cm)
			}
			return nil
		}); err != nil {
			t.Error(err)
		} else {
			t.Logf("agent on %s restarted, connected and published in %v", a2.Node.Name(), time.Since(t0).Round(time.Millisecond))
			if err := eventually(5*time.Second, func() error { return tcpEcho(client.Netns, netip.AddrPortFrom(server.IPv6, 8080)) }); err != nil {
				t.Errorf("client -> server after the agent restart: %v", err)
			}
		}
	})
	t.Logf("whole story in %v", time.Since(start).Round(time.Millisecond))
}

// endpointSummary is what must not change of an endpoint: its addresses,
// identity, labels and interface.
func endpointSummary(eps map[string]api.Endpoint) []string {
	var out []string
	for k, e := range eps {
		ips := slices.Clone(e.IPs)
		slices.SortFunc(ips, func(a, b netip.Addr) int { return a.Compare(b) })
		out = append(out, fmt.Sprintf("%s %v id=%d %v %s", k, ips, e.Identity, e.Labels, e.Interface))
	}
	slices.Sort(out)
	return out
}
