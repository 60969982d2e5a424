package records

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Ownership. Validate* check a record against its key and the connection
// it came from; that says which cluster wrote it, not whether the cluster
// may say it. Owner and Gate check the second: what a record claims must
// be the writing cluster's own — addresses inside the pod CIDRs its
// cluster config announces, its own nodes' addresses, identities of its
// own ID range — so that whoever holds one cluster's etcd credentials
// cannot steer another cluster's datapath. The mirror (before it writes a
// remote record into the local etcd) and the agent (before a record
// reaches desired state) use the same Gate.

// Reasons a record is refused as not owned by its cluster; they label the
// refusal metrics and the per-reason counts of the statuses.
const (
	// ReasonReservedIdentity: an ipcache entry with a reserved identity
	// (1-255: host, world, remote-node, ...). Agents publish only
	// cluster-scoped identities of their endpoints; reserved ones mean
	// this cluster's own and are never taken from records.
	ReasonReservedIdentity = "reserved-identity"
	// ReasonIdentityNotOwned: a cluster-scoped identity of another
	// cluster ID.
	ReasonIdentityNotOwned = "identity-not-owned"
	// ReasonPrefixNotOwned: an ipcache prefix outside the cluster's pod
	// CIDRs (and not one of its nodes' addresses), e.g. 0.0.0.0/0.
	ReasonPrefixNotOwned = "prefix-not-owned"
	// ReasonNodeCIDRNotOwned: a node's pod CIDR outside its cluster's.
	ReasonNodeCIDRNotOwned = "node-cidr-not-owned"
	// ReasonNodeCIDROverlap: a node's pod CIDR overlaps one of another
	// node of the same cluster (both are refused).
	ReasonNodeCIDROverlap = "node-cidr-overlap"
	// ReasonBackendNotOwned: a service backend outside the cluster's pod
	// CIDRs and not one of its nodes' addresses.
	ReasonBackendNotOwned = "backend-not-owned"
	// ReasonOverCap: an ipcache entry past the per-cluster cap.
	ReasonOverCap = "over-cap"
)

// Reasons lists every refusal reason, for metrics that export all of them.
var Reasons = []string{ReasonReservedIdentity, ReasonIdentityNotOwned, ReasonPrefixNotOwned,
	ReasonNodeCIDRNotOwned, ReasonNodeCIDROverlap, ReasonBackendNotOwned, ReasonOverCap}

// DefaultMaxIPCacheEntries is the default cap on the ipcache entries one
// remote cluster may have accepted (the shared BPF ipcache has 512k).
const DefaultMaxIPCacheEntries = 65536

// ErrNotOwned is wrapped by every *RefusalError.
var ErrNotOwned = errors.New("not owned by its cluster")

// ErrPending: the record waits for its cluster's config; it is neither
// used nor counted as refused.
var ErrPending = errors.New("waiting for the cluster's config")

// RefusalError says why a record is not owned by the cluster that wrote it.
type RefusalError struct {
	Reason string
	Msg    string
}

func (e *RefusalError) Error() string {
	return fmt.Sprintf("%s (%s): %s", ErrNotOwned, e.Reason, e.Msg)
}

// Unwrap makes errors.Is(err, ErrNotOwned) hold.
func (e *RefusalError) Unwrap() error { return ErrNotOwned }

func refusal(reason, format string, args ...any) error {
	return &RefusalError{Reason: reason, Msg: fmt.Sprintf(format, args...)}
}

// RefusalReason returns the reason of a *RefusalError in err's chain, or "".
func RefusalReason(err error) string {
	if re, ok := errors.AsType[*RefusalError](err); ok {
		return re.Reason
	}
	return ""
}

// Owner is what one cluster owns according to its cluster config: its
// name, ID and pod CIDRs. Node addresses are owned too, but only those of
// the cluster's accepted nodes: the Gate supplies them.
type Owner struct {
	Cluster  string
	ID       uint32
	PodCIDRs []netip.Prefix
}

// NewOwner returns what cfg says its cluster owns. A config without pod
// CIDRs owns no address.
func NewOwner(cfg ClusterConfig) Owner {
	return Owner{Cluster: cfg.Name, ID: cfg.ID, PodCIDRs: slices.Clone(cfg.PodCIDRs)}
}

// OwnsPrefix reports whether p lies inside one of the cluster's pod CIDRs
// (so it is at least as long as that CIDR: 0.0.0.0/0 is never owned).
func (o Owner) OwnsPrefix(p netip.Prefix) bool {
	return slices.ContainsFunc(o.PodCIDRs, func(q netip.Prefix) bool {
		return q.Addr().Is4() == p.Addr().Is4() && q.Bits() <= p.Bits() && q.Contains(p.Addr())
	})
}

// CheckIdentity checks the identity of an ipcache entry: cluster-scoped
// and of the cluster's ID.
func (o Owner) CheckIdentity(id uint32) error {
	if id <= MaxReservedIdentity {
		return refusal(ReasonReservedIdentity, "identity %d is reserved: records of cluster %q carry only identities of its ID range", id, o.Cluster)
	}
	if id>>identityLocalBits != o.ID {
		return refusal(ReasonIdentityNotOwned, "identity %d belongs to cluster ID %d, not %d (%s)", id, id>>identityLocalBits, o.ID, o.Cluster)
	}
	return nil
}

// CheckIPCacheEntry checks that e is the cluster's to publish: its
// identity, and its prefix inside the pod CIDRs or, for a single address,
// one of the cluster's nodes' addresses (isNode).
func (o Owner) CheckIPCacheEntry(e IPCacheEntry, isNode func(netip.Addr) bool) error {
	if err := o.CheckIdentity(e.Identity); err != nil {
		return err
	}
	if o.OwnsPrefix(e.Prefix) || (e.Prefix.IsSingleIP() && isNode != nil && isNode(e.Prefix.Addr())) {
		return nil
	}
	return refusal(ReasonPrefixNotOwned, "prefix %s is outside the pod CIDRs of cluster %q (%v) and not one of its nodes' addresses", e.Prefix, o.Cluster, o.PodCIDRs)
}

// CheckNodeCIDRs checks that every pod CIDR of n lies inside the cluster's
// pod CIDRs. Overlaps between nodes are the Gate's to resolve.
func (o Owner) CheckNodeCIDRs(n Node) error {
	for _, p := range n.PodCIDRs {
		if !o.OwnsPrefix(p) {
			return refusal(ReasonNodeCIDRNotOwned, "node %s: pod CIDR %s is outside the pod CIDRs of cluster %q (%v)", n.Name, p, o.Cluster, o.PodCIDRs)
		}
	}
	return nil
}

// CheckService checks that every backend of s is the cluster's: inside its
// pod CIDRs or one of its nodes' addresses (isNode).
func (o Owner) CheckService(s ServiceRecord, isNode func(netip.Addr) bool) error {
	for _, b := range s.Backends {
		if o.OwnsPrefix(netip.PrefixFrom(b.IP, b.IP.BitLen())) || (isNode != nil && isNode(b.IP)) {
			continue
		}
		return refusal(ReasonBackendNotOwned, "service %s/%s: backend %s is outside the pod CIDRs of cluster %q (%v) and not one of its nodes' addresses",
			s.Namespace, s.Name, b.IP, o.Cluster, o.PodCIDRs)
	}
	return nil
}

// RefusedText is a count of refusals by reason in one line: "0", or
// "3 (prefix-not-owned 2, reserved-identity 1)".
func RefusedText(refused map[string]int) string {
	n := 0
	var parts []string
	for _, r := range slices.Sorted(maps.Keys(refused)) {
		if refused[r] > 0 {
			n += refused[r]
			parts = append(parts, fmt.Sprintf("%s %d", r, refused[r]))
		}
	}
	if n == 0 {
		return "0"
	}
	return fmt.Sprintf("%d (%s)", n, strings.Join(parts, ", "))
}
