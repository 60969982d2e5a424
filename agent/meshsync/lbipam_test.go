package meshsync

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// LB-IPAM's records reach the services of the objects snapshot, with a new
// generation; a record for a service that is not LoadBalancer, and an
// address of a family the service has no VIP of, are ignored with a log
// line; the objects count as listed only once the records were.
func TestTablesLBAssignments(t *testing.T) {
	var logs bytes.Buffer
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, slog.New(slog.NewTextHandler(&logs, nil)), nil)
	put := func(prefix, key string, value []byte) {
		tables.Handle(prefix, kvstore.Event{Type: kvstore.EventUpsert, Key: key, Value: value})
	}
	svc := func(name, typ string) []byte {
		return []byte(`{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"` + name + `","namespace":"default"},"spec":{"vips":["10.96.0.1"],"ports":[{"port":80}],"type":"` + typ + `"}}`)
	}
	rec := func(name string, ips ...string) []byte {
		r := records.LBAssignment{Namespace: "default", Name: name}
		for _, ip := range ips {
			r.Addresses = append(r.Addresses, records.LBAddress{IP: netip.MustParseAddr(ip), Pool: "blue"})
		}
		raw, err := r.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	put(ConfigPrefix, ConfigKey("Service/default/web"), svc("web", "LoadBalancer"))
	put(ConfigPrefix, ConfigKey("Service/default/plain"), svc("plain", "ClusterIP"))
	tables.Handle(ConfigPrefix, kvstore.Event{Type: kvstore.EventListDone})
	if tables.ObjectsListed() {
		t.Error("objects listed before LB-IPAM's records")
	}
	_, gen := tables.ObjectsGen()

	put(records.LBIPAMPrefix, records.LBIPAMKey("default", "web"), rec("web", "192.0.2.1", "2001:db8::1"))
	put(records.LBIPAMPrefix, records.LBIPAMKey("default", "plain"), rec("plain", "192.0.2.2"))
	put(records.LBIPAMPrefix, records.LBIPAMKey("default", "bad"), []byte(`{"version":1}`))
	tables.Handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventListDone})
	if !tables.ObjectsListed() {
		t.Error("objects not listed after both prefixes")
	}
	objs, gen2 := tables.ObjectsGen()
	if gen2 == gen {
		t.Error("the generation did not move")
	}
	web := objs["Service/default/web"].(*objects.Service).Status.LoadBalancer
	if len(web.Ingress) != 1 || web.Ingress[0].IP != "192.0.2.1" || web.Ingress[0].Pool != "blue" {
		t.Errorf("web status %+v, want only 192.0.2.1 (no IPv6 VIP)", web)
	}
	if st := objs["Service/default/plain"].(*objects.Service).Status; len(st.LoadBalancer.Ingress) != 0 {
		t.Errorf("ClusterIP service got status %+v", st)
	}
	for _, want := range []string{"default/plain, which is not of type LoadBalancer", "address 2001:db8::1 is of a family", "lbipam/v1/default/bad"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("no log line about %q in:\n%s", want, logs.String())
		}
	}
	// Logged once, not per snapshot.
	put(ConfigPrefix, ConfigKey("Service/default/other"), svc("other", "ClusterIP"))
	tables.ObjectsGen()
	if n := strings.Count(logs.String(), "which is not of type LoadBalancer"); n != 1 {
		t.Errorf("problem logged %d times, want once", n)
	}
	// The record goes: so does the status.
	tables.Handle(records.LBIPAMPrefix, kvstore.Event{Type: kvstore.EventDelete, Key: records.LBIPAMKey("default", "web")})
	objs, _ = tables.ObjectsGen()
	if st := objs["Service/default/web"].(*objects.Service).Status; len(st.LoadBalancer.Ingress) != 0 {
		t.Errorf("status after the record's deletion: %+v", st)
	}
}
