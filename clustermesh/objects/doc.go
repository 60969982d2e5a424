// Package objects owns the user-facing YAML kinds of apiVersion
// isthmus.io/v1alpha1 that are applied in standalone mode (`isthmus apply`)
// and stored under isthmus/config/<kind>/<ns>/<name>: Service,
// NetworkPolicy, LoadBalancerIPPool (cluster-scoped: its namespace is
// always "default"; see docs/lbipam.md) and BGPPeeringPolicy (cluster-wide,
// namespace "default"; see docs/bgp.md). It decodes them strictly, defaults and validates them, and
// turns a Service into datapath frontends.
//
// Contract:
//
//	const APIVersion = "isthmus.io/v1alpha1"
//	type Object interface { GetKind() string; GetMeta() Meta; Validate() error }
//	func Decode(data []byte) ([]Object, error) // *Service, *NetworkPolicy, *LoadBalancerIPPool, *BGPPeeringPolicy
//	func CheckPoolOverlap(existing []LoadBalancerIPPool, p LoadBalancerIPPool) error
//	func WithoutStatus(o Object) Object         // as applied, without what Isthmus fills in
//	func ParseCommunity(s string) (std *uint32, large *[3]uint32, err error)
//	func Key(o Object) string                   // "<Kind>/<namespace>/<name>"
//	func (s Service) Frontends() ([]bpf.Frontend, error)
//	func CheckConflicts(existing []Service, s Service) error
//
// Decoding is all-or-nothing: one bad document fails the whole call, so an
// apply never half-happens. Errors name the document (1-based, counting
// non-empty documents), the object, the field path and the bad value:
//
//	document 2 (Service default/web): spec.ports[0].port: must be 1-65535, got 0
//
// Defaults applied by Decode: metadata.namespace "default"; protocols are
// upper-cased; a Service port protocol defaults to TCP; a PortRule protocol
// defaults to TCP when port > 0 and ANY when port is 0. A ServicePort's
// targetPort stays 0 when omitted; ServicePort.Target gives the effective one.
//
// NetworkPolicy semantics: a policy selects the endpoints of its namespace
// that endpointSelector matches (matchLabels and matchExpressions with the
// Kubernetes operators In, NotIn, Exists, DoesNotExist; empty = all of
// them). An endpoint selected by a policy that enforces ingress (policyTypes
// lists Ingress, or, without policyTypes, the ingress list is non-empty) is
// default deny for ingress: only what some rule allows gets in; the same for
// egress. An empty list (`ingress: []`) is the same as leaving the key out;
// a policy needs at least one ingress or egress rule, or policyTypes, and
// rules of a direction that policyTypes leaves out are refused.
//
// A Service may have neither selector nor backends: its frontends then
// exist without backends.
package objects
