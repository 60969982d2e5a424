package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The kinds of this file are the standalone kinds of clustermesh/objects
// (LoadBalancerIPPool, BGPPeeringPolicy, L2AnnouncementPolicy,
// ExternalWorkload) as custom resources. The clustermesh server converts
// them (ToObject) into the cluster's etcd, where LB-IPAM, enrollment and
// the agents read them as they read what `isthmus apply` stores, and sets
// their Ready condition (reasons Applied, Invalid, Conflict).
//
// The OpenAPI markers refuse at the API server what a schema can say
// (types, ranges, enums, exactly-one-of, address syntax); ToObject runs
// the full Validate of the Isthmus kind for the rest (overlapping blocks,
// AS_TRANS, duplicate neighbours, regular expressions), which the server
// reports as Ready=False.

// ReasonConflict: the object is valid but clashes with another one (a
// pool overlapping another pool, an ExternalWorkload name taken by another
// namespace, an enrolled workload whose identity changed) or with what
// was applied outside Kubernetes (Ready False).
const ReasonConflict = "Conflict"

// ObjectStatus is the status of the kinds of this file: whether the
// clustermesh server applied the object.
type ObjectStatus struct {
	// ObservedGeneration is the metadata.generation the conditions
	// describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Ready (reasons Applied, Invalid, Conflict).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// LoadBalancerIPPool is a cluster-scoped set of addresses LB-IPAM hands to
// Services of type LoadBalancer (see the kind in docs/reference.md).
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:path=loadbalancerippools,singular=loadbalancerippool,scope=Cluster,shortName=lbpool
// +kubebuilder:printcolumn:name="Disabled",type=boolean,JSONPath=`.spec.disabled`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type LoadBalancerIPPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   LoadBalancerIPPoolSpec `json:"spec"`
	Status ObjectStatus           `json:"status,omitempty"`
}

// LoadBalancerIPPoolList is a list of LoadBalancerIPPools.
//
// +kubebuilder:object:root=true
type LoadBalancerIPPoolList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []LoadBalancerIPPool `json:"items"`
}

// LoadBalancerIPPoolSpec mirrors objects.LoadBalancerIPPoolSpec.
type LoadBalancerIPPoolSpec struct {
	// Blocks are the pool's addresses: CIDRs (at most a /8 or a /64 each)
	// or start-stop ranges, IPv4 and IPv6 mixed, not overlapping.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=64
	Blocks []PoolBlock `json:"blocks"`
	// ServiceSelector picks the LoadBalancer Services (by their labels)
	// the pool serves; empty serves all of them.
	// +optional
	ServiceSelector Selector `json:"serviceSelector,omitempty"`
	// Disabled stops new allocations from the pool; addresses in use stay.
	// +optional
	Disabled bool `json:"disabled,omitempty"`
}

// PoolBlock is one block of a pool: either cidr, or start and stop (both
// included, of one family).
//
// +kubebuilder:validation:XValidation:rule="has(self.cidr) ? !has(self.start) && !has(self.stop) : has(self.start) && has(self.stop)",message="give either cidr, or start and stop"
// +kubebuilder:validation:XValidation:rule="!has(self.start) || !has(self.stop) || ip(self.start).family() == ip(self.stop).family()",message="start and stop must be of one family"
type PoolBlock struct {
	// +optional
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isCIDR(self)",message="must be a CIDR"
	CIDR string `json:"cidr,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="must be an IP address"
	Start string `json:"start,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="must be an IP address"
	Stop string `json:"stop,omitempty"`
}

// BGPPeeringPolicy makes the nodes it selects peer with routers over BGP
// and announce pod CIDRs and service addresses (cluster-scoped; see the
// kind in docs/reference.md).
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:path=bgppeeringpolicies,singular=bgppeeringpolicy,scope=Cluster,shortName=bgpp
// +kubebuilder:printcolumn:name="ASN",type=integer,JSONPath=`.spec.localASN`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type BGPPeeringPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   BGPPeeringPolicySpec `json:"spec"`
	Status ObjectStatus         `json:"status,omitempty"`
}

// BGPPeeringPolicyList is a list of BGPPeeringPolicies.
//
// +kubebuilder:object:root=true
type BGPPeeringPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BGPPeeringPolicy `json:"items"`
}

// BGPPeeringPolicySpec mirrors objects.BGPPeeringPolicySpec.
type BGPPeeringPolicySpec struct {
	// NodeSelector picks the nodes by their labels; empty selects every
	// node.
	// +optional
	NodeSelector Selector `json:"nodeSelector,omitempty"`
	// LocalASN is the nodes' AS (not 23456, AS_TRANS).
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=4294967294
	LocalASN int64 `json:"localASN"`
	// RouterID is an IPv4 address; default the node's IPv4 address.
	// +optional
	// +kubebuilder:validation:MaxLength=15
	// +kubebuilder:validation:XValidation:rule="isIP(self) && ip(self).family() == 4 && !ip(self).isUnspecified()",message="must be an IPv4 address other than 0.0.0.0"
	RouterID string `json:"routerID,omitempty"`
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=64
	Neighbors []BGPNeighbor `json:"neighbors"`
	// Advertisements say what to announce; none announces nothing.
	// +optional
	// +kubebuilder:validation:MaxItems=16
	Advertisements []BGPAdvertisement `json:"advertisements,omitempty"`
}

// BGPNeighbor is one peer router.
//
// +kubebuilder:validation:XValidation:rule="!has(self.gracefulRestart) || !has(self.gracefulRestart.restartTimeSeconds) || self.gracefulRestart.restartTimeSeconds == 0 || (has(self.gracefulRestart.enabled) && self.gracefulRestart.enabled)",message="gracefulRestart.restartTimeSeconds needs gracefulRestart.enabled"
type BGPNeighbor struct {
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="must be an IP address"
	Address string `json:"address"`
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=4294967294
	PeerASN int64 `json:"peerASN"`
	// Port is the peer's BGP port (default 179).
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Port int32 `json:"port,omitempty"`
	// EBGPMultihopTTL is the IP TTL of an eBGP session's packets (default
	// 1: directly connected).
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=255
	EBGPMultihopTTL int32 `json:"ebgpMultihopTTL,omitempty"`
	// PasswordFile is an absolute path, on the node, of the TCP MD5
	// password.
	// +optional
	// +kubebuilder:validation:Pattern=`^/`
	PasswordFile string `json:"passwordFile,omitempty"`
	// +optional
	Timers BGPTimers `json:"timers,omitempty"`
	// +optional
	GracefulRestart BGPGracefulRestart `json:"gracefulRestart,omitempty"`
}

// BGPTimers are a session's timers in seconds (defaults: hold 90,
// keepalive a third of hold, connect retry 5).
type BGPTimers struct {
	// +optional
	// +kubebuilder:validation:Minimum=3
	// +kubebuilder:validation:Maximum=65535
	HoldTimeSeconds *int32 `json:"holdTimeSeconds,omitempty"`
	// KeepaliveTimeSeconds must be below the hold time.
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	KeepaliveTimeSeconds *int32 `json:"keepaliveTimeSeconds,omitempty"`
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	ConnectRetryTimeSeconds *int32 `json:"connectRetryTimeSeconds,omitempty"`
}

// BGPGracefulRestart is RFC 4724 graceful restart.
type BGPGracefulRestart struct {
	// +optional
	Enabled bool `json:"enabled,omitempty"`
	// RestartTimeSeconds defaults to 120.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=4095
	RestartTimeSeconds int32 `json:"restartTimeSeconds,omitempty"`
}

// BGPAdvertisement is one kind of prefix to announce.
//
// +kubebuilder:validation:XValidation:rule="self.type != 'PodCIDR' || !has(self.selector) || ((!has(self.selector.matchLabels) || size(self.selector.matchLabels) == 0) && (!has(self.selector.matchExpressions) || size(self.selector.matchExpressions) == 0))",message="selector selects services: not allowed with type PodCIDR"
type BGPAdvertisement struct {
	// +kubebuilder:validation:Enum=PodCIDR;LoadBalancerIP;ExternalIP
	Type string `json:"type"`
	// Selector picks services (LoadBalancerIP, ExternalIP) of every
	// namespace by their labels (isthmus.io/namespace: the namespace).
	// +optional
	Selector Selector `json:"selector,omitempty"`
	// Communities: standard ("65000:100", or a well-known name) or large
	// ("65000:1:2").
	// +optional
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:Pattern=`^([0-9]+:[0-9]+(:[0-9]+)?|(?i:no-export|no-advertise|no-export-subconfed|no-peer|blackhole))$`
	Communities []string `json:"communities,omitempty"`
	// LocalPreference is sent to iBGP neighbours.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=4294967295
	LocalPreference *int64 `json:"localPreference,omitempty"`
}

// L2AnnouncementPolicy says which service addresses are answered with ARP
// and NDP on which interfaces of which nodes (cluster-scoped; see the
// kind in docs/reference.md).
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:path=l2announcementpolicies,singular=l2announcementpolicy,scope=Cluster,shortName=l2p
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type L2AnnouncementPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   L2AnnouncementPolicySpec `json:"spec"`
	Status ObjectStatus             `json:"status,omitempty"`
}

// L2AnnouncementPolicyList is a list of L2AnnouncementPolicies.
//
// +kubebuilder:object:root=true
type L2AnnouncementPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []L2AnnouncementPolicy `json:"items"`
}

// L2AnnouncementPolicySpec mirrors objects.L2AnnouncementPolicySpec.
//
// +kubebuilder:validation:XValidation:rule="has(self.interfaces) && size(self.interfaces) > 0 ? !has(self.interfaceRegex) || size(self.interfaceRegex) == 0 : has(self.interfaceRegex) && size(self.interfaceRegex) > 0",message="give interfaces or interfaceRegex, exactly one"
// +kubebuilder:validation:XValidation:rule="!has(self.loadBalancerIPs) || !has(self.externalIPs) || self.loadBalancerIPs || self.externalIPs",message="loadBalancerIPs and externalIPs are both false: the policy would announce nothing"
type L2AnnouncementPolicySpec struct {
	// ServiceSelector picks services by their labels (plus
	// isthmus.io/namespace); empty: every service.
	// +optional
	ServiceSelector Selector `json:"serviceSelector,omitempty"`
	// NodeSelector picks the nodes that may answer; empty: every node.
	// +optional
	NodeSelector Selector `json:"nodeSelector,omitempty"`
	// Interfaces are exact interface names.
	// +optional
	// +listType=set
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=15
	// +kubebuilder:validation:items:Pattern=`^[^/: \t\n]+$`
	Interfaces []string `json:"interfaces,omitempty"`
	// InterfaceRegex is an RE2 expression matched against the whole name.
	// +optional
	// +kubebuilder:validation:MaxLength=256
	InterfaceRegex string `json:"interfaceRegex,omitempty"`
	// LoadBalancerIPs: announce the addresses LB-IPAM assigned (default
	// true).
	// +optional
	LoadBalancerIPs *bool `json:"loadBalancerIPs,omitempty"`
	// ExternalIPs: announce spec.externalIPs (default true).
	// +optional
	ExternalIPs *bool `json:"externalIPs,omitempty"`
}

// ExternalWorkload is a VM or bare-metal host that joins the cluster with
// a one-time token (docs/vms.md). Its namespace and labels are its
// identity; its name is the host's name in the cluster, unique across
// namespaces (node vm-<name>).
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:path=externalworkloads,singular=externalworkload,scope=Namespaced,shortName=iew
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 60",message="metadata.name: at most 60 characters (the host's node name is vm-<name>)"
// +kubebuilder:printcolumn:name="IPv4",type=string,JSONPath=`.spec.ipv4`
// +kubebuilder:printcolumn:name="IPv6",type=string,JSONPath=`.spec.ipv6`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ExternalWorkload struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Spec   ExternalWorkloadSpec `json:"spec,omitempty"`
	Status ObjectStatus         `json:"status,omitempty"`
}

// ExternalWorkloadList is a list of ExternalWorkloads.
//
// +kubebuilder:object:root=true
type ExternalWorkloadList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ExternalWorkload `json:"items"`
}

// ExternalWorkloadSpec: the addresses the host asks for; a family left
// out is allocated from the cluster's VM range at enrollment.
type ExternalWorkloadSpec struct {
	// +optional
	// +kubebuilder:validation:MaxLength=15
	// +kubebuilder:validation:XValidation:rule="isIP(self) && ip(self).family() == 4",message="must be an IPv4 address"
	IPv4 string `json:"ipv4,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxLength=45
	// +kubebuilder:validation:XValidation:rule="isIP(self) && ip(self).family() == 6",message="must be an IPv6 address"
	IPv6 string `json:"ipv6,omitempty"`
}
