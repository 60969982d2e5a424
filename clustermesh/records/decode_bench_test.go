package records

import (
	"net/netip"
	"testing"
)

// BenchmarkDecodeLBAssignment decodes an assignment as LB-IPAM stores
// it: every agent reads one per LoadBalancer service.
func BenchmarkDecodeLBAssignment(b *testing.B) {
	raw, err := LBAssignment{Namespace: "default", Name: "vip-00001",
		Addresses: []LBAddress{{IP: netip.MustParseAddr("100.64.0.51"), Pool: "bench"}}}.Marshal()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeLBAssignment(raw); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeService decodes a service record as the server's
// service syncer stores it (each agent watches its own cluster's).
func BenchmarkDecodeService(b *testing.B) {
	raw, err := ServiceRecord{Name: "vip-00001", Namespace: "default", Cluster: "c1", ClusterID: 1,
		Frontends: []Frontend{{IP: netip.MustParseAddr("10.98.0.1"), Port: 80, Protocol: "TCP"}}}.Marshal()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeService(raw); err != nil {
			b.Fatal(err)
		}
	}
}
