package meshsync

import (
	"context"
	"encoding/json"
	"reflect"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
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
}
