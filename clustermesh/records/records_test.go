package records

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

var (
	wgKey = "KBb4JdwVuPTjDRYmgbt5z/3qkmrYX8xD6Nb7Y7sWB3s=" // 32 bytes

	testConfig = ClusterConfig{
		Name: "c1", ID: 1,
		PodCIDRs:     []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd00:1::/48")},
		Capabilities: []string{CapSyncCanaries},
	}
	testNode = Node{
		Name: "n1", Cluster: "c1", ClusterID: 1,
		IPs:                []netip.Addr{netip.MustParseAddr("192.168.1.10"), netip.MustParseAddr("fd01::10")},
		PodCIDRs:           []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")},
		WireGuardPublicKey: wgKey,
		BootID:             "5d1f0f0e-8a7b-4c37-9d0e-0b6f5b8f6c1a",
		Labels:             map[string]string{"topology.kubernetes.io/zone": "a"},
	}
	testIP = IPCacheEntry{
		Prefix: netip.MustParsePrefix("10.1.1.5/32"), Identity: 1<<20 | 42,
		HostIP: netip.MustParseAddr("192.168.1.10"), OwnerName: "web-1", OwnerNamespace: "default", Cluster: "c1",
	}
	testService = ServiceRecord{
		Name: "web", Namespace: "default", Cluster: "c1", ClusterID: 1,
		Frontends: []Frontend{{IP: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: ProtocolTCP, PortName: "http"}},
		Backends: []Backend{
			{IP: netip.MustParseAddr("10.1.1.5"), Port: 8080, Protocol: ProtocolTCP, PortName: "http", Cluster: "c1"},
			{IP: netip.MustParseAddr("10.1.2.5"), Port: 8080, Protocol: ProtocolTCP, PortName: "http", Cluster: "c1"},
		},
		Global: true, Shared: true, Affinity: AffinityLocal,
	}
	testIdentity = IdentityRecord{ID: 1<<20 | 42, Labels: map[string]string{"app": "web", LabelCluster: "c1"}}
)

func mustMarshal(t testing.TB, r interface{ Marshal() ([]byte, error) }) []byte {
	t.Helper()
	b, err := r.Marshal()
	if err != nil {
		t.Fatalf("Marshal(%+v): %v", r, err)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	c, err := DecodeClusterConfig(mustMarshal(t, testConfig))
	if err != nil || c.Name != "c1" || c.Version != CurrentVersion || len(c.PodCIDRs) != 2 {
		t.Errorf("cluster config: %+v %v", c, err)
	}
	n, err := DecodeNode(mustMarshal(t, testNode))
	if err != nil || n.Name != "n1" || n.IPs[1] != testNode.IPs[1] || n.Labels["topology.kubernetes.io/zone"] != "a" {
		t.Errorf("node: %+v %v", n, err)
	}
	e, err := DecodeIPCacheEntry(mustMarshal(t, testIP))
	if err != nil || e != (IPCacheEntry{Version: 1, Prefix: testIP.Prefix, Identity: testIP.Identity, HostIP: testIP.HostIP, OwnerName: "web-1", OwnerNamespace: "default", Cluster: "c1"}) {
		t.Errorf("ipcache: %+v %v", e, err)
	}
	s, err := DecodeService(mustMarshal(t, testService))
	if err != nil || len(s.Backends) != 2 || s.Affinity != AffinityLocal || !s.Shared {
		t.Errorf("service: %+v %v", s, err)
	}
	r, err := DecodeIdentity(mustMarshal(t, testIdentity))
	if err != nil || r.ID != testIdentity.ID || r.Labels["app"] != "web" {
		t.Errorf("identity: %+v %v", r, err)
	}
	ref, err := DecodeIdentityRef(mustMarshal(t, IdentityRef{ID: 1<<20 | 1}))
	if err != nil || ref.ID != 1<<20|1 {
		t.Errorf("identity ref: %+v %v", ref, err)
	}
	now := time.Now().UTC().Round(time.Millisecond)
	st, err := DecodeStamp(mustMarshal(t, Stamp{Cluster: "c1", Time: now}))
	if err != nil || !st.Time.Equal(now) {
		t.Errorf("stamp: %+v %v", st, err)
	}
	// A world entry without host IP leaves the field out entirely.
	b := mustMarshal(t, IPCacheEntry{Prefix: netip.MustParsePrefix("0.0.0.0/0"), Identity: 2, Cluster: "c1"})
	if strings.Contains(string(b), "hostIP") {
		t.Errorf("zero hostIP encoded: %s", b)
	}
}

func TestDecodeRejects(t *testing.T) {
	good := string(mustMarshal(t, testNode))
	tests := []struct{ name, in, want string }{
		{"not json", `{`, "malformed"},
		{"null", `null`, "no version"},
		{"array", `[1]`, "malformed"},
		{"no version", strings.Replace(good, `"version":1,`, ``, 1), "no version"},
		{"future version", strings.Replace(good, `"version":1`, `"version":2`, 1), "version 2 not supported"},
		{"unknown field", strings.Replace(good, `"version":1`, `"version":1,"extra":true`, 1), "unknown field"},
		{"trailing", good + `{}`, "after top-level value"},
		{"bad ip", strings.Replace(good, `192.168.1.10`, `192.168.1.300`, 1), "malformed"},
		{"empty ip", strings.Replace(good, `"192.168.1.10"`, `""`, 1), "ips[0]"},
		{"mapped ip", strings.Replace(good, `192.168.1.10`, `::ffff:192.168.1.10`, 1), "IPv4-mapped"},
		{"host bits", strings.Replace(good, `10.1.1.0/24`, `10.1.1.1/24`, 1), "host bits"},
		{"bad wg key", strings.Replace(good, wgKey, "AAAA", 1), "wireguardPublicKey"},
		{"bad cluster", strings.Replace(good, `"cluster":"c1"`, `"cluster":"C 1"`, 1), "cluster name"},
		{"cluster id 0", strings.Replace(good, `"clusterID":1`, `"clusterID":0`, 1), "cluster ID 0"},
		{"cluster id big", strings.Replace(good, `"clusterID":1`, `"clusterID":4096`, 1), "cluster ID 4096"},
		{"bad label", strings.Replace(good, `"topology.kubernetes.io/zone":"a"`, `"a b":"c"`, 1), "label key"},
		{"huge", `{"version":1,"name":"` + strings.Repeat("a", MaxRecordSize) + `"}`, "more than"},
	}
	for _, tt := range tests {
		_, err := DecodeNode([]byte(tt.in))
		if err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: DecodeNode = %v, want ErrMalformed containing %q", tt.name, err, tt.want)
		}
	}
}

func TestServiceRules(t *testing.T) {
	mod := func(f func(s *ServiceRecord)) error {
		s := testService
		s.Frontends = append([]Frontend(nil), s.Frontends...)
		s.Backends = append([]Backend(nil), s.Backends...)
		f(&s)
		_, err := s.Marshal()
		return err
	}
	for name, tt := range map[string]struct {
		f    func(s *ServiceRecord)
		want string
	}{
		"no frontends":     {func(s *ServiceRecord) { s.Frontends = nil }, "no frontends"},
		"port 0":           {func(s *ServiceRecord) { s.Frontends[0].Port = 0 }, "port must be"},
		"sctp":             {func(s *ServiceRecord) { s.Frontends[0].Protocol = "SCTP" }, "protocol"},
		"dup backend":      {func(s *ServiceRecord) { s.Backends[1] = s.Backends[0] }, "twice"},
		"foreign backend":  {func(s *ServiceRecord) { s.Backends[0].Cluster = "c2" }, "backend of cluster"},
		"unmatched port":   {func(s *ServiceRecord) { s.Backends[0].PortName = "grpc" }, "no frontend"},
		"bad affinity":     {func(s *ServiceRecord) { s.Affinity = "sticky" }, "affinity"},
		"local not global": {func(s *ServiceRecord) { s.Global, s.Shared = false, false }, "global services only"},
	} {
		if err := mod(tt.f); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", name, err, tt.want)
		}
	}
	if err := mod(func(s *ServiceRecord) { s.Global, s.Shared, s.Affinity = false, false, "" }); err != nil {
		t.Errorf("plain local service: %v", err)
	}
}

func TestValidateAgainstKeyAndSource(t *testing.T) {
	node := mustMarshal(t, testNode)
	if _, err := ValidateNode(NodeKey("c1", "n1"), node, "c1", 1); err != nil {
		t.Fatalf("valid node: %v", err)
	}
	tests := []struct {
		name    string
		err     error
		wantErr error
	}{
		{"node under another cluster's key", second(ValidateNode(NodeKey("c2", "n1"), node, "c2", 2)), ErrClusterMismatch},
		{"node from the wrong connection", second(ValidateNode(NodeKey("c1", "n1"), node, "c2", 2)), ErrClusterMismatch},
		{"node with another cluster ID", second(ValidateNode(NodeKey("c1", "n1"), node, "c1", 7)), ErrClusterMismatch},
		{"node under another name", second(ValidateNode(NodeKey("c1", "n2"), node, "c1", 1)), ErrMalformed},
		{"node bad key", second(ValidateNode("isthmus/state/nodes/v1/c1", node, "c1", 1)), ErrMalformed},
		{"node bad value", second(ValidateNode(NodeKey("c1", "n1"), []byte("{}"), "c1", 1)), ErrMalformed},
	}
	ip := mustMarshal(t, testIP)
	svc := mustMarshal(t, testService)
	cfg := mustMarshal(t, testConfig)
	id := mustMarshal(t, testIdentity)
	tests = append(tests, []struct {
		name    string
		err     error
		wantErr error
	}{
		{"ip ok", second(ValidateIPCacheEntry(IPCacheKey("c1", "n1", testIP.Prefix), ip, "c1", 1)), nil},
		{"ip wrong prefix", second(ValidateIPCacheEntry(IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.1.6/32")), ip, "c1", 1)), ErrMalformed},
		{"ip wrong source", second(ValidateIPCacheEntry(IPCacheKey("c1", "n1", testIP.Prefix), ip, "c2", 2)), ErrClusterMismatch},
		{"ip identity of another cluster", second(ValidateIPCacheEntry(IPCacheKey("c1", "n1", testIP.Prefix), ip, "c1", 3)), ErrClusterMismatch},
		{"service ok", second(ValidateService(ServiceKey("c1", "default", "web"), svc, "c1", 1)), nil},
		{"service renamed", second(ValidateService(ServiceKey("c1", "default", "api"), svc, "c1", 1)), ErrMalformed},
		{"service wrong id", second(ValidateService(ServiceKey("c1", "default", "web"), svc, "c1", 2)), ErrClusterMismatch},
		{"config ok", second(ValidateClusterConfig(ClusterConfigKey("c1"), cfg, "c1", 1)), nil},
		{"config key of another cluster", second(ValidateClusterConfig(ClusterConfigKey("c2"), cfg, "c2", 1)), ErrClusterMismatch},
		{"config wrong id", second(ValidateClusterConfig(ClusterConfigKey("c1"), cfg, "c1", 9)), ErrClusterMismatch},
		{"identity ok", second(ValidateIdentity(IdentityIDKey(testIdentity.ID), id, "c1", 1)), nil},
		{"identity wrong key", second(ValidateIdentity(IdentityIDKey(testIdentity.ID+1), id, "c1", 1)), ErrMalformed},
		{"identity of another cluster id", second(ValidateIdentity(IdentityIDKey(testIdentity.ID), id, "c1", 2)), ErrClusterMismatch},
		{"identity labels name another cluster", second(ValidateIdentity(IdentityIDKey(testIdentity.ID), id, "c9", 1)), ErrClusterMismatch},
	}...)
	for _, tt := range tests {
		switch {
		case tt.wantErr == nil && tt.err != nil:
			t.Errorf("%s: %v", tt.name, tt.err)
		case tt.wantErr != nil && !errors.Is(tt.err, tt.wantErr):
			t.Errorf("%s: error %v, want %v", tt.name, tt.err, tt.wantErr)
		}
	}
	if _, err := ValidateNode(NodeKey("c1", "n1"), node, "", 0); err == nil {
		t.Error("validation without an expected cluster must fail")
	}
}

func second[T any](_ T, err error) error { return err }

func TestCheckClusterConflicts(t *testing.T) {
	a := testConfig
	b := ClusterConfig{Name: "c2", ID: 2, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}}
	if err := CheckClusterConflicts(a, b); err != nil {
		t.Fatal(err)
	}
	same := b
	same.Name = "c1"
	overlap := b
	overlap.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	dupID := b
	dupID.ID = 1
	for name, tt := range map[string]struct {
		b    ClusterConfig
		want string
	}{
		"name":    {same, `both are named "c1"`},
		"id":      {dupID, "both have cluster ID 1"},
		"overlap": {overlap, "10.1.0.0/16"},
	} {
		if err := CheckClusterConflicts(a, tt.b); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", name, err, tt.want)
		}
	}
}
