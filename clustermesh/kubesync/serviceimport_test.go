package kubesync

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

func rec(cluster, ns, name string, global bool, fes ...records.Frontend) records.ServiceRecord {
	return records.ServiceRecord{Version: records.CurrentVersion, Cluster: cluster, Namespace: ns, Name: name, Global: global, Frontends: fes}
}

func fe(ip string, port uint16, proto, name string) records.Frontend {
	return records.Frontend{IP: netip.MustParseAddr(ip), Port: port, Protocol: proto, PortName: name}
}

func TestDesiredImports(t *testing.T) {
	recs := []records.ServiceRecord{
		// Dual-stack: one port per address family, merged into one.
		rec("c1", "default", "web", true,
			fe("10.96.0.10", 80, "TCP", "http"), fe("fd00::10", 80, "TCP", "http"),
			fe("10.96.0.10", 53, "UDP", "dns")),
		// Another cluster: the same http port, plus its own.
		rec("c2", "default", "web", true,
			fe("10.97.0.10", 80, "TCP", "http"), fe("10.97.0.10", 8443, "TCP", "https")),
		// Same name, another port number: a distinct port.
		rec("c3", "default", "web", true, fe("10.98.0.10", 8080, "TCP", "http")),
		// Not global anywhere: no import.
		rec("c1", "default", "local-only", false, fe("10.96.0.11", 80, "TCP", "")),
		// Global in c2 only, not global in c1: exported by c2.
		rec("c1", "other", "db", false, fe("10.96.0.12", 5432, "TCP", "")),
		rec("c2", "other", "db", true, fe("10.97.0.12", 5432, "TCP", "")),
	}
	local := map[string][]string{"default/web": {"10.96.0.10", "fd00::10"}}
	localIPs := func(k string) []string { return local[k] }

	got := DesiredImports(recs, localIPs)
	want := map[string]ServiceImport{
		"default/web": {Namespace: "default", Name: "web",
			Spec: ImportSpec{Type: ImportClusterSetIP, IPs: []string{"10.96.0.10", "fd00::10"}, Ports: []ImportPort{
				{Name: "dns", Protocol: "UDP", Port: 53},
				{Name: "http", Protocol: "TCP", Port: 80},
				{Name: "http", Protocol: "TCP", Port: 8080},
				{Name: "https", Protocol: "TCP", Port: 8443},
			}},
			Status: ImportStatus{Clusters: []ImportCluster{{"c1"}, {"c2"}, {"c3"}}}},
		"other/db": {Namespace: "other", Name: "db",
			Spec:   ImportSpec{Type: ImportClusterSetIP, Ports: []ImportPort{{Protocol: "TCP", Port: 5432}}},
			Status: ImportStatus{Clusters: []ImportCluster{{"c2"}}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("DesiredImports:\n got %+v\nwant %+v", got, want)
	}

	// The order of the records does not matter.
	rev := slices.Clone(recs)
	slices.Reverse(rev)
	if again := DesiredImports(rev, localIPs); !reflect.DeepEqual(again, got) {
		t.Errorf("reversed records:\n got %+v\nwant %+v", again, got)
	}

	// Nothing global: nothing to import (the managed ones get deleted).
	if got := DesiredImports(recs[3:5], localIPs); len(got) != 0 {
		t.Errorf("no global record: %+v", got)
	}
	if got := DesiredImports(nil, nil); len(got) != 0 {
		t.Errorf("no records: %+v", got)
	}
}

func TestImportEqual(t *testing.T) {
	a := ImportSpec{Type: ImportClusterSetIP, Ports: []ImportPort{{Name: "http", Protocol: "TCP", Port: 80}}}
	b := a
	b.IPs = []string{} // as decoded from an empty list
	if !a.equal(b) {
		t.Error("nil and empty ips differ")
	}
	b.Ports = []ImportPort{{Name: "http", Protocol: "TCP", Port: 81}}
	if a.equal(b) {
		t.Error("another port is equal")
	}
	if !(ImportStatus{}).equal(ImportStatus{Clusters: []ImportCluster{}}) {
		t.Error("nil and empty clusters differ")
	}
	if (ImportStatus{Clusters: []ImportCluster{{"c1"}}}).equal(ImportStatus{Clusters: []ImportCluster{{"c2"}}}) {
		t.Error("other clusters are equal")
	}
}

func TestServiceIPs(t *testing.T) {
	for _, c := range []struct {
		spec corev1.ServiceSpec
		want []string
	}{
		{corev1.ServiceSpec{ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1", "fd00::1"}}, []string{"10.96.0.1", "fd00::1"}},
		{corev1.ServiceSpec{ClusterIP: "10.96.0.1"}, []string{"10.96.0.1"}},
		{corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, ClusterIPs: []string{corev1.ClusterIPNone}}, nil},
		{corev1.ServiceSpec{}, nil},
	} {
		if got := serviceIPs(&corev1.Service{Spec: c.spec}); !slices.Equal(got, c.want) {
			t.Errorf("serviceIPs(%+v) = %v, want %v", c.spec, got, c.want)
		}
	}
}
