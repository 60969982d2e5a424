package meshsync

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// A ConfigCache read gives what ReadConfig gives, after puts, edits,
// deletes and a value that does not decode, and reuses the decoded object
// of a key whose value did not change (the point of it).
func TestConfigCacheReadsWhatIsStored(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)
	ctx := context.Background()
	svc := func(name, vip string) []byte {
		s := objects.Service{APIVersion: objects.APIVersion, Kind: objects.KindService,
			Metadata: objects.Meta{Name: name, Namespace: objects.DefaultNamespace},
			Spec:     objects.ServiceSpec{VIPs: []string{vip}, Ports: []objects.ServicePort{{Port: 80, Protocol: "TCP"}}}}
		raw, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	var cc ConfigCache
	check := func(step string) Config {
		t.Helper()
		got, err := cc.Read(ctx, c, "")
		if err != nil {
			t.Fatal(err)
		}
		want, err := ReadConfig(ctx, c, "")
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got.Objects, want.Objects) || !reflect.DeepEqual(got.Raw, want.Raw) || len(got.Invalid) != len(want.Invalid) {
			t.Fatalf("%s: cached read %v (invalid %v), ReadConfig %v (invalid %v)", step, got.Objects, got.Invalid, want.Objects, want.Invalid)
		}
		return got
	}
	put(t, c, ConfigKey("Service/default/a"), svc("a", "10.96.0.1"))
	put(t, c, ConfigKey("Service/default/b"), svc("b", "10.96.0.2"))
	first := check("two services")
	put(t, c, ConfigKey("Service/default/b"), svc("b", "10.96.0.3"))
	put(t, c, ConfigKey("Service/default/c"), []byte(`{"kind":"Service"}`))
	second := check("b edited, c invalid")
	if len(second.Invalid) != 1 {
		t.Errorf("invalid %v, want c's error", second.Invalid)
	}
	if second.Objects["Service/default/a"] != first.Objects["Service/default/a"] {
		t.Error("a did not change but was decoded again")
	}
	if vips := second.Objects["Service/default/b"].(*objects.Service).Spec.VIPs; vips[0] != "10.96.0.3" {
		t.Errorf("b read as %v after its edit", vips)
	}
	del(t, c, ConfigKey("Service/default/a"))
	put(t, c, ConfigKey("Service/default/c"), svc("c", "10.96.0.4"))
	third := check("a deleted, c fixed")
	if _, ok := third.Objects["Service/default/a"]; ok {
		t.Error("a is still read after its delete")
	}

	// With the watch's tables as Known: a value they hold decoded, byte
	// for byte, is their object; one they hold another value of (stale)
	// is decoded from what is stored.
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, nil)
	tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: ConfigKey("Service/default/d"), Value: svc("d", "10.96.0.5")})
	tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: ConfigKey("Service/default/e"), Value: svc("e", "10.96.0.6")})
	put(t, c, ConfigKey("Service/default/d"), svc("d", "10.96.0.5"))
	put(t, c, ConfigKey("Service/default/e"), svc("e", "10.96.0.7"))
	cc.Known = tables.DecodedObject
	fourth := check("d and e, known to the tables")
	if fourth.Objects["Service/default/d"] != tables.Objects()["Service/default/d"] {
		t.Error("d, as the tables hold it, was decoded again")
	}
	if vips := fourth.Objects["Service/default/e"].(*objects.Service).Spec.VIPs; vips[0] != "10.96.0.7" {
		t.Errorf("e read as %v: the tables' stale value", vips)
	}
}

// Reads through a ConfigCache (incremental while nothing was deleted,
// full otherwise, of every kind or of one) give what ReadConfig gives,
// over random puts, edits, invalid values and deletes.
func TestConfigCacheMatchesReadConfig(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)
	ctx := context.Background()
	r := rand.New(rand.NewPCG(1, 2))
	value := func(kind, name string) []byte {
		if r.IntN(6) == 0 {
			return []byte(`{"kind":"` + kind + `"}`) // does not decode
		}
		var o any = objects.Service{APIVersion: objects.APIVersion, Kind: objects.KindService,
			Metadata: objects.Meta{Name: name, Namespace: objects.DefaultNamespace},
			Spec:     objects.ServiceSpec{VIPs: []string{fmt.Sprintf("10.96.0.%d", r.IntN(200)+1)}, Ports: []objects.ServicePort{{Port: 80, Protocol: "TCP"}}}}
		if kind == objects.KindLoadBalancerIPPool {
			o = objects.LoadBalancerIPPool{APIVersion: objects.APIVersion, Kind: kind, Metadata: objects.Meta{Name: name, Namespace: objects.DefaultNamespace},
				Spec: objects.LoadBalancerIPPoolSpec{Blocks: []objects.PoolBlock{{CIDR: fmt.Sprintf("192.0.%d.0/24", r.IntN(200))}}}}
		}
		raw, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	var cc ConfigCache
	kinds := []string{objects.KindService, objects.KindLoadBalancerIPPool}
	for step := range 300 {
		kind, name := kinds[r.IntN(2)], fmt.Sprint("o", r.IntN(6))
		key := ConfigKey(kind + "/default/" + name)
		switch r.IntN(5) {
		case 0:
			del(t, c, key)
		case 1, 2:
			put(t, c, key, value(kind, name))
		default:
			readKind := ""
			if r.IntN(4) == 0 {
				readKind = kinds[r.IntN(2)]
			}
			got, err := cc.Read(ctx, c, readKind)
			if err != nil {
				t.Fatal(err)
			}
			want, err := ReadConfig(ctx, c, readKind)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Objects, want.Objects) || !reflect.DeepEqual(got.Raw, want.Raw) ||
				fmt.Sprint(got.Invalid) != fmt.Sprint(want.Invalid) || got.guardRev != want.guardRev {
				t.Fatalf("step %d, read of %q: cached\n%v %v\nReadConfig\n%v %v", step, readKind, got.Raw, got.Invalid, want.Raw, want.Invalid)
			}
		}
	}
}

// HasObjects (what an apply waits for) holds once the tables are listed
// and hold every value asked about byte for byte: not before the list,
// not for an older value, not after a delete.
func TestHasObjects(t *testing.T) {
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, nil)
	raw := func(vip string) []byte {
		s := objects.Service{APIVersion: objects.APIVersion, Kind: objects.KindService,
			Metadata: objects.Meta{Name: "a", Namespace: objects.DefaultNamespace},
			Spec:     objects.ServiceSpec{VIPs: []string{vip}, Ports: []objects.ServicePort{{Port: 80, Protocol: "TCP"}}}}
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	const key = "Service/default/a"
	v1, v2 := raw("10.96.0.1"), raw("10.96.0.2")
	upsert := func(v []byte) {
		tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: ConfigKey(key), Value: v})
	}
	upsert(v1)
	if tables.HasObjects(map[string][]byte{key: v1}) {
		t.Error("HasObjects before the objects were listed")
	}
	tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventListDone})
	tables.Handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventListDone})
	if !tables.HasObjects(map[string][]byte{key: v1}) {
		t.Error("HasObjects false for the value held")
	}
	if tables.HasObjects(map[string][]byte{key: v2}) {
		t.Error("HasObjects true for a value not yet delivered")
	}
	upsert(v2)
	if !tables.HasObjects(map[string][]byte{key: v2}) || tables.HasObjects(map[string][]byte{key: v1}) {
		t.Error("HasObjects does not follow the update")
	}
	tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventDelete, Key: ConfigKey(key)})
	if tables.HasObjects(map[string][]byte{key: v2}) {
		t.Error("HasObjects true after the delete")
	}
}
