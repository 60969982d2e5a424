package desired

import (
	"math"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// State is the desired state one reconcile run converges to.
type State struct {
	Cluster   string // this node's cluster, qualifies identity labels
	Endpoints []state.Endpoint
	Services  []objects.Service
	// ServiceSources are the objects Services are copies of, in the same
	// order (nil: not known). The snapshots they come from are immutable,
	// so a reconciler that meets the same pointer again knows the service
	// is unchanged without comparing it.
	ServiceSources []*objects.Service
	Policies       []objects.NetworkPolicy
	Identities     Identities
	HostAddrs      []netip.Addr // the node's own addresses: the host identity
	Mesh           Mesh
	// Workload is an external workload's own endpoint (isthmus-agent
	// --join, docs/vms.md): the host's addresses under its identity, whose
	// datapath is its WireGuard device (from_host, to_host). nil on a node
	// and until the identity is allocated. It is not among Endpoints: it
	// is no pod, so no service selects it and nothing is plumbed for it.
	Workload *state.Endpoint
	// AllowLocalHostIngress admits the node's own host identity into every
	// local endpoint whose ingress a policy enforces, on every port: in
	// Kubernetes mode the kubelet's probes come from the host, and
	// Kubernetes expects them to pass whatever the NetworkPolicies say.
	AllowLocalHostIngress bool

	// Generations of Endpoints and of Services and Policies (the applied
	// objects): equal values, same content. Reconcilers skip what depends
	// only on inputs they already applied (0: unknown, always apply).
	EndpointsGen, ObjectsGen uint64
	// EndpointsChangedSince, when not nil, returns the keys
	// (state.Endpoint.Key) of the endpoints changed since an earlier
	// EndpointsGen, each once (ok false: not known). With it a reconciler derives
	// and writes again what the changed endpoints make, not what every
	// endpoint does: a run costs the change, not the node.
	EndpointsChangedSince func(since uint64) (keys []string, ok bool)
	// IdentitiesGen identifies the set of Identities: equal values, same
	// identities (0: unknown; any endpoint change may have changed it).
	IdentitiesGen uint64

	// Objects, when not nil, are the applied objects Services were split
	// from (by objects.Key), and ObjectsChangedSince, when not nil,
	// returns the keys of the objects changed since an earlier
	// ObjectsGen (ok false: not known). With them a reconciler looks at
	// the services that changed only, and Services may be left nil.
	Objects             Objects
	ObjectsChangedSince func(since uint64) (keys []string, ok bool)
}

// WorkloadEndpointID is the endpoint ID of an external workload's own
// endpoint (State.Workload) in the policy and endpoints maps. Pods' IDs
// count up from 1 and are never reused, so they never reach it.
const WorkloadEndpointID uint32 = math.MaxUint32

// Identities is what reconcilers read of the identity allocator.
type Identities interface {
	List() []identity.Identity
	Get(id uint32) (identity.Labels, bool)
}

// IdentityLabels are the security labels of an endpoint: the user's labels
// plus its namespace and cluster.
func IdentityLabels(cluster, namespace string, user identity.Labels) identity.Labels {
	l := make(identity.Labels, len(user)+2)
	for k, v := range user {
		l[k] = v
	}
	l[identity.LabelNamespace] = namespace
	l[identity.LabelCluster] = cluster
	return l
}

// DNSLabel reports whether s is a DNS label: lower-case letters, digits and
// '-' (not at either end), at most 63 characters. Node, cluster, namespace
// and endpoint names are.
func DNSLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(s)-1:
		default:
			return false
		}
	}
	return true
}
