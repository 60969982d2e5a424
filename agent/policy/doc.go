// Package policy owns the compilation of NetworkPolicies into the allow
// entries of the datapath policy map and the per-endpoint enforcement flags.
//
// Contract:
//
//	type Endpoint struct { ID uint32; Namespace string; Identity uint32; Labels identity.Labels }
//	type Result struct { Keys []bpf.PolicyKey; Ingress map[uint32]bool; Egress map[uint32]bool }
//	func Compile(policies []objects.NetworkPolicy, endpoints []Endpoint, identities []identity.Identity, localCluster string) Result
//	func NewCompiler(policies []objects.NetworkPolicy, identities []identity.Identity, localCluster string) *Compiler
//	func (c *Compiler) Endpoint(ep Endpoint) (keys []bpf.PolicyKey, ingress, egress bool) // Compile for one endpoint
//
// Semantics:
//
//   - A policy selects the local endpoints of its own namespace whose labels
//     satisfy endpointSelector: contain its matchLabels and meet each of
//     its matchExpressions (In, NotIn, Exists, DoesNotExist, with the
//     Kubernetes meaning); an empty selector selects all of them.
//   - An endpoint selected by a policy gets ingress enforcement (default
//     deny) when the policy enforces ingress: policyTypes lists Ingress, or,
//     without policyTypes, the ingress list is non-empty; the same for
//     egress. Result has a flag for every endpoint given, false where
//     nothing is enforced.
//   - Peers of a rule: each fromEndpoints/toEndpoints selector matches the
//     given identities by label (matchLabels and matchExpressions). A
//     selector that does not name isthmus.io/namespace (as a matchLabels
//     key or an expression's key) is limited to the policy's namespace, so
//     {key: isthmus.io/namespace, operator: Exists} is every namespace; one
//     that does not name isthmus.io/cluster matches every cluster. Entities: host
//     -> bpf.IdentityHost, world -> bpf.IdentityWorld, all -> 0 (any),
//     cluster -> every identity labelled with localCluster plus host and
//     remote-node. A rule without any peer field allows any peer (0).
//   - Ports: none -> port 0 / any protocol; {port, TCP|UDP} -> that port;
//     {0, TCP|UDP} -> every port of that protocol; ICMP -> ICMP and ICMPv6;
//     ANY with a port -> TCP and UDP on that port; ANY without -> anything.
//   - A selector that matches no identity yields no entries; the agent
//     recompiles whenever identities change.
//
// Keys are deduplicated and sorted (endpoint, direction, peer, protocol,
// port) so the same input always gives the same output. Values that
// Validate would reject (an unknown entity or protocol) add no entry while
// enforcement still applies: an invalid rule fails closed.
package policy
