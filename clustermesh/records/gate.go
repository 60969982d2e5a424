package records

import (
	"cmp"
	"container/heap"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Gate holds the node, ipcache and service records of one cluster, each
// already checked against its key and source (Validate*), and decides
// which of them the cluster owns. It re-decides whenever something they
// depend on changes, so that order of arrival does not matter:
//
//   - nothing is accepted while the cluster config is unknown (ErrPending);
//   - a node is refused if a pod CIDR of it lies outside the cluster's pod
//     CIDRs, or overlaps a pod CIDR of another node of the cluster: then
//     both are refused, since either may be the one lying (a rule of
//     "first" would let a node whose name sorts first, or that wrote first,
//     take another node's pods and their traffic; this way a node that
//     claims another's range only takes both out, and is counted). The
//     answer is the same in every reader, whatever order the records
//     arrived in;
//   - an ipcache entry is refused if its identity is reserved or of
//     another cluster ID, or its prefix is neither inside the cluster's
//     pod CIDRs nor an accepted node's address; and, since the entry sits
//     under the prefix of the node that published it, if its prefix is
//     neither inside that node's pod CIDRs nor one of that node's
//     addresses, or its host IP is not one of them (pending while that
//     node's record is there but not accepted);
//   - a service is refused if a backend is neither inside the pod CIDRs
//     nor an accepted node's address;
//   - of the ipcache entries that pass, only the Limits.MaxIPCache whose
//     keys sort first are accepted; the others are refused as over-cap
//     and come in as earlier ones go.
//
// A refused record stays in the Gate and is accepted as soon as it is
// valid (and an accepted one refused as soon as it is not). Drain reports
// every change of verdict once, so callers log and count each refusal
// once per key, not on every re-list. A Gate is not safe for concurrent
// use.
type Gate struct {
	cluster string
	limits  Limits
	owner   *Owner

	entries map[string]*gateEntry
	byKind  map[Kind]map[string]*gateEntry // nodes and services; ipcache entries are in ipByNode
	// nodeIdx indexes the pod CIDRs of the nodes that are inside the
	// cluster's (the candidates of the overlap rule).
	nodeIdx prefixIndex
	// nodeAddrs counts the accepted nodes per underlay address.
	nodeAddrs map[netip.Addr]int
	// ipByNode indexes the ipcache entries by the node whose key prefix
	// they sit under, to decide them again when that node's verdict or
	// record changes. A list per node (each entry knows its slot), not a
	// map: one pointer per entry, and no hashing of its key.
	ipByNode map[string]*nodeIPs
	ipCount  int
	// ipByAddr indexes the single-address ipcache entries outside the
	// cluster's pod CIDRs (only a node address makes them owned), to decide
	// them again when a node with that address comes or goes. Entries
	// inside the pod CIDRs, nearly all of them, do not depend on node
	// addresses and stay out of it (memory: one map entry less each).
	ipByAddr map[netip.Addr]map[string]*gateEntry
	capped   capSet
	// changed holds, per kind, the entries whose verdict changed since the
	// last Drain (each once: queued); replaced and removed ones are gone.
	changed [numGateKinds][]*gateEntry
	refused map[string]int
	// refusedGen counts the changes of refused (RefusedGen).
	refusedGen uint64
}

// Limits bound what one cluster may have accepted.
type Limits struct {
	// MaxIPCache caps the accepted ipcache entries; 0 or less: no cap.
	MaxIPCache int
}

// gateEntry is one record. Its fields are ordered to keep it small: the
// Gate holds one per ipcache entry of the cluster (100,000s).
type gateEntry struct {
	key  string
	node *Node
	ip   *IPCacheEntry // of an ipGateEntry: stored with the entry
	svc  *ServiceRecord
	raw  []byte

	owned    error // ipcache: the verdict before the cap
	verdict  error // nil: accepted
	reported error // the verdict Drain last returned

	slot      int32 // ipcache: its index in its node's ipByNode list
	kind      gateKind
	candidate bool // node: its pod CIDRs are in nodeIdx
	hasReport bool
	queued    bool // in changed, until the next Drain of its kind
	gone      bool // replaced or deleted: no longer the record at key
}

// ipGateEntry is an ipcache entry's gateEntry with the record stored in
// the same allocation.
type ipGateEntry struct {
	gateEntry
	rec IPCacheEntry
}

// nodeIPs are the ipcache entries under one node's key prefix.
type nodeIPs struct{ es []*gateEntry }

// gateKind is the Kind of a gateEntry, as a small index.
type gateKind uint8

const (
	gateNode gateKind = iota
	gateIP
	gateService
	numGateKinds
)

var gateKinds = [numGateKinds]Kind{KindNodes, KindIP, KindServices}

// gateKindOf returns the gateKind of k (ok false for a kind the Gate does
// not hold).
func gateKindOf(k Kind) (gateKind, bool) {
	for i, gk := range gateKinds {
		if gk == k {
			return gateKind(i), true
		}
	}
	return 0, false
}

// Verdict is a change of a record's verdict, reported by Drain.
type Verdict struct {
	Key  string
	Kind Kind
	// Err is nil for an accepted record, ErrPending for one waiting for
	// the cluster config, else a *RefusalError.
	Err error
	// The record (one of Node, IP, Service) and its value as given to Put.
	Node    *Node
	IP      *IPCacheEntry
	Service *ServiceRecord
	Raw     []byte
}

// Accepted reports whether the record is accepted.
func (v Verdict) Accepted() bool { return v.Err == nil }

// NewGate returns an empty Gate for cluster; SetConfig makes it accept.
func NewGate(cluster string, limits Limits) *Gate {
	return &Gate{cluster: cluster, limits: limits,
		entries: map[string]*gateEntry{},
		byKind:  map[Kind]map[string]*gateEntry{KindNodes: {}, KindIP: {}, KindServices: {}},
		nodeIdx: newPrefixIndex(), nodeAddrs: map[netip.Addr]int{}, ipByNode: map[string]*nodeIPs{}, ipByAddr: map[netip.Addr]map[string]*gateEntry{},
		capped:  newCapSet(limits.MaxIPCache),
		refused: map[string]int{}}
}

// Cluster returns the cluster the Gate is for.
func (g *Gate) Cluster() string { return g.cluster }

// Owner returns what the cluster owns, if its config is known.
func (g *Gate) Owner() (Owner, bool) {
	if g.owner == nil {
		return Owner{}, false
	}
	return *g.owner, true
}

// SetConfig sets the cluster's config (nil: unknown) and re-decides every
// record.
func (g *Gate) SetConfig(cfg *ClusterConfig) {
	if cfg == nil {
		g.owner = nil
	} else {
		o := NewOwner(*cfg)
		g.owner = &o
	}
	// Nodes first (they own addresses), then what depends on them.
	g.nodeIdx = newPrefixIndex()
	for _, e := range g.byKind[KindNodes] {
		g.unaccept(e)
		e.candidate = false
	}
	var all []*gateEntry
	for _, e := range g.byKind[KindNodes] {
		g.classifyNode(e)
		all = append(all, e)
	}
	g.resolveNodes(all)
	g.ipByAddr = map[netip.Addr]map[string]*gateEntry{}
	g.eachIP(func(e *gateEntry) {
		if g.mayBeNodeAddr(e.ip.Prefix) {
			addIndex(g.ipByAddr, e.ip.Prefix.Addr(), e)
		}
	})
	g.eachIP(g.evalIP)
	for _, e := range g.byKind[KindServices] {
		g.evalService(e)
	}
}

// mayBeNodeAddr: whether an entry for p can depend on node addresses (a
// single address the cluster's pod CIDRs do not cover, or any while the
// config is unknown).
func (g *Gate) mayBeNodeAddr(p netip.Prefix) bool {
	return p.IsSingleIP() && (g.owner == nil || !g.owner.OwnsPrefix(p))
}

// PutNode adds or replaces the node record at key (a NodeKey of the
// cluster).
func (g *Gate) PutNode(key string, n Node, raw []byte) {
	old := g.entries[key]
	var seeds []netip.Prefix
	if old != nil {
		seeds = g.removeNode(old)
	}
	e := g.newEntry(&gateEntry{}, key, gateNode, old, raw)
	e.node = &n
	g.classifyNode(e)
	g.resolveNodes(g.component(append(seeds, n.PodCIDRs...), e))
	g.nodeVerdictChanged(n.Name) // its entries are now judged by its record
}

// PutIP adds or replaces the ipcache entry at key.
func (g *Gate) PutIP(key string, ip IPCacheEntry, raw []byte) {
	old := g.entries[key]
	x := &ipGateEntry{rec: ip}
	e := g.newEntry(&x.gateEntry, key, gateIP, old, raw)
	if old != nil {
		e.owned = old.owned
	} else {
		e.owned = ErrPending
	}
	e.ip = &x.rec
	if old != nil {
		g.unindexIP(old)
	}
	g.indexIPNode(e)
	g.ipCount++
	if ip.Prefix.IsSingleIP() {
		if g.mayBeNodeAddr(ip.Prefix) {
			addIndex(g.ipByAddr, ip.Prefix.Addr(), e)
		}
	}
	g.evalIP(e)
}

// PutService adds or replaces the service record at key.
func (g *Gate) PutService(key string, s ServiceRecord, raw []byte) {
	e := g.newEntry(&gateEntry{}, key, gateService, g.entries[key], raw)
	e.svc = &s
	g.evalService(e)
}

// Delete removes the record at key, if the Gate has it.
func (g *Gate) Delete(key string) {
	e, ok := g.entries[key]
	if !ok {
		return
	}
	switch e.kind {
	case gateNode:
		seeds := g.removeNode(e)
		g.forget(e)
		g.resolveNodes(g.component(seeds, nil))
		g.nodeVerdictChanged(e.node.Name)
	case gateIP:
		if e.owned == nil {
			if promoted := g.capped.remove(key); promoted != "" {
				g.evalIP(g.entries[promoted])
			}
		}
		g.unindexIP(e)
		g.forget(e)
	default:
		g.forget(e)
	}
}

// Keys returns the keys of kind the Gate holds, sorted.
func (g *Gate) Keys(k Kind) []string {
	if k == KindIP {
		var out []string
		g.eachIP(func(e *gateEntry) { out = append(out, e.key) })
		slices.Sort(out)
		return out
	}
	return slices.Sorted(maps.Keys(g.byKind[k]))
}

// eachIP calls f for every ipcache entry (by node, the index they are
// kept in: one map entry each, not two).
func (g *Gate) eachIP(f func(*gateEntry)) {
	for _, node := range slices.Sorted(maps.Keys(g.ipByNode)) {
		for _, e := range g.ipByNode[node].es {
			f(e)
		}
	}
}

// Len returns how many records of kind the Gate holds.
func (g *Gate) Len(k Kind) int {
	if k == KindIP {
		return g.ipCount
	}
	return len(g.byKind[k])
}

// Get returns the verdict of the record at key.
func (g *Gate) Get(key string) (Verdict, bool) {
	e, ok := g.entries[key]
	if !ok {
		return Verdict{}, false
	}
	return e.verdictOf(), true
}

// Dirty reports whether Drain(k) has something to report.
func (g *Gate) Dirty(k Kind) bool {
	gk, ok := gateKindOf(k)
	return ok && len(g.changed[gk]) > 0
}

// Drain returns, sorted by key, the records of kind k whose verdict
// changed since the last Drain (or that were never reported): once per
// change, not once per Put.
func (g *Gate) Drain(k Kind) []Verdict {
	gk, ok := gateKindOf(k)
	if !ok {
		return nil
	}
	var out []Verdict
	for _, e := range g.changed[gk] {
		e.queued = false
		if e.gone || (e.hasReport && sameVerdict(e.reported, e.verdict)) {
			continue
		}
		e.reported, e.hasReport = e.verdict, true
		out = append(out, e.verdictOf())
	}
	clear(g.changed[gk]) // no pointers kept to entries gone since
	g.changed[gk] = g.changed[gk][:0]
	slices.SortFunc(out, func(a, b Verdict) int { return strings.Compare(a.Key, b.Key) })
	return out
}

// Refused returns how many records are refused now, by reason.
func (g *Gate) Refused() map[string]int { return maps.Clone(g.refused) }

// RefusedGen changes whenever what Refused returns changes: a caller that
// publishes Refused after every change compares it to skip the copy.
func (g *Gate) RefusedGen() uint64 { return g.refusedGen }

func sameVerdict(a, b error) bool {
	if a == nil || b == nil {
		return a == b
	}
	if a == ErrPending || b == ErrPending {
		return a == b
	}
	return RefusalReason(a) == RefusalReason(b)
}

func (e *gateEntry) verdictOf() Verdict {
	return Verdict{Key: e.key, Kind: gateKinds[e.kind], Err: e.verdict, Node: e.node, IP: e.ip, Service: e.svc, Raw: e.raw}
}

// newEntry makes e (new and empty) the entry at key of kind k, replacing
// old (if any); what Drain last reported carries over, so an unchanged
// verdict is not reported again, and so does a change not drained yet.
func (g *Gate) newEntry(e *gateEntry, key string, k gateKind, old *gateEntry, raw []byte) *gateEntry {
	e.key, e.kind, e.raw, e.verdict = key, k, raw, ErrPending
	if old != nil {
		e.verdict, e.reported, e.hasReport = old.verdict, old.reported, old.hasReport
		old.gone = true
		if old.queued {
			g.queue(e)
		}
	}
	g.entries[key] = e
	if k != gateIP {
		g.byKind[gateKinds[k]][key] = e
	}
	return e
}

// queue notes that e's verdict changed, for the next Drain of its kind.
func (g *Gate) queue(e *gateEntry) {
	if !e.queued {
		e.queued = true
		g.changed[e.kind] = append(g.changed[e.kind], e)
	}
}

func (g *Gate) forget(e *gateEntry) {
	g.count(e.verdict, -1)
	delete(g.entries, e.key)
	delete(g.byKind[gateKinds[e.kind]], e.key)
	e.gone = true
}

// set records a new verdict of e.
func (g *Gate) set(e *gateEntry, v error) {
	if e.verdict == v || (e.verdict != nil && v != nil && e.verdict.Error() == v.Error()) {
		e.verdict = v
		return
	}
	g.count(e.verdict, -1)
	g.count(v, 1)
	e.verdict = v
	g.queue(e)
}

func (g *Gate) count(v error, d int) {
	if r := RefusalReason(v); r != "" {
		g.refusedGen++
		g.refused[r] += d
		if g.refused[r] == 0 {
			delete(g.refused, r)
		}
	}
}

// ---- ipcache and services ----

func (g *Gate) isNode(a netip.Addr) bool { return g.nodeAddrs[a] > 0 }

func (g *Gate) evalIP(e *gateEntry) {
	was := e.owned
	now := ErrPending
	if g.owner != nil {
		now = g.owner.CheckIPCacheEntry(*e.ip, g.isNode)
		if now == nil {
			now = g.checkIPNode(e)
		}
	}
	e.owned = now
	switch {
	case was == nil && now != nil:
		if promoted := g.capped.remove(e.key); promoted != "" {
			g.evalIP(g.entries[promoted])
		}
	case was != nil && now == nil:
		if evicted := g.capped.add(e.key); evicted != "" && evicted != e.key {
			g.evalIP(g.entries[evicted])
		}
	}
	switch {
	case now != nil:
		g.set(e, now)
	case g.capped.isIn(e.key):
		g.set(e, nil)
	default:
		g.set(e, refusal(ReasonOverCap, "cluster %q has more than %d ipcache entries; the first %d by key are accepted", g.cluster, g.limits.MaxIPCache, g.limits.MaxIPCache))
	}
}

func (g *Gate) evalService(e *gateEntry) {
	if g.owner == nil {
		g.set(e, ErrPending)
		return
	}
	g.set(e, g.owner.CheckService(*e.svc, g.isNode))
}

// checkIPNode checks an ipcache entry against the node whose key prefix
// it sits under (the node that published it): pending while that node's
// record is there but not accepted; once it is accepted, the prefix must
// lie inside the node's pod CIDRs or be one of its addresses, and the host
// IP (where the datapath sends the endpoint's traffic) one of its
// addresses. An entry under a node without a record (not yet listed, or a
// name no node has) is judged by the cluster's ranges alone: a node's own
// etcd credential writes only under its own prefix, so only a broad
// credential (the shared "agents" one, root) can write under a name no
// node publishes.
func (g *Gate) checkIPNode(e *gateEntry) error {
	ne, ok := g.entries[NodeKey(g.cluster, e.ipNode())]
	if !ok {
		return nil
	}
	if ne.verdict != nil {
		return ErrPending
	}
	n := ne.node
	p := e.ip.Prefix
	inside := slices.ContainsFunc(n.PodCIDRs, func(c netip.Prefix) bool { return c.Bits() <= p.Bits() && c.Contains(p.Addr()) }) ||
		(p.IsSingleIP() && slices.Contains(n.IPs, p.Addr()))
	if !inside {
		return refusal(ReasonPrefixNotOwned, "prefix %s, published by node %s, is outside that node's pod CIDRs (%v) and not one of its addresses", p, n.Name, n.PodCIDRs)
	}
	if h := e.ip.HostIP; h.IsValid() && !slices.Contains(n.IPs, h) {
		return refusal(ReasonPrefixNotOwned, "prefix %s, published by node %s, names host %s, not one of that node's addresses (%v)", p, n.Name, h, n.IPs)
	}
	return nil
}

// ipNode is the node under whose prefix an ipcache entry's key sits: the
// path element after the cluster (not stored, to keep entries small; the
// key was checked before it came in, so cutting it is enough).
func (e *gateEntry) ipNode() string {
	_, rest, _ := strings.Cut(strings.TrimPrefix(e.key, StatePrefix(KindIP)), "/")
	node, _, _ := strings.Cut(rest, "/")
	return node
}

// indexIPNode adds e to its node's list.
func (g *Gate) indexIPNode(e *gateEntry) {
	node := e.ipNode()
	l := g.ipByNode[node]
	if l == nil {
		l = &nodeIPs{}
		g.ipByNode[node] = l
	}
	e.slot = int32(len(l.es))
	l.es = append(l.es, e)
}

// unindexIPNode takes e out of its node's list: the last entry moves into
// its slot.
func (g *Gate) unindexIPNode(e *gateEntry) {
	node := e.ipNode()
	l := g.ipByNode[node]
	if l == nil {
		return
	}
	i := int(e.slot)
	if i >= len(l.es) || l.es[i] != e {
		// Not where it should be (a bug): find it rather than corrupt
		// the list.
		if i = slices.Index(l.es, e); i < 0 {
			return
		}
	}
	last := len(l.es) - 1
	l.es[i] = l.es[last]
	l.es[i].slot = int32(i)
	l.es[last] = nil
	l.es = l.es[:last]
	if len(l.es) == 0 {
		delete(g.ipByNode, node)
	}
}

func (g *Gate) unindexIP(e *gateEntry) {
	g.unindexIPNode(e)
	g.ipCount--
	if e.ip.Prefix.IsSingleIP() {
		delIndex(g.ipByAddr, e.ip.Prefix.Addr(), e.key)
	}
}

func addIndex[K comparable](m map[K]map[string]*gateEntry, k K, e *gateEntry) {
	if m[k] == nil {
		m[k] = map[string]*gateEntry{}
	}
	m[k][e.key] = e
}

func delIndex[K comparable](m map[K]map[string]*gateEntry, k K, key string) {
	if s := m[k]; s != nil {
		delete(s, key)
		if len(s) == 0 {
			delete(m, k)
		}
	}
}

// nodeVerdictChanged decides again the ipcache entries the node published.
func (g *Gate) nodeVerdictChanged(node string) {
	l := g.ipByNode[node]
	if l == nil {
		return
	}
	es := slices.Clone(l.es)
	slices.SortFunc(es, func(a, b *gateEntry) int { return strings.Compare(a.key, b.key) })
	for _, e := range es {
		if !e.gone {
			g.evalIP(e)
		}
	}
}

// nodeAddrsChanged re-decides what may depend on the node address a.
func (g *Gate) nodeAddrChanged(a netip.Addr) {
	for _, key := range slices.Sorted(maps.Keys(g.ipByAddr[a])) {
		if e, ok := g.entries[key]; ok {
			g.evalIP(e)
		}
	}
	for _, e := range g.byKind[KindServices] {
		if slices.ContainsFunc(e.svc.Backends, func(b Backend) bool { return b.IP == a }) {
			g.evalService(e)
		}
	}
}

func (g *Gate) nodeAddrsAdd(n *Node) {
	for _, a := range n.IPs {
		g.nodeAddrs[a]++
		if g.nodeAddrs[a] == 1 {
			g.nodeAddrChanged(a)
		}
	}
}

func (g *Gate) nodeAddrsDel(n *Node) {
	for _, a := range n.IPs {
		g.nodeAddrs[a]--
		if g.nodeAddrs[a] <= 0 {
			delete(g.nodeAddrs, a)
			g.nodeAddrChanged(a)
		}
	}
}

// ---- nodes ----

// classifyNode decides what does not depend on other nodes: pending
// without a config, refused with a pod CIDR outside the cluster's; else e
// becomes a candidate (indexed) whose verdict resolveNodes decides.
func (g *Gate) classifyNode(e *gateEntry) {
	if g.owner == nil {
		g.setNode(e, ErrPending)
		return
	}
	if err := g.owner.CheckNodeCIDRs(*e.node); err != nil {
		g.setNode(e, err)
		return
	}
	e.candidate = true
	for _, p := range e.node.PodCIDRs {
		g.nodeIdx.add(p, e.key)
	}
}

// removeNode takes e out of the index and the node addresses; it returns
// its pod CIDRs, whose overlapping nodes must be decided again.
func (g *Gate) removeNode(e *gateEntry) []netip.Prefix {
	g.unaccept(e)
	if e.candidate {
		for _, p := range e.node.PodCIDRs {
			g.nodeIdx.remove(p, e.key)
		}
		e.candidate = false
	}
	return slices.Clone(e.node.PodCIDRs)
}

// component returns the candidate nodes connected to the prefixes (and to
// start, if it is a candidate) by overlapping pod CIDRs: the only nodes
// whose verdict a change there can affect.
func (g *Gate) component(prefixes []netip.Prefix, start *gateEntry) []*gateEntry {
	seen := map[string]bool{}
	var queue []string
	push := func(keys []string) {
		for _, k := range keys {
			if !seen[k] {
				seen[k] = true
				queue = append(queue, k)
			}
		}
	}
	if start != nil && start.candidate {
		push([]string{start.key})
	}
	for _, p := range prefixes {
		push(g.nodeIdx.overlapping(p))
	}
	var out []*gateEntry
	for len(queue) > 0 {
		e := g.entries[queue[0]]
		queue = queue[1:]
		out = append(out, e)
		for _, p := range e.node.PodCIDRs {
			push(g.nodeIdx.overlapping(p))
		}
	}
	return out
}

// resolveNodes decides the candidates among nodes (a closed component, or
// all of them): a node is accepted unless a pod CIDR of it overlaps one of
// another candidate.
func (g *Gate) resolveNodes(nodes []*gateEntry) {
	slices.SortFunc(nodes, func(a, b *gateEntry) int { return cmp.Compare(a.node.Name, b.node.Name) })
	for _, e := range nodes {
		if !e.candidate {
			continue
		}
		var err error
		for _, p := range e.node.PodCIDRs {
			others := slices.DeleteFunc(g.nodeIdx.overlapping(p), func(k string) bool { return k == e.key })
			if len(others) > 0 {
				slices.Sort(others)
				other := g.entries[others[0]].node
				err = refusal(ReasonNodeCIDROverlap, "node %s: pod CIDR %s overlaps a pod CIDR of node %s (%v); both are left out, since either may be wrong",
					e.node.Name, p, other.Name, other.PodCIDRs)
				break
			}
		}
		g.setNode(e, err)
	}
}

// unaccept takes an accepted node's addresses away and marks it pending
// while it is decided again (neither verdict is counted as a refusal, and
// Drain compares with what it reported, so an unchanged outcome is not
// reported).
func (g *Gate) unaccept(e *gateEntry) {
	if e.verdict == nil {
		e.verdict = ErrPending
		g.queue(e)
		g.nodeAddrsDel(e.node)
		g.nodeVerdictChanged(e.node.Name)
	}
}

// setNode sets a node's verdict and keeps the accepted nodes' addresses.
func (g *Gate) setNode(e *gateEntry, v error) {
	was := e.verdict == nil
	g.set(e, v)
	switch {
	case was && v != nil:
		g.nodeAddrsDel(e.node)
		g.nodeVerdictChanged(e.node.Name)
	case !was && v == nil:
		g.nodeAddrsAdd(e.node)
		g.nodeVerdictChanged(e.node.Name)
	}
}

// ---- prefix index ----

// prefixIndex finds the keys whose prefixes overlap a prefix, in
// O(prefix length) map lookups: two prefixes overlap when one contains the
// other, so it keeps every key under its exact prefix and under each
// shorter prefix containing it.
type prefixIndex struct {
	exact map[netip.Prefix]map[string]struct{}
	below map[netip.Prefix]map[string]int
}

func newPrefixIndex() prefixIndex {
	return prefixIndex{exact: map[netip.Prefix]map[string]struct{}{}, below: map[netip.Prefix]map[string]int{}}
}

func (x prefixIndex) add(p netip.Prefix, key string) {
	if x.exact[p] == nil {
		x.exact[p] = map[string]struct{}{}
	}
	x.exact[p][key] = struct{}{}
	for i := range p.Bits() {
		a := netip.PrefixFrom(p.Addr(), i).Masked()
		if x.below[a] == nil {
			x.below[a] = map[string]int{}
		}
		x.below[a][key]++
	}
}

func (x prefixIndex) remove(p netip.Prefix, key string) {
	if m := x.exact[p]; m != nil {
		delete(m, key)
		if len(m) == 0 {
			delete(x.exact, p)
		}
	}
	for i := range p.Bits() {
		a := netip.PrefixFrom(p.Addr(), i).Masked()
		if m := x.below[a]; m != nil {
			if m[key]--; m[key] <= 0 {
				delete(m, key)
			}
			if len(m) == 0 {
				delete(x.below, a)
			}
		}
	}
}

// overlapping returns the keys of prefixes overlapping p, sorted.
func (x prefixIndex) overlapping(p netip.Prefix) []string {
	set := map[string]struct{}{}
	for i := 0; i <= p.Bits(); i++ {
		for k := range x.exact[netip.PrefixFrom(p.Addr(), i).Masked()] {
			set[k] = struct{}{}
		}
	}
	for k := range x.below[p] {
		set[k] = struct{}{}
	}
	return slices.Sorted(maps.Keys(set))
}

// ---- cap ----

// capSet keeps, of the keys added, the limit whose keys sort first "in"
// and the others "out", with O(log n) changes: a max-heap of the keys in
// (to push out the last one when an earlier key comes) and a min-heap of
// the keys out (to take in the first one when a key in goes). Heaps are
// cleaned lazily: an item counts only while where[key] agrees.
type capSet struct {
	limit int
	where map[string]bool // true: in
	in    strHeap         // max-heap
	out   strHeap         // min-heap
	nIn   int
}

func newCapSet(limit int) capSet {
	return capSet{limit: limit, where: map[string]bool{}, in: strHeap{max: true}, out: strHeap{}}
}

func (c *capSet) isIn(k string) bool {
	if c.limit <= 0 {
		return true // no cap: nothing to remember per key
	}
	in, ok := c.where[k]
	return ok && in
}

// add adds k; it returns the key that is out because of it ("" if none),
// which may be k itself.
func (c *capSet) add(k string) string {
	if c.limit <= 0 {
		return ""
	}
	if _, ok := c.where[k]; ok {
		panic(fmt.Sprintf("capSet: %q added twice", k))
	}
	if c.limit <= 0 || c.nIn < c.limit {
		c.putIn(k)
		return ""
	}
	last := c.top(&c.in, true)
	if k > last {
		c.where[k] = false
		heap.Push(&c.out, k)
		return k
	}
	heap.Pop(&c.in)
	c.nIn--
	c.where[last] = false
	heap.Push(&c.out, last)
	c.putIn(k)
	return last
}

// remove removes k; it returns the key that came in because of it.
func (c *capSet) remove(k string) string {
	if c.limit <= 0 {
		return ""
	}
	in, ok := c.where[k]
	if !ok {
		return ""
	}
	delete(c.where, k)
	defer c.compact()
	if !in {
		return ""
	}
	c.nIn--
	if first := c.top(&c.out, false); first != "" && c.limit > 0 {
		heap.Pop(&c.out)
		c.putIn(first)
		return first
	}
	return ""
}

func (c *capSet) putIn(k string) {
	c.where[k] = true
	c.nIn++
	if c.limit > 0 {
		heap.Push(&c.in, k)
	}
}

// top returns the first live item of h, dropping stale ones ("" if none).
func (c *capSet) top(h *strHeap, in bool) string {
	for h.Len() > 0 {
		k := h.s[0]
		if w, ok := c.where[k]; ok && w == in {
			return k
		}
		heap.Pop(h)
	}
	return ""
}

// compact rebuilds a heap that holds mostly stale items.
func (c *capSet) compact() {
	nOut := len(c.where) - c.nIn
	if c.in.Len() > 2*c.nIn+64 {
		c.in.s = c.in.s[:0]
		for k, in := range c.where {
			if in {
				c.in.s = append(c.in.s, k)
			}
		}
		heap.Init(&c.in)
	}
	if c.out.Len() > 2*nOut+64 {
		c.out.s = c.out.s[:0]
		for k, in := range c.where {
			if !in {
				c.out.s = append(c.out.s, k)
			}
		}
		heap.Init(&c.out)
	}
}

type strHeap struct {
	s   []string
	max bool
}

func (h strHeap) Len() int { return len(h.s) }
func (h strHeap) Less(i, j int) bool {
	if h.max {
		return h.s[i] > h.s[j]
	}
	return h.s[i] < h.s[j]
}
func (h strHeap) Swap(i, j int) { h.s[i], h.s[j] = h.s[j], h.s[i] }
func (h *strHeap) Push(x any)   { h.s = append(h.s, x.(string)) }
func (h *strHeap) Pop() any {
	x := h.s[len(h.s)-1]
	h.s = h.s[:len(h.s)-1]
	return x
}
