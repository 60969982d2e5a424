package mirror_test

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

func ipEntry(t *testing.T, cluster, prefix string, id uint32, host string) []byte {
	return marshal(t, records.IPCacheEntry{Prefix: netip.MustParsePrefix(prefix), Identity: id,
		HostIP: netip.MustParseAddr(host), Cluster: cluster})
}

func nodeWithCIDRs(c *servertest.Cluster, name, ip string, cidrs ...string) records.Node {
	n := node(c, name, ip)
	for _, p := range cidrs {
		n.PodCIDRs = append(n.PodCIDRs, netip.MustParsePrefix(p))
	}
	return n
}

func memStatus(c *servertest.Cluster, remote string) mirror.Status {
	for _, st := range c.API().Mirror.Status() {
		if st.Cluster == remote {
			return st
		}
	}
	return mirror.Status{}
}

// TestMirrorRefusesForgedRecords plays the attacker of issue 10: with the
// etcd credentials of a node of c2, records written into c2's etcd must not
// reach c1's etcd, while c2's valid records keep flowing. Each refusal is
// counted by reason, once.
func TestMirrorRefusesForgedRecords(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16", "fd00:2::/48")
	kv := c2.KV()
	id := identityOf(c2, 7)
	const host = "192.168.0.2"
	ipKey := func(p string) string { return records.IPCacheKey("c2", "n1", netip.MustParsePrefix(p)) }

	// Valid: a node, an endpoint, its identity, a global service selecting it;
	// and n4, whose pod CIDR n2 will claim.
	put(t, kv, records.NodeKey("c2", "n1"), marshal(t, nodeWithCIDRs(c2, "n1", host, "10.2.1.0/24")))
	put(t, kv, records.NodeKey("c2", "n4"), marshal(t, nodeWithCIDRs(c2, "n4", "192.168.0.5", "10.2.4.0/24")))
	put(t, kv, ipKey("10.2.1.5/32"), ipEntry(t, "c2", "10.2.1.5/32", id, host))
	put(t, kv, records.IdentityIDKey(id), marshal(t, records.IdentityRecord{ID: id, Labels: map[string]string{
		"isthmus.io/cluster": "c2", "isthmus.io/namespace": "default", "app": "web"}}))
	put(t, kv, "isthmus/config/Service/default/web", []byte(`{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","namespace":"default",`+
		`"annotations":{"isthmus.io/global":"true"}},"spec":{"vips":["10.96.0.10"],"ports":[{"port":80}],"selector":{"app":"web"}}}`))

	// Forged.
	forged := map[string][]byte{
		ipKey("0.0.0.0/0"):          ipEntry(t, "c2", "0.0.0.0/0", 1, host),                              // reserved-identity
		ipKey("10.2.1.6/32"):        ipEntry(t, "c2", "10.2.1.6/32", 6, host),                            // reserved-identity
		ipKey("::/0"):               ipEntry(t, "c2", "::/0", id, host),                                  // prefix-not-owned
		ipKey("10.1.1.0/24"):        ipEntry(t, "c2", "10.1.1.0/24", id, host),                           // prefix-not-owned: c1's pod CIDR
		ipKey("10.1.1.7/32"):        ipEntry(t, "c2", "10.1.1.7/32", id, host),                           // prefix-not-owned: a c1 pod
		records.NodeKey("c2", "n2"): marshal(t, nodeWithCIDRs(c2, "n2", "192.168.0.3", "10.2.4.128/25")), // node-cidr-overlap with n4 (both out)
		records.NodeKey("c2", "n3"): marshal(t, nodeWithCIDRs(c2, "n3", "192.168.0.4", "10.1.1.0/24")),   // node-cidr-not-owned
	}
	for k, v := range forged {
		put(t, kv, k, v)
	}
	// A Service whose explicit backend is a c1 pod: c2's service syncer
	// publishes it, the mirror refuses it (backend-not-owned).
	put(t, kv, "isthmus/config/Service/default/evil", []byte(`{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"evil","namespace":"default",`+
		`"annotations":{"isthmus.io/global":"true"}},"spec":{"vips":["10.96.0.11"],"ports":[{"port":80}],"backends":[{"ip":"10.1.1.5"}]}}`))

	servertest.Connect(t, c1, c2)
	wantRefused := map[string]int{records.ReasonReservedIdentity: 2, records.ReasonPrefixNotOwned: 3,
		records.ReasonNodeCIDROverlap: 2, records.ReasonNodeCIDRNotOwned: 1, records.ReasonBackendNotOwned: 1}
	servertest.Eventually(t, wait, "forgeries refused, the rest mirrored", func() error {
		st := memStatus(c1, "c2")
		if !st.Ready || !maps.Equal(st.Refused, wantRefused) {
			return fmt.Errorf("status %+v", st)
		}
		if err := wantKeys(t, c1, records.KindIP, "c2", "n1/10.2.1.5")(); err != nil {
			return err
		}
		if err := wantKeys(t, c1, records.KindNodes, "c2", "n1")(); err != nil {
			return err
		}
		return wantKeys(t, c1, records.KindServices, "c2", "default/web")()
	})
	st := memStatus(c1, "c2")
	for r, n := range wantRefused {
		if st.RefusedTotal[r] != uint64(n) {
			t.Errorf("refusals counted %v, want %v", st.RefusedTotal, wantRefused)
			break
		}
	}
	if st.Endpoints != 1 || st.Nodes != 1 || st.Services != 1 || st.LastRefused == "" {
		t.Errorf("status %+v", st)
	}
	// The written status carries the counts for `isthmus clustermesh status`.
	servertest.Eventually(t, wait, "status in etcd", func() error {
		s, err := status(c1, "c2")
		if err != nil || !maps.Equal(s.Refused, wantRefused) {
			return fmt.Errorf("status %+v %v", s, err)
		}
		return nil
	})

	// A forgery written again (as a re-list delivers it) is not counted
	// again; valid records keep flowing meanwhile.
	put(t, kv, ipKey("::/0"), forged[ipKey("::/0")])
	put(t, kv, ipKey("10.2.1.8/32"), ipEntry(t, "c2", "10.2.1.8/32", id, host))
	servertest.Eventually(t, wait, "a later endpoint", wantKeys(t, c1, records.KindIP, "c2", "n1/10.2.1.5", "n1/10.2.1.8"))
	if got := memStatus(c1, "c2").RefusedTotal[records.ReasonPrefixNotOwned]; got != 3 {
		t.Errorf("prefix-not-owned counted %d times, want 3", got)
	}

	// Ordering: an endpoint on a node address before its node record is
	// refused, then mirrored once the node is there.
	n9Key := records.IPCacheKey("c2", "n9", netip.MustParsePrefix("192.168.0.9/32"))
	put(t, kv, n9Key, ipEntry(t, "c2", "192.168.0.9/32", id, "192.168.0.9"))
	servertest.Eventually(t, wait, "node-address endpoint refused", func() error {
		if n := memStatus(c1, "c2").Refused[records.ReasonPrefixNotOwned]; n != 4 {
			return fmt.Errorf("prefix-not-owned %d", n)
		}
		return nil
	})
	put(t, kv, records.NodeKey("c2", "n9"), marshal(t, nodeWithCIDRs(c2, "n9", "192.168.0.9", "10.2.9.0/24")))
	servertest.Eventually(t, wait, "node-address endpoint mirrored after its node",
		wantKeys(t, c1, records.KindIP, "c2", "n1/10.2.1.5", "n1/10.2.1.8", "n9/192.168.0.9"))

	// n4 goes: n2, refused for overlapping it, is mirrored now.
	del(t, kv, records.NodeKey("c2", "n4"))
	servertest.Eventually(t, wait, "n2 after n4 went", wantKeys(t, c1, records.KindNodes, "c2", "n1", "n2", "n9"))
}

// TestMirrorCapsRemoteIPCache: a flood of valid-looking entries stops at
// the cap (the entries whose keys sort first are kept), is counted, and
// other records keep flowing.
func TestMirrorCapsRemoteIPCache(t *testing.T) {
	const limit = 20
	c1 := servertest.New(t, "c1", 1, "10.1.0.0/16")
	c1.Config.Mirror.MaxIPCachePerRemote = limit
	c1.Start(t)
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	id := identityOf(c2, 7)
	var ops []kvstore.Op
	var keys []string
	for i := range 50 {
		p := fmt.Sprintf("10.2.0.%d/32", 1+i)
		ops = append(ops, kvstore.OpPut(records.IPCacheKey("c2", "n1", netip.MustParsePrefix(p)), ipEntry(t, "c2", p, id, "192.168.0.2")))
		keys = append(keys, "n1/"+netip.MustParsePrefix(p).Addr().String())
	}
	if _, err := c2.KV().Txn(context.Background(), nil, ops); err != nil {
		t.Fatal(err)
	}
	servertest.Connect(t, c1, c2)
	slices.Sort(keys)
	servertest.Eventually(t, wait, "capped", func() error {
		st := memStatus(c1, "c2")
		if !st.Ready || st.Endpoints != limit || st.Refused[records.ReasonOverCap] != 50-limit {
			return fmt.Errorf("status %+v", st)
		}
		return wantKeys(t, c1, records.KindIP, "c2", keys[:limit]...)()
	})
	if got := memStatus(c1, "c2").RefusedTotal[records.ReasonOverCap]; got != 50-limit {
		t.Errorf("over-cap counted %d", got)
	}
	// Other kinds flow; one entry goes and the next by key comes in.
	put(t, c2.KV(), records.NodeKey("c2", "n1"), marshal(t, nodeWithCIDRs(c2, "n1", "192.168.0.2", "10.2.0.0/24")))
	del(t, c2.KV(), records.StateClusterPrefix(records.KindIP, "c2")+keys[0])
	servertest.Eventually(t, wait, "node mirrored", wantKeys(t, c1, records.KindNodes, "c2", "n1"))
	servertest.Eventually(t, wait, "next entry in", wantKeys(t, c1, records.KindIP, "c2", keys[1:limit+1]...))
}
