package objects

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/bpf"
)

func validService() Service {
	return Service{
		APIVersion: APIVersion,
		Kind:       KindService,
		Metadata:   Meta{Name: "web", Namespace: "default"},
		Spec: ServiceSpec{
			VIPs:     []string{"10.96.0.10"},
			Ports:    []ServicePort{{Port: 80}},
			Selector: map[string]string{"app": "web"},
		},
	}
}

func TestServiceValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Service)
		want   string // "" = valid
	}{
		{"valid", func(*Service) {}, ""},
		{"dual stack", func(s *Service) { s.Spec.VIPs = []string{"10.0.0.1", "2001:db8::1"} }, ""},
		{"backends only", func(s *Service) { s.Spec.Selector = nil; s.Spec.Backends = []ExplicitBackend{{IP: "10.1.0.1"}} }, ""},
		{"selector and backends", func(s *Service) { s.Spec.Backends = []ExplicitBackend{{IP: "fd00::1"}} }, ""},
		{"lower-case protocol", func(s *Service) { s.Spec.Ports[0].Protocol = "udp" }, ""},
		{"same port two protocols", func(s *Service) {
			s.Spec.Ports = []ServicePort{{Port: 53, Protocol: "UDP"}, {Port: 53}}
		}, ""},
		{"wrong apiVersion", func(s *Service) { s.APIVersion = "v1" }, `apiVersion: must be "isthmus.io/v1alpha1", got "v1"`},
		{"wrong kind", func(s *Service) { s.Kind = "NetworkPolicy" }, `kind: must be "Service"`},
		{"no name", func(s *Service) { s.Metadata.Name = "" }, "metadata.name: must not be empty"},
		{"long name", func(s *Service) { s.Metadata.Name = strings.Repeat("a", 64) }, "metadata.name: must be at most 63"},
		{"name with dot", func(s *Service) { s.Metadata.Name = "a.b" }, "metadata.name: must be a DNS-1123 label"},
		{"name leading dash", func(s *Service) { s.Metadata.Name = "-a" }, "metadata.name: must be a DNS-1123 label"},
		{"no namespace", func(s *Service) { s.Metadata.Namespace = "" }, "metadata.namespace: must not be empty"},
		{"bad namespace", func(s *Service) { s.Metadata.Namespace = "Prod" }, `metadata.namespace: must be a DNS-1123 label (lower-case alphanumerics and '-', starting and ending alphanumeric), got "Prod"`},
		{"bad label", func(s *Service) { s.Metadata.Labels = map[string]string{"a": "b c"} }, `metadata.labels["a"]: label value "b c"`},
		{"bad annotation key", func(s *Service) { s.Metadata.Annotations = map[string]string{"a b": "anything goes"} }, `metadata.annotations: label key "a b"`},
		{"annotation value free", func(s *Service) { s.Metadata.Annotations = map[string]string{"isthmus.io/global": "true, really"} }, ""},
		{"no vips", func(s *Service) { s.Spec.VIPs = nil }, "spec.vips: must list at least one address"},
		{"bad vip", func(s *Service) { s.Spec.VIPs = []string{"10.0.0"} }, `spec.vips[0]: invalid IP address "10.0.0"`},
		{"cidr vip", func(s *Service) { s.Spec.VIPs = []string{"10.0.0.0/24"} }, `spec.vips[0]: invalid IP address`},
		{"unspecified vip", func(s *Service) { s.Spec.VIPs = []string{"::"} }, `spec.vips[0]: "::": unspecified address`},
		{"multicast vip", func(s *Service) { s.Spec.VIPs = []string{"224.0.0.1"} }, "multicast"},
		{"loopback vip", func(s *Service) { s.Spec.VIPs = []string{"127.0.0.1"} }, "loopback"},
		{"zoned vip", func(s *Service) { s.Spec.VIPs = []string{"fe80::1%eth0"} }, "zones"},
		{"mapped vip", func(s *Service) { s.Spec.VIPs = []string{"::ffff:10.0.0.1"} }, "use the plain IPv4 form 10.0.0.1"},
		{"two v4", func(s *Service) { s.Spec.VIPs = []string{"10.0.0.1", "10.0.0.2"} }, `spec.vips[1]: at most one IPv4 address allowed, already have "10.0.0.1"`},
		{"two v6", func(s *Service) { s.Spec.VIPs = []string{"fd00::1", "10.0.0.1", "fd00::2"} }, `spec.vips[2]: at most one IPv6`},
		{"no ports", func(s *Service) { s.Spec.Ports = nil }, "spec.ports: must list at least one port"},
		{"port zero", func(s *Service) { s.Spec.Ports[0].Port = 0 }, "spec.ports[0].port: must be 1-65535, got 0"},
		{"bad protocol", func(s *Service) { s.Spec.Ports[0].Protocol = "ICMP" }, `spec.ports[0].protocol: must be TCP or UDP, got "ICMP"`},
		{"duplicate port", func(s *Service) {
			s.Spec.Ports = []ServicePort{{Port: 80}, {Port: 443}, {Port: 80, Protocol: "tcp"}}
		}, "spec.ports[2]: port 80/TCP is already listed as spec.ports[0]"},
		{"bad port name", func(s *Service) { s.Spec.Ports[0].Name = "HTTP" }, "spec.ports[0].name: must be a DNS-1123 label"},
		{"duplicate port name", func(s *Service) {
			s.Spec.Ports = []ServicePort{{Name: "a", Port: 80}, {Name: "a", Port: 81}}
		}, `spec.ports[1].name: "a" is already used by spec.ports[0]`},
		{"bad selector", func(s *Service) { s.Spec.Selector = map[string]string{"app/": "x"} }, `spec.selector: label key "app/"`},
		{"bad backend", func(s *Service) { s.Spec.Backends = []ExplicitBackend{{IP: "10.1.0.1"}, {IP: "nope"}} }, `spec.backends[1].ip: invalid IP address "nope"`},
		{"no selector no backends", func(s *Service) { s.Spec.Selector = map[string]string{} }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := validService()
			tt.mutate(&s)
			err := s.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate = %v, want containing %q", err, tt.want)
			}
		})
	}
}

func validPolicy() NetworkPolicy {
	return NetworkPolicy{
		APIVersion: APIVersion,
		Kind:       KindNetworkPolicy,
		Metadata:   Meta{Name: "p", Namespace: "default"},
		Spec: PolicySpec{
			Ingress: []IngressRule{{FromEntities: []string{"world"}}},
		},
	}
}

func TestNetworkPolicyValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*NetworkPolicy)
		want   string
	}{
		{"valid", func(*NetworkPolicy) {}, ""},
		{"egress only", func(p *NetworkPolicy) { p.Spec.Ingress = nil; p.Spec.Egress = []EgressRule{{}} }, ""},
		{"entities any case", func(p *NetworkPolicy) { p.Spec.Ingress[0].FromEntities = []string{"HOST", "Cluster", "all"} }, ""},
		{"ports", func(p *NetworkPolicy) {
			p.Spec.Ingress[0].ToPorts = []PortRule{{Port: 80}, {Port: 53, Protocol: "udp"}, {Protocol: "icmp"}, {Port: 1, Protocol: "any"}, {}}
		}, ""},
		{"wrong kind", func(p *NetworkPolicy) { p.Kind = "Service" }, `kind: must be "NetworkPolicy"`},
		{"no rules", func(p *NetworkPolicy) { p.Spec.Ingress = []IngressRule{} }, "spec: needs at least one ingress or egress rule, or policyTypes"},
		{"bad endpoint selector", func(p *NetworkPolicy) {
			p.Spec.EndpointSelector.MatchLabels = map[string]string{"a": "-"}
		}, `spec.endpointSelector.matchLabels["a"]: label value "-"`},
		{"bad peer selector", func(p *NetworkPolicy) {
			p.Spec.Egress = []EgressRule{{}, {ToEndpoints: []Selector{{}, {MatchLabels: map[string]string{"": "x"}}}}}
		}, `spec.egress[1].toEndpoints[1].matchLabels: label key ""`},
		{"bad entity", func(p *NetworkPolicy) { p.Spec.Ingress[0].FromEntities = []string{"host", "nodes"} }, `spec.ingress[0].fromEntities[1]: must be one of host, remote-node, world, all, cluster, got "nodes"`},
		{"bad egress entity", func(p *NetworkPolicy) { p.Spec.Egress = []EgressRule{{ToEntities: []string{""}}} }, `spec.egress[0].toEntities[0]`},
		{"bad protocol", func(p *NetworkPolicy) { p.Spec.Ingress[0].ToPorts = []PortRule{{Protocol: "gre"}} }, `spec.ingress[0].toPorts[0].protocol: must be TCP, UDP, ICMP or ANY, got "gre"`},
		{"icmp with port", func(p *NetworkPolicy) { p.Spec.Ingress[0].ToPorts = []PortRule{{Port: 8, Protocol: "ICMP"}} }, "spec.ingress[0].toPorts[0].port: must be 0 or absent for ICMP, got 8"},
		{"policyTypes without rules", func(p *NetworkPolicy) { p.Spec.Ingress = nil; p.Spec.PolicyTypes = []string{"Ingress", "Egress"} }, ""},
		{"policyTypes with its rules", func(p *NetworkPolicy) { p.Spec.PolicyTypes = []string{"Ingress"} }, ""},
		{"policyTypes bad", func(p *NetworkPolicy) { p.Spec.PolicyTypes = []string{"ingress"} }, `spec.policyTypes[0]: must be Ingress or Egress, got "ingress"`},
		{"policyTypes duplicate", func(p *NetworkPolicy) { p.Spec.PolicyTypes = []string{"Ingress", "Ingress"} }, `spec.policyTypes[1]: "Ingress" is already listed as spec.policyTypes[0]`},
		{"policyTypes excludes ingress rules", func(p *NetworkPolicy) { p.Spec.PolicyTypes = []string{"Egress"} }, "spec.ingress: has rules but spec.policyTypes does not list Ingress"},
		{"policyTypes excludes egress rules", func(p *NetworkPolicy) {
			p.Spec.Egress = []EgressRule{{}}
			p.Spec.PolicyTypes = []string{"Ingress"}
		}, "spec.egress: has rules but spec.policyTypes does not list Egress"},
		{"expressions", func(p *NetworkPolicy) {
			p.Spec.EndpointSelector.MatchExpressions = []LabelSelectorRequirement{{Key: "app", Operator: "In", Values: []string{"a", "b"}}, {Key: "x", Operator: "DoesNotExist"}}
			p.Spec.Ingress[0].FromEndpoints = []Selector{{MatchExpressions: []LabelSelectorRequirement{{Key: "isthmus.io/namespace", Operator: "Exists"}, {Key: "t", Operator: "NotIn", Values: []string{"x"}}}}}
		}, ""},
		{"expression bad operator", func(p *NetworkPolicy) {
			p.Spec.EndpointSelector.MatchExpressions = []LabelSelectorRequirement{{Key: "app", Operator: "in", Values: []string{"a"}}}
		}, `spec.endpointSelector.matchExpressions[0].operator: must be In, NotIn, Exists or DoesNotExist, got "in"`},
		{"expression bad key", func(p *NetworkPolicy) {
			p.Spec.Ingress[0].FromEndpoints = []Selector{{MatchExpressions: []LabelSelectorRequirement{{Key: "a b", Operator: "Exists"}}}}
		}, `spec.ingress[0].fromEndpoints[0].matchExpressions[0].key: label key "a b"`},
		{"expression In without values", func(p *NetworkPolicy) {
			p.Spec.EndpointSelector.MatchExpressions = []LabelSelectorRequirement{{Key: "app", Operator: "In"}}
		}, "spec.endpointSelector.matchExpressions[0].values: must not be empty for operator In"},
		{"expression Exists with values", func(p *NetworkPolicy) {
			p.Spec.EndpointSelector.MatchExpressions = []LabelSelectorRequirement{{Key: "app", Operator: "Exists", Values: []string{"a"}}}
		}, "spec.endpointSelector.matchExpressions[0].values: must be empty for operator Exists"},
		{"expression bad value", func(p *NetworkPolicy) {
			p.Spec.EndpointSelector.MatchExpressions = []LabelSelectorRequirement{{Key: "app", Operator: "NotIn", Values: []string{"ok", "-"}}}
		}, `spec.endpointSelector.matchExpressions[0].values[1]: label value "-"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := validPolicy()
			tt.mutate(&p)
			err := p.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate = %v, want containing %q", err, tt.want)
			}
		})
	}
}

func TestPortRuleEffectiveProtocol(t *testing.T) {
	tests := []struct {
		in   PortRule
		want string
	}{
		{PortRule{}, "ANY"},
		{PortRule{Port: 80}, "TCP"},
		{PortRule{Protocol: "tcp"}, "TCP"},
		{PortRule{Port: 53, Protocol: "Udp"}, "UDP"},
		{PortRule{Protocol: "icmp"}, "ICMP"},
	}
	for _, tt := range tests {
		if got := tt.in.EffectiveProtocol(); got != tt.want {
			t.Errorf("%+v.EffectiveProtocol() = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestKey(t *testing.T) {
	s := validService()
	s.Metadata.Namespace = ""
	if got := Key(s); got != "Service/default/web" {
		t.Errorf("Key = %q", got)
	}
	p := validPolicy()
	p.Metadata.Namespace = "prod"
	if got := Key(&p); got != "NetworkPolicy/prod/p" {
		t.Errorf("Key = %q", got)
	}
	if got := Key(nil); got != "" {
		t.Errorf("Key(nil) = %q", got)
	}
}

func TestFrontends(t *testing.T) {
	s := validService()
	s.Spec.VIPs = []string{"10.0.0.1", "fd00::1"}
	s.Spec.Ports = []ServicePort{{Port: 80}, {Port: 53, Protocol: "udp"}}
	got, err := s.Frontends()
	if err != nil {
		t.Fatal(err)
	}
	v4, v6 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")
	want := []bpf.Frontend{
		{VIP: v4, Port: 80, Proto: bpf.ProtoTCP},
		{VIP: v4, Port: 53, Proto: bpf.ProtoUDP},
		{VIP: v6, Port: 80, Proto: bpf.ProtoTCP},
		{VIP: v6, Port: 53, Proto: bpf.ProtoUDP},
	}
	if !slices.Equal(got, want) {
		t.Errorf("Frontends = %v, want %v", got, want)
	}

	bad := []struct {
		name   string
		mutate func(*Service)
		want   string
	}{
		{"bad vip", func(s *Service) { s.Spec.VIPs = []string{"x"} }, `service default/web: spec.vips[0]: invalid IP address "x"`},
		{"bad protocol", func(s *Service) { s.Spec.Ports[0].Protocol = "sctp" }, "spec.ports[0].protocol"},
		{"zero port", func(s *Service) { s.Spec.Ports[0].Port = 0 }, "spec.ports[0].port"},
	}
	for _, tt := range bad {
		s := validService()
		tt.mutate(&s)
		fs, err := s.Frontends()
		if err == nil || fs != nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Frontends = %v, %v; want error containing %q", tt.name, fs, err, tt.want)
		}
	}
}

func TestCheckConflicts(t *testing.T) {
	mk := func(ns, name string, vips []string, ports ...ServicePort) Service {
		s := validService()
		s.Metadata = Meta{Name: name, Namespace: ns}
		s.Spec.VIPs = vips
		s.Spec.Ports = ports
		return s
	}
	existing := []Service{
		mk("default", "web", []string{"10.0.0.1", "fd00::1"}, ServicePort{Port: 80}),
		mk("other", "dns", []string{"10.0.0.53"}, ServicePort{Port: 53, Protocol: "UDP"}),
		{Metadata: Meta{Name: "broken", Namespace: "default"}, Spec: ServiceSpec{VIPs: []string{"nope", "10.0.0.9"}, Ports: []ServicePort{{Port: 9}}}},
		func() Service {
			s := mk("default", "ext", []string{"10.0.0.70"}, ServicePort{Port: 80})
			s.Spec.ExternalIPs = []string{"203.0.113.10"}
			return s
		}(),
		func() Service {
			s := mk("default", "np", []string{"10.0.0.80", "fd00::80"}, ServicePort{Port: 80, NodePort: 30080})
			s.Spec.Type = ServiceTypeNodePort
			return s
		}(),
	}
	nodePort := func(s Service, typ string) Service {
		s.Spec.Type = typ
		return s
	}
	withExternal := func(s Service, ips ...string) Service {
		s.Spec.ExternalIPs = ips
		return s
	}
	tests := []struct {
		name string
		svc  Service
		want string
	}{
		{"new vip", mk("default", "api", []string{"10.0.0.2"}, ServicePort{Port: 80}), ""},
		{"same vip other port", mk("default", "api", []string{"10.0.0.1"}, ServicePort{Port: 443}), ""},
		{"same vip port other protocol", mk("default", "api", []string{"10.0.0.53"}, ServicePort{Port: 53}), ""},
		{"update of itself", mk("default", "web", []string{"10.0.0.1"}, ServicePort{Port: 80}), ""},
		{"same name other namespace", mk("prod", "web", []string{"10.0.0.1"}, ServicePort{Port: 80}),
			"service prod/web: frontend 10.0.0.1:80/tcp is already used by service default/web"},
		{"v6 clash", mk("default", "api", []string{"fd00::1"}, ServicePort{Port: 80, Protocol: "tcp"}),
			"frontend [fd00::1]:80/tcp is already used by service default/web"},
		{"udp clash", mk("default", "dns2", []string{"10.0.0.53"}, ServicePort{Port: 53, Protocol: "udp"}),
			"service default/dns2: frontend 10.0.0.53:53/udp is already used by service other/dns"},
		{"clash with the valid part of a broken service", mk("default", "x", []string{"10.0.0.9"}, ServicePort{Port: 9}),
			"already used by service default/broken"},
		{"invalid new service", mk("default", "x", []string{"bad"}, ServicePort{Port: 9}), `invalid IP address "bad"`},
		{"external IP clash", withExternal(mk("default", "x", []string{"10.0.0.71"}, ServicePort{Port: 80}), "203.0.113.10"),
			"frontend 203.0.113.10:80/tcp is already used by service default/ext"},
		{"external IP on another port", withExternal(mk("default", "x", []string{"10.0.0.71"}, ServicePort{Port: 443}), "203.0.113.10"), ""},
		{"a VIP that is another service's external IP", mk("default", "x", []string{"203.0.113.10"}, ServicePort{Port: 80}),
			"already used by service default/ext"},
		{"node port clash", nodePort(mk("prod", "x", []string{"10.0.0.81"}, ServicePort{Port: 8080, NodePort: 30080}), ServiceTypeNodePort),
			"service prod/x: node port 30080/tcp is already used by service default/np"},
		{"node port clash in the other family only", nodePort(mk("prod", "x", []string{"fd00::81"}, ServicePort{Port: 8080, NodePort: 30080}), ServiceTypeLoadBalancer),
			"node port 30080/tcp is already used by service default/np"},
		{"node port other protocol", nodePort(mk("prod", "x", []string{"10.0.0.81"}, ServicePort{Port: 8080, NodePort: 30080, Protocol: "UDP"}), ServiceTypeNodePort), ""},
		{"node port number as a port", mk("prod", "x", []string{"10.0.0.81"}, ServicePort{Port: 30080}), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckConflicts(existing, tt.svc)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("CheckConflicts: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("CheckConflicts = %v, want containing %q", err, tt.want)
			}
		})
	}
}

func TestNodePortFrontends(t *testing.T) {
	s := validService()
	s.Spec.VIPs = []string{"10.0.0.1", "fd00::1"}
	s.Spec.Ports = []ServicePort{{Port: 80, TargetPort: 8080, NodePort: 30080}, {Port: 53, Protocol: "udp", NodePort: 30053}, {Port: 443}}
	if got := s.NodePortFrontends(); got != nil {
		t.Fatalf("ClusterIP: NodePortFrontends = %v, want none", got)
	}
	s.Spec.Type = ServiceTypeLoadBalancer
	want := []bpf.Frontend{bpf.NodePort(false, 30080, bpf.ProtoTCP), bpf.NodePort(false, 30053, bpf.ProtoUDP),
		bpf.NodePort(true, 30080, bpf.ProtoTCP), bpf.NodePort(true, 30053, bpf.ProtoUDP)}
	if got := s.NodePortFrontends(); !slices.Equal(got, want) {
		t.Fatalf("NodePortFrontends = %v, want %v", got, want)
	}
	if got := want[0].String(); got != "0.0.0.0:30080/tcp" {
		t.Errorf("String = %q", got)
	}
	// PortFor tells a node port from a port of the same number.
	if p, ok := s.PortFor(bpf.NodePort(true, 30080, bpf.ProtoTCP)); !ok || p.Target() != 8080 {
		t.Errorf("PortFor(node port 30080) = %+v, %v", p, ok)
	}
	if _, ok := s.PortFor(bpf.NodePort(false, 30080, bpf.ProtoUDP)); ok {
		t.Errorf("PortFor(node port 30080/udp) found a port")
	}
	if _, ok := s.PortFor(bpf.Frontend{VIP: netip.MustParseAddr("10.0.0.1"), Port: 30080, Proto: bpf.ProtoTCP}); ok {
		t.Errorf("PortFor(10.0.0.1:30080) found a port")
	}
}

func TestSelectorMatches(t *testing.T) {
	l := map[string]string{"app": "web", "tier": "front"}
	tests := []struct {
		name string
		sel  Selector
		want bool
	}{
		{"empty", Selector{}, true},
		{"labels", Selector{MatchLabels: map[string]string{"app": "web"}}, true},
		{"labels miss", Selector{MatchLabels: map[string]string{"app": "db"}}, false},
		{"In", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "app", Operator: OpIn, Values: []string{"db", "web"}}}}, true},
		{"In miss", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "app", Operator: OpIn, Values: []string{"db"}}}}, false},
		{"In absent key", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "zone", Operator: OpIn, Values: []string{""}}}}, false},
		{"NotIn", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "app", Operator: OpNotIn, Values: []string{"db"}}}}, true},
		{"NotIn miss", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "app", Operator: OpNotIn, Values: []string{"web"}}}}, false},
		{"NotIn absent key", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "zone", Operator: OpNotIn, Values: []string{"a"}}}}, true},
		{"Exists", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "tier", Operator: OpExists}}}, true},
		{"Exists miss", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "zone", Operator: OpExists}}}, false},
		{"DoesNotExist", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "zone", Operator: OpDoesNotExist}}}, true},
		{"DoesNotExist miss", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "app", Operator: OpDoesNotExist}}}, false},
		{"labels and expression both needed", Selector{MatchLabels: map[string]string{"app": "web"}, MatchExpressions: []LabelSelectorRequirement{{Key: "tier", Operator: OpIn, Values: []string{"back"}}}}, false},
		{"unknown operator matches nothing", Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "app", Operator: "Gt"}}}, false},
	}
	for _, tt := range tests {
		if got := tt.sel.Matches(l); got != tt.want {
			t.Errorf("%s: Matches = %v, want %v", tt.name, got, tt.want)
		}
	}
	if !(Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "k", Operator: OpExists}}}).Names("k") || (Selector{MatchLabels: map[string]string{"a": "b"}}).Names("k") {
		t.Error("Names")
	}
}

func TestPolicySpecEnforces(t *testing.T) {
	rules := PolicySpec{Ingress: []IngressRule{{}}}
	if !rules.Enforces(PolicyTypeIngress) || rules.Enforces(PolicyTypeEgress) {
		t.Error("without policyTypes: a direction is enforced when it has rules")
	}
	types := PolicySpec{PolicyTypes: []string{PolicyTypeEgress}}
	if types.Enforces(PolicyTypeIngress) || !types.Enforces(PolicyTypeEgress) {
		t.Error("with policyTypes: exactly the listed directions")
	}
}

func TestServiceExternalAddrs(t *testing.T) {
	s := Service{Spec: ServiceSpec{ExternalIPs: []string{"192.0.2.1", "2001:db8::1", "192.0.2.1"}},
		Status: ServiceStatus{LoadBalancer: LoadBalancerStatus{Ingress: []LoadBalancerIngress{{IP: "198.51.100.7"}, {IP: "bogus"}, {IP: "2001:db8::1"}}}}}
	got := fmt.Sprint(s.ExternalAddrs())
	if want := "[192.0.2.1 2001:db8::1 198.51.100.7]"; got != want {
		t.Fatalf("ExternalAddrs = %s, want %s", got, want)
	}
}
