package meshsync

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// ObjectsChangedSince names every object that differs between two
// snapshots (compared from scratch: another object, or one gone or new),
// after random sequences of objects and LB-IPAM records put and deleted,
// with snapshots taken now and then by the reader and by others; a reader
// further behind than the log, or from before the first snapshot, is told
// to look at everything.
func TestObjectsChangedSinceMatchesDiff(t *testing.T) {
	for seed := range uint64(10) {
		rng := rand.New(rand.NewPCG(seed, 2))
		tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, slog.New(slog.DiscardHandler), nil)
		svc := func(name, typ string) []byte {
			return fmt.Appendf(nil, `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":%q,"namespace":"default"},"spec":{"vips":["10.96.0.%d"],"ports":[{"port":80}],"type":%q}}`, name, rng.IntN(200)+1, typ)
		}
		pool := []byte(`{"apiVersion":"isthmus.io/v1alpha1","kind":"LoadBalancerIPPool","metadata":{"name":"blue"},"spec":{"blocks":[{"cidr":"192.0.2.0/24"}]}}`)
		tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: ConfigKey("LoadBalancerIPPool/default/blue"), Value: pool})
		tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventListDone})
		tables.Handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventListDone})
		prev, prevGen := tables.ObjectsGen()
		if _, ok := tables.ObjectsChangedSince(prevGen-1, prevGen); ok {
			t.Fatal("changes known since before the first snapshot")
		}
		for step := range 200 {
			name := fmt.Sprintf("s%d", rng.IntN(10))
			switch rng.IntN(5) {
			case 0, 1:
				typ := []string{"LoadBalancer", "ClusterIP"}[rng.IntN(2)]
				tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: ConfigKey("Service/default/" + name), Value: svc(name, typ)})
			case 2:
				tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventDelete, Key: ConfigKey("Service/default/" + name)})
			case 3:
				r := records.LBAssignment{Namespace: "default", Name: name,
					Addresses: []records.LBAddress{{IP: netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(5))}), Pool: "blue"}}}
				raw, err := r.Marshal()
				if err != nil {
					t.Fatal(err)
				}
				tables.Handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: records.LBIPAMKey("default", name), Value: raw})
			case 4:
				tables.Handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventDelete, Key: records.LBIPAMKey("default", name)})
			}
			if rng.IntN(3) == 0 {
				tables.ObjectsGen() // another reader builds a snapshot in between
			}
			if rng.IntN(2) == 0 {
				continue
			}
			cur, gen := tables.ObjectsGen()
			keys, ok := tables.ObjectsChangedSince(prevGen, gen)
			if !ok {
				t.Fatalf("seed %d step %d: changes since %d unknown", seed, step, prevGen)
			}
			for k, o := range cur {
				if prev[k] != o && !slices.Contains(keys, k) {
					t.Fatalf("seed %d step %d: %s changed, not in %v", seed, step, k, keys)
				}
			}
			for k := range prev {
				if _, ok := cur[k]; !ok && !slices.Contains(keys, k) {
					t.Fatalf("seed %d step %d: %s deleted, not in %v", seed, step, k, keys)
				}
			}
			prev, prevGen = cur, gen
		}
		// Further behind than the log: unknown.
		for range maxChangeLog + 1 {
			tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: ConfigKey("Service/default/x"), Value: svc("x", "ClusterIP")})
			tables.ObjectsGen()
		}
		if _, gen := tables.ObjectsGen(); gen != prevGen {
			if _, ok := tables.ObjectsChangedSince(prevGen, gen); ok {
				t.Fatalf("seed %d: changes known since %d, older than the log", seed, prevGen)
			}
		}
	}
}
