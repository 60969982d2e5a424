package meshsync

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipam"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// ConfigPrefix holds the applied objects: isthmus/config/<Kind>/<ns>/<name>.
const ConfigPrefix = records.Root + "config/"

// ConfigKey returns the etcd key of an applied object with objects.Key k
// ("<Kind>/<ns>/<name>").
func ConfigKey(k string) string { return ConfigPrefix + k }

// Local names this node and its cluster.
type Local struct {
	Cluster   string
	ClusterID uint32
	Node      string
}

// Tables hold what the watchers read from etcd, decoded and validated, per
// cluster. They are safe for concurrent use.
type Tables struct {
	local    Local
	log      *slog.Logger
	onChange func()

	mu       sync.RWMutex
	clusters map[string]*cluster
	listed   map[string]bool // watched prefix -> its first list is complete
	objs     map[string]objects.Object
	objsRaw  map[string][]byte // the values objs were decoded from
	objsVer  uint64
	objsSnap map[string]objects.Object // immutable copy of objs at objsSnapVer
	snapVer  uint64
	// lbRecs are LB-IPAM's assignments (by "<ns>/<name>"), filled into
	// the services of objsSnap; lbLogged holds the problems with them
	// already logged, so a problem is logged once, not per snapshot.
	lbRecs   map[string]records.LBAssignment
	lbVer    uint64                       // counts the changes of lbRecs
	lbAsg    map[string]lbipam.Assignment // lbRecs converted, as of the last snapshot
	lbLogged map[string]bool
	// statusCache keeps objsSnap's copies of services whose object and
	// assignment did not change, so that a rebuild costs little per
	// unchanged service.
	statusCache lbipam.StatusCache
	// changes is the log of the last snapshots' changed keys, for
	// ObjectsChangedSince.
	changes []snapChange
	// The keys of objs (objects.Key) and of lbRecs changed since the last
	// snapshot: the next one patches those only (StatusCache.Patch).
	objsDirty, lbDirty map[string]struct{}

	// The ipcache deltas (TakeIPChanges): the prefixes whose entry in a
	// usable cluster changed since the last take, and the clusters whose
	// entries all came into use or went out of it (each of their prefixes
	// changed: listed at the take, not here).
	dirty         map[netip.Prefix]struct{}
	dirtyClusters map[string]struct{}
	// vers counts the changes of the small tables (View), view is the
	// last View built and viewVers the versions it was built at.
	vers     Versions
	view     *View
	viewVers Versions
	// strs interns the strings that repeat across records: owner
	// namespaces of ipcache entries, identity label keys and values.
	strs map[string]string

	invalid     uint64
	lastInvalid string
	// maxIPCache caps the accepted ipcache entries of each remote cluster.
	maxIPCache  int
	refused     uint64
	lastRefusal string
}

// cluster is the state of one cluster, own or remote.
type cluster struct {
	name   string
	id     uint32 // from its cluster-config; 0 while unknown
	config *records.ClusterConfig
	// refused says why a remote cluster's state is not used (it conflicts
	// with the own cluster).
	refused error

	nodes map[string]records.Node
	// ips holds the accepted entries with the etcd key each came from:
	// another node's key for the same prefix (refused, or deleted) never
	// removes it. The entry is the Gate's (stored once).
	ips        map[netip.Prefix]ipRef
	services   map[string]records.ServiceRecord // "<ns>/<name>"
	identities map[uint32]identity.Labels

	// gate decides which node, ipcache and service records the cluster
	// owns; nodes, ips and services above hold only the accepted ones. It
	// keeps the refused ones, so they come in once they are valid (a node
	// record arriving after an endpoint on its address, a cluster config
	// announcing more). nil for a remote cluster while its ID is unknown.
	gate *records.Gate
	// refusedTotal counts the refusals by reason (each once per key and
	// reason, not per re-list).
	refusedTotal map[string]uint64

	// Remote clusters only: canaries seen, and the raw mirrored values by
	// state key that rebuild needs when the cluster's ID becomes known or
	// changes: every value while the ID is unknown, then those of the
	// small kinds (nodes, services, identities) and the ipcache values
	// refused for their cluster ID. An ipcache entry the Gate holds is
	// kept decoded only (rebuild encodes it again): at 100,000 entries the
	// raw values were a quarter of the agent's heap.
	synced  map[records.Kind]bool
	raw     map[string][]byte
	invalid uint64
	// inUse: whether the cluster's ipcache entries were in use (usable)
	// when last checked; a change of it is a full ipcache change.
	inUse bool
}

func newCluster(name string) *cluster {
	return &cluster{
		name: name, nodes: map[string]records.Node{}, ips: map[netip.Prefix]ipRef{},
		services: map[string]records.ServiceRecord{}, identities: map[uint32]identity.Labels{},
		synced: map[records.Kind]bool{}, raw: map[string][]byte{}, refusedTotal: map[string]uint64{},
	}
}

// NewTables returns empty tables for a node of local's cluster. onChange
// (may be nil) is called, without locks held, after every change; it must
// not block.
func NewTables(local Local, log *slog.Logger, onChange func()) *Tables {
	if log == nil {
		log = slog.Default()
	}
	if onChange == nil {
		onChange = func() {}
	}
	t := &Tables{local: local, log: log, onChange: onChange, clusters: map[string]*cluster{},
		listed: map[string]bool{}, objs: map[string]objects.Object{}, objsRaw: map[string][]byte{}, lbRecs: map[string]records.LBAssignment{}, lbLogged: map[string]bool{},
		lbAsg: map[string]lbipam.Assignment{}, objsDirty: map[string]struct{}{}, lbDirty: map[string]struct{}{}, maxIPCache: records.DefaultMaxIPCacheEntries,
		dirty: map[netip.Prefix]struct{}{}, dirtyClusters: map[string]struct{}{}, strs: map[string]string{}}
	own := newCluster(local.Cluster)
	own.id = local.ClusterID
	own.inUse = true
	// The own cluster's records are checked like a remote's (a node of it
	// holds the credentials to write any of them), but not capped: the
	// cluster's own size is its operator's choice. They wait for the own
	// cluster config, which the agent checks before it starts watching.
	own.gate = records.NewGate(local.Cluster, records.Limits{})
	t.clusters[local.Cluster] = own
	return t
}

// SetMaxIPCachePerRemote sets how many ipcache entries of one remote
// cluster are accepted (the first ones by key; 0: the default,
// records.DefaultMaxIPCacheEntries; negative: no cap). Call it before
// Watch.
func (t *Tables) SetMaxIPCachePerRemote(n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case n == 0:
		n = records.DefaultMaxIPCacheEntries
	case n < 0:
		n = 0
	}
	t.maxIPCache = n
}

// WatchedPrefixes are the prefixes Watch follows for a node of cluster.
func WatchedPrefixes(cluster string) []string {
	return []string{
		records.ClusterConfigPrefix,
		ConfigPrefix,
		records.StateClusterPrefix(records.KindNodes, cluster),
		records.StateClusterPrefix(records.KindIP, cluster),
		records.StateClusterPrefix(records.KindServices, cluster),
		records.IdentityIDPrefix,
		records.SyncedPrefix,
		records.CacheRoot,
		records.LBIPAMPrefix,
	}
}

// Handle applies one watch event of prefix.
func (t *Tables) Handle(prefix string, ev kvstore.Event) {
	// An applied object is decoded before the lock is taken: during a
	// bulk apply the watch delivers thousands, and readers (the
	// reconciler, an apply waiting for its objects) need the lock too.
	var dec *decoded
	if prefix == ConfigPrefix && ev.Type != kvstore.EventDelete && ev.Type != kvstore.EventListDone {
		o, err := DecodeObject(ev.Key, ev.Value)
		dec = &decoded{obj: o, err: err}
	}
	t.mu.Lock()
	changed := t.handle(prefix, ev, dec)
	t.mu.Unlock()
	if changed {
		t.onChange()
	}
}

// decoded is an applied object decoded outside the lock (or why not).
type decoded struct {
	obj objects.Object
	err error
}

func (t *Tables) handle(prefix string, ev kvstore.Event, dec *decoded) bool {
	if ev.Type == kvstore.EventListDone {
		first := !t.listed[prefix]
		t.listed[prefix] = true
		if first {
			t.vers.Listed++
		}
		return first
	}
	if prefix == records.ClusterConfigPrefix || prefix == records.SyncedPrefix {
		// What decides whether a cluster's state is used may change.
		defer t.checkInUse()
	}
	del := ev.Type == kvstore.EventDelete
	var err error
	switch {
	case prefix == records.ClusterConfigPrefix:
		err = t.clusterConfig(ev.Key, ev.Value, del)
	case prefix == ConfigPrefix:
		err = t.object(ev.Key, ev.Value, del, dec)
	case prefix == records.LBIPAMPrefix:
		err = t.lbAssignment(ev.Key, ev.Value, del)
	case prefix == records.SyncedPrefix:
		err = t.canary(ev.Key, ev.Value, del)
	case prefix == records.CacheRoot:
		if err = t.cached(ev.Key, ev.Value, del); err == nil {
			// A remote's records before its canary change nothing in use:
			// no reconcile for them (a full sync is many thousands).
			return t.cachedInUse(ev.Key)
		}
	default: // own cluster's state
		err = t.state(t.clusters[t.local.Cluster], ev.Key, ev.Value, del)
	}
	if err != nil {
		t.reject(ev.Key, err)
	}
	return true
}

// reject counts and logs a record that was skipped.
func (t *Tables) reject(key string, err error) {
	t.invalid++
	t.lastInvalid = err.Error()
	if c := t.clusterOfKey(key); c != nil {
		c.invalid++
	}
	t.log.Warn("clustermesh: skipping invalid record", "key", key, "reason", reasonOf(err), "err", err)
}

func reasonOf(err error) string {
	switch {
	case errors.Is(err, records.ErrClusterMismatch):
		return "cluster-mismatch"
	case errors.Is(err, records.ErrMalformed):
		return "malformed"
	}
	return "invalid"
}

// clusterOfKey finds the (known) cluster a key belongs to, for counting.
func (t *Tables) clusterOfKey(key string) *cluster {
	if _, c, err := records.StateKey(key); err == nil {
		return t.clusters[c]
	}
	for _, k := range []records.Kind{records.KindNodes, records.KindIP, records.KindServices} {
		if rest, ok := strings.CutPrefix(key, records.StatePrefix(k)); ok {
			name, _, _ := strings.Cut(rest, "/")
			return t.clusters[name]
		}
	}
	if strings.HasPrefix(key, records.IdentityIDPrefix) {
		return t.clusters[t.local.Cluster]
	}
	return nil
}

func (t *Tables) getCluster(name string) *cluster {
	c, ok := t.clusters[name]
	if !ok {
		c = newCluster(name)
		t.clusters[name] = c
	}
	return c
}

// clusterConfig handles isthmus/cluster-config/<c>: the own one must match
// this node's configuration; a remote one gives the ID its records are
// validated against.
func (t *Tables) clusterConfig(key string, value []byte, del bool) error {
	name, err := records.ParseClusterConfigKey(key)
	if err != nil {
		return err
	}
	t.vers.Config++
	if name == t.local.Cluster {
		own := t.clusters[name]
		if del {
			own.config = nil
			return nil
		}
		cfg, err := records.ValidateClusterConfig(key, value, t.local.Cluster, t.local.ClusterID)
		if err != nil {
			own.config = nil
			return err
		}
		own.config = &cfg
		// A deleted or broken own config leaves the last valid one in the
		// gate: the own cluster's state is not dropped for it.
		own.gate.SetConfig(&cfg)
		t.syncGate(own)
		t.recheckRemotes()
		return nil
	}
	c := t.getCluster(name)
	if del {
		c.config, c.id = nil, 0
		t.rebuild(c)
		return nil
	}
	cfg, err := records.DecodeClusterConfig(value)
	if err == nil && cfg.Name != name {
		err = fmt.Errorf("%s: record names cluster %q: %w", key, cfg.Name, records.ErrClusterMismatch)
	}
	if err != nil {
		c.config, c.id = nil, 0
		t.rebuild(c)
		return fmt.Errorf("%s: %w", key, err)
	}
	c.config = &cfg
	t.checkRemote(c)
	if c.id != cfg.ID {
		c.id = cfg.ID
		t.rebuild(c)
	} else if c.gate != nil {
		c.gate.SetConfig(&cfg) // the pod CIDRs may have changed
		t.syncGate(c)
	}
	return nil
}

// checkRemote refuses a remote cluster that cannot share a mesh with the
// own one: same ID, overlapping pod CIDRs.
func (t *Tables) checkRemote(c *cluster) {
	prev := c.refused
	c.refused = nil
	own := t.clusters[t.local.Cluster]
	ownCfg := records.ClusterConfig{Name: t.local.Cluster, ID: t.local.ClusterID}
	if own.config != nil {
		ownCfg = *own.config
	}
	if c.config != nil {
		c.refused = records.CheckClusterConflicts(ownCfg, *c.config)
	}
	if c.refused != nil && (prev == nil || prev.Error() != c.refused.Error()) {
		t.log.Error("clustermesh: not using remote cluster", "cluster", c.name, "err", c.refused)
	}
}

func (t *Tables) recheckRemotes() {
	for name, c := range t.clusters {
		if name != t.local.Cluster {
			t.checkRemote(c)
		}
	}
}

// canary handles isthmus/synced/<cluster>/<prefix>.
func (t *Tables) canary(key string, value []byte, del bool) error {
	name, kind, err := records.ParseSyncedKey(key)
	if err != nil {
		return err
	}
	if name == t.local.Cluster {
		return nil // own state is read directly, not through canaries
	}
	t.vers.Config++
	c := t.getCluster(name)
	if del {
		c.synced[kind] = false
		return nil
	}
	st, err := records.DecodeStamp(value)
	if err == nil && st.Cluster != name {
		err = fmt.Errorf("stamp of cluster %q: %w", st.Cluster, records.ErrClusterMismatch)
	}
	if err != nil {
		c.synced[kind] = false
		return fmt.Errorf("%s: %w", key, err)
	}
	c.synced[kind] = true
	return nil
}

// cached handles a remote cluster's mirrored state under isthmus/cache/.
func (t *Tables) cached(key string, value []byte, del bool) error {
	stateKey, name, err := records.StateKey(key)
	if err != nil {
		return err
	}
	if name == t.local.Cluster {
		return fmt.Errorf("%s: own cluster %q in the remote cache: %w", key, name, records.ErrClusterMismatch)
	}
	c := t.getCluster(name)
	delete(c.raw, stateKey)
	if c.id == 0 {
		if !del {
			c.raw[stateKey] = value // validated once its cluster-config arrives
		}
		return nil
	}
	err = t.state(c, stateKey, value, del)
	if !del && (!isIPKey(stateKey) || errors.Is(err, records.ErrClusterMismatch)) {
		c.raw[stateKey] = value
	}
	return err
}

// isIPKey reports whether a state key is an ipcache entry's.
func isIPKey(key string) bool { return strings.HasPrefix(key, records.StatePrefix(records.KindIP)) }

// rebuild re-validates every mirrored value of a remote cluster, after its
// ID became known or changed.
func (t *Tables) rebuild(c *cluster) {
	// The values to validate again: the raw ones kept, and the ipcache
	// entries the Gate holds, encoded again (their raw value is not kept).
	values := maps.Clone(c.raw)
	if c.gate != nil {
		for _, k := range c.gate.Keys(records.KindIP) {
			if _, ok := values[k]; ok {
				continue
			}
			if v, ok := c.gate.Get(k); ok && v.IP != nil {
				if raw, err := v.IP.Marshal(); err == nil {
					values[k] = raw
				}
			}
		}
	}
	for p := range c.ips {
		t.markIP(c, p)
	}
	clear(c.nodes)
	clear(c.ips)
	clear(c.services)
	clear(c.identities)
	t.vers.Nodes++
	t.vers.Identities++
	t.vers.Services++
	t.vers.OwnIPs++
	c.gate = nil
	clear(c.raw)
	if c.id == 0 {
		c.raw = values
		return
	}
	c.gate = records.NewGate(c.name, records.Limits{MaxIPCache: t.maxIPCache})
	c.gate.SetConfig(c.config)
	for _, k := range slices.Sorted(maps.Keys(values)) {
		err := t.state(c, k, values[k], false)
		if !isIPKey(k) || errors.Is(err, records.ErrClusterMismatch) {
			c.raw[k] = values[k]
		}
		if err != nil {
			t.reject(k, err)
		}
	}
}

// state applies a state key (isthmus/state/...) of cluster c. An invalid
// value also removes what the key held before: its writer's intent is
// unknown, so nothing stale is kept.
func (t *Tables) state(c *cluster, key string, value []byte, del bool) error {
	switch {
	case strings.HasPrefix(key, records.StatePrefix(records.KindNodes)):
		_, name, err := records.ParseNodeKey(key)
		if err != nil {
			return err
		}
		delete(c.nodes, name)
		var n records.Node
		if !del {
			n, err = records.ValidateNode(key, value, c.name, c.id)
		}
		if del || err != nil {
			c.gate.Delete(key)
		} else {
			c.gate.PutNode(key, n, nil)
		}
		t.syncGate(c)
		if v, ok := c.gate.Get(key); ok && v.Accepted() {
			c.nodes[name] = *v.Node
		}
		t.vers.Nodes++
		return err
	case strings.HasPrefix(key, records.StatePrefix(records.KindIP)):
		_, _, p, err := records.ParseIPCacheKey(key)
		if err != nil {
			return err
		}
		var e records.IPCacheEntry
		if !del {
			e, err = records.ValidateIPCacheEntry(key, value, c.name, c.id)
		}
		if del || err != nil {
			// A deleted record's verdict is not drained: take its
			// entry out here. (An upsert replaces it below, or is
			// drained as refused or pending, which takes it out.)
			t.setIP(c, key, p, nil)
			c.gate.Delete(key)
		} else {
			e.Cluster = c.name // one string for all the cluster's entries
			e.OwnerNamespace = t.intern(e.OwnerNamespace)
			c.gate.PutIP(key, e, nil)
		}
		t.syncGate(c)
		if v, ok := c.gate.Get(key); ok && v.Accepted() {
			if r := c.ips[p]; r.IPCacheEntry != v.IP { // not set by syncGate already
				t.setIP(c, key, p, v.IP)
			}
		}
		return err
	case strings.HasPrefix(key, records.StatePrefix(records.KindServices)):
		_, ns, name, err := records.ParseServiceKey(key)
		if err != nil {
			return err
		}
		delete(c.services, ns+"/"+name)
		var s records.ServiceRecord
		if !del {
			s, err = records.ValidateService(key, value, c.name, c.id)
		}
		if del || err != nil {
			c.gate.Delete(key)
		} else {
			c.gate.PutService(key, s, nil)
		}
		t.syncGate(c)
		if v, ok := c.gate.Get(key); ok && v.Accepted() {
			c.services[ns+"/"+name] = *v.Service
		}
		t.vers.Services++
		return err
	case strings.HasPrefix(key, records.IdentityIDPrefix):
		id, err := records.ParseIdentityIDKey(key)
		if err != nil {
			return err
		}
		delete(c.identities, id)
		t.vers.Identities++
		if del {
			return nil
		}
		r, err := records.ValidateIdentity(key, value, c.name, c.id)
		if err != nil {
			return err
		}
		// Label keys and values repeat across identities (the namespace
		// and cluster labels are in every one): one string each.
		l := make(identity.Labels, len(r.Labels))
		for k, v := range r.Labels {
			l[t.intern(k)] = t.intern(v)
		}
		c.identities[id] = l
	case strings.HasPrefix(key, records.StatePrefix(records.KindIdentities)):
		// Reference and claim keys of the allocator: not needed here.
		return nil
	default:
		return fmt.Errorf("%s: not a state key this agent reads: %w", key, records.ErrMalformed)
	}
	return nil
}

// ipRef is an accepted ipcache entry (the Gate's, not a copy) and the key
// it was read at.
type ipRef struct {
	*records.IPCacheEntry
	key string
}

// setIP sets the entry of prefix p read at key (e nil: removes it, if it
// came from key), and notes the change for TakeIPChanges.
func (t *Tables) setIP(c *cluster, key string, p netip.Prefix, e *records.IPCacheEntry) {
	if e != nil {
		c.ips[p] = ipRef{e, key}
	} else if c.ips[p].key == key {
		delete(c.ips, p)
	} else {
		return
	}
	t.markIP(c, p)
}

// markIP notes a change of c's entry for p, if c's entries are in use.
func (t *Tables) markIP(c *cluster, p netip.Prefix) {
	if c.name == t.local.Cluster {
		t.vers.OwnIPs++
	}
	if c.inUse {
		t.dirty[p] = struct{}{}
	}
}

// checkInUse notes the clusters whose ipcache entries came into use or
// went out of it (a canary, an ID, a refusal): all their prefixes
// changed. The small tables' versions move too.
func (t *Tables) checkInUse() {
	for _, c := range t.clusters {
		if use := t.usable(c, records.KindIP); use != c.inUse {
			c.inUse = use
			t.dirtyClusters[c.name] = struct{}{}
		}
	}
	t.vers.Nodes++
	t.vers.Identities++
	t.vers.Services++
}

// intern returns s, or an equal string already held (at most 16384 are;
// past that, each record keeps its own).
func (t *Tables) intern(s string) string {
	if v, ok := t.strs[s]; ok {
		return v
	}
	if len(t.strs) < 16384 {
		t.strs[s] = s
	}
	return s
}

// syncGate applies the verdicts of c's gate that changed to the typed
// tables, and logs and counts each new refusal once.
func (t *Tables) syncGate(c *cluster) {
	for _, k := range []records.Kind{records.KindNodes, records.KindIP, records.KindServices} {
		for _, v := range c.gate.Drain(k) {
			switch {
			case v.Node != nil:
				delete(c.nodes, v.Node.Name)
				if v.Accepted() {
					c.nodes[v.Node.Name] = *v.Node
				}
				t.vers.Nodes++
			case v.IP != nil:
				if v.Accepted() {
					t.setIP(c, v.Key, v.IP.Prefix, v.IP)
				} else {
					t.setIP(c, v.Key, v.IP.Prefix, nil)
				}
			case v.Service != nil:
				delete(c.services, v.Service.Namespace+"/"+v.Service.Name)
				if v.Accepted() {
					c.services[v.Service.Namespace+"/"+v.Service.Name] = *v.Service
				}
				t.vers.Services++
			}
			if reason := records.RefusalReason(v.Err); reason != "" {
				c.refusedTotal[reason]++
				t.refused++
				t.lastRefusal = v.Err.Error()
				t.log.Warn("clustermesh: refusing a record its cluster does not own", "cluster", c.name, "key", v.Key, "reason", reason, "err", v.Err)
			}
		}
	}
}

// object handles isthmus/config/<Kind>/<ns>/<name>.
func (t *Tables) object(key string, value []byte, del bool, dec *decoded) error {
	rest := strings.TrimPrefix(key, ConfigPrefix)
	if _, had := t.objs[rest]; had {
		delete(t.objs, rest)
		delete(t.objsRaw, rest)
		t.objsVer++
		t.objsDirty[rest] = struct{}{}
	}
	if del {
		return nil
	}
	if dec == nil {
		o, err := DecodeObject(key, value)
		dec = &decoded{obj: o, err: err}
	}
	if dec.err != nil {
		return dec.err
	}
	t.objs[rest] = dec.obj
	t.objsRaw[rest] = value
	t.objsVer++
	t.objsDirty[rest] = struct{}{}
	return nil
}

// HasObjects reports whether the applied objects are listed and hold
// every key of want (objects.Key) with the value want gives, byte for
// byte as it was written to etcd. It is what an apply waits for, and
// costs the keys asked about, not the table (the snapshot with status
// would be rebuilt on every check while the watch delivers).
func (t *Tables) HasObjects(want map[string][]byte) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if !t.listed[ConfigPrefix] || !t.listed[records.LBIPAMPrefix] {
		return false
	}
	for k, v := range want {
		if have, ok := t.objsRaw[k]; !ok || !bytes.Equal(have, v) {
			return false
		}
	}
	return true
}

// DecodedObject returns the object the watch decoded for key (an etcd key
// under ConfigPrefix) when it was decoded from raw, byte for byte: what
// DecodeObject(key, raw) gives, without decoding again
// (ConfigCache.Known).
func (t *Tables) DecodedObject(key string, raw []byte) (objects.Object, bool) {
	rest, ok := strings.CutPrefix(key, ConfigPrefix)
	if !ok {
		return nil, false
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if have, ok := t.objsRaw[rest]; !ok || !bytes.Equal(have, raw) {
		return nil, false
	}
	return t.objs[rest], true
}

// lbAssignment handles isthmus/state/lbipam/v1/<ns>/<name>: the
// addresses go into the service's status when the objects snapshot is
// built. An invalid record is dropped (the service shows no addresses
// until the server rewrites it).
func (t *Tables) lbAssignment(key string, value []byte, del bool) error {
	ns, name, err := records.ParseLBIPAMKey(key)
	if err != nil {
		return err
	}
	svc := ns + "/" + name
	t.lbVer++
	if _, had := t.lbRecs[svc]; had {
		delete(t.lbRecs, svc)
		t.objsVer++
		t.lbDirty[svc] = struct{}{}
	}
	if del {
		return nil
	}
	r, err := records.ValidateLBAssignment(key, value)
	if err != nil {
		return err
	}
	t.lbRecs[svc] = r
	t.objsVer++
	t.lbDirty[svc] = struct{}{}
	return nil
}

// LBAssignments returns LB-IPAM's assignments as read from etcd.
func (t *Tables) LBAssignments() []records.LBAssignment {
	recs, _ := t.LBAssignmentsGen()
	return recs
}

// LBAssignmentsGen is LBAssignments with a generation: equal generations,
// same assignments.
func (t *Tables) LBAssignmentsGen() ([]records.LBAssignment, uint64) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return slices.Collect(maps.Values(t.lbRecs)), t.lbVer
}

// LBAssignmentsVer is the generation LBAssignmentsGen would give.
func (t *Tables) LBAssignmentsVer() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.lbVer
}

// DecodeObject decodes and validates an applied object read at key.
func DecodeObject(key string, value []byte) (objects.Object, error) {
	objs, err := objects.Decode(value)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", key, records.ErrMalformed, err)
	}
	if len(objs) != 1 {
		return nil, fmt.Errorf("%s: %w: %d objects in one key", key, records.ErrMalformed, len(objs))
	}
	// objects.Decode validated it: a second Validate per object cost a
	// bulk apply's watch a tenth of its decoding.
	o := objs[0]
	if want := ConfigKey(objects.Key(o)); want != key {
		return nil, fmt.Errorf("%s: %w: the object is %s", key, records.ErrMalformed, objects.Key(o))
	}
	return o, nil
}

// Ready reports whether every watched prefix has been listed at least once:
// from then on the tables are a complete picture, and what is not in them
// may be removed from the datapath.
func (t *Tables) Ready() bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.ready()
}

// ObjectsListed reports whether the applied objects and LB-IPAM's
// assignments have been listed (before that, a LoadBalancer service would
// lose its addresses for a moment).
func (t *Tables) ObjectsListed() bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.listed[ConfigPrefix] && t.listed[records.LBIPAMPrefix]
}

// Objects returns the applied objects by objects.Key. The map is shared
// and must not be modified.
func (t *Tables) Objects() map[string]objects.Object {
	objs, _ := t.ObjectsGen()
	return objs
}

// ObjectsGen returns Objects and its generation (> 0; equal generations,
// same objects).
func (t *Tables) ObjectsGen() (map[string]objects.Object, uint64) {
	t.mu.RLock()
	if t.objsSnap != nil && t.snapVer == t.objsVer {
		s, v := t.objsSnap, t.snapVer
		t.mu.RUnlock()
		return s, v + 1
	}
	t.mu.RUnlock()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.objsSnap == nil || t.snapVer != t.objsVer {
		// The assignments are kept converted (t.lbAsg) as they change:
		// converting all of them per snapshot cost O(all services).
		for k := range t.lbDirty {
			if r, ok := t.lbRecs[k]; ok {
				t.lbAsg[k] = lbipam.FromRecord(r)
			} else {
				delete(t.lbAsg, k)
			}
		}
		full := t.objsSnap == nil
		objKeys, asgKeys := slices.Collect(maps.Keys(t.objsDirty)), slices.Collect(maps.Keys(t.lbDirty))
		snap, problems := t.statusCache.Patch(t.objs, t.lbAsg, objKeys, asgKeys)
		t.logChange(full, objKeys, asgKeys)
		clear(t.objsDirty)
		clear(t.lbDirty)
		logged := map[string]bool{}
		for _, p := range problems {
			if !t.lbLogged[p] {
				t.log.Warn("clustermesh: LB-IPAM assignment ignored", "problem", p)
			}
			logged[p] = true
		}
		t.lbLogged = logged
		t.objsSnap = snap
		t.snapVer = t.objsVer
	}
	return t.objsSnap, t.snapVer + 1
}

// snapChange is what one snapshot (gen) changed against the one before
// it (prev): the objects.Keys whose object differs, or, when full,
// everything.
type snapChange struct {
	prev, gen uint64
	keys      []string
	full      bool
}

// maxChangeLog bounds the change log: a reader further behind reads
// everything.
const maxChangeLog = 64

// logChange records the snapshot being built at t.objsVer: the objects
// changed and those of the changed assignments (their services' status),
// and every pool (Patch recomputes the pools' usage each time).
func (t *Tables) logChange(full bool, objKeys, asgKeys []string) {
	c := snapChange{prev: t.snapVer + 1, gen: t.objsVer + 1, full: full}
	if !full {
		c.keys = append(c.keys, objKeys...)
		for _, k := range asgKeys {
			c.keys = append(c.keys, objects.KindService+"/"+k)
		}
		c.keys = append(c.keys, t.statusCache.PoolKeys()...)
	}
	if len(t.changes) >= maxChangeLog {
		t.changes = slices.Delete(t.changes, 0, len(t.changes)-maxChangeLog+1)
	}
	t.changes = append(t.changes, c)
}

// ObjectsChangedSince returns the keys (objects.Key) of the objects that
// differ between the snapshot of generation since (as ObjectsGen gave it)
// and the current one, possibly with repeats; ok is false when that is
// not known (too far behind, or the current snapshot is not built yet:
// call ObjectsGen first) and the caller must look at everything. Its cost
// is the changes, not the objects: what lets a reconciler do per run the
// work of what changed.
func (t *Tables) ObjectsChangedSince(since, current uint64) (keys []string, ok bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if since == current {
		return nil, true
	}
	i := slices.IndexFunc(t.changes, func(c snapChange) bool { return c.prev == since })
	if i < 0 {
		return nil, false
	}
	for _, c := range t.changes[i:] {
		if c.full {
			return nil, false
		}
		keys = append(keys, c.keys...)
		if c.gen == current {
			return keys, true
		}
	}
	return nil, false
}

// OwnConfig returns the own cluster's cluster-config, if it was read and
// matched this node's cluster ID.
func (t *Tables) OwnConfig() (records.ClusterConfig, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if c := t.clusters[t.local.Cluster].config; c != nil {
		return *c, true
	}
	return records.ClusterConfig{}, false
}

// usable reports whether the state of kind k of cluster c is used: always
// for the own cluster; for a remote one once its canary exists, its ID is
// known and it does not conflict with the own cluster.
func (t *Tables) usable(c *cluster, k records.Kind) bool {
	return c.name == t.local.Cluster || (c.id != 0 && c.refused == nil && c.synced[k])
}

// Versions count the changes of the tables by what they hold, so that a
// reader can tell what changed since it last looked: equal versions, same
// content.
type Versions struct {
	Nodes, Identities, Services, Config uint64
	// OwnIPs counts changes of the own cluster's ipcache entries (services
	// select the own cluster's endpoints among them).
	OwnIPs uint64
	// Listed counts prefixes listed for the first time.
	Listed uint64
}

// View is the mesh as the datapath should see it, but for the ipcache
// entries, which are read per prefix (LookupIP, TakeIPChanges): the own
// cluster's state and every remote cluster's state of the kinds it has
// synced. A View is shared and must not be modified.
type View struct {
	// Ready: every prefix was listed; what is missing here is gone.
	Ready bool
	// Versions the View was built at.
	Versions Versions
	// Nodes of every cluster, this node included.
	Nodes []records.Node
	// Identities of every cluster, sorted by ID.
	Identities []identity.Identity
	// Services are the service records of remote clusters.
	RemoteServices []records.ServiceRecord
	// RemotePodCIDRs are the pod CIDRs every accepted remote cluster
	// announces in its config, known or not whether its nodes are: with
	// encryption, traffic to them must never leave unencrypted, whatever
	// becomes of a node (refused, expired, not yet listed).
	RemotePodCIDRs []netip.Prefix
}

// View returns the usable state but the ipcache entries. It is built again
// only when something in it changed.
func (t *Tables) View() View {
	t.mu.RLock()
	if t.view != nil && t.viewVers == t.vers {
		v := *t.view
		t.mu.RUnlock()
		return v
	}
	t.mu.RUnlock()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.view == nil || t.viewVers != t.vers {
		v := t.buildView()
		t.view, t.viewVers = &v, t.vers
	}
	return *t.view
}

// ready is Ready with t.mu held.
func (t *Tables) ready() bool {
	for _, p := range WatchedPrefixes(t.local.Cluster) {
		if !t.listed[p] {
			return false
		}
	}
	return true
}

func (t *Tables) buildView() View {
	v := View{Ready: t.ready(), Versions: t.vers}
	for _, name := range slices.Sorted(maps.Keys(t.clusters)) {
		c := t.clusters[name]
		own := name == t.local.Cluster
		use := func(k records.Kind) bool { return t.usable(c, k) }
		if use(records.KindNodes) {
			for _, n := range c.nodes {
				v.Nodes = append(v.Nodes, n)
			}
		}
		if use(records.KindIdentities) {
			for id, l := range c.identities {
				v.Identities = append(v.Identities, identity.Identity{ID: id, Labels: l})
			}
		}
		if !own && use(records.KindServices) {
			for _, s := range c.services {
				v.RemoteServices = append(v.RemoteServices, s)
			}
		}
		if !own && c.config != nil && c.refused == nil {
			v.RemotePodCIDRs = append(v.RemotePodCIDRs, c.config.PodCIDRs...)
		}
	}
	slices.SortFunc(v.Identities, func(a, b identity.Identity) int { return cmp.Compare(a.ID, b.ID) })
	return v
}

// IPEntry is an ipcache entry as the datapath needs it.
type IPEntry struct {
	Prefix   netip.Prefix
	Identity uint32
	HostIP   netip.Addr
	Cluster  string
}

func entryOf(e *records.IPCacheEntry) IPEntry {
	return IPEntry{Prefix: e.Prefix, Identity: e.Identity, HostIP: e.HostIP, Cluster: e.Cluster}
}

// TakeIPChanges returns the prefixes whose ipcache entry changed since the
// last call (LookupIP has the entry now): those changed one by one, and
// every prefix of a cluster whose entries came into use or went out of it
// (a canary, an ID, a refusal), so that a cluster joining costs its own
// size, not the mesh's. It forgets what it returned: the caller must apply
// it, or go through every entry next time. full is never set by the
// tables (the interface lets a source ask for a pass over everything).
func (t *Tables) TakeIPChanges() (changed []netip.Prefix, full bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(t.dirty)
	for name := range t.dirtyClusters {
		n += len(t.clusters[name].ips)
	}
	changed = make([]netip.Prefix, 0, n)
	for p := range t.dirty {
		changed = append(changed, p)
	}
	for name := range t.dirtyClusters {
		for p := range t.clusters[name].ips {
			changed = append(changed, p)
		}
	}
	clear(t.dirtyClusters)
	if len(t.dirty) > 1024 {
		t.dirty = map[netip.Prefix]struct{}{} // give a burst's memory back
	} else {
		clear(t.dirty)
	}
	return changed, full
}

// LookupIP returns the ipcache entry for p of the clusters in use: the own
// cluster's, else a remote cluster's (pod CIDRs of clusters in use never
// overlap; of two that claim one node address, the first by name wins).
func (t *Tables) LookupIP(p netip.Prefix) (IPEntry, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if r, ok := t.clusters[t.local.Cluster].ips[p]; ok {
		return entryOf(r.IPCacheEntry), true
	}
	found := IPEntry{}
	for name, c := range t.clusters {
		if name == t.local.Cluster || !c.inUse {
			continue
		}
		if r, ok := c.ips[p]; ok && (!found.Prefix.IsValid() || name < found.Cluster) {
			found = entryOf(r.IPCacheEntry)
		}
	}
	return found, found.Prefix.IsValid()
}

// RangeIP calls f for the ipcache entries of the clusters in use, with the
// tables read-locked: f must not call the tables. For a prefix two
// clusters claim, f sees both; LookupIP says which one counts.
func (t *Tables) RangeIP(f func(IPEntry)) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, c := range t.clusters {
		if !c.inUse {
			continue
		}
		for _, r := range c.ips {
			f(entryOf(r.IPCacheEntry))
		}
	}
}

// RangeOwnIP calls f for the own cluster's ipcache entries, read-locked
// like RangeIP.
func (t *Tables) RangeOwnIP(f func(IPEntry)) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, r := range t.clusters[t.local.Cluster].ips {
		f(entryOf(r.IPCacheEntry))
	}
}

// IPCache returns a copy of the ipcache entries in use, sorted by prefix
// (for tests and tools: the datapath reads per prefix).
func (t *Tables) IPCache() []records.IPCacheEntry {
	t.mu.RLock()
	defer t.mu.RUnlock()
	var out []records.IPCacheEntry
	for _, c := range t.clusters {
		if c.inUse {
			for _, r := range c.ips {
				out = append(out, *r.IPCacheEntry)
			}
		}
	}
	slices.SortFunc(out, func(a, b records.IPCacheEntry) int { return a.Prefix.Compare(b.Prefix) })
	return out
}

// ClusterStatus is one cluster as this node sees it.
type ClusterStatus struct {
	Name   string
	ID     uint32
	Local  bool
	Synced bool // own: listed; remote: every canary present and usable
	// Reason a remote cluster is not used, if any.
	Error      string
	Nodes      int
	Endpoints  int
	Identities int
	Services   int
	Invalid    uint64
	// Refused counts the cluster's records refused now as not owned by
	// it, RefusedTotal the refusals since start (each once per key and
	// reason), by reason (records.Reason*).
	Refused      map[string]int
	RefusedTotal map[string]uint64
}

// Status summarises the tables.
type Status struct {
	Clusters       []ClusterStatus
	InvalidRecords uint64
	LastInvalid    string
	// RefusedRecords counts the refusals of records not owned by their
	// cluster (each once per key and reason); LastRefusal is the last.
	RefusedRecords uint64
	LastRefusal    string
}

// Status returns counts per cluster, the own one first.
func (t *Tables) Status() Status {
	ready := t.Ready()
	t.mu.RLock()
	defer t.mu.RUnlock()
	st := Status{InvalidRecords: t.invalid, LastInvalid: t.lastInvalid, RefusedRecords: t.refused, LastRefusal: t.lastRefusal}
	names := slices.Sorted(maps.Keys(t.clusters))
	slices.SortStableFunc(names, func(a, b string) int {
		return cmp.Compare(btoi(a != t.local.Cluster), btoi(b != t.local.Cluster))
	})
	for _, name := range names {
		c := t.clusters[name]
		cs := ClusterStatus{Name: name, ID: c.id, Local: name == t.local.Cluster,
			Nodes: len(c.nodes), Endpoints: len(c.ips), Identities: len(c.identities), Services: len(c.services), Invalid: c.invalid,
			RefusedTotal: maps.Clone(c.refusedTotal)}
		if c.gate != nil {
			cs.Refused = c.gate.Refused()
		}
		if cs.Local {
			cs.Synced = ready
			if c.config == nil {
				cs.Error = "no valid cluster-config for the own cluster yet"
			}
		} else {
			cs.Synced = true
			for _, k := range records.Kinds {
				cs.Synced = cs.Synced && t.usable(c, k)
			}
			switch {
			case c.refused != nil:
				cs.Error = c.refused.Error()
			case c.id == 0:
				cs.Error = "waiting for its cluster-config (" + records.ClusterConfigKey(name) + ")"
			}
		}
		if cs.Local && cs.ID == 0 {
			cs.ID = t.local.ClusterID
		}
		st.Clusters = append(st.Clusters, cs)
	}
	return st
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Identities returns the identities of the own cluster and of every remote
// cluster whose identities are synced, sorted by ID.
//
// The slice and the labels are shared (the View's): they must not be
// modified.
func (t *Tables) Identities() []identity.Identity {
	return t.View().Identities
}

// Identity returns the labels of an identity of any cluster.
func (t *Tables) Identity(id uint32) (identity.Labels, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, c := range t.clusters {
		if l, ok := c.identities[id]; ok {
			return l.Clone(), true
		}
	}
	return nil, false
}

// cachedInUse reports whether a mirrored key belongs to state in use (its
// cluster known and its kind synced).
func (t *Tables) cachedInUse(key string) bool {
	stateKey, name, err := records.StateKey(key)
	if err != nil {
		return true
	}
	c, ok := t.clusters[name]
	if !ok {
		return true
	}
	rest, _ := strings.CutPrefix(stateKey, records.StateRoot)
	kind, _, _ := strings.Cut(rest, "/")
	return t.usable(c, records.Kind(kind))
}

// Refusal is one cluster's count of records refused for one reason.
type Refusal struct {
	Cluster, Reason string
	// Now is how many records are refused for the reason now; Total how
	// many refusals there were since start (once per key and reason).
	Now   int
	Total uint64
}

// Refusals returns, for every known cluster and every reason of
// records.Reasons (so every series exists from the start), the records of
// the cluster refused as not owned by it: for the agent's metrics
// isthmus_agent_mesh_cluster_refused_records{cluster,reason} (Now) and
// isthmus_agent_mesh_cluster_refused_records_total{cluster,reason} (Total).
func (t *Tables) Refusals() []Refusal {
	t.mu.RLock()
	defer t.mu.RUnlock()
	var out []Refusal
	for _, name := range slices.Sorted(maps.Keys(t.clusters)) {
		c := t.clusters[name]
		var now map[string]int
		if c.gate != nil {
			now = c.gate.Refused()
		}
		for _, r := range records.Reasons {
			out = append(out, Refusal{Cluster: name, Reason: r, Now: now[r], Total: c.refusedTotal[r]})
		}
	}
	return out
}
