package translate

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

func ptr[T any](v T) *T { return &v }

func k8sService(mutate func(*corev1.Service)) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10"},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	if mutate != nil {
		mutate(s)
	}
	return s
}

type ep struct {
	addrs       []string
	ready, term *bool
}

func slice(name string, family discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "shop", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: family,
		Ports:       ports,
	}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: e.addrs, Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Terminating: e.term}})
	}
	return s
}

func sport(name string, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr(name), Port: ptr(port), Protocol: ptr(corev1.ProtocolTCP)}
}

func backends(ips ...string) []objects.ExplicitBackend {
	var out []objects.ExplicitBackend
	for _, ip := range ips {
		out = append(out, objects.ExplicitBackend{IP: ip})
	}
	return out
}

func TestService(t *testing.T) {
	v4 := discoveryv1.AddressTypeIPv4
	http := []discoveryv1.EndpointPort{sport("http", 8080)}
	base := func(f func(*objects.Service)) objects.Service {
		s := objects.Service{
			APIVersion: objects.APIVersion, Kind: objects.KindService,
			Metadata: objects.Meta{Name: "web", Namespace: "shop"},
			Spec: objects.ServiceSpec{
				VIPs:  []string{"10.96.0.10"},
				Ports: []objects.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"}},
			},
		}
		if f != nil {
			f(&s)
		}
		return s
	}
	tests := []struct {
		name     string
		svc      *corev1.Service
		slices   []*discoveryv1.EndpointSlice
		want     objects.Service
		served   bool
		warnings []string // substrings, in order
		err      string
	}{
		{
			name:   "ready backends only, sorted, deduplicated",
			svc:    k8sService(nil),
			served: true,
			slices: []*discoveryv1.EndpointSlice{
				slice("web-b", v4, http, ep{addrs: []string{"10.0.0.3"}}, ep{addrs: []string{"10.0.0.9"}, ready: ptr(false)}),
				slice("web-a", v4, http, ep{addrs: []string{"10.0.0.2"}, ready: ptr(true)}, ep{addrs: []string{"10.0.0.8"}, ready: ptr(true), term: ptr(true)}, ep{addrs: []string{"10.0.0.2"}}),
			},
			want: base(func(s *objects.Service) { s.Spec.Backends = backends("10.0.0.2", "10.0.0.3") }),
		},
		{
			name:   "slices of other services, namespaces and families ignored",
			svc:    k8sService(nil),
			served: true,
			slices: []*discoveryv1.EndpointSlice{
				func() *discoveryv1.EndpointSlice {
					s := slice("other", v4, http, ep{addrs: []string{"10.0.1.1"}})
					s.Labels[discoveryv1.LabelServiceName] = "api"
					return s
				}(),
				func() *discoveryv1.EndpointSlice {
					s := slice("web-x", v4, http, ep{addrs: []string{"10.0.1.2"}})
					s.Namespace = "prod"
					return s
				}(),
				slice("web-v6", discoveryv1.AddressTypeIPv6, http, ep{addrs: []string{"fd00::1"}}),
				slice("web-fqdn", discoveryv1.AddressTypeFQDN, http, ep{addrs: []string{"example.com"}}),
				nil,
			},
			want: base(nil),
		},
		{
			name:   "no ready endpoints: served without backends",
			svc:    k8sService(nil),
			served: true,
			slices: []*discoveryv1.EndpointSlice{slice("web-a", v4, http, ep{addrs: []string{"10.0.0.2"}, ready: ptr(false)})},
			want:   base(nil),
		},
		{
			name: "dual stack, UDP, default protocol, targetPort unset",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.ClusterIPs = []string{"10.96.0.10", "fd00:96::10"}
				s.Spec.Ports = []corev1.ServicePort{{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}, {Name: "dns-tcp", Port: 53}}
			}),
			served: true,
			slices: []*discoveryv1.EndpointSlice{
				slice("web-4", v4, nil, ep{addrs: []string{"10.0.0.2"}}),
				slice("web-6", discoveryv1.AddressTypeIPv6, nil, ep{addrs: []string{"fd00::2"}}),
			},
			want: base(func(s *objects.Service) {
				s.Spec.VIPs = []string{"10.96.0.10", "fd00:96::10"}
				s.Spec.Ports = []objects.ServicePort{{Name: "dns", Port: 53, Protocol: "UDP"}, {Name: "dns-tcp", Port: 53, Protocol: "TCP"}}
				s.Spec.Backends = backends("10.0.0.2", "fd00::2")
			}),
		},
		{
			name: "NodePort and LoadBalancer have a cluster IP; global annotations kept, others not",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeLoadBalancer
				s.Annotations = map[string]string{"isthmus.io/global": "true", "isthmus.io/affinity": "local", "isthmus.io/shared": "false", "kubectl.kubernetes.io/last-applied-configuration": "{}"}
				s.Labels = map[string]string{"app": "web"}
				s.Spec.Selector = map[string]string{"app": "web"}
			}),
			served: true,
			want: base(func(s *objects.Service) {
				s.Metadata.Annotations = map[string]string{"isthmus.io/global": "true", "isthmus.io/affinity": "local", "isthmus.io/shared": "false"}
				s.Spec.Type = objects.ServiceTypeLoadBalancer
			}),
		},
		{
			name: "NodePort: node ports and externalTrafficPolicy Local carried, both families",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeNodePort
				s.Spec.ClusterIPs = []string{"10.96.0.10", "fd00:96::10"}
				s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
				s.Spec.Ports[0].NodePort = 30080
				s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, NodePort: 30080})
			}),
			served: true,
			want: base(func(s *objects.Service) {
				s.Spec.VIPs = []string{"10.96.0.10", "fd00:96::10"}
				s.Spec.Type = objects.ServiceTypeNodePort
				s.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
				s.Spec.Ports = []objects.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP", NodePort: 30080}, {Name: "dns", Port: 53, Protocol: "UDP", NodePort: 30080}}
			}),
		},
		{
			name: "LoadBalancer: its node ports and its status's addresses served (Cluster is the default)",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeLoadBalancer
				s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
				s.Spec.Ports[0].NodePort = 31000
				s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "203.0.113.7"}}
			}),
			served: true,
			want: base(func(s *objects.Service) {
				s.Spec.Type = objects.ServiceTypeLoadBalancer
				s.Spec.Ports[0].NodePort = 31000
				s.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: "203.0.113.7"}}
			}),
		},
		{
			name: "LoadBalancer: loadBalancerIP requested, Local, externalIPs; hostnames and bad addresses left out",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeLoadBalancer
				s.Spec.ClusterIPs = []string{"10.96.0.10", "fd00:96::10"}
				s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
				s.Spec.LoadBalancerIP = "203.0.113.9"
				s.Spec.ExternalIPs = []string{"198.51.100.1", "224.0.0.1", "10.96.0.10", "203.0.113.9"}
				s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "203.0.113.9"}, {Hostname: "lb.example"}, {IP: "2001:db8::9"}, {IP: "2001:db8::9"}}
			}),
			served: true,
			want: base(func(s *objects.Service) {
				s.Spec.VIPs = []string{"10.96.0.10", "fd00:96::10"}
				s.Spec.Type = objects.ServiceTypeLoadBalancer
				s.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
				s.Spec.LoadBalancerIPs = []string{"203.0.113.9"}
				s.Spec.ExternalIPs = []string{"198.51.100.1"}
				// The requested address is also the assigned one.
				s.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: "203.0.113.9"}, {IP: "2001:db8::9"}}
			}),
			warnings: []string{
				"service shop/web: status.loadBalancer.ingress[3].ip 2001:db8::9 is listed twice (or is a cluster IP): served once",
				`service shop/web: spec.externalIPs[1] "224.0.0.1" is not a unicast IP address: not served`,
				"service shop/web: spec.externalIPs[2] 10.96.0.10 is listed twice (or is a cluster IP): served once",
				"service shop/web: spec.externalIPs[3] 203.0.113.9 is listed twice (or is a cluster IP): served once",
			},
		},
		{
			name: "LoadBalancer of another class: node ports only; externalIPs of a ClusterIP service carried",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeLoadBalancer
				s.Spec.LoadBalancerClass = ptr("example.com/lb")
				s.Spec.Ports[0].NodePort = 31000
				s.Spec.ExternalIPs = []string{"198.51.100.1"}
				s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "203.0.113.7"}}
			}),
			served: true,
			want: base(func(s *objects.Service) {
				s.Spec.Type = objects.ServiceTypeNodePort
				s.Spec.Ports[0].NodePort = 31000
				s.Spec.ExternalIPs = []string{"198.51.100.1"}
			}),
		},
		{
			name: "node port outside the range: left out with a warning, the cluster IP served",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeNodePort
				s.Spec.Ports[0].NodePort = 40000
			}),
			served:   true,
			want:     base(nil),
			warnings: []string{"service shop/web: spec.ports[0].nodePort 40000 is outside 30000-32767: node ports not served"},
		},
		{
			name: "a port without a node port (allocateLoadBalancerNodePorts false): left out with a warning",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeLoadBalancer
				s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "https", Port: 443, NodePort: 30443})
			}),
			served: true,
			want: base(func(s *objects.Service) {
				s.Spec.Ports = append(s.Spec.Ports, objects.ServicePort{Name: "https", Port: 443, Protocol: "TCP"})
				s.Spec.Type = objects.ServiceTypeLoadBalancer
			}),
			warnings: []string{"service shop/web: spec.ports[0] has no nodePort: node ports not served"},
		},
		{
			name: "clusterIP without clusterIPs (older objects)",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeNodePort
				s.Spec.ClusterIPs = nil
			}),
			served: true,
			want:   base(nil),
		},
		{
			name: "named targetPort resolved from the slices",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Ports[0].TargetPort = intstr.FromString("web")
			}),
			served: true,
			slices: []*discoveryv1.EndpointSlice{slice("web-a", v4, []discoveryv1.EndpointPort{sport("http", 9090)}, ep{addrs: []string{"10.0.0.2"}})},
			want: base(func(s *objects.Service) {
				s.Spec.Ports[0].TargetPort = 9090
				s.Spec.Backends = backends("10.0.0.2")
			}),
		},
		{
			name: "named targetPort, slices disagree: most common port, the others left out",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Ports[0].TargetPort = intstr.FromString("web")
			}),
			served: true,
			slices: []*discoveryv1.EndpointSlice{
				slice("web-a", v4, []discoveryv1.EndpointPort{sport("http", 9090)}, ep{addrs: []string{"10.0.0.2"}}),
				slice("web-b", v4, []discoveryv1.EndpointPort{sport("http", 9091)}, ep{addrs: []string{"10.0.0.3"}}, ep{addrs: []string{"10.0.0.4"}}),
				slice("web-c", v4, []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(9090)), Protocol: ptr(corev1.ProtocolUDP)}}, ep{addrs: []string{"10.0.0.5"}}),
			},
			want: base(func(s *objects.Service) {
				s.Spec.Ports[0].TargetPort = 9091
				s.Spec.Backends = backends("10.0.0.3", "10.0.0.4")
			}),
			warnings: []string{`spec.ports[0].targetPort "web": backends resolve it to different ports ([9090 9091]); using 9091`},
		},
		{
			name: "named targetPort no slice lists: no backends",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Ports[0].TargetPort = intstr.FromString("web")
			}),
			served:   true,
			slices:   []*discoveryv1.EndpointSlice{slice("web-a", v4, []discoveryv1.EndpointPort{sport("metrics", 9100)}, ep{addrs: []string{"10.0.0.2"}})},
			want:     base(func(s *objects.Service) { s.Spec.Ports[0].TargetPort = 0 }),
			warnings: []string{`no EndpointSlice lists this port`},
		},
		{
			name: "headless: not served",
			svc:  k8sService(func(s *corev1.Service) { s.Spec.ClusterIP = "None"; s.Spec.ClusterIPs = []string{"None"} }),
		},
		{
			name: "ExternalName: not served",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeExternalName
				s.Spec.ClusterIP, s.Spec.ClusterIPs, s.Spec.ExternalName = "", nil, "db.example.com"
			}),
		},
		{
			name: "no cluster IP yet: not served",
			svc:  k8sService(func(s *corev1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = "", nil }),
		},
		{
			name: "SCTP: error",
			svc: k8sService(func(s *corev1.Service) {
				s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "sig", Port: 3868, Protocol: corev1.ProtocolSCTP})
			}),
			err: "service shop/web: spec.ports[1].protocol: unsupported: SCTP",
		},
		{
			name: "bad cluster IP: error",
			svc:  k8sService(func(s *corev1.Service) { s.Spec.ClusterIPs = []string{"10.96.0"} }),
			err:  `service shop/web: spec.vips[0]: invalid IP address "10.96.0"`,
		},
		{
			name: "bad target port: error",
			svc:  k8sService(func(s *corev1.Service) { s.Spec.Ports[0].TargetPort = intstr.FromInt32(70000) }),
			err:  "service shop/web: spec.ports[0].targetPort: must be 1-65535, got 70000",
		},
		{
			name: "nil: error",
			err:  "service: nil",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, served, warnings, err := ServiceWithWarnings(tt.svc, tt.slices)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if served != tt.served {
				t.Fatalf("served = %v, want %v", served, tt.served)
			}
			if !served {
				return
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("service:\n got %+v\nwant %+v", got, tt.want)
			}
			if len(warnings) != len(tt.warnings) {
				t.Fatalf("warnings = %q, want %d", warnings, len(tt.warnings))
			}
			for i, w := range tt.warnings {
				if !strings.Contains(warnings[i], w) {
					t.Errorf("warning %d = %q, want containing %q", i, warnings[i], w)
				}
			}
			// Service is ServiceWithWarnings without the warnings.
			got2, served2, err2 := Service(tt.svc, tt.slices)
			if !reflect.DeepEqual(got2, got) || served2 != served || err2 != nil {
				t.Error("Service differs from ServiceWithWarnings")
			}
		})
	}
}
