package servicesync

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

func svc(name string, annotations map[string]string, mod func(*objects.Service)) objects.Service {
	s := objects.Service{
		APIVersion: objects.APIVersion, Kind: objects.KindService,
		Metadata: objects.Meta{Name: name, Namespace: "default", Annotations: annotations},
		Spec: objects.ServiceSpec{
			VIPs:     []string{"10.96.0.10"},
			Ports:    []objects.ServicePort{{Port: 80, TargetPort: 8080, Protocol: "TCP"}},
			Selector: map[string]string{"app": "web"},
		},
	}
	if mod != nil {
		mod(&s)
	}
	return s
}

func ep(ip, ns string, labels ...string) Endpoint {
	l := map[string]string{labelCluster: "c1", labelNamespace: ns}
	for _, kv := range labels {
		k, v, _ := strings.Cut(kv, "=")
		l[k] = v
	}
	return Endpoint{IP: netip.MustParseAddr(ip), Namespace: ns, Labels: l}
}

func be(ip string, port uint16, proto, name string) records.Backend {
	return records.Backend{IP: netip.MustParseAddr(ip), Port: port, Protocol: proto, PortName: name, Cluster: "c1"}
}

func TestBuild(t *testing.T) {
	eps := []Endpoint{
		ep("10.1.0.2", "default", "app=web"),
		ep("10.1.0.1", "default", "app=web", "tier=front"),
		ep("fd00::1", "default", "app=web"),
		ep("10.1.0.3", "prod", "app=web"),
		ep("10.1.0.4", "default", "app=db"),
	}
	for _, tt := range []struct {
		name         string
		svc          objects.Service
		wantFront    int
		wantBackends []records.Backend
		global       bool
		shared       bool
		affinity     records.Affinity
		wantAnnErr   string
		wantErr      string
	}{
		{name: "selector in namespace, IPv4 only, sorted",
			svc:          svc("web", nil, nil),
			wantFront:    1,
			wantBackends: []records.Backend{be("10.1.0.1", 8080, "TCP", ""), be("10.1.0.2", 8080, "TCP", "")}},
		{name: "dual stack",
			svc:          svc("web", nil, func(s *objects.Service) { s.Spec.VIPs = append(s.Spec.VIPs, "fd00:96::10") }),
			wantFront:    2,
			wantBackends: []records.Backend{be("10.1.0.1", 8080, "TCP", ""), be("10.1.0.2", 8080, "TCP", ""), be("fd00::1", 8080, "TCP", "")}},
		{name: "narrower selector, other namespace",
			svc: svc("web", nil, func(s *objects.Service) {
				s.Metadata.Namespace = "prod"
			}),
			wantFront:    1,
			wantBackends: []records.Backend{be("10.1.0.3", 8080, "TCP", "")}},
		{name: "two named ports, target port defaults to port, explicit backend deduplicated",
			svc: svc("web", nil, func(s *objects.Service) {
				s.Spec.Selector = map[string]string{"tier": "front"}
				s.Spec.Ports = []objects.ServicePort{{Name: "http", Port: 80}, {Name: "dns", Port: 53, Protocol: "UDP"}}
				s.Spec.Backends = []objects.ExplicitBackend{{IP: "10.1.0.1"}, {IP: "192.0.2.7"}}
			}),
			wantFront: 2,
			wantBackends: []records.Backend{be("10.1.0.1", 53, "UDP", "dns"), be("10.1.0.1", 80, "TCP", "http"),
				be("192.0.2.7", 53, "UDP", "dns"), be("192.0.2.7", 80, "TCP", "http")}},
		{name: "no endpoint selected",
			svc:       svc("web", nil, func(s *objects.Service) { s.Spec.Selector = map[string]string{"app": "none"} }),
			wantFront: 1},
		{name: "global: shared by default",
			svc:       svc("web", map[string]string{AnnotationGlobal: "true"}, nil),
			wantFront: 1, global: true, shared: true,
			wantBackends: []records.Backend{be("10.1.0.1", 8080, "TCP", ""), be("10.1.0.2", 8080, "TCP", "")}},
		{name: "global, not shared, affinity local (any case, blanks)",
			svc:       svc("web", map[string]string{AnnotationGlobal: " True", AnnotationShared: "false", AnnotationAffinity: "Local "}, nil),
			wantFront: 1, global: true, shared: false, affinity: records.AffinityLocal,
			wantBackends: []records.Backend{be("10.1.0.1", 8080, "TCP", ""), be("10.1.0.2", 8080, "TCP", "")}},
		{name: "affinity on a non-global service: published as not global",
			svc:          svc("web", map[string]string{AnnotationAffinity: "remote"}, nil),
			wantFront:    1,
			wantAnnErr:   "global services only",
			wantBackends: []records.Backend{be("10.1.0.1", 8080, "TCP", ""), be("10.1.0.2", 8080, "TCP", "")}},
		{name: "bad global value",
			svc:          svc("web", map[string]string{AnnotationGlobal: "yes"}, nil),
			wantFront:    1,
			wantAnnErr:   `want "true" or "false"`,
			wantBackends: []records.Backend{be("10.1.0.1", 8080, "TCP", ""), be("10.1.0.2", 8080, "TCP", "")}},
		{name: "invalid service",
			svc:     svc("web", nil, func(s *objects.Service) { s.Spec.Ports = nil }),
			wantErr: "spec.ports"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rec, annErr, err := Build("c1", 1, tt.svc, eps)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (annErr == nil) != (tt.wantAnnErr == "") || (annErr != nil && !strings.Contains(annErr.Error(), tt.wantAnnErr)) {
				t.Errorf("annotation error %v, want %q", annErr, tt.wantAnnErr)
			}
			if len(rec.Frontends) != tt.wantFront {
				t.Errorf("frontends %+v", rec.Frontends)
			}
			if !slices.Equal(rec.Backends, tt.wantBackends) {
				t.Errorf("backends\n got %+v\nwant %+v", rec.Backends, tt.wantBackends)
			}
			if rec.Global != tt.global || rec.Shared != tt.shared || rec.Affinity != tt.affinity {
				t.Errorf("global %v shared %v affinity %q", rec.Global, rec.Shared, rec.Affinity)
			}
			if rec.Cluster != "c1" || rec.ClusterID != 1 || rec.Namespace != tt.svc.Metadata.Namespace {
				t.Errorf("record %+v", rec)
			}
			if _, err := rec.Marshal(); err != nil {
				t.Errorf("record does not marshal: %v", err)
			}
		})
	}
}

func TestEndpoints(t *testing.T) {
	e := func(p string, id uint32, cluster string) records.IPCacheEntry {
		return records.IPCacheEntry{Prefix: netip.MustParsePrefix(p), Identity: id, Cluster: cluster}
	}
	labels := map[uint32]map[string]string{
		1<<20 | 1: {labelCluster: "c1", labelNamespace: "default", "app": "web"},
		1<<20 | 2: {labelCluster: "c1"}, // no namespace
		2<<20 | 1: {labelCluster: "c2", labelNamespace: "default"},
	}
	got := Endpoints("c1", slices.Values([]records.IPCacheEntry{
		e("10.1.0.1/32", 1<<20|1, "c1"),
		e("10.1.0.0/24", 1<<20|1, "c1"), // a CIDR
		e("10.1.0.2/32", 1<<20|2, "c1"),
		e("10.1.0.3/32", 1<<20|9, "c1"), // unknown identity
		e("10.1.0.4/32", 2, "c1"),       // world
		e("10.2.0.1/32", 2<<20|1, "c2"),
	}), labels)
	if len(got) != 1 || got[0].IP != netip.MustParseAddr("10.1.0.1") || got[0].Namespace != "default" {
		t.Errorf("endpoints %+v", got)
	}
}

func TestSyncer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := etcdtest.Start(t)
	kv, err := kvstore.Connect(ctx, kvstore.Config{Endpoints: []string{e.Endpoint}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer kv.Close()
	put := func(k, v string) {
		t.Helper()
		if err := kv.Put(ctx, k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	marshal := func(r interface{ Marshal() ([]byte, error) }) string {
		v, err := r.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return string(v)
	}
	id := uint32(1<<20 | 5)
	put(records.IdentityIDKey(id), marshal(records.IdentityRecord{ID: id, Labels: map[string]string{labelCluster: "c1", labelNamespace: "default", "app": "web"}}))
	addEP := func(ip string) {
		p := netip.MustParsePrefix(ip + "/32")
		put(records.IPCacheKey("c1", "n1", p), marshal(records.IPCacheEntry{Prefix: p, Identity: id, HostIP: netip.MustParseAddr("192.168.0.1"), Cluster: "c1"}))
	}
	addEP("10.1.0.1")
	web := `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","namespace":"default","annotations":{"isthmus.io/global":"true"}},` +
		`"spec":{"vips":["10.96.0.10"],"ports":[{"port":80,"targetPort":8080}],"selector":{"app":"web"}}}`
	put(ServiceConfigPrefix+"default/web", web)
	// Junk that must not stop anything: a bad object, a record of a
	// service that does not exist (left over), another cluster's record.
	put(ServiceConfigPrefix+"default/bad", `{"kind":"Service"}`)
	stale := records.ServiceRecord{Name: "gone", Namespace: "default", Cluster: "c1", ClusterID: 1,
		Frontends: []records.Frontend{{IP: netip.MustParseAddr("10.96.0.9"), Port: 80, Protocol: "TCP"}}}
	put(records.ServiceKey("c1", "default", "gone"), marshal(stale))
	other := stale
	other.Cluster, other.ClusterID = "c2", 2
	put(records.ServiceKey("c2", "default", "gone"), marshal(other))

	s, err := New(Config{Cluster: "c1", ClusterID: 1, Client: kv, Debounce: 10 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Run(sctx) }()
	defer func() { stop(); <-done }()

	backends := func() ([]string, int64, error) {
		got, found, err := kv.Get(ctx, records.ServiceKey("c1", "default", "web"))
		if err != nil || !found {
			return nil, 0, fmt.Errorf("no record: %v", err)
		}
		rec, err := records.ValidateService(got.Key, got.Value, "c1", 1)
		if err != nil {
			return nil, 0, err
		}
		if !rec.Global || !rec.Shared {
			return nil, 0, fmt.Errorf("record %+v", rec)
		}
		var out []string
		for _, b := range rec.Backends {
			out = append(out, fmt.Sprintf("%s:%d", b.IP, b.Port))
		}
		return out, got.ModRevision, nil
	}
	eventually := func(what string, f func() error) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := f()
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %v", what, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	wantBackends := func(want ...string) func() error {
		return func() error {
			got, _, err := backends()
			if err != nil {
				return err
			}
			if !slices.Equal(got, want) {
				return fmt.Errorf("backends %v, want %v", got, want)
			}
			return nil
		}
	}
	eventually("first sync", wantBackends("10.1.0.1:8080"))
	eventually("stale record deleted", func() error {
		if _, found, _ := kv.Get(ctx, records.ServiceKey("c1", "default", "gone")); found {
			return fmt.Errorf("record of a service that does not exist is still there")
		}
		return nil
	})
	if _, found, _ := kv.Get(ctx, records.ServiceKey("c2", "default", "gone")); !found {
		t.Error("another cluster's record was deleted")
	}

	addEP("10.1.0.2")
	eventually("endpoint added", wantBackends("10.1.0.1:8080", "10.1.0.2:8080"))

	// Changes that do not change the record do not rewrite it. First let
	// the work of the step above finish (its own watch events), on a
	// loaded machine it can still be in flight.
	var before Stats
	eventually("syncer idle", func() error {
		a := s.Stats()
		time.Sleep(150 * time.Millisecond)
		if b := s.Stats(); b.Syncs != a.Syncs || b.Puts != a.Puts || b.Deletes != a.Deletes {
			return fmt.Errorf("still syncing: %+v then %+v", a, b)
		}
		before = s.Stats()
		return nil
	})
	_, rev, _ := backends()
	p := netip.MustParsePrefix("10.1.9.9/32")
	put(records.IPCacheKey("c1", "n1", p), marshal(records.IPCacheEntry{Prefix: p, Identity: 2, Cluster: "c1"}))
	put(ServiceConfigPrefix+"default/web", web)
	eventually("syncs ran", func() error {
		if st := s.Stats(); st.Syncs <= before.Syncs {
			return fmt.Errorf("stats %+v", st)
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond) // a pending sync has run
	if _, rev2, _ := backends(); rev2 != rev {
		t.Errorf("unchanged record rewritten (revision %d -> %d)", rev, rev2)
	}
	if st := s.Stats(); st.Puts != before.Puts || st.Deletes != before.Deletes {
		t.Errorf("writes without a change: %+v, before %+v", st, before)
	}

	// Someone tampers with the record: it is put back.
	put(records.ServiceKey("c1", "default", "web"), marshal(stale))
	eventually("record repaired", wantBackends("10.1.0.1:8080", "10.1.0.2:8080"))

	// The Service goes: its record goes.
	if err := kv.Delete(ctx, ServiceConfigPrefix+"default/web"); err != nil {
		t.Fatal(err)
	}
	eventually("record deleted", func() error {
		if _, found, _ := kv.Get(ctx, records.ServiceKey("c1", "default", "web")); found {
			return fmt.Errorf("still there")
		}
		return nil
	})
	eventually("stats", func() error {
		if st := s.Stats(); st.Invalid == 0 || st.Services != 0 || st.Deletes != 2 {
			return fmt.Errorf("stats %+v", st)
		}
		return nil
	})
}

// TestSyncerBatchesFlood: 50 endpoint changes that arrive together are
// written in a few syncs, not one each; and one bad ipcache record among
// them stops nothing.
func TestSyncerBatchesFlood(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := etcdtest.Start(t)
	kv, err := kvstore.Connect(ctx, kvstore.Config{Endpoints: []string{e.Endpoint}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer kv.Close()
	id := uint32(1<<20 | 9)
	lv, err := records.IdentityRecord{ID: id, Labels: map[string]string{labelCluster: "c1", labelNamespace: "default", "app": "flood"}}.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Put(ctx, records.IdentityIDKey(id), lv); err != nil {
		t.Fatal(err)
	}
	sv := `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"flood","namespace":"default"},` +
		`"spec":{"vips":["10.96.0.11"],"ports":[{"port":80}],"selector":{"app":"flood"}}}`
	if err := kv.Put(ctx, ServiceConfigPrefix+"default/flood", []byte(sv)); err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Cluster: "c1", ClusterID: 1, Client: kv, Debounce: 300 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Run(sctx) }()
	defer func() { stop(); <-done }()
	backends := func() int {
		got, found, err := kv.Get(ctx, records.ServiceKey("c1", "default", "flood"))
		if err != nil || !found {
			return -1
		}
		rec, err := records.ValidateService(got.Key, got.Value, "c1", 1)
		if err != nil {
			t.Fatal(err)
		}
		return len(rec.Backends)
	}
	for backends() != 0 {
		time.Sleep(10 * time.Millisecond)
	}
	before := s.Stats()
	var ops []kvstore.Op
	for i := range 50 {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, 3, byte(i)}), 32)
		v, err := records.IPCacheEntry{Prefix: p, Identity: id, Cluster: "c1"}.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		ops = append(ops, kvstore.OpPut(records.IPCacheKey("c1", "n1", p), v))
	}
	ops = append(ops, kvstore.OpPut(records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.3.200/32")), []byte(`{"version":1,"junk`)))
	if _, err := kv.Txn(ctx, nil, ops); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for backends() != 50 {
		if time.Now().After(deadline) {
			t.Fatalf("record has %d backends, want 50", backends())
		}
		time.Sleep(10 * time.Millisecond)
	}
	st := s.Stats()
	if n := st.Syncs - before.Syncs; n > 3 {
		t.Errorf("50 changes written in %d syncs: not batched", n)
	}
	if st.Invalid != before.Invalid+1 {
		t.Errorf("invalid records counted %d, want %d", st.Invalid, before.Invalid+1)
	}
}
