package records

import (
	"net/netip"
	"strconv"
	"strings"
)

// Key prefixes. Every key of the project lives under Root.
const (
	Root                 = "isthmus/"
	ClusterConfigPrefix  = "isthmus/cluster-config/"
	HeartbeatPrefix      = "isthmus/heartbeat/"
	StateRoot            = "isthmus/state/"
	SyncedPrefix         = "isthmus/synced/"
	CacheRoot            = "isthmus/cache/"
	IdentityIDPrefix     = "isthmus/state/identities/v1/id/"
	IdentityValuePrefix  = "isthmus/state/identities/v1/value/"
	IdentityLabelsPrefix = "isthmus/state/identities/v1/labels/"
)

// Kind names a kind of shared state; it is a path element of state, cache
// and canary keys.
type Kind string

const (
	KindNodes      Kind = "nodes"
	KindIP         Kind = "ip"
	KindServices   Kind = "services"
	KindIdentities Kind = "identities"
)

// Kinds lists every kind of shared state.
var Kinds = []Kind{KindNodes, KindIP, KindServices, KindIdentities}

func (k Kind) valid() bool {
	switch k {
	case KindNodes, KindIP, KindServices, KindIdentities:
		return true
	}
	return false
}

// clustered reports whether the kind's state keys name the cluster
// (identity keys do not: the cluster is part of the numeric ID).
func (k Kind) clustered() bool { return k != KindIdentities }

// StatePrefix returns "isthmus/state/<kind>/v1/".
func StatePrefix(k Kind) string { return StateRoot + string(k) + "/v1/" }

// StateClusterPrefix returns "isthmus/state/<kind>/v1/<cluster>/", the keys
// one cluster writes of a clustered kind (nodes, ip, services).
func StateClusterPrefix(k Kind, cluster string) string { return StatePrefix(k) + cluster + "/" }

// ClusterConfigKey returns "isthmus/cluster-config/<cluster>".
func ClusterConfigKey(cluster string) string { return ClusterConfigPrefix + cluster }

// HeartbeatKey returns "isthmus/heartbeat/<cluster>".
func HeartbeatKey(cluster string) string { return HeartbeatPrefix + cluster }

// NodeKey returns "isthmus/state/nodes/v1/<cluster>/<node>".
func NodeKey(cluster, node string) string { return StateClusterPrefix(KindNodes, cluster) + node }

// IPCacheKey returns "isthmus/state/ip/v1/<cluster>/<node>/<ip>": the entry
// of an endpoint that node hosts, under the node's own prefix (the only
// one its etcd credential may write). <ip> is the bare address for a
// single-address prefix (/32, /128) and the CIDR otherwise.
func IPCacheKey(cluster, node string, p netip.Prefix) string {
	return NodeIPCachePrefix(cluster, node) + prefixKeyPart(p)
}

func prefixKeyPart(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// NodeIPCachePrefix returns "isthmus/state/ip/v1/<cluster>/<node>/", the
// ipcache keys of the endpoints one node hosts: the only ones that node's
// etcd credential may write.
func NodeIPCachePrefix(cluster, node string) string {
	return StateClusterPrefix(KindIP, cluster) + node + "/"
}

// L2Prefix holds the L2 announcement records: one per node,
// isthmus/l2/<cluster>/<node>, written by that node under its own short
// lease (agent/l2). Outside isthmus/state/: they are not mirrored to other
// clusters, whose nodes never share an L2 segment with this one's.
const L2Prefix = Root + "l2/"

// L2ClusterPrefix returns "isthmus/l2/<cluster>/".
func L2ClusterPrefix(cluster string) string { return L2Prefix + cluster + "/" }

// L2Key returns "isthmus/l2/<cluster>/<node>".
func L2Key(cluster, node string) string { return L2ClusterPrefix(cluster) + node }

// ConfigPrefix holds the applied objects: isthmus/config/<Kind>/<ns>/<name>.
const ConfigPrefix = Root + "config/"

// ConfigGuardKey is bumped by every apply of objects; an apply's
// transaction holds only if it is unchanged since the apply read it.
const ConfigGuardKey = Root + "config-revision"

// ServiceKey returns "isthmus/state/services/v1/<cluster>/<ns>/<name>".
func ServiceKey(cluster, namespace, name string) string {
	return StateClusterPrefix(KindServices, cluster) + namespace + "/" + name
}

// IdentityIDKey returns the master key "isthmus/state/identities/v1/id/<id>".
func IdentityIDKey(id uint32) string { return IdentityIDPrefix + strconv.FormatUint(uint64(id), 10) }

// IdentityValueLabelsPrefix returns "isthmus/state/identities/v1/value/<labels>/",
// under which every node using the label set has its reference. labels is
// the canonical LabelsString form.
func IdentityValueLabelsPrefix(labels string) string { return IdentityValuePrefix + labels + "/" }

// IdentityValueKey returns "isthmus/state/identities/v1/value/<labels>/<node>".
func IdentityValueKey(labels, node string) string { return IdentityValueLabelsPrefix(labels) + node }

// IdentityLabelsKey returns "isthmus/state/identities/v1/labels/<labels>",
// the claim that maps a label set to its one ID.
func IdentityLabelsKey(labels string) string { return IdentityLabelsPrefix + labels }

// SyncedKey returns the sync canary "isthmus/synced/<cluster>/isthmus/state/<kind>/v1":
// its writer has written everything of that kind.
func SyncedKey(cluster string, k Kind) string {
	return SyncedPrefix + cluster + "/" + strings.TrimSuffix(StatePrefix(k), "/")
}

// CachePrefix returns "isthmus/cache/<kind>/v1/<cluster>/", where a server
// mirrors a remote cluster's state of that kind.
func CachePrefix(k Kind, cluster string) string {
	return CacheRoot + string(k) + "/v1/" + cluster + "/"
}

// cut returns s without prefix, or ok=false.
func cut(s, prefix string) (string, bool) {
	if !strings.HasPrefix(s, prefix) {
		return "", false
	}
	return s[len(prefix):], true
}

// ParseClusterConfigKey returns the cluster of a cluster-config key.
func ParseClusterConfigKey(key string) (cluster string, err error) {
	rest, ok := cut(key, ClusterConfigPrefix)
	if !ok {
		return "", malformed("key %q is not under %s", key, ClusterConfigPrefix)
	}
	if err := ValidateClusterName(rest); err != nil {
		return "", malformed("key %q: %v", key, err)
	}
	return rest, nil
}

// ParseHeartbeatKey returns the cluster of a heartbeat key.
func ParseHeartbeatKey(key string) (cluster string, err error) {
	rest, ok := cut(key, HeartbeatPrefix)
	if !ok {
		return "", malformed("key %q is not under %s", key, HeartbeatPrefix)
	}
	if err := ValidateClusterName(rest); err != nil {
		return "", malformed("key %q: %v", key, err)
	}
	return rest, nil
}

// parseClustered splits a state key of a clustered kind into the cluster
// and the rest.
func parseClustered(key string, k Kind) (cluster, rest string, err error) {
	rest, ok := cut(key, StatePrefix(k))
	if !ok {
		return "", "", malformed("key %q is not under %s", key, StatePrefix(k))
	}
	cluster, rest, ok = strings.Cut(rest, "/")
	if !ok {
		return "", "", malformed("key %q: want %s<cluster>/...", key, StatePrefix(k))
	}
	if err := ValidateClusterName(cluster); err != nil {
		return "", "", malformed("key %q: %v", key, err)
	}
	return cluster, rest, nil
}

// ParseNodeKey returns the cluster and node of a node key.
func ParseNodeKey(key string) (cluster, node string, err error) {
	cluster, node, err = parseClustered(key, KindNodes)
	if err != nil {
		return "", "", err
	}
	if err := ValidateNodeName(node); err != nil {
		return "", "", malformed("key %q: %v", key, err)
	}
	return cluster, node, nil
}

// ParseIPCacheKey returns the cluster, node and prefix of an ipcache key. A
// bare address is a single-address prefix; anything IPCacheKey would spell
// differently (non-canonical addresses, host bits set, "/32") is refused.
func ParseIPCacheKey(key string) (cluster, node string, p netip.Prefix, err error) {
	cluster, rest, err := parseClustered(key, KindIP)
	if err != nil {
		return "", "", netip.Prefix{}, err
	}
	node, rest, ok := strings.Cut(rest, "/")
	if !ok {
		return "", "", netip.Prefix{}, malformed("key %q: want %s<cluster>/<node>/<ip>", key, StatePrefix(KindIP))
	}
	if err := ValidateNodeName(node); err != nil {
		return "", "", netip.Prefix{}, malformed("key %q: %v", key, err)
	}
	if strings.Contains(rest, "/") {
		p, err = netip.ParsePrefix(rest)
	} else {
		var a netip.Addr
		a, err = netip.ParseAddr(rest)
		if err == nil {
			p = netip.PrefixFrom(a, a.BitLen())
		}
	}
	if err != nil {
		return "", "", netip.Prefix{}, malformed("key %q: %v", key, err)
	}
	if err := validatePrefix("key "+key, p); err != nil {
		return "", "", netip.Prefix{}, err
	}
	if prefixKeyPart(p) != rest {
		return "", "", netip.Prefix{}, malformed("key %q: not in canonical form (want %s)", key, IPCacheKey(cluster, node, p))
	}
	return cluster, node, p, nil
}

// ParseServiceKey returns the cluster, namespace and name of a service key.
func ParseServiceKey(key string) (cluster, namespace, name string, err error) {
	cluster, rest, err := parseClustered(key, KindServices)
	if err != nil {
		return "", "", "", err
	}
	namespace, name, ok := strings.Cut(rest, "/")
	if !ok {
		return "", "", "", malformed("key %q: want %s<cluster>/<namespace>/<name>", key, StatePrefix(KindServices))
	}
	if err := validateName("namespace", namespace); err != nil {
		return "", "", "", malformed("key %q: %v", key, err)
	}
	if err := validateName("service name", name); err != nil {
		return "", "", "", malformed("key %q: %v", key, err)
	}
	return cluster, namespace, name, nil
}

// ParseIdentityIDKey returns the ID of an identity master key.
func ParseIdentityIDKey(key string) (uint32, error) {
	rest, ok := cut(key, IdentityIDPrefix)
	if !ok {
		return 0, malformed("key %q is not under %s", key, IdentityIDPrefix)
	}
	id, err := strconv.ParseUint(rest, 10, 32)
	if err != nil || strconv.FormatUint(id, 10) != rest {
		return 0, malformed("key %q: %q is not a decimal identity", key, rest)
	}
	if err := validateIdentity(uint32(id)); err != nil {
		return 0, malformed("key %q: %v", key, err)
	}
	return uint32(id), nil
}

// ParseIdentityValueKey returns the canonical label string and the node of
// an identity reference key. Labels contain '/' (isthmus.io/cluster=...),
// node names never do, so the node is the last path element.
func ParseIdentityValueKey(key string) (labels, node string, err error) {
	rest, ok := cut(key, IdentityValuePrefix)
	if !ok {
		return "", "", malformed("key %q is not under %s", key, IdentityValuePrefix)
	}
	i := strings.LastIndexByte(rest, '/')
	if i < 0 {
		return "", "", malformed("key %q: want %s<labels>/<node>", key, IdentityValuePrefix)
	}
	labels, node = rest[:i], rest[i+1:]
	if _, err := ParseLabelsString(labels); err != nil {
		return "", "", malformed("key %q: %v", key, err)
	}
	if err := ValidateNodeName(node); err != nil {
		return "", "", malformed("key %q: %v", key, err)
	}
	return labels, node, nil
}

// ParseIdentityLabelsKey returns the canonical label string of a label
// claim key.
func ParseIdentityLabelsKey(key string) (labels string, err error) {
	rest, ok := cut(key, IdentityLabelsPrefix)
	if !ok {
		return "", malformed("key %q is not under %s", key, IdentityLabelsPrefix)
	}
	if _, err := ParseLabelsString(rest); err != nil {
		return "", malformed("key %q: %v", key, err)
	}
	return rest, nil
}

// ParseSyncedKey returns the cluster and kind of a sync canary key.
func ParseSyncedKey(key string) (cluster string, k Kind, err error) {
	rest, ok := cut(key, SyncedPrefix)
	if !ok {
		return "", "", malformed("key %q is not under %s", key, SyncedPrefix)
	}
	cluster, rest, _ = strings.Cut(rest, "/")
	if err := ValidateClusterName(cluster); err != nil {
		return "", "", malformed("key %q: %v", key, err)
	}
	for _, k := range Kinds {
		if rest == strings.TrimSuffix(StatePrefix(k), "/") {
			return cluster, k, nil
		}
	}
	return "", "", malformed("key %q: unknown synced prefix %q", key, rest)
}

// CacheKey maps a state key written by cluster to the key under which a
// server mirrors it: isthmus/state/<kind>/v1/<cluster>/<rest> and
// isthmus/state/identities/v1/<rest> become
// isthmus/cache/<kind>/v1/<cluster>/<rest>. A clustered key that names
// another cluster is refused.
func CacheKey(stateKey, cluster string) (string, error) {
	if err := ValidateClusterName(cluster); err != nil {
		return "", err
	}
	for _, k := range Kinds {
		rest, ok := cut(stateKey, StatePrefix(k))
		if !ok {
			continue
		}
		if k.clustered() {
			c, r, found := strings.Cut(rest, "/")
			if !found || r == "" {
				return "", malformed("key %q: want %s<cluster>/...", stateKey, StatePrefix(k))
			}
			if c != cluster {
				return "", mismatch("key %q belongs to cluster %q, not %q", stateKey, c, cluster)
			}
			rest = r
		}
		if rest == "" {
			return "", malformed("key %q: nothing after the prefix", stateKey)
		}
		return CachePrefix(k, cluster) + rest, nil
	}
	return "", malformed("key %q is not a state key", stateKey)
}

// StateKey is the inverse of CacheKey: it returns the original state key
// and the cluster of a cache key, so the record can be validated like one
// read from that cluster.
func StateKey(cacheKey string) (stateKey, cluster string, err error) {
	rest, ok := cut(cacheKey, CacheRoot)
	if !ok {
		return "", "", malformed("key %q is not under %s", cacheKey, CacheRoot)
	}
	kind, rest, _ := strings.Cut(rest, "/v1/")
	k := Kind(kind)
	if !k.valid() {
		return "", "", malformed("key %q: unknown kind %q", cacheKey, kind)
	}
	cluster, rest, found := strings.Cut(rest, "/")
	if !found || rest == "" {
		return "", "", malformed("key %q: want %s<kind>/v1/<cluster>/...", cacheKey, CacheRoot)
	}
	if err := ValidateClusterName(cluster); err != nil {
		return "", "", malformed("key %q: %v", cacheKey, err)
	}
	if k.clustered() {
		return StateClusterPrefix(k, cluster) + rest, cluster, nil
	}
	return StatePrefix(k) + rest, cluster, nil
}

// NodeUser is the etcd user of one node's own credential: "node-<node>".
// It may write only that node's records (docs/clustermesh.md).
func NodeUser(node string) string { return nodeUserPrefix + node }

const nodeUserPrefix = "node-"

// EnrollmentUser is the etcd user of one enrollment (generation gen, from
// 1) of the external workload whose node is node: "node-<node>.<gen>". etcd
// maps a certificate to a user by its common name alone, so each
// enrollment gets a user of its own: after a revocation and a new
// enrollment of the same name, a certificate of the revoked enrollment maps
// to a user that no longer exists.
func EnrollmentUser(node string, gen int) string {
	return NodeUser(node) + "." + strconv.Itoa(gen)
}

// IsEnrollmentUser reports whether user is one of node's EnrollmentUsers.
func IsEnrollmentUser(user, node string) bool {
	rest, ok := strings.CutPrefix(user, NodeUser(node)+".")
	n, err := strconv.Atoi(rest)
	return ok && err == nil && n > 0 && strconv.Itoa(n) == rest
}

// NodeOfUser returns the node an etcd user is the credential of, if it is
// a node's.
func NodeOfUser(user string) (string, bool) {
	node, ok := strings.CutPrefix(user, nodeUserPrefix)
	return node, ok && ValidateNodeName(node) == nil
}
