package service

import (
	"slices"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

func globalSvc(name string, ann map[string]string, ports ...objects.ServicePort) objects.Service {
	if len(ports) == 0 {
		ports = []objects.ServicePort{{Port: 80, TargetPort: 8080}}
	}
	s := svc("default", name, []string{"10.96.0.1", "fd00:96::1"}, ports, web)
	s.Metadata.Annotations = ann
	return s
}

func rec(cluster string, id uint32, name string, global, shared bool, bes ...records.Backend) records.ServiceRecord {
	for i := range bes {
		bes[i].Cluster = cluster
		if bes[i].Protocol == "" {
			bes[i].Protocol = records.ProtocolTCP
		}
	}
	return records.ServiceRecord{
		Version: records.CurrentVersion, Name: name, Namespace: "default", Cluster: cluster, ClusterID: id,
		Frontends: []records.Frontend{{IP: ip("10.97.0.1"), Port: 80, Protocol: records.ProtocolTCP}},
		Backends:  bes, Global: global, Shared: shared,
	}
}

func rbe(addr string, port uint16) records.Backend {
	return records.Backend{IP: ip(addr), Port: port}
}

func cbe(addr string, port uint16, cluster uint32) bpf.Backend {
	return bpf.Backend{Addr: ip(addr), Port: port, ClusterID: cluster}
}

var (
	f4 = fe("10.96.0.1", 80, bpf.ProtoTCP)
	f6 = fe("fd00:96::1", 80, bpf.ProtoTCP)
)

func TestMerge(t *testing.T) {
	global := map[string]string{AnnotationGlobal: "true"}
	withAff := func(a string) map[string]string {
		return map[string]string{AnnotationGlobal: "true", AnnotationAffinity: a}
	}
	c2 := rec("c2", 2, "web", true, true, rbe("10.2.0.5", 8080), rbe("fd00:2::5", 8080))
	c3 := rec("c3", 3, "web", true, true, rbe("10.3.0.7", 8080))
	localBoth := []bpf.Backend{be("10.0.1.2", 8080)}

	tests := []struct {
		name   string
		svcs   []objects.Service
		local  map[bpf.Frontend][]bpf.Backend
		remote []records.ServiceRecord
		want   map[bpf.Frontend][]bpf.Backend
	}{
		{
			name:   "not global: remote ignored",
			svcs:   []objects.Service{globalSvc("web", nil)},
			local:  map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
			remote: []records.ServiceRecord{c2},
			want:   map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
		},
		{
			name:   "global, affinity none: all, per family, with cluster IDs",
			svcs:   []objects.Service{globalSvc("web", global)},
			local:  map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
			remote: []records.ServiceRecord{c3, c2},
			want: map[bpf.Frontend][]bpf.Backend{
				f4: {be("10.0.1.2", 8080), cbe("10.2.0.5", 8080, 2), cbe("10.3.0.7", 8080, 3)},
				f6: {cbe("fd00:2::5", 8080, 2)},
			},
		},
		{
			name:   "affinity local with local backends: local only",
			svcs:   []objects.Service{globalSvc("web", withAff("local"))},
			local:  map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
			remote: []records.ServiceRecord{c2},
			want:   map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {cbe("fd00:2::5", 8080, 2)}},
		},
		{
			name:   "affinity local without local backends: remote",
			svcs:   []objects.Service{globalSvc("web", withAff("local"))},
			local:  map[bpf.Frontend][]bpf.Backend{f4: {}, f6: {}},
			remote: []records.ServiceRecord{c2},
			want:   map[bpf.Frontend][]bpf.Backend{f4: {cbe("10.2.0.5", 8080, 2)}, f6: {cbe("fd00:2::5", 8080, 2)}},
		},
		{
			name:   "affinity remote: remote while there is one, else local",
			svcs:   []objects.Service{globalSvc("web", withAff("remote"))},
			local:  map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {be("fd00:1::2", 8080)}},
			remote: []records.ServiceRecord{c3},
			want:   map[bpf.Frontend][]bpf.Backend{f4: {cbe("10.3.0.7", 8080, 3)}, f6: {be("fd00:1::2", 8080)}},
		},
		{
			name:  "remote record not shared or not global: ignored",
			svcs:  []objects.Service{globalSvc("web", global)},
			local: map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
			remote: []records.ServiceRecord{
				rec("c2", 2, "web", true, false, rbe("10.2.0.5", 8080)),
				rec("c3", 3, "web", false, false, rbe("10.3.0.7", 8080)),
			},
			want: map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
		},
		{
			name:   "other name or namespace: ignored",
			svcs:   []objects.Service{globalSvc("web", global)},
			local:  map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
			remote: []records.ServiceRecord{rec("c2", 2, "db", true, true, rbe("10.2.0.5", 8080))},
			want:   map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
		},
		{
			name: "ports matched by protocol and port name",
			svcs: []objects.Service{globalSvc("web", global,
				objects.ServicePort{Name: "http", Port: 80, TargetPort: 8080},
				objects.ServicePort{Name: "dns", Port: 53, Protocol: "UDP"})},
			local: map[bpf.Frontend][]bpf.Backend{f4: {}, f6: {}, fe("10.96.0.1", 53, bpf.ProtoUDP): {}, fe("fd00:96::1", 53, bpf.ProtoUDP): {}},
			remote: []records.ServiceRecord{rec("c2", 2, "web", true, true,
				records.Backend{IP: ip("10.2.0.5"), Port: 8080, PortName: "http"},
				records.Backend{IP: ip("10.2.0.5"), Port: 5353, PortName: "dns", Protocol: records.ProtocolUDP},
				records.Backend{IP: ip("10.2.0.6"), Port: 9999, PortName: "other"})},
			want: map[bpf.Frontend][]bpf.Backend{
				f4: {cbe("10.2.0.5", 8080, 2)}, f6: {},
				fe("10.96.0.1", 53, bpf.ProtoUDP): {cbe("10.2.0.5", 5353, 2)}, fe("fd00:96::1", 53, bpf.ProtoUDP): {},
			},
		},
		{
			name: "frontend won by another service in Resolve is left alone",
			svcs: []objects.Service{
				globalSvc("web", global),
				func() objects.Service { s := globalSvc("aaa", nil); s.Spec.VIPs = []string{"10.96.0.1"}; return s }(),
			},
			local:  map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
			remote: []records.ServiceRecord{c2},
			want:   map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {cbe("fd00:2::5", 8080, 2)}},
		},
		{
			name:   "bad annotation: not global",
			svcs:   []objects.Service{globalSvc("web", map[string]string{AnnotationGlobal: "yes"})},
			local:  map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
			remote: []records.ServiceRecord{c2},
			want:   map[bpf.Frontend][]bpf.Backend{f4: localBoth, f6: {}},
		},
		{
			name:   "duplicate remote backends deduplicated",
			svcs:   []objects.Service{globalSvc("web", global)},
			local:  map[bpf.Frontend][]bpf.Backend{f4: {}, f6: {}},
			remote: []records.ServiceRecord{c3, c3},
			want:   map[bpf.Frontend][]bpf.Backend{f4: {cbe("10.3.0.7", 8080, 3)}, f6: {}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			localCopy := map[bpf.Frontend][]bpf.Backend{}
			for f, bs := range tt.local {
				localCopy[f] = slices.Clone(bs)
			}
			got := Merge(tt.local, tt.svcs, tt.remote)
			if len(got) != len(tt.want) {
				t.Errorf("got %d frontends, want %d: %v", len(got), len(tt.want), got)
			}
			for f, want := range tt.want {
				bs, ok := got[f]
				if !ok || bs == nil {
					t.Errorf("frontend %v missing or nil", f)
					continue
				}
				if !slices.Equal(bs, want) {
					t.Errorf("frontend %v: got %v, want %v", f, bs, want)
				}
			}
			for f, bs := range localCopy {
				if !slices.Equal(tt.local[f], bs) {
					t.Errorf("input modified at %v", f)
				}
			}
		})
	}
}

func TestGlobalOf(t *testing.T) {
	tests := []struct {
		ann     map[string]string
		want    Global
		wantErr string
	}{
		{ann: nil, want: Global{}},
		{ann: map[string]string{AnnotationGlobal: "true"}, want: Global{Global: true, Shared: true}},
		{ann: map[string]string{AnnotationGlobal: "True", AnnotationShared: "false", AnnotationAffinity: "local"},
			want: Global{Global: true, Affinity: records.AffinityLocal}},
		{ann: map[string]string{AnnotationGlobal: "false"}, want: Global{}},
		{ann: map[string]string{AnnotationGlobal: "yes"}, wantErr: `want "true" or "false"`},
		{ann: map[string]string{AnnotationGlobal: "true", AnnotationAffinity: "nearest"}, wantErr: "want local, remote or none"},
		{ann: map[string]string{AnnotationAffinity: "local"}, wantErr: "applies to global services only"},
		{ann: map[string]string{AnnotationShared: "true"}, wantErr: "applies to global services only"},
	}
	for _, tt := range tests {
		g, err := GlobalOf(globalSvc("web", tt.ann))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%v: err %v, want %q", tt.ann, err, tt.wantErr)
			}
			continue
		}
		if err != nil || g != tt.want {
			t.Errorf("%v: got %+v, %v; want %+v", tt.ann, g, err, tt.want)
		}
	}
}
