package desired

import (
	"net/netip"

	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// State is the desired state one reconcile run converges to.
type State struct {
	Cluster    string // this node's cluster, qualifies identity labels
	Endpoints  []state.Endpoint
	Services   []objects.Service
	Policies   []objects.NetworkPolicy
	Identities Identities
	HostAddrs  []netip.Addr // the node's own addresses: the host identity
	Mesh       Mesh

	// Generations of Endpoints and of Services and Policies (the applied
	// objects): equal values, same content. Reconcilers skip what depends
	// only on inputs they already applied (0: unknown, always apply).
	EndpointsGen, ObjectsGen uint64
}

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
