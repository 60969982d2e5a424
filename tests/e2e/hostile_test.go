package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// The hostile cluster of issue 10: a node of c2, with exactly the etcd
// credential its own agent runs with, tries every forgery it can think of
// to steer c1's datapath. What etcd's RBAC can refuse, it refuses; what a
// node's credential may write (its own node record, ipcache entries under
// its own prefix, identities, the applied objects) is refused by the
// ownership checks (records.Gate) of c1's mirror, and counted by reason.
// c1's datapath does not move: the world stays world, c1's pods keep their
// identities, the denied c2 pod stays denied, the admitted one admitted,
// no route or WireGuard AllowedIP changes, c1's global service keeps its
// own backends.

// hostileCap is c1's --max-remote-ipcache: small, so a flood is cheap.
const hostileCap = 40

// hostileFlood is how many entries the attacker floods with.
const hostileFlood = 50

// permissionDenied reports whether err is etcd's "permission denied".
func permissionDenied(err error) bool {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if errors.Is(rpctypes.Error(e), rpctypes.ErrPermissionDenied) {
			return true
		}
	}
	return err != nil && strings.Contains(err.Error(), rpctypes.ErrPermissionDenied.Error())
}

// kvFromNode connects to cluster c's etcd from inside namespace ns (the
// attacking node's network) with the credential in dir. The test process
// cannot dial from another namespace itself, so a relay on a loopback port
// dials every connection in ns.
func kvFromNode(t *testing.T, ctx context.Context, c *lab.Cluster, ns *lab.Netns, dir string) *kvstore.Client {
	t.Helper()
	tc, err := meshsync.LoadBundle(dir, c.Name)
	if err != nil {
		t.Fatal(err)
	}
	addr, stop, err := ns.Forward(strings.TrimPrefix(c.ServerAddr(), "https://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	kv, err := kvstore.Connect(ctx, kvstore.Config{Endpoints: []string{"https://" + addr}, TLS: tc,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), MaxRetries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	return kv
}

// mirrorStatus is c's mirror's status of remote, from `isthmus clustermesh
// status -o json`.
func mirrorStatus(ctx context.Context, c *lab.Cluster, remote string) (mirror.Status, error) {
	out, err := c.CLI(ctx, "clustermesh", "status", "-o", "json")
	if err != nil {
		return mirror.Status{}, err
	}
	var st struct {
		Remotes []mirror.Status `json:"remotes"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return mirror.Status{}, fmt.Errorf("clustermesh status -o json: %w: %s", err, out)
	}
	for _, r := range st.Remotes {
		if r.Cluster == remote {
			return r, nil
		}
	}
	return mirror.Status{}, fmt.Errorf("clustermesh status of %s shows no remote %s: %s", c.Name, remote, out)
}

// datapathView is what one node's datapath says about the mesh: its BPF
// ipcache (whole, and the entry the datapath finds for chosen addresses),
// its routes and its WireGuard peers' AllowedIPs.
type datapathView struct {
	ipcache map[netip.Prefix]bpf.IPCacheEntry
	lookups map[netip.Addr]string
	routes  []string
	allowed map[string][]netip.Prefix // peer <cluster>/<node> -> AllowedIPs
}

func readDatapath(ctx context.Context, a *lab.Agent, probes []netip.Addr) (datapathView, error) {
	v := datapathView{lookups: map[netip.Addr]string{}, allowed: map[string][]netip.Prefix{}}
	var err error
	if v.ipcache, err = bpf.ReadIPCache(a.Node.PinDir()); err != nil {
		return v, err
	}
	ipc, err := bpf.OpenPinnedIPCache(a.Node.PinDir())
	if err != nil {
		return v, err
	}
	defer ipc.Close()
	for _, p := range probes {
		e, ok := ipc.Lookup(p)
		if !ok {
			v.lookups[p] = "no entry"
		} else {
			v.lookups[p] = fmt.Sprintf("identity %d host %v", e.Identity, e.HostIP)
		}
	}
	for _, fam := range []string{"-4", "-6"} {
		out, err := a.Node.Exec(ctx, "ip", fam, "route", "show", "table", "all")
		if err != nil {
			return v, err
		}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				v.routes = append(v.routes, fam+" "+l)
			}
		}
	}
	st, err := agentStatus(ctx, a)
	if err != nil {
		return v, err
	}
	if st.WireGuard == nil {
		return v, fmt.Errorf("%s: no WireGuard status", a.Node.Name())
	}
	for _, p := range st.WireGuard.Peers {
		ips := slices.Clone(p.AllowedIPs)
		slices.SortFunc(ips, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
		v.allowed[p.Node] = ips
	}
	return v, nil
}

// routeDst returns the destination of an `ip route` line ("default" as
// the family's /0), and whether it parses.
func routeDst(line string) (netip.Prefix, bool) {
	f := strings.Fields(line)
	if len(f) < 2 {
		return netip.Prefix{}, false
	}
	fam, f := f[0], f[1:]
	switch f[0] {
	case "unicast", "local", "broadcast", "multicast", "unreachable", "prohibit", "blackhole", "throw", "anycast":
		f = f[1:]
	}
	if len(f) == 0 {
		return netip.Prefix{}, false
	}
	if f[0] == "default" {
		if fam == "-6" {
			return netip.MustParsePrefix("::/0"), true
		}
		return netip.MustParsePrefix("0.0.0.0/0"), true
	}
	if p, err := netip.ParsePrefix(f[0]); err == nil {
		return p, true
	}
	if a, err := netip.ParseAddr(f[0]); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), true
	}
	return netip.Prefix{}, false
}

// inAny reports whether p lies inside (or is) one of cidrs.
func inAny(p netip.Prefix, cidrs []netip.Prefix) bool {
	return slices.ContainsFunc(cidrs, func(c netip.Prefix) bool {
		return c.Addr().Is4() == p.Addr().Is4() && c.Bits() <= p.Bits() && c.Contains(p.Addr())
	})
}

// unchangedBut compares two views and returns every difference, leaving
// out the ipcache entries inside ipSkip (the attacking node's own pod
// CIDRs, which it may fill), and the routes and AllowedIPs inside skip; a
// WireGuard peer may go only when peerMayGo says so (the refused node's).
func unchangedBut(before, after datapathView, ipSkip, skip []netip.Prefix, peerMayGo func(string) bool) []string {
	var diffs []string
	for _, p := range slices.SortedFunc(maps.Keys(before.ipcache), netip.Prefix.Compare) {
		if inAny(p, ipSkip) {
			continue
		}
		if e, ok := after.ipcache[p]; !ok || e != before.ipcache[p] {
			diffs = append(diffs, fmt.Sprintf("ipcache %s: %+v, now %+v (present %v)", p, before.ipcache[p], e, ok))
		}
	}
	for _, p := range slices.SortedFunc(maps.Keys(after.ipcache), netip.Prefix.Compare) {
		if _, ok := before.ipcache[p]; !ok && !inAny(p, ipSkip) {
			diffs = append(diffs, fmt.Sprintf("ipcache %s: new entry %+v", p, after.ipcache[p]))
		}
	}
	for _, a := range slices.SortedFunc(maps.Keys(before.lookups), netip.Addr.Compare) {
		if before.lookups[a] != after.lookups[a] && !inAny(netip.PrefixFrom(a, a.BitLen()), ipSkip) {
			diffs = append(diffs, fmt.Sprintf("lookup %s: %s, now %s", a, before.lookups[a], after.lookups[a]))
		}
	}
	keep := func(rs []string) []string {
		var out []string
		for _, r := range rs {
			if p, ok := routeDst(r); !ok || !inAny(p, skip) {
				out = append(out, r)
			}
		}
		return out
	}
	rb, ra := keep(before.routes), keep(after.routes)
	for _, r := range rb {
		if !slices.Contains(ra, r) {
			diffs = append(diffs, "route gone: "+r)
		}
	}
	for _, r := range ra {
		if !slices.Contains(rb, r) {
			diffs = append(diffs, "route new: "+r)
		}
	}
	for _, peer := range slices.Sorted(maps.Keys(before.allowed)) {
		if _, ok := after.allowed[peer]; !ok {
			if peerMayGo == nil || !peerMayGo(peer) {
				diffs = append(diffs, fmt.Sprintf("WireGuard peer %s gone (AllowedIPs %v)", peer, before.allowed[peer]))
			}
			continue
		}
		var b, a []netip.Prefix
		for _, p := range before.allowed[peer] {
			if !inAny(p, skip) {
				b = append(b, p)
			}
		}
		for _, p := range after.allowed[peer] {
			if !inAny(p, skip) {
				a = append(a, p)
			}
		}
		if !slices.Equal(a, b) {
			diffs = append(diffs, fmt.Sprintf("AllowedIPs of %s: %v, now %v", peer, before.allowed[peer], after.allowed[peer]))
		}
	}
	for _, peer := range slices.Sorted(maps.Keys(after.allowed)) {
		if _, ok := before.allowed[peer]; !ok {
			diffs = append(diffs, fmt.Sprintf("new WireGuard peer %s: %v", peer, after.allowed[peer]))
		}
	}
	return diffs
}

func TestHostileClusterCannotSteerAnother(t *testing.T) {
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	t.Cleanup(cancel)
	start := time.Now()
	capArg := fmt.Sprintf("--max-remote-ipcache=%d", hostileCap)
	step(t, "cluster c1 (1 node, cap %d on remote ipcache) and c2 (2 nodes), WireGuard, connected", hostileCap)
	c1, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 1, Encryption: "wireguard",
		ServerArgs: []string{capArg}, AgentArgs: []string{capArg}})
	if err != nil {
		t.Fatal(err)
	}
	c2, err := l.AddCluster(ctx, 2, lab.ClusterOptions{Nodes: 2, Encryption: "wireguard"})
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.Connect(ctx, c1, c2); err != nil {
		t.Fatal(err)
	}
	m := &mesh{t: t, ctx: ctx, lab: l, c1: c1, c2: c2}
	victim := c1.Agents[0] // c1-n1: the datapath that must not move
	// c2-n1 hosts c2's pods; c2-n2 is compromised. The attacker is the
	// node whose name sorts last on purpose: the Gate's name-order rules
	// (node-cidr-overlap: the node sorting first keeps a contested CIDR;
	// over-cap: the first keys are kept) let a compromised node that sorts
	// first take an honest c2 node's pod CIDR or crowd its entries out of
	// the cap. That moves traffic within c2's own ranges, not c1's, and is
	// not what this test covers.
	honest, attacker := c2.Agents[0], c2.Agents[1]
	n1, atk := honest.Node.NodeName(), attacker.Node.NodeName()
	n1IP, atkIP := netip.MustParseAddr("10.102.0.11"), netip.MustParseAddr("10.102.0.12")
	victimIP := netip.MustParseAddr("10.101.0.11")
	atkCIDRs := c2.NodePodCIDRs(2)

	s1 := m.pod(victim, "s1", map[string]string{"app": "server"})
	w1 := m.pod(victim, "w1", map[string]string{"app": "web"})
	k1 := m.pod(victim, "k1", map[string]string{"app": "client"})
	k2 := m.pod(honest, "k2", map[string]string{"app": "client"})
	x2 := m.pod(honest, "x2", map[string]string{"app": "other"})
	serveTCP(t, s1.Netns, 8080, echo)
	serveTCP(t, w1.Netns, 8080, sayName("c1-w1"))
	m.apply(victim, `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: server-from-c2-clients}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client, isthmus.io/cluster: c2}}]
      toPorts: [{port: 8080, protocol: TCP}]
`)
	m.apply(victim, fmt.Sprintf(globalWeb, "none"))
	vip := netip.MustParseAddrPort("10.96.0.50:80")

	// What must hold before, and after every forgery.
	policyHolds := func() error {
		for _, v6 := range []bool{false, true} {
			dst := netip.AddrPortFrom(s1.Addr(v6), 8080)
			if err := tcpEcho(k2.Netns, dst); err != nil {
				return fmt.Errorf("admitted c2 client k2 -> s1 over %s: %w", familyName(v6), err)
			}
			if err := connectTimesOut(x2.Netns, dst, time.Second); err != nil {
				return fmt.Errorf("denied c2 pod x2 -> s1 over %s: %w", familyName(v6), err)
			}
		}
		return nil
	}
	serviceHolds := func() error {
		got, err := answers(k1.Netns, vip, 20)
		if err != nil {
			return fmt.Errorf("c1's global service %s: %w (answers so far %v)", vip, err, got)
		}
		if got["c1-w1"] != 20 {
			return fmt.Errorf("c1's global service %s answered %v, want only c1-w1", vip, got)
		}
		return nil
	}

	step(t, "baseline: policy, service, c2's endpoints and both c2 peers known on c1-n1")
	if err := eventually(60*time.Second, func() error {
		if err := policyHolds(); err != nil {
			return err
		}
		if err := serviceHolds(); err != nil {
			return err
		}
		ipc, err := bpf.ReadIPCache(victim.Node.PinDir())
		if err != nil {
			return err
		}
		for _, p := range []*lab.Pod{k2, x2} {
			for _, v6 := range []bool{false, true} {
				e, ok := ipc[netip.PrefixFrom(p.Addr(v6), p.Addr(v6).BitLen())]
				if !ok || e.Identity <= records.MaxReservedIdentity {
					return fmt.Errorf("c1-n1's ipcache has %s of %s as %+v (present %v)", p.Addr(v6), p.PodName, e, ok)
				}
			}
		}
		st, err := agentStatus(ctx, victim)
		if err != nil {
			return err
		}
		if st.WireGuard == nil || len(st.WireGuard.Peers) != 2 {
			return fmt.Errorf("c1-n1's WireGuard peers: %+v", st.WireGuard)
		}
		ms, err := mirrorStatus(ctx, c1, "c2")
		if err != nil {
			return err
		}
		if !ms.Ready || len(ms.Refused) != 0 {
			return fmt.Errorf("c1's mirror of c2 not ready, or already refusing: %+v", ms)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	unusedC1 := []netip.Addr{netip.MustParseAddr("10.1.1.200"), netip.MustParseAddr("fd00:1:0:1::c8")}
	probes := []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("2001:db8::1"),
		netip.MustParseAddr("10.2.2.50"), n1IP, atkIP, victimIP, unusedC1[0], unusedC1[1]}
	for _, p := range []*lab.Pod{s1, w1, k1, k2, x2} {
		probes = append(probes, p.IPv4, p.IPv6)
	}
	before, err := readDatapath(ctx, victim, probes)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range probes[:2] {
		if want := fmt.Sprintf("identity %d host invalid IP", bpf.IdentityWorld); before.lookups[a] != want {
			t.Fatalf("baseline: c1-n1 finds %s as %s, want world (%s)", a, before.lookups[a], want)
		}
	}
	idK2 := before.ipcache[netip.PrefixFrom(k2.IPv4, 32)].Identity
	idX2 := before.ipcache[netip.PrefixFrom(x2.IPv4, 32)].Identity
	if idK2 == idX2 || idK2>>20 != c2.ID {
		t.Fatalf("baseline: k2 has identity %d, x2 %d", idK2, idX2)
	}
	base, err := mirrorStatus(ctx, c1, "c2")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("baseline: k2 identity %d, x2 identity %d; c1 mirrors %d c2 endpoints; c1-n1 has %d ipcache entries, %d routes, peers %v",
		idK2, idX2, base.Endpoints, len(before.ipcache), len(before.routes), before.allowed)

	step(t, "the attacker: c2-n2's own credential, from c2-n2's network")
	bundle := attacker.KVStoreBundle()
	if user, err := bundleUser(bundle, c2.Name); err != nil || user != etcdserver.NodeUser(atk) {
		t.Fatalf("c2-n2's agent bundle %s authenticates as %q (%v), want %q", bundle, user, err, etcdserver.NodeUser(atk))
	}
	kv := kvFromNode(t, ctx, c2, attacker.Node.NS(), bundle)
	must := func(b []byte, err error) []byte {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ipRec := func(p netip.Prefix, id uint32, host netip.Addr) []byte {
		return must(records.IPCacheEntry{Prefix: p, Identity: id, HostIP: host, Cluster: c2.Name,
			OwnerName: "forged", OwnerNamespace: "default"}.Marshal())
	}
	single := func(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }
	cacheKey := func(stateKey, cluster string) string {
		k, err := records.CacheKey(stateKey, cluster)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}

	t.Run("etcd refuses what the credential may not write", func(t *testing.T) {
		n1Rec, found, err := kv.Get(ctx, records.NodeKey(c2.Name, n1))
		if err != nil || !found {
			t.Fatalf("the attacker reads c2-n1's record: found %v, %v (a node may read the cluster's state)", found, err)
		}
		forgedCfg := must(records.ClusterConfig{Name: c2.Name, ID: c2.ID,
			PodCIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}}.Marshal())
		c1Cfg := must(records.ClusterConfig{Name: c1.Name, ID: c1.ID,
			PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}.Marshal())
		svc := must(records.ServiceRecord{Name: "web", Namespace: "default", Cluster: c2.Name, ClusterID: c2.ID, Global: true, Shared: true,
			Frontends: []records.Frontend{{IP: vip.Addr(), Port: 80, Protocol: records.ProtocolTCP}},
			Backends:  []records.Backend{{IP: s1.IPv4, Port: 8080, Protocol: records.ProtocolTCP, Cluster: c2.Name}}}.Marshal())
		attempts := []struct {
			what string
			do   func() error
		}{
			{"overwrite c2-n1's node record", func() error { return kv.Put(ctx, records.NodeKey(c2.Name, n1), n1Rec.Value) }},
			{"delete c2-n1's node record", func() error { return kv.Delete(ctx, records.NodeKey(c2.Name, n1)) }},
			{"an ipcache entry under c2-n1's prefix (x2 as k2's identity)", func() error {
				return kv.Put(ctx, records.IPCacheKey(c2.Name, n1, single(x2.IPv4)), ipRec(single(x2.IPv4), idK2, n1IP))
			}},
			{"an ipcache entry under a node name no node has", func() error {
				p := netip.MustParsePrefix("10.2.9.9/32")
				return kv.Put(ctx, records.IPCacheKey(c2.Name, "ghost", p), ipRec(p, idK2, atkIP))
			}},
			{"delete all of c2's ipcache", func() error {
				_, err := kv.DeletePrefix(ctx, records.StateClusterPrefix(records.KindIP, c2.Name))
				return err
			}},
			{"c2's cache of c1's ipcache (isthmus/cache/)", func() error {
				return kv.Put(ctx, cacheKey(records.IPCacheKey(c1.Name, victim.Node.NodeName(), single(s1.IPv4)), c1.Name),
					must(records.IPCacheEntry{Prefix: single(s1.IPv4), Identity: idK2, Cluster: c1.Name}.Marshal()))
			}},
			{"c2's cache of c1's nodes (isthmus/cache/)", func() error {
				return kv.Put(ctx, cacheKey(records.NodeKey(c1.Name, victim.Node.NodeName()), c1.Name), []byte("{}"))
			}},
			{"c2's cluster config (isthmus/cluster-config/c2: pod CIDRs 0.0.0.0/0, ::/0)", func() error {
				return kv.Put(ctx, records.ClusterConfigKey(c2.Name), forgedCfg)
			}},
			{"the mirrored cluster config of c1 (isthmus/cluster-config/c1)", func() error {
				return kv.Put(ctx, records.ClusterConfigKey(c1.Name), c1Cfg)
			}},
			{"a sync canary (isthmus/synced/c1/...)", func() error {
				return kv.Put(ctx, records.SyncedKey(c1.Name, records.KindIP), []byte("{}"))
			}},
			{"a service record (isthmus/state/services/)", func() error {
				return kv.Put(ctx, records.ServiceKey(c2.Name, "default", "web"), svc)
			}},
			{"the heartbeat", func() error { return kv.Put(ctx, records.HeartbeatKey(c2.Name), []byte("{}")) }},
			{"write the mirror's credentials for c1 (isthmus/remotes/c1)", func() error {
				return kv.Put(ctx, etcdserver.RemoteKey(c1.Name), []byte("{}"))
			}},
			{"read the mirror's private keys (isthmus/remotes/)", func() error {
				_, _, err := kv.GetPrefix(ctx, etcdserver.RemotesPrefix)
				return err
			}},
		}
		for _, a := range attempts {
			if err := a.do(); !permissionDenied(err) {
				t.Errorf("%s: %v, want permission denied", a.what, err)
			} else {
				t.Logf("refused by etcd: %s", a.what)
			}
		}
		// Nothing of it happened.
		if now, found, err := kv.Get(ctx, records.NodeKey(c2.Name, n1)); err != nil || !found || string(now.Value) != string(n1Rec.Value) {
			t.Errorf("c2-n1's node record after the attempts: found %v, %v", found, err)
		}
	})

	// Forgeries the credential may write; the Gate refuses them.
	type forgery struct {
		what, reason string
		key          string
		value        []byte
	}
	ipForgery := func(what, reason string, p netip.Prefix, id uint32, host netip.Addr) forgery {
		return forgery{what, reason, records.IPCacheKey(c2.Name, atk, p), ipRec(p, id, host)}
	}
	forgeries := []forgery{
		ipForgery("0.0.0.0/0 as host (1)", records.ReasonReservedIdentity, netip.MustParsePrefix("0.0.0.0/0"), bpf.IdentityHost, atkIP),
		ipForgery("c1's pod s1 as remote-node (6)", records.ReasonReservedIdentity, single(s1.IPv4), bpf.IdentityRemote, atkIP),
		ipForgery("::/0 as k2's identity", records.ReasonPrefixNotOwned, netip.MustParsePrefix("::/0"), idK2, atkIP),
		ipForgery("c1-n1's pod CIDR 10.1.1.0/24 as k2's identity", records.ReasonPrefixNotOwned, c1.NodePodCIDRs(1)[0], idK2, atkIP),
		ipForgery("c1's pod s1 (IPv6) as k2's identity", records.ReasonPrefixNotOwned, single(s1.IPv6), idK2, atkIP),
		ipForgery("x2, in c2-n1's pod CIDR, as k2's identity", records.ReasonPrefixNotOwned, single(x2.IPv4), idK2, atkIP),
		ipForgery("an own address hosted by c1-n1's underlay address", records.ReasonPrefixNotOwned, netip.MustParsePrefix("10.2.2.50/32"), idK2, victimIP),
		{"a global Service web whose explicit backend is c1's pod s1", records.ReasonBackendNotOwned, "isthmus/config/Service/default/web",
			[]byte(fmt.Sprintf(`{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","namespace":"default",`+
				`"annotations":{"isthmus.io/global":"true"}},"spec":{"vips":["10.96.0.50"],"ports":[{"port":80,"targetPort":8080,"protocol":"TCP"}],`+
				`"backends":[{"ip":%q}]}}`, s1.IPv4))},
	}
	// An identity of c2's range whose labels claim cluster c1 (a c1 client,
	// as c1's policy would admit it): invalid, not a refusal of the Gate.
	fakeID := c2.ID<<20 | 77777
	fakeIDKey := records.IdentityIDKey(fakeID)
	fakeIDValue := must(records.IdentityRecord{ID: fakeID, Labels: map[string]string{
		records.LabelCluster: c1.Name, "isthmus.io/namespace": "default", "app": "client"}}.Marshal())
	flood := map[string][]byte{}
	var floodAddrs []netip.Addr
	for i := range hostileFlood {
		a := netip.AddrFrom4([4]byte{10, 2, 2, byte(100 + i)})
		floodAddrs = append(floodAddrs, a)
		flood[records.IPCacheKey(c2.Name, atk, single(a))] = ipRec(single(a), idK2, atkIP)
	}
	wantRefused := map[string]int{}
	for _, f := range forgeries {
		wantRefused[f.reason]++
	}
	// The cap counts c2's entries that pass, first by key: c2-n1's sort
	// before the attacker's, so the flood loses its last ones.
	overCap := base.Endpoints + hostileFlood - hostileCap
	acceptedFlood := hostileFlood - overCap
	if overCap <= 0 || acceptedFlood <= 0 {
		t.Fatalf("c2 has %d endpoints: the flood of %d does not pass the cap of %d with some entries accepted", base.Endpoints, hostileFlood, hostileCap)
	}
	wantRefused[records.ReasonOverCap] = overCap

	t.Run("the Gate refuses what the credential may write, and c1 counts it", func(t *testing.T) {
		for _, f := range forgeries {
			if err := kv.Put(ctx, f.key, f.value); err != nil {
				t.Fatalf("%s: etcd refused a write the node's credential may do: %v", f.what, err)
			}
			t.Logf("written, for the Gate (%s): %s", f.reason, f.what)
		}
		if err := kv.Put(ctx, fakeIDKey, fakeIDValue); err != nil {
			t.Fatalf("identity %d labelled cluster c1: %v", fakeID, err)
		}
		var ops []kvstore.Op
		for k, v := range flood {
			ops = append(ops, kvstore.OpPut(k, v))
		}
		if _, err := kv.Txn(ctx, nil, ops); err != nil {
			t.Fatalf("flood of %d entries: %v", hostileFlood, err)
		}
		step(t, "c1's mirror refuses and counts: %v, and the identity claiming c1 as invalid", wantRefused)
		var ms mirror.Status
		if err := eventually(60*time.Second, func() error {
			var err error
			if ms, err = mirrorStatus(ctx, c1, "c2"); err != nil {
				return err
			}
			if !maps.Equal(ms.Refused, wantRefused) {
				return fmt.Errorf("c1's mirror refuses %v of c2's records, want %v", ms.Refused, wantRefused)
			}
			if ms.Invalid < 1 || ms.Endpoints != hostileCap {
				return fmt.Errorf("c1's mirror: %d invalid (want the forged identity), %d endpoints (want the cap, %d)", ms.Invalid, ms.Endpoints, hostileCap)
			}
			return nil
		}); err != nil {
			t.Error(err) // and show what reached c1's etcd
		}
		for r, n := range wantRefused {
			if ms.RefusedTotal[r] != uint64(n) {
				t.Errorf("c1's mirror counted %v refusals since start, want %v", ms.RefusedTotal, wantRefused)
				break
			}
		}
		t.Logf("c1's clustermesh status of c2: refused %s; last: %s", ms.RefusedText(), ms.LastRefused)

		step(t, "the same counts in c1's server metrics")
		fams, err := promtest.Get(inNetns(c1.Router.Netns), localURL(server.DefaultMetricsListen, "/metrics"))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range records.Reasons {
			if v, _ := fams.Value("isthmus_clustermesh_remote_refused_records", "cluster", c2.Name, "reason", r); v != float64(wantRefused[r]) {
				t.Errorf("isthmus_clustermesh_remote_refused_records{cluster=c2,reason=%s} = %v, want %d", r, v, wantRefused[r])
			}
			if v, _ := fams.Value("isthmus_clustermesh_remote_refused_records_total", "cluster", c2.Name, "reason", r); v != float64(wantRefused[r]) {
				t.Errorf("isthmus_clustermesh_remote_refused_records_total{cluster=c2,reason=%s} = %v, want %d", r, v, wantRefused[r])
			}
		}

		step(t, "none of it is in c1's etcd: the cache holds c2's honest entries and the flood up to the cap")
		out, err := etcdctl(ctx, c1, "get", records.Root+"cache/", "--prefix", "--keys-only")
		if err != nil {
			t.Fatal(err)
		}
		cached := map[string]bool{}
		for _, k := range strings.Fields(out) {
			cached[k] = true
		}
		for _, f := range forgeries {
			if !strings.HasPrefix(f.key, records.StateRoot) {
				continue
			}
			if ck := cacheKey(f.key, c2.Name); cached[ck] {
				t.Errorf("%s: mirrored into c1's etcd at %s", f.what, ck)
			}
		}
		if ck := cacheKey(records.ServiceKey(c2.Name, "default", "web"), c2.Name); cached[ck] {
			t.Errorf("c2's service web with a c1 backend mirrored into c1's etcd at %s", ck)
		}
		if ck := cacheKey(fakeIDKey, c2.Name); cached[ck] {
			t.Errorf("identity %d claiming cluster c1 mirrored into c1's etcd at %s", fakeID, ck)
		}
		nFlood := 0
		for k := range flood {
			if cached[cacheKey(k, c2.Name)] {
				nFlood++
			}
		}
		if nFlood != acceptedFlood {
			t.Errorf("%d flood entries in c1's cache, want %d (the cap %d less c2's %d honest ones)", nFlood, acceptedFlood, hostileCap, base.Endpoints)
		}

		step(t, "c2's honest node refuses them too, for its own cluster")
		if err := eventually(20*time.Second, func() error {
			st, err := agentStatus(ctx, honest)
			if err != nil {
				return err
			}
			for _, cl := range st.ClusterMesh.Clusters {
				if cl.Name == c2.Name {
					if cl.Refused[records.ReasonReservedIdentity] != wantRefused[records.ReasonReservedIdentity] ||
						cl.Refused[records.ReasonPrefixNotOwned] != wantRefused[records.ReasonPrefixNotOwned] {
						return fmt.Errorf("c2-n1 refuses %v of its own cluster's records, want %d reserved-identity and %d prefix-not-owned",
							cl.Refused, wantRefused[records.ReasonReservedIdentity], wantRefused[records.ReasonPrefixNotOwned])
					}
					return nil
				}
			}
			return fmt.Errorf("c2-n1's status lists no cluster c2")
		}); err != nil {
			t.Error(err)
		}
	})

	t.Run("c1's datapath is unchanged", func(t *testing.T) {
		// The accepted part of the flood is c2's to say (inside the
		// attacker's own pod CIDR); it arrives, up to the cap.
		var after datapathView
		if err := eventually(30*time.Second, func() error {
			var err error
			if after, err = readDatapath(ctx, victim, probes); err != nil {
				return err
			}
			n := 0
			for _, a := range floodAddrs {
				if e, ok := after.ipcache[single(a)]; ok {
					if e.Identity != idK2 || e.HostIP != atkIP {
						return fmt.Errorf("flood entry %s in c1-n1's ipcache as %+v", a, e)
					}
					n++
				}
			}
			if n != acceptedFlood {
				return fmt.Errorf("%d flood entries in c1-n1's ipcache, want %d", n, acceptedFlood)
			}
			return nil
		}); err != nil {
			t.Error(err) // and show what else moved
			if after.ipcache == nil {
				t.FailNow()
			}
		}
		for p := range after.ipcache {
			if inAny(p, atkCIDRs) && !slices.Contains(floodAddrs, p.Addr()) {
				t.Errorf("c1-n1's ipcache has %s inside the attacker's pod CIDRs: %+v", p, after.ipcache[p])
			}
		}
		for _, d := range unchangedBut(before, after, atkCIDRs, nil, nil) {
			t.Error(d)
		}
		if err := policyHolds(); err != nil {
			t.Error(err)
		}
		if err := serviceHolds(); err != nil {
			t.Error(err)
		}
		out, err := victim.CLI(ctx, "identity", "list", "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(out), fmt.Sprint(fakeID)) {
			t.Errorf("c1-n1 knows identity %d, labelled cluster c1 by c2: %s", fakeID, out)
		}
	})

	// Last, as it takes the attacker's own node out: its node record,
	// claiming pod CIDRs it does not own. The node is refused whole: its
	// CIDRs never become routes or AllowedIPs, and its endpoints (the
	// flood) leave c1. Claiming another c2 node's CIDR takes that node out
	// too (both are refused: either may be the liar), so c2-n1's pods
	// become unreachable from c1 (fail closed), but nothing of theirs ever
	// goes to the attacker.
	victimNode := c2.Nodes[0].NodeName()
	victimCIDRs := c2.NodePodCIDRs(1)
	for _, claim := range []struct {
		what, reason string
		cidr         netip.Prefix
		refused      int  // node records refused for the reason
		victimOut    bool // c2-n1 is refused too
	}{
		{"c1-n1's pod CIDR", records.ReasonNodeCIDRNotOwned, c1.NodePodCIDRs(1)[0], 1, false},
		{"c2-n1's pod CIDR", records.ReasonNodeCIDROverlap, c2.NodePodCIDRs(1)[0], 2, true},
	} {
		t.Run("the attacker's node record claiming "+claim.what, func(t *testing.T) {
			kvv, found, err := kv.Get(ctx, records.NodeKey(c2.Name, atk))
			if err != nil || !found {
				t.Fatalf("the attacker's node record: found %v, %v", found, err)
			}
			n, err := records.DecodeNode(kvv.Value)
			if err != nil {
				t.Fatal(err)
			}
			n.PodCIDRs = append(slices.DeleteFunc(n.PodCIDRs, func(p netip.Prefix) bool { return !inAny(p, atkCIDRs) }), claim.cidr)
			if err := kv.Put(ctx, records.NodeKey(c2.Name, atk), must(n.Marshal())); err != nil {
				t.Fatalf("the attacker's own node record: %v", err)
			}
			t.Logf("written, for the Gate (%s): node %s with pod CIDRs %v", claim.reason, atk, n.PodCIDRs)
			if err := eventually(60*time.Second, func() error {
				ms, err := mirrorStatus(ctx, c1, "c2")
				if err != nil {
					return err
				}
				if ms.Refused[claim.reason] != claim.refused || ms.RefusedTotal[claim.reason] != uint64(claim.refused) {
					return fmt.Errorf("c1's mirror refuses %v (since start %v), want %d %s", ms.Refused, ms.RefusedTotal, claim.refused, claim.reason)
				}
				if wantNodes := 1 - btoi(claim.victimOut); ms.Nodes != wantNodes {
					return fmt.Errorf("c1's mirror has %d nodes of c2, want %d", ms.Nodes, wantNodes)
				}
				after, err := readDatapath(ctx, victim, probes)
				if err != nil {
					return err
				}
				if _, ok := after.allowed[c2.Name+"/"+atk]; ok {
					return fmt.Errorf("c1-n1 still has the attacker as WireGuard peer: %v", after.allowed)
				}
				for p := range after.ipcache {
					if inAny(p, atkCIDRs) || (claim.victimOut && inAny(p, victimCIDRs)) {
						return fmt.Errorf("c1-n1 still has %s of a refused node in its ipcache", p)
					}
				}
				return nil
			}); err != nil {
				t.Error(err) // and show what else moved
			}
			after, err := readDatapath(ctx, victim, probes)
			if err != nil {
				t.Fatal(err)
			}
			attackerPeer, victimPeer := c2.Name+"/"+atk, c2.Name+"/"+victimNode
			skip := atkCIDRs
			if claim.victimOut {
				skip = append(slices.Clone(atkCIDRs), victimCIDRs...)
			}
			for _, d := range unchangedBut(before, after, skip, skip, func(p string) bool {
				return p == attackerPeer || (claim.victimOut && p == victimPeer)
			}) {
				t.Error(d)
			}
			for peer, ips := range after.allowed {
				for _, p := range ips {
					if p.Overlaps(claim.cidr) && !slices.Contains(before.allowed[peer], p) {
						t.Errorf("WireGuard peer %s has %s, overlapping the claimed %s", peer, p, claim.cidr)
					}
				}
			}
			if claim.victimOut {
				// c2-n1's pods: nothing reaches s1 from them now (the
				// denied one stays denied; the admitted one is cut off,
				// not redirected).
				for _, v6 := range []bool{false, true} {
					dst := netip.AddrPortFrom(s1.Addr(v6), 8080)
					if err := connectTimesOut(x2.Netns, dst, time.Second); err != nil {
						t.Errorf("denied c2 pod x2 -> s1 over %s: %v", familyName(v6), err)
					}
				}
			} else if err := policyHolds(); err != nil {
				t.Error(err)
			}
			if err := serviceHolds(); err != nil {
				t.Error(err)
			}
		})
	}
	t.Logf("hostile cluster story in %s", time.Since(start).Round(time.Second))
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// bundleUser is the etcd user of the credential in a bundle directory, as
// the agent reads it.
func bundleUser(dir, cluster string) (string, error) {
	tc, err := meshsync.LoadBundle(dir, cluster)
	if err != nil {
		return "", err
	}
	return meshsync.BundleUser(tc)
}
