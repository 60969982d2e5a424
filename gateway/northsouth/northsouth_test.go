package northsouth

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/nftables"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// In a node's namespace: the programs go onto the device holding the node
// IP and the default route (not onto another device), the SNAT table
// exists exactly while it is wanted, a device that stops being external
// loses the programs, and a named device that does not exist is reported.
func TestSyncAttachesAndKeepsTheSNATTable(t *testing.T) {
	l := labtest.New(t)
	n, err := l.AddNode("ns")
	if err != nil {
		t.Fatal(err)
	}
	peer, err := l.AddNode("peer")
	if err != nil {
		t.Fatal(err)
	}
	ext, err := l.LinkWith(labLink(n, peer, "eth0", "10.77.0.2/24"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := l.LinkWith(labLink(n, peer, "eth1", "10.78.0.2/24"))
	if err != nil {
		t.Fatal(err)
	}
	_ = other
	if err := n.AddRoute(netip.Prefix{}, netip.MustParseAddr("10.77.0.1")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	rand.Read(b)
	pin := filepath.Join("/sys/fs/bpf/isthmus", "test-ns-"+hex.EncodeToString(b))
	t.Cleanup(func() { bpf.RemovePins(pin) })
	dp, err := bpf.Open(pin)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	node := "ns-" + hex.EncodeToString(b)

	err = n.Do(func() error {
		r := New(Config{Node: node}, dp)
		nodeIP := []netip.Addr{netip.MustParseAddr("10.77.0.2")}
		if err := r.Sync(Input{NodeIPs: nodeIP, SNAT: true}); err != nil {
			t.Errorf("Sync: %v", err)
		}
		st := r.Status()
		if len(st.Devices) != 1 || st.Devices[0].Name != ext.AName || !st.Devices[0].Attached || !slices.Equal(st.Devices[0].Roles, []string{"underlay", "outside"}) {
			t.Errorf("devices %+v, want %s attached as underlay,outside", st.Devices, ext.AName)
		}
		if got, _ := dp.ExternalAttached(); !slices.Equal(got, []string{ext.AName}) {
			t.Errorf("pinned external links %v", got)
		}
		if !st.SNATPresent || !present(t, node) {
			t.Errorf("SNAT wanted: status %+v, table present %v", st, present(t, node))
		}
		// Drift: the table removed by hand comes back at the next full pass.
		if err := RemoveTable(node); err != nil {
			t.Error(err)
		}
		r.fullAt = r.fullAt.AddDate(0, 0, -1)
		if err := r.Sync(Input{NodeIPs: nodeIP, SNAT: true}); err != nil || !present(t, node) {
			t.Errorf("after the table was removed by hand: %v, present %v", err, present(t, node))
		}
		// No Cluster frontend any more: the table stays for snatHold
		// (established flows keep their NAT through a flicker)...
		if err := r.Sync(Input{NodeIPs: nodeIP, SNAT: false}); err != nil || !present(t, node) || !r.Status().SNATPresent {
			t.Errorf("SNAT just unwanted: %v, table present %v, status %+v", err, present(t, node), r.Status())
		}
		// ... and a restarted agent whose first pass has no Cluster
		// frontend yet leaves it alone.
		if err := New(Config{Node: node}, dp).Sync(Input{NodeIPs: nodeIP, SNAT: false}); err != nil || !present(t, node) {
			t.Errorf("first pass of a new reconciler without SNAT: %v, table present %v", err, present(t, node))
		}
		// ... then the next full pass removes it.
		r.unwanted = r.unwanted.Add(-snatHold)
		r.fullAt = r.fullAt.AddDate(0, 0, -1)
		if err := r.Sync(Input{NodeIPs: nodeIP, SNAT: false}); err != nil || present(t, node) || r.Status().SNATPresent {
			t.Errorf("SNAT not wanted for snatHold: %v, table present %v", err, present(t, node))
		}
		// The device is no longer external (its address and route move):
		// the programs leave it.
		r2 := New(Config{Node: node, Devices: []string{other.AName, "nosuchdev0"}}, dp)
		if err := r2.Sync(Input{}); err == nil {
			t.Error("a missing named device is not an error")
		}
		st = r2.Status()
		if len(st.Devices) != 2 || !st.Devices[0].Attached || st.Devices[1].Attached || st.Devices[1].Reason == "" {
			t.Errorf("named devices: %+v", st.Devices)
		}
		if got, _ := dp.ExternalAttached(); !slices.Equal(got, []string{other.AName}) {
			t.Errorf("pinned external links after the change %v, want only %s", got, other.AName)
		}
		return RemoveTable(node) // idempotent
	})
	if err != nil {
		t.Fatal(err)
	}
}

func present(t *testing.T, node string) bool {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	ok, err := tablePresent(c, node)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func labLink(a, b *lab.Node, name, addr string) lab.LinkOptions {
	return lab.LinkOptions{A: a, B: b, AName: name, AAddrs: []netip.Prefix{netip.MustParsePrefix(addr)}}
}
