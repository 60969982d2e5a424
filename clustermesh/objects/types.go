package objects

import (
	"slices"
	"strings"
)

// APIVersion is the only apiVersion the kinds of this package accept.
const APIVersion = "isthmus.io/v1alpha1"

// Kind names.
const (
	KindService       = "Service"
	KindNetworkPolicy = "NetworkPolicy"
)

// Protocol names, as normalised by Decode.
const (
	ProtocolTCP  = "TCP"
	ProtocolUDP  = "UDP"
	ProtocolICMP = "ICMP" // in policies: ICMP and ICMPv6
	ProtocolANY  = "ANY"  // in policies: any protocol
)

// Entities a policy rule may name in fromEntities/toEntities.
const (
	EntityHost    = "host"    // the local node
	EntityWorld   = "world"   // anything outside the mesh
	EntityAll     = "all"     // any peer at all
	EntityCluster = "cluster" // every workload of the local cluster, its nodes and remote nodes
	// EntityRemoteNode is every other node of the mesh (this cluster's and
	// other clusters'): the source of traffic from outside that another
	// node SNATed to its own address (externalTrafficPolicy Cluster).
	EntityRemoteNode = "remote-node"
)

// DefaultNamespace is the namespace of objects that name none.
const DefaultNamespace = "default"

// Object is a decoded, typed object.
type Object interface {
	GetKind() string
	GetMeta() Meta
	Validate() error
}

// Meta is the metadata common to all kinds.
type Meta struct {
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Service is a standalone-mode load-balanced service.
type Service struct {
	APIVersion string      `json:"apiVersion"`
	Kind       string      `json:"kind"`
	Metadata   Meta        `json:"metadata"`
	Spec       ServiceSpec `json:"spec"`
	// Status is written by Isthmus, never by the user: Decode drops what
	// a document holds here, and the agent fills it in (the addresses
	// LB-IPAM assigned) before the service reaches desired state.
	Status ServiceStatus `json:"status,omitzero"`
}

// Service types (ServiceSpec.Type).
const (
	ServiceTypeClusterIP    = "ClusterIP"    // reachable at its VIPs inside the mesh (the default)
	ServiceTypeNodePort     = "NodePort"     // also at every node's addresses on its ports' nodePorts
	ServiceTypeLoadBalancer = "LoadBalancer" // also at load-balancer addresses, from outside (and at nodePorts where given)
)

// The node ports a service may ask for (ServicePort.NodePort): Kubernetes'
// default range. Isthmus keeps it fixed: the node's SNAT picks its source
// ports above it (gateway/northsouth), so a reply to a masqueraded flow is
// never mistaken for a new flow to a node port.
const (
	NodePortMin = 30000
	NodePortMax = 32767
)

// External traffic policies (ServiceSpec.ExternalTrafficPolicy).
const (
	// TrafficPolicyCluster (the default): any node takes external traffic
	// and balances it over every backend, SNATing it to its own address.
	TrafficPolicyCluster = "Cluster"
	// TrafficPolicyLocal: a node sends external traffic only to its own
	// backends and keeps the client's address.
	TrafficPolicyLocal = "Local"
)

// ServiceSpec says where a service listens and where it sends traffic.
type ServiceSpec struct {
	// VIPs holds at least one and at most one address per family.
	VIPs  []string      `json:"vips"`
	Ports []ServicePort `json:"ports"`
	// Selector picks endpoints of the service's namespace by label.
	Selector map[string]string `json:"selector,omitempty"`
	// Backends are explicit addresses, added to the selected endpoints. A
	// service with neither selector nor backends is valid: its frontends
	// exist and drop new connections (like a Kubernetes Service without
	// ready endpoints).
	Backends []ExplicitBackend `json:"backends,omitempty"`

	// Type is ServiceTypeClusterIP (default), ServiceTypeNodePort or
	// ServiceTypeLoadBalancer.
	Type string `json:"type,omitempty"`
	// LoadBalancerIPs requests load-balancer addresses (type LoadBalancer
	// only, at most one per family); LB-IPAM honours them or refuses the
	// service with the reason in its status. Without them LB-IPAM
	// allocates from a LoadBalancerIPPool that selects the service.
	LoadBalancerIPs []string `json:"loadBalancerIPs,omitempty"`
	// ExternalIPs are addresses the network routes to the nodes (not
	// allocated); traffic from outside to them reaches the service as for
	// a load-balancer address.
	ExternalIPs []string `json:"externalIPs,omitempty"`
	// ExternalTrafficPolicy is TrafficPolicyCluster (default) or
	// TrafficPolicyLocal; it applies to traffic from outside the mesh to
	// load-balancer and external addresses and to node ports.
	ExternalTrafficPolicy string `json:"externalTrafficPolicy,omitempty"`
}

// ExternalTraffic returns the effective external traffic policy.
func (s ServiceSpec) ExternalTraffic() string {
	if s.ExternalTrafficPolicy == "" {
		return TrafficPolicyCluster
	}
	return s.ExternalTrafficPolicy
}

// IsLoadBalancer reports whether the service asks for load-balancer
// addresses.
func (s ServiceSpec) IsLoadBalancer() bool { return s.Type == ServiceTypeLoadBalancer }

// HasNodePorts reports whether the service's type lets it have node
// ports (NodePort, and LoadBalancer where a port gives one).
func (s ServiceSpec) HasNodePorts() bool {
	return s.Type == ServiceTypeNodePort || s.Type == ServiceTypeLoadBalancer
}

// ServiceStatus is what Isthmus did with a service.
type ServiceStatus struct {
	LoadBalancer LoadBalancerStatus `json:"loadBalancer,omitzero"`
}

// LoadBalancerStatus lists the load-balancer addresses assigned to the
// service, or why none could be.
type LoadBalancerStatus struct {
	Ingress []LoadBalancerIngress `json:"ingress,omitempty"`
	// Refused is LB-IPAM's reason when a requested address could not be
	// honoured or no pool had room (empty when all is well).
	Refused string `json:"refused,omitempty"`
}

// LoadBalancerIngress is one assigned address.
type LoadBalancerIngress struct {
	IP string `json:"ip"`
	// Pool is the LoadBalancerIPPool the address was allocated from.
	Pool string `json:"pool,omitempty"`
	// Kept says why the service keeps an address its pool no longer
	// offers it (the pool was edited or deleted, or no longer selects
	// the service): an address in use never moves.
	Kept string `json:"kept,omitempty"`
}

// ServicePort is one port of a service.
type ServicePort struct {
	Name string `json:"name,omitempty"`
	Port uint16 `json:"port"`
	// TargetPort is the backend port; 0 means the same as Port.
	TargetPort uint16 `json:"targetPort,omitempty"`
	// Protocol is TCP (default) or UDP.
	Protocol string `json:"protocol,omitempty"`
	// NodePort is the port the service answers on at every node's
	// addresses (NodePortMin-NodePortMax): required for type NodePort
	// (Isthmus does not allocate them), optional for LoadBalancer, not
	// allowed otherwise.
	NodePort uint16 `json:"nodePort,omitempty"`
}

// Target returns the effective backend port.
func (p ServicePort) Target() uint16 {
	if p.TargetPort == 0 {
		return p.Port
	}
	return p.TargetPort
}

// ExplicitBackend is a backend given by address.
type ExplicitBackend struct {
	IP string `json:"ip"`
}

// NetworkPolicy is an identity-based L3/L4 policy.
type NetworkPolicy struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   Meta       `json:"metadata"`
	Spec       PolicySpec `json:"spec"`
}

// Policy types: the directions a policy enforces (PolicySpec.PolicyTypes).
const (
	PolicyTypeIngress = "Ingress"
	PolicyTypeEgress  = "Egress"
)

// PolicySpec selects endpoints and lists what they may receive and send.
type PolicySpec struct {
	EndpointSelector Selector      `json:"endpointSelector"`
	Ingress          []IngressRule `json:"ingress,omitempty"`
	Egress           []EgressRule  `json:"egress,omitempty"`
	// PolicyTypes, when set, lists exactly the directions ("Ingress",
	// "Egress") the policy enforces on the endpoints it selects, even
	// without rules (default deny). Unset: a direction is enforced when it
	// has rules.
	PolicyTypes []string `json:"policyTypes,omitempty"`
}

// Enforces reports whether the policy enforces direction (PolicyTypeIngress
// or PolicyTypeEgress) on the endpoints it selects.
func (s PolicySpec) Enforces(direction string) bool {
	if len(s.PolicyTypes) > 0 {
		return slices.Contains(s.PolicyTypes, direction)
	}
	switch direction {
	case PolicyTypeIngress:
		return len(s.Ingress) > 0
	case PolicyTypeEgress:
		return len(s.Egress) > 0
	}
	return false
}

// Label selector operators of LabelSelectorRequirement (Kubernetes
// semantics).
const (
	OpIn           = "In"
	OpNotIn        = "NotIn"
	OpExists       = "Exists"
	OpDoesNotExist = "DoesNotExist"
)

// Selector matches label sets that contain all of MatchLabels and satisfy
// every MatchExpressions requirement; an empty selector matches everything
// (within the scope it is used in).
type Selector struct {
	MatchLabels      map[string]string          `json:"matchLabels,omitempty"`
	MatchExpressions []LabelSelectorRequirement `json:"matchExpressions,omitempty"`
}

// LabelSelectorRequirement is one requirement of a selector, as in
// Kubernetes: In (the label is present with one of Values), NotIn (absent,
// or present with none of Values), Exists, DoesNotExist (no Values).
type LabelSelectorRequirement struct {
	Key      string   `json:"key"`
	Operator string   `json:"operator"`
	Values   []string `json:"values,omitempty"`
}

// Matches reports whether labels l satisfy the selector. An operator
// Validate would reject matches nothing.
func (s Selector) Matches(l map[string]string) bool {
	for k, v := range s.MatchLabels {
		if got, ok := l[k]; !ok || got != v {
			return false
		}
	}
	for _, r := range s.MatchExpressions {
		if !r.Matches(l) {
			return false
		}
	}
	return true
}

// Matches reports whether labels l satisfy the requirement.
func (r LabelSelectorRequirement) Matches(l map[string]string) bool {
	v, ok := l[r.Key]
	switch r.Operator {
	case OpIn:
		return ok && slices.Contains(r.Values, v)
	case OpNotIn:
		return !ok || !slices.Contains(r.Values, v)
	case OpExists:
		return ok
	case OpDoesNotExist:
		return !ok
	}
	return false
}

// Names reports whether the selector mentions key, in MatchLabels or in
// MatchExpressions (with any operator).
func (s Selector) Names(key string) bool {
	if _, ok := s.MatchLabels[key]; ok {
		return true
	}
	for _, r := range s.MatchExpressions {
		if r.Key == key {
			return true
		}
	}
	return false
}

// IngressRule allows traffic from the listed peers to the listed ports. A
// rule with neither fromEndpoints nor fromEntities allows any peer; one
// without toPorts allows any port and protocol.
type IngressRule struct {
	FromEndpoints []Selector `json:"fromEndpoints,omitempty"`
	FromEntities  []string   `json:"fromEntities,omitempty"`
	ToPorts       []PortRule `json:"toPorts,omitempty"`
}

// EgressRule allows traffic to the listed peers and ports; see IngressRule.
type EgressRule struct {
	ToEndpoints []Selector `json:"toEndpoints,omitempty"`
	ToEntities  []string   `json:"toEntities,omitempty"`
	ToPorts     []PortRule `json:"toPorts,omitempty"`
}

// PortRule is one port (0 = any) and protocol (TCP, UDP, ICMP, ANY).
type PortRule struct {
	Port     uint16 `json:"port,omitempty"`
	Protocol string `json:"protocol,omitempty"`
}

// EffectiveProtocol returns the upper-cased protocol with the default
// applied: TCP when a port is given, ANY otherwise.
func (r PortRule) EffectiveProtocol() string {
	if r.Protocol == "" {
		if r.Port > 0 {
			return ProtocolTCP
		}
		return ProtocolANY
	}
	return strings.ToUpper(r.Protocol)
}

// WithoutStatus returns o without what Isthmus fills in (Status), as it
// was applied.
func WithoutStatus(o Object) Object {
	switch v := o.(type) {
	case *Service:
		c := *v
		c.Status = ServiceStatus{}
		return &c
	case *LoadBalancerIPPool:
		c := *v
		c.Status = LoadBalancerIPPoolStatus{}
		return &c
	}
	return o
}

// GetKind implements Object.
func (s Service) GetKind() string { return KindService }

// GetMeta implements Object.
func (s Service) GetMeta() Meta { return s.Metadata }

// GetKind implements Object.
func (p NetworkPolicy) GetKind() string { return KindNetworkPolicy }

// GetMeta implements Object.
func (p NetworkPolicy) GetMeta() Meta { return p.Metadata }

// Key returns "<Kind>/<namespace>/<name>", the object's identity in stores.
// An empty namespace counts as DefaultNamespace, as Decode would set it.
func Key(o Object) string {
	if o == nil {
		return ""
	}
	m := o.GetMeta()
	return o.GetKind() + "/" + namespaceOrDefault(m.Namespace) + "/" + m.Name
}

func namespaceOrDefault(ns string) string {
	if ns == "" {
		return DefaultNamespace
	}
	return ns
}

// Normalize fills in the defaults Decode fills in once an object is valid
// (BGP timers and ports, L2 address switches, upper-case protocols). An
// object converted from another source (the custom resources of k8s/apis)
// is so stored exactly as `isthmus apply` would store it. Call it on an
// object Validate accepts.
func Normalize(o interface{ normalize() }) { o.normalize() }
