package clustermode

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipam"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// What persistObjects leaves in the state dir, writing per tick only what
// changed since the last one, is the applied objects as the tables hold
// them (without status), and the LB-IPAM assignments are theirs, after
// every tick of random sequences of objects and assignments put and
// deleted, with ticks that see no change; a restart reads them back.
func TestPersistObjectsFollowsTheTables(t *testing.T) {
	for seed := range uint64(5) {
		rng := rand.New(rand.NewPCG(seed, 4))
		dir := t.TempDir()
		store, err := state.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		m := New(Config{Local: meshsync.Local{Cluster: "c1", ClusterID: 1, Node: "n1"}, Log: slog.New(slog.DiscardHandler), Store: store, Request: func() {}})
		handle := func(prefix string, ev kvstore.Event) { m.tables.Handle(prefix, ev) }
		handle(meshsync.ConfigPrefix, kvstore.Event{Type: kvstore.EventListDone})
		handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventListDone})
		for step := range 60 {
			for range rng.IntN(4) {
				name := fmt.Sprintf("s%d", rng.IntN(12))
				key := meshsync.ConfigKey("Service/default/" + name)
				switch rng.IntN(4) {
				case 0, 1:
					raw := fmt.Appendf(nil, `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":%q,"namespace":"default"},"spec":{"type":"LoadBalancer","vips":["10.96.0.%d"],"ports":[{"port":80}]}}`, name, rng.IntN(200)+1)
					handle(meshsync.ConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: key, Value: raw})
				case 2:
					handle(meshsync.ConfigPrefix, kvstore.Event{Type: kvstore.EventDelete, Key: key})
				default:
					r := records.LBAssignment{Namespace: "default", Name: name,
						Addresses: []records.LBAddress{{IP: netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(9) + 1)}), Pool: "p"}}}
					raw, err := r.Marshal()
					if err != nil {
						t.Fatal(err)
					}
					if rng.IntN(3) == 0 {
						handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventDelete, Key: records.LBIPAMKey("default", name)})
					} else {
						handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: records.LBIPAMKey("default", name), Value: raw})
					}
				}
			}
			if rng.IntN(2) == 0 {
				m.tables.ObjectsGen() // a reconcile run takes a snapshot between ticks
			}
			m.persistObjects()
			want := map[string][]byte{}
			for k, o := range m.tables.Objects() {
				raw, err := json.Marshal(objects.WithoutStatus(o))
				if err != nil {
					t.Fatal(err)
				}
				want[k] = raw
			}
			got := store.Objects()
			if !maps.EqualFunc(got, want, desired.JSONEqual) {
				t.Fatalf("seed %d step %d: state dir holds\n %s\ntables\n %s", seed, step, keys(got), keys(want))
			}
			stored, err := store.LBAssignments()
			if err != nil {
				t.Fatal(err)
			}
			if have := m.tables.LBAssignments(); !lbipam.Equal(lbipam.FromRecords(stored), lbipam.FromRecords(have)) {
				t.Fatalf("seed %d step %d: assignments stored %v, the tables hold %v", seed, step, stored, have)
			}
		}
		again, err := state.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !maps.EqualFunc(again.Objects(), store.Objects(), desired.JSONEqual) {
			t.Fatalf("seed %d: read back after a restart: %v", seed, keys(again.Objects()))
		}
	}
}

func keys(m map[string][]byte) string {
	var out []string
	for k, v := range m {
		out = append(out, k+"="+string(v))
	}
	return fmt.Sprint(out)
}
