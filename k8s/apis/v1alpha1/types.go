package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition type and reasons of NetworkPolicy status.
const (
	// ConditionReady is True when the agent enforces the policy.
	ConditionReady = "Ready"
	// ReasonApplied: the policy is enforced (Ready True).
	ReasonApplied = "Applied"
	// ReasonInvalid: the policy fails validation (Ready False).
	ReasonInvalid = "Invalid"
	// ReasonUnsupported: the policy uses something the datapath cannot
	// enforce (Ready False).
	ReasonUnsupported = "Unsupported"
)

// NetworkPolicy is an Isthmus identity-based L3/L4 policy (see the
// NetworkPolicy kind in docs/reference.md): it selects endpoints of its
// namespace and lists what they may receive and send.
//
// +genclient
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:path=networkpolicies,singular=networkpolicy,scope=Namespaced,shortName=inp
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NetworkPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NetworkPolicySpec   `json:"spec"`
	Status NetworkPolicyStatus `json:"status,omitempty"`
}

// NetworkPolicyList is a list of NetworkPolicies.
//
// +kubebuilder:object:root=true
type NetworkPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NetworkPolicy `json:"items"`
}

// NetworkPolicySpec mirrors objects.PolicySpec.
type NetworkPolicySpec struct {
	// EndpointSelector selects the endpoints of the policy's namespace
	// the policy applies to; empty selects all of them.
	// +optional
	EndpointSelector Selector `json:"endpointSelector"`
	// Ingress lists rules for traffic into the selected endpoints.
	// +optional
	Ingress []IngressRule `json:"ingress,omitempty"`
	// Egress lists rules for traffic out of the selected endpoints.
	// +optional
	Egress []EgressRule `json:"egress,omitempty"`
	// PolicyTypes, when set, lists exactly the directions enforced on the
	// selected endpoints, even without rules (default deny). Unset: a
	// direction is enforced when it has rules.
	// +optional
	// +listType=set
	// +kubebuilder:validation:MaxItems=2
	PolicyTypes []PolicyType `json:"policyTypes,omitempty"`
}

// PolicyType is a direction a policy enforces.
// +kubebuilder:validation:Enum=Ingress;Egress
type PolicyType string

// Selector selects identities (or endpoints) by label: all of MatchLabels
// and every one of MatchExpressions must hold. A peer selector that names
// isthmus.io/namespace (in either) is not limited to the policy's
// namespace.
type Selector struct {
	// +optional
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
	// +optional
	MatchExpressions []LabelSelectorRequirement `json:"matchExpressions,omitempty"`
}

// LabelSelectorRequirement is one requirement of a Selector, with the
// Kubernetes meaning.
type LabelSelectorRequirement struct {
	// +kubebuilder:validation:MinLength=1
	Key string `json:"key"`
	// +kubebuilder:validation:Enum=In;NotIn;Exists;DoesNotExist
	Operator string `json:"operator"`
	// Values: at least one for In and NotIn, none for Exists and
	// DoesNotExist.
	// +optional
	Values []string `json:"values,omitempty"`
}

// IngressRule allows traffic from the listed peers to the listed ports. A
// rule with neither fromEndpoints nor fromEntities allows any peer; one
// without toPorts allows any port and protocol.
type IngressRule struct {
	// +optional
	FromEndpoints []Selector `json:"fromEndpoints,omitempty"`
	// +optional
	FromEntities []Entity `json:"fromEntities,omitempty"`
	// +optional
	ToPorts []PortRule `json:"toPorts,omitempty"`
}

// EgressRule allows traffic to the listed peers and ports; see IngressRule.
type EgressRule struct {
	// +optional
	ToEndpoints []Selector `json:"toEndpoints,omitempty"`
	// +optional
	ToEntities []Entity `json:"toEntities,omitempty"`
	// +optional
	ToPorts []PortRule `json:"toPorts,omitempty"`
}

// Entity is a peer by role: host (the local node), remote-node (every
// other node of the mesh), world (anything outside the mesh), all (any
// peer), cluster (the local cluster's workloads and nodes).
// +kubebuilder:validation:Enum=host;remote-node;world;all;cluster
type Entity string

// PortRule is one port (0 or absent = any) and protocol.
type PortRule struct {
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=65535
	Port int32 `json:"port,omitempty"`
	// Protocol defaults to TCP with a port and ANY without.
	// +optional
	// +kubebuilder:validation:Enum=TCP;UDP;ICMP;ANY
	Protocol string `json:"protocol,omitempty"`
}

// NetworkPolicyStatus is what the agent reports about a NetworkPolicy.
type NetworkPolicyStatus struct {
	// ObservedGeneration is the metadata.generation the conditions
	// describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Ready (reasons Applied, Invalid, Unsupported).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}
