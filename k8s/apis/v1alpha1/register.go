package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupName is the API group of the Isthmus custom resources.
const GroupName = "isthmus.io"

// GroupVersion is the group and version of this package's kinds.
var GroupVersion = schema.GroupVersion{Group: GroupName, Version: "v1alpha1"}

// SchemeGroupVersion is GroupVersion, under the name generated clients use.
var SchemeGroupVersion = GroupVersion

// NetworkPolicyResource is the resource of NetworkPolicy, for dynamic clients.
var NetworkPolicyResource = GroupVersion.WithResource("networkpolicies")

// Resources of the kinds the clustermesh server converts into the
// cluster's etcd (config_types.go), for dynamic clients.
var (
	LoadBalancerIPPoolResource   = GroupVersion.WithResource("loadbalancerippools")
	BGPPeeringPolicyResource     = GroupVersion.WithResource("bgppeeringpolicies")
	L2AnnouncementPolicyResource = GroupVersion.WithResource("l2announcementpolicies")
	ExternalWorkloadResource     = GroupVersion.WithResource("externalworkloads")
)

var (
	// SchemeBuilder registers this package's kinds.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds this package's kinds to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

// Resource returns the group-qualified resource of a resource name.
func Resource(resource string) schema.GroupResource {
	return GroupVersion.WithResource(resource).GroupResource()
}

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &NetworkPolicy{}, &NetworkPolicyList{},
		&LoadBalancerIPPool{}, &LoadBalancerIPPoolList{},
		&BGPPeeringPolicy{}, &BGPPeeringPolicyList{},
		&L2AnnouncementPolicy{}, &L2AnnouncementPolicyList{},
		&ExternalWorkload{}, &ExternalWorkloadList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
