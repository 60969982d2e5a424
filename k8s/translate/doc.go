// Package translate turns Kubernetes objects into Isthmus objects, purely:
// no API server, no state. The agent in Kubernetes mode feeds informer
// objects into these functions and puts the results into its desired state.
//
// Contract:
//
//	func NamespaceLabelKey(k string) string // "" when the key cannot be mapped
//	func PodLabels(pod, namespace map[string]string) (map[string]string, []string)
//	func Service(svc *corev1.Service, slices []*discoveryv1.EndpointSlice) (objects.Service, bool, error)
//	func ServiceWithWarnings(svc *corev1.Service, slices []*discoveryv1.EndpointSlice) (objects.Service, bool, []string, error)
//	func NetworkPolicy(np *networkingv1.NetworkPolicy, peersCluster string) (objects.NetworkPolicy, error)
//
// Identities. A pod's identity labels are its own labels, minus those whose
// key prefix is or ends with isthmus.io (reserved; dropped with a
// warning), plus its namespace's labels under NamespaceLabelKey: prefix P
// and name N become P.ns.isthmus.io/N, an unprefixed N becomes
// ns.isthmus.io/N, so they can never collide with pod labels. The agent
// adds isthmus.io/namespace and isthmus.io/cluster.
//
// Services. ClusterIP, NodePort and LoadBalancer Services are served on
// their cluster IPs (spec.clusterIPs); headless and ExternalName Services
// are not served. Backends are the ready (conditions.ready unset or true,
// not terminating) addresses of the Service's EndpointSlices (label
// kubernetes.io/service-name), as explicit backends with no selector: the
// slices are the truth, as for kube-proxy. A Service without ready
// addresses is served without backends (its traffic is dropped). A named
// targetPort is resolved from the slices' port of the same name and
// protocol. Only the three isthmus.io/global, isthmus.io/shared and
// isthmus.io/affinity annotations are kept. The node ports of NodePort and
// LoadBalancer Services are carried (type NodePort, with
// externalTrafficPolicy) when every port has one in 30000-32767; else they
// are left out with a warning. A LoadBalancer Service without
// spec.loadBalancerClass is an Isthmus LoadBalancer Service: its
// spec.loadBalancerIP is requested from LB-IPAM (loadBalancerIPs) and the
// IPs of its status.loadBalancer.ingress (which the clustermesh server
// writes from LB-IPAM's assignment) are served, as its spec.externalIPs
// are for any type; an address that is not unicast or is listed twice is
// left out with a warning.
//
// NetworkPolicies. Kubernetes semantics on the Isthmus engine: the
// podSelector selects pods of the policy's namespace; policyTypes
// (default: Ingress, plus Egress when there are egress rules) are always
// set, so a listed direction is default deny even without rules; rules of
// a direction that is not listed are dropped, as Kubernetes ignores them.
// A rule without from/to allows any peer; a peer with only a podSelector
// means the policy's namespace; a namespaceSelector (optionally with a
// podSelector) means pods of the namespaces whose labels match, through
// the NamespaceLabelKey labels and {isthmus.io/namespace Exists}. Peers
// match the pods of one cluster, the policy's own (peersCluster, which
// the agent sets by default: a policy written for one cluster must not
// admit pods another cluster happens to label alike), or, with
// peersCluster "", every cluster of the mesh (the Isthmus meaning of a
// selector that does not name isthmus.io/cluster). Cluster-aware rules
// are written as isthmus.io NetworkPolicies. Named ports, SCTP and ipBlock
// are errors ("unsupported: ..."), naming the field.
package translate
