package identity

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Etcd is the cluster-wide Allocator: identities live in the cluster's etcd
// so that every node of the cluster gives a label set the same ID.
//
// Keys (see package records):
//
//	.../identities/v1/id/<id>             master: id -> labels, no lease
//	.../identities/v1/labels/<labels>     claim: labels -> id, no lease
//	.../identities/v1/value/<labels>/<node>  this node uses it, leased
//
// A new identity is created by one transaction that puts all three keys if
// neither the master nor the claim exists (compare-and-swap on
// CreateRevision == 0). The claim is what makes racing nodes agree: of two
// nodes allocating the same labels at once, one transaction wins the claim
// and the other finds it on its next round and uses that ID. Joining an
// existing identity puts the node's value key in a transaction that
// requires master and claim unchanged since they were read, so it cannot
// race with GC, which deletes a master and its claim only in a transaction
// that requires no value key under the labels.
//
// Release deletes this node's value key after its last local reference;
// the master stays until GC. Get and List answer from a cache that Watch
// keeps current (and that this allocator's own allocations fill).
//
// Labels this node already references are served from memory (refMu, never
// held across a call to etcd): an Allocate for them does not wait for
// another one that is talking to an unreachable etcd.
//
// When the node's lease is lost (a partition longer than its TTL), its
// value keys vanish; the re-granted lease puts them back with the same IDs
// (restore). A reference that cannot come back with the same ID (GC
// collected the identity and the labels or the ID were allocated anew
// meanwhile) is dropped and reported to WithOnLost's callback: its users
// must Allocate again, which gives them the labels' current ID.
type Etcd struct {
	kv        *kvstore.Client
	cluster   string
	clusterID uint32
	node      string
	log       *slog.Logger
	leaseTTL  time.Duration
	// maxLocal bounds n in clusterID<<20|n; tests lower it to reach
	// exhaustion quickly.
	maxLocal uint32

	// allocMu serialises this node's writes to etcd (Allocate, Release,
	// lease restore), so its local reference counts and value keys agree.
	allocMu   sync.Mutex
	lease     *kvstore.Lease
	ownsLease bool
	onLost    func([]Identity)

	// refMu guards refs and refByKey; it is never held across I/O. A
	// reference whose last Release is deleting its value key is in refs
	// but not in refByKey, so new Allocates of its labels wait on allocMu.
	refMu    sync.Mutex
	refs     map[uint32]*nodeRef
	refByKey map[string]uint32 // Labels.String() -> ID, for refs

	mu       sync.Mutex // guards the cache below
	byID     map[uint32]Labels
	byKey    map[string]uint32
	listed   bool // the cache was filled from a complete list
	watching bool // Watch keeps the cache current

	stats etcdCounters

	// gcMu guards unrefSince: when GC first found each master of this
	// cluster unreferenced (and at which revision of the master).
	gcMu       sync.Mutex
	unrefSince map[uint32]unreferenced
}

type unreferenced struct {
	since       time.Time
	modRevision int64
}

type nodeRef struct {
	labels Labels
	count  uint64
}

var _ Allocator = (*Etcd)(nil)

// DefaultLeaseTTL is the TTL of the lease of a node's identity references:
// long, like Cilium's, because losing them only delays GC, while a short TTL
// costs keepalive traffic on every node.
const DefaultLeaseTTL = 15 * time.Minute

// EtcdOption configures NewEtcd.
type EtcdOption func(*Etcd)

// WithLease attaches the node's references to an existing lease (e.g. the
// agent's) instead of one the allocator grants itself.
func WithLease(l *kvstore.Lease) EtcdOption { return func(e *Etcd) { e.lease = l } }

// WithLeaseTTL sets the TTL of the lease the allocator grants itself.
func WithLeaseTTL(d time.Duration) EtcdOption { return func(e *Etcd) { e.leaseTTL = d } }

// WithOnLost sets the function told, after a lease loss, which identities
// this node's references could not be restored for with the same ID: GC
// deleted them while the node was cut off and the labels (or the ID) were
// allocated anew meanwhile. The allocator has dropped those references (a
// later Release of them returns ErrNotFound); whoever used them must
// Allocate their labels again, which joins or creates the labels' current
// identity. f runs on the lease's goroutine and must not block.
func WithOnLost(f func(lost []Identity)) EtcdOption { return func(e *Etcd) { e.onLost = f } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) EtcdOption { return func(e *Etcd) { e.log = l } }

// NewEtcd returns an allocator for node of cluster (ID clusterID) that
// stores identities through kv. It does no I/O; the first Allocate grants
// the lease (unless WithLease gave one).
func NewEtcd(kv *kvstore.Client, cluster string, clusterID uint32, node string, opts ...EtcdOption) (*Etcd, error) {
	if kv == nil {
		return nil, errors.New("identity allocator: no kvstore client")
	}
	if err := records.ValidateClusterName(cluster); err != nil {
		return nil, fmt.Errorf("identity allocator: %w", err)
	}
	if clusterID < 1 || clusterID > MaxClusterID {
		return nil, fmt.Errorf("identity allocator: cluster ID %d out of range 1-%d", clusterID, MaxClusterID)
	}
	if err := records.ValidateNodeName(node); err != nil {
		return nil, fmt.Errorf("identity allocator: %w", err)
	}
	e := &Etcd{
		kv: kv, cluster: cluster, clusterID: clusterID, node: node,
		log:      slog.Default(),
		leaseTTL: DefaultLeaseTTL,
		maxLocal: MaxLocal,
		refs:     map[uint32]*nodeRef{},
		refByKey: map[string]uint32{},
		byID:     map[uint32]Labels{},
		byKey:    map[string]uint32{},
	}
	for _, o := range opts {
		o(e)
	}
	e.log = e.log.With("cluster", cluster, "node", node)
	if e.lease != nil {
		e.lease.OnRegrant(e.restore)
	}
	return e, nil
}

// EtcdStats counts what an Etcd allocator did.
type EtcdStats struct {
	Allocated  uint64 // identities this node created
	Joined     uint64 // existing identities this node started to use
	Conflicts  uint64 // transactions lost to another writer (retried)
	BadRecords uint64 // malformed or foreign records skipped by Watch and GC
	Collected  uint64 // masters deleted by GC
}

type etcdCounters struct {
	allocated, joined, conflicts, badRecords, collected atomic.Uint64
}

// Stats returns the allocator's counters.
func (e *Etcd) Stats() EtcdStats {
	return EtcdStats{
		Allocated:  e.stats.allocated.Load(),
		Joined:     e.stats.joined.Load(),
		Conflicts:  e.stats.conflicts.Load(),
		BadRecords: e.stats.badRecords.Load(),
		Collected:  e.stats.collected.Load(),
	}
}

// maxAttempts bounds the rounds of one Allocate: each lost round means
// another writer made progress, so many in a row point to a bug or a
// pathological storm rather than bad luck.
const maxAttempts = 32

// Allocate implements Allocator. The labels must be a non-empty, valid set;
// an isthmus.io/cluster label, if present, must name this cluster.
func (e *Etcd) Allocate(ctx context.Context, l Labels) (uint32, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if len(l) == 0 {
		return 0, errors.New("allocate identity: empty label set")
	}
	if err := l.Validate(); err != nil {
		return 0, fmt.Errorf("allocate identity: %w", err)
	}
	if c, ok := l[LabelCluster]; ok && c != e.cluster {
		return 0, fmt.Errorf("allocate identity for %q: label %s=%s names another cluster than %q", l, LabelCluster, c, e.cluster)
	}
	key := l.String()

	// This node already references the labels: one more local reference,
	// without waiting for an Allocate that is talking to etcd.
	if id, ok := e.addRef(key); ok {
		return id, nil
	}
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	if id, ok := e.addRef(key); ok { // allocated while we waited
		return id, nil
	}
	if err := e.ensureLease(ctx); err != nil {
		return 0, fmt.Errorf("allocate identity for %q: %w", key, err)
	}
	b := time.Duration(0)
	var lastErr error
	for range maxAttempts {
		id, done, err := e.join(ctx, key, l)
		if err == nil && !done {
			id, done, err = e.create(ctx, key, l)
		}
		if err == nil && done {
			e.refMu.Lock()
			e.refs[id] = &nodeRef{labels: l.Clone(), count: 1}
			e.refByKey[key] = id
			e.refMu.Unlock()
			e.cacheAdd(id, l)
			return id, nil
		}
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, errExhausted) || errors.Is(err, errCorrupt) {
				return 0, fmt.Errorf("allocate identity for %q: %w", key, err)
			}
			lastErr = err
		} else {
			e.stats.conflicts.Add(1)
		}
		// Someone else changed the keys (or etcd hiccupped): back off a
		// little, with jitter, so racing nodes do not collide in lock step.
		b = min(max(2*b, time.Millisecond), 100*time.Millisecond)
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(b/2 + rand.N(b/2+1)):
		}
	}
	return 0, fmt.Errorf("allocate identity for %q: gave up after %d attempts (last error: %v)", key, maxAttempts, lastErr)
}

// addRef takes one more local reference on the labels with key, if this
// node references them already.
func (e *Etcd) addRef(key string) (uint32, bool) {
	e.refMu.Lock()
	defer e.refMu.Unlock()
	id, ok := e.refByKey[key]
	if ok {
		e.refs[id].count++
	}
	return id, ok
}

// Holds reports whether this node holds a reference on id: false once the
// last one was released, or after a lease loss dropped it (WithOnLost).
func (e *Etcd) Holds(id uint32) bool {
	e.refMu.Lock()
	defer e.refMu.Unlock()
	_, ok := e.refs[id]
	return ok
}

var (
	errExhausted = errors.New("identities exhausted")
	errCorrupt   = errors.New("corrupt identity record")
)

func (e *Etcd) ensureLease(ctx context.Context) error {
	if e.lease != nil {
		return nil
	}
	l, err := e.kv.GrantLease(ctx, e.leaseTTL)
	if err != nil {
		return err
	}
	l.OnRegrant(e.restore)
	e.lease, e.ownsLease = l, true
	return nil
}

func (e *Etcd) refValue(id uint32) ([]byte, error) {
	return records.IdentityRef{ID: id}.Marshal()
}

// join makes this node use the existing identity of key, if there is one.
// done is false when there is no claim (create next) or when the keys
// changed between read and write (try again).
func (e *Etcd) join(ctx context.Context, key string, l Labels) (id uint32, done bool, err error) {
	claimKey := records.IdentityLabelsKey(key)
	claim, found, err := e.kv.Get(ctx, claimKey)
	if err != nil || !found {
		return 0, false, err
	}
	ref, err := records.DecodeIdentityRef(claim.Value)
	if err != nil {
		return 0, false, fmt.Errorf("%w: %s: %v", errCorrupt, claimKey, err)
	}
	id = ref.ID
	if ClusterIDOf(id) != e.clusterID {
		return 0, false, fmt.Errorf("%w: %s claims identity %d of cluster ID %d, this is cluster ID %d", errCorrupt, claimKey, id, ClusterIDOf(id), e.clusterID)
	}
	idKey := records.IdentityIDKey(id)
	master, mfound, err := e.kv.Get(ctx, idKey)
	if err != nil {
		return 0, false, err
	}
	value, err := e.refValue(id)
	if err != nil {
		return 0, false, err
	}
	valueOp := kvstore.OpPutLeased(records.IdentityValueKey(key, e.node), value, e.lease)
	var applied bool
	if mfound {
		rec, err := records.ValidateIdentity(idKey, master.Value, e.cluster, e.clusterID)
		if err != nil {
			return 0, false, fmt.Errorf("%w: %v", errCorrupt, err)
		}
		if Labels(rec.Labels).String() != key {
			return 0, false, fmt.Errorf("%w: %s claims identity %d, whose master has labels %q", errCorrupt, claimKey, id, Labels(rec.Labels))
		}
		applied, err = e.kv.Txn(ctx,
			[]kvstore.Cond{kvstore.KeyModRevision(claimKey, claim.ModRevision), kvstore.KeyModRevision(idKey, master.ModRevision)},
			[]kvstore.Op{valueOp})
		if err != nil {
			return 0, false, err
		}
	} else {
		// A claim without master: left by a crashed writer of an older
		// layout or by hand. Restore the master rather than orphan the ID.
		mv, err := records.IdentityRecord{ID: id, Labels: l}.Marshal()
		if err != nil {
			return 0, false, err
		}
		e.log.Warn("identity claim without master, restoring the master", "id", id, "labels", key)
		applied, err = e.kv.Txn(ctx,
			[]kvstore.Cond{kvstore.KeyModRevision(claimKey, claim.ModRevision), kvstore.KeyMissing(idKey)},
			[]kvstore.Op{kvstore.OpPut(idKey, mv), valueOp})
		if err != nil {
			return 0, false, err
		}
	}
	if applied {
		e.stats.joined.Add(1)
	}
	return id, applied, nil
}

// create allocates a new ID for key: master, claim and this node's value
// key in one transaction that requires neither master nor claim to exist.
func (e *Etcd) create(ctx context.Context, key string, l Labels) (id uint32, done bool, err error) {
	n, err := e.pickFree(ctx)
	if err != nil {
		return 0, false, err
	}
	id = e.clusterID<<localBits | n
	idKey, claimKey := records.IdentityIDKey(id), records.IdentityLabelsKey(key)
	mv, err := records.IdentityRecord{ID: id, Labels: l}.Marshal()
	if err != nil {
		return 0, false, err
	}
	ref, err := e.refValue(id)
	if err != nil {
		return 0, false, err
	}
	applied, err := e.kv.Txn(ctx,
		[]kvstore.Cond{kvstore.KeyMissing(idKey), kvstore.KeyMissing(claimKey)},
		[]kvstore.Op{
			kvstore.OpPut(idKey, mv),
			kvstore.OpPut(claimKey, ref),
			kvstore.OpPutLeased(records.IdentityValueKey(key, e.node), ref, e.lease),
		})
	if err != nil {
		return 0, false, err
	}
	if applied {
		e.stats.allocated.Add(1)
		return id, true, nil
	}
	// Lost: either the labels were claimed meanwhile (join finds it next
	// round) or the ID is taken; learn who took it so we skip it.
	if kv, found, err := e.kv.Get(ctx, idKey); err == nil && found {
		if rec, err := records.ValidateIdentity(idKey, kv.Value, e.cluster, e.clusterID); err == nil {
			e.cacheAdd(id, rec.Labels)
		} else {
			e.cacheAdd(id, Labels{}) // unreadable, but taken
		}
	}
	return 0, false, nil
}

// pickFree returns a local number not known to be in use, starting at a
// random point so that nodes allocating different labels at once rarely
// try the same ID.
func (e *Etcd) pickFree(ctx context.Context) (uint32, error) {
	e.mu.Lock()
	needList := !e.listed && !e.watching
	e.mu.Unlock()
	if needList {
		if err := e.list(ctx); err != nil {
			return 0, err
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	used := 0
	for id := range e.byID {
		if ClusterIDOf(id) == e.clusterID {
			used++
		}
	}
	if uint64(used) >= uint64(e.maxLocal) {
		// Known to be full. Without a watch the cache may hold masters GC
		// has deleted since: list again next time.
		e.listed = false
		return 0, fmt.Errorf("cluster %s (ID %d): %w (%d in use)", e.cluster, e.clusterID, errExhausted, used)
	}
	n := 1 + rand.N(e.maxLocal)
	for range e.maxLocal {
		if _, taken := e.byID[e.clusterID<<localBits|n]; !taken {
			return n, nil
		}
		if n++; n > e.maxLocal {
			n = 1
		}
	}
	return 0, fmt.Errorf("cluster %s (ID %d): %w", e.cluster, e.clusterID, errExhausted)
}

// list fills the cache with every master of this cluster.
func (e *Etcd) list(ctx context.Context) error {
	kvs, _, err := e.kv.GetPrefix(ctx, records.IdentityIDPrefix)
	if err != nil {
		return err
	}
	byID := map[uint32]Labels{}
	for _, kv := range kvs {
		if rec, ok := e.decodeMaster(kv.Key, kv.Value); ok {
			byID[rec.ID] = rec.Labels
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.byID, e.byKey = map[uint32]Labels{}, map[string]uint32{}
	for id, l := range byID {
		e.cacheAddLocked(id, l)
	}
	e.listed = true
	return nil
}

// decodeMaster validates a master read from this cluster's etcd; bad ones
// are logged, counted and skipped.
func (e *Etcd) decodeMaster(key string, value []byte) (records.IdentityRecord, bool) {
	rec, err := records.ValidateIdentity(key, value, e.cluster, e.clusterID)
	if err == nil {
		err = Labels(rec.Labels).Validate()
	}
	if err != nil {
		e.stats.badRecords.Add(1)
		e.log.Warn("skipping bad identity record", "key", key, "err", err)
		return rec, false
	}
	return rec, true
}

func (e *Etcd) cacheAdd(id uint32, l Labels) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cacheAddLocked(id, l)
}

func (e *Etcd) cacheAddLocked(id uint32, l Labels) {
	if old, ok := e.byID[id]; ok {
		delete(e.byKey, old.String())
	}
	e.byID[id] = l.Clone()
	if len(l) > 0 {
		e.byKey[l.String()] = id
	}
}

func (e *Etcd) cacheDelete(id uint32) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if old, ok := e.byID[id]; ok {
		delete(e.byKey, old.String())
		delete(e.byID, id)
	}
}

// Release implements Allocator: it drops one local reference and, with the
// last one, this node's value key. The ID itself is freed by GC once no
// node references it.
func (e *Etcd) Release(ctx context.Context, id uint32) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if name, ok := ReservedName(id); ok {
		return fmt.Errorf("release identity %d: reserved identity %q cannot be released", id, name)
	}
	if last, err := e.unref(id); err != nil || !last {
		return err
	}
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	// Check again (another reference may have been taken or lost
	// meanwhile), and hide the labels from addRef in the same step: new
	// Allocates of them wait for the delete below.
	e.refMu.Lock()
	r, ok := e.refs[id]
	switch {
	case !ok:
		e.refMu.Unlock()
		return fmt.Errorf("release identity %d: %w", id, ErrNotFound)
	case r.count > 1:
		r.count--
		e.refMu.Unlock()
		return nil
	}
	key := r.labels.String()
	delete(e.refByKey, key)
	e.refMu.Unlock()
	if err := e.kv.Delete(ctx, records.IdentityValueKey(key, e.node)); err != nil {
		e.refMu.Lock()
		if e.refs[id] == r {
			e.refByKey[key] = id
		}
		e.refMu.Unlock()
		return fmt.Errorf("release identity %d: %w", id, err)
	}
	e.refMu.Lock()
	if e.refs[id] == r {
		delete(e.refs, id)
	}
	e.refMu.Unlock()
	return nil
}

// unref drops one local reference on id unless it is the last one, for
// which it reports last (the caller deletes the value key first).
func (e *Etcd) unref(id uint32) (last bool, err error) {
	e.refMu.Lock()
	defer e.refMu.Unlock()
	r, ok := e.refs[id]
	if !ok {
		return false, fmt.Errorf("release identity %d: %w", id, ErrNotFound)
	}
	if r.count > 1 {
		r.count--
		return false, nil
	}
	return true, nil
}

// Get implements Allocator from the cache. Reserved identities have the
// single label LabelReserved=<name>. The returned map is a copy.
func (e *Etcd) Get(id uint32) (Labels, bool) {
	if name, ok := ReservedName(id); ok {
		return Labels{LabelReserved: name}, true
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	l, ok := e.byID[id]
	if !ok || len(l) == 0 {
		return nil, false
	}
	return l.Clone(), true
}

// List implements Allocator from the cache.
func (e *Etcd) List() []Identity {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]Identity, 0, len(e.byID))
	for id, l := range e.byID {
		if len(l) > 0 {
			out = append(out, Identity{ID: id, Labels: l.Clone()})
		}
	}
	slices.SortFunc(out, func(a, b Identity) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Watch keeps the cache current from etcd until ctx ends. It returns once
// the first complete list is in the cache (or with ctx's error). After a
// reconnect the watch re-lists and drops identities deleted meanwhile.
func (e *Etcd) Watch(ctx context.Context) error {
	e.mu.Lock()
	e.watching = true
	e.mu.Unlock()
	synced := make(chan struct{})
	events := e.kv.WatchPrefix(ctx, records.IdentityIDPrefix)
	go func() {
		defer func() {
			e.mu.Lock()
			e.watching, e.listed = false, false
			e.mu.Unlock()
		}()
		first := true
		for ev := range events {
			switch ev.Type {
			case kvstore.EventUpsert:
				id, err := records.ParseIdentityIDKey(ev.Key)
				if err != nil {
					e.stats.badRecords.Add(1)
					e.log.Warn("skipping bad identity key", "key", ev.Key, "err", err)
					continue
				}
				if ClusterIDOf(id) != e.clusterID {
					continue // not ours to cache (and not ours to judge)
				}
				if rec, ok := e.decodeMaster(ev.Key, ev.Value); ok {
					e.cacheAdd(id, rec.Labels)
				} else {
					e.cacheDelete(id) // do not keep serving the old labels
				}
			case kvstore.EventDelete:
				if id, err := records.ParseIdentityIDKey(ev.Key); err == nil {
					e.cacheDelete(id)
				}
			case kvstore.EventListDone:
				e.mu.Lock()
				e.listed = true
				e.mu.Unlock()
				if first {
					first = false
					close(synced)
				}
			}
		}
	}()
	select {
	case <-synced:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// GC deletes the masters (and their claims) of this cluster that no node
// has referenced for at least grace, and returns how many it deleted.
//
// The grace period is what lets identities survive partitions: a node cut
// off from etcd past its lease TTL loses its references, and gets them back
// (same IDs) when it reconnects, unless GC deleted the masters meanwhile.
// So a master is deleted only when GC found it unreferenced, unchanged, on
// an earlier pass at least grace ago (or grace is 0). Each deletion is one
// transaction that requires the master unchanged and no value key under
// its labels, so a node joining the identity at the same moment either
// wins (the master stays) or finds it gone and allocates anew.
func (e *Etcd) GC(ctx context.Context, grace time.Duration) (int, error) {
	kvs, _, err := e.kv.GetPrefix(ctx, records.IdentityIDPrefix)
	if err != nil {
		return 0, fmt.Errorf("identity GC: %w", err)
	}
	refs, _, err := e.kv.GetPrefix(ctx, records.IdentityValuePrefix)
	if err != nil {
		return 0, fmt.Errorf("identity GC: %w", err)
	}
	referenced := make(map[string]bool, len(refs))
	for _, kv := range refs {
		if labels, _, err := records.ParseIdentityValueKey(kv.Key); err == nil {
			referenced[labels] = true
		}
	}
	now := time.Now()
	e.gcMu.Lock()
	defer e.gcMu.Unlock()
	if e.unrefSince == nil {
		e.unrefSince = map[uint32]unreferenced{}
	}
	seen := map[uint32]bool{}
	deleted := 0
	for _, kv := range kvs {
		id, err := records.ParseIdentityIDKey(kv.Key)
		if err != nil || ClusterIDOf(id) != e.clusterID {
			continue
		}
		rec, ok := e.decodeMaster(kv.Key, kv.Value)
		if !ok {
			continue // a human should look at it; never delete what we cannot read
		}
		key := Labels(rec.Labels).String()
		if referenced[key] {
			continue
		}
		seen[id] = true
		u, known := e.unrefSince[id]
		if !known || u.modRevision != kv.ModRevision {
			e.unrefSince[id] = unreferenced{since: now, modRevision: kv.ModRevision}
			if grace > 0 {
				continue
			}
		} else if now.Sub(u.since) < grace {
			continue
		}
		claimKey := records.IdentityLabelsKey(key)
		claim, found, err := e.kv.Get(ctx, claimKey)
		if err != nil {
			return deleted, fmt.Errorf("identity GC: %w", err)
		}
		conds := []kvstore.Cond{
			kvstore.KeyModRevision(kv.Key, kv.ModRevision),
			kvstore.PrefixEmpty(records.IdentityValueLabelsPrefix(key)),
			kvstore.KeyModRevision(claimKey, claim.ModRevision), // 0 if missing
		}
		ops := []kvstore.Op{kvstore.OpDelete(kv.Key)}
		if found {
			if ref, err := records.DecodeIdentityRef(claim.Value); err == nil && ref.ID == id {
				ops = append(ops, kvstore.OpDelete(claimKey))
			}
		}
		applied, err := e.kv.Txn(ctx, conds, ops)
		if err != nil {
			return deleted, fmt.Errorf("identity GC: %w", err)
		}
		if applied {
			deleted++
			e.stats.collected.Add(1)
			e.cacheDelete(id)
			e.log.Info("identity garbage-collected", "id", id, "labels", key,
				"unreferencedFor", now.Sub(e.unrefSince[id].since).Round(time.Second))
			delete(e.unrefSince, id)
		}
	}
	// Forget what is referenced again or gone.
	for id := range e.unrefSince {
		if !seen[id] {
			delete(e.unrefSince, id)
		}
	}
	return deleted, nil
}

// restore runs after the lease was lost and re-granted: every value key of
// this node vanished with the old lease, so put them back. If GC removed an
// identity meanwhile, it is re-created with the same ID when that is still
// free. If the ID or the labels were taken by another allocation (or etcd
// failed), the reference is dropped and reported to the WithOnLost
// callback: the workloads using the old ID must allocate again.
func (e *Etcd) restore(ctx context.Context, _ kvstore.LeaseID) {
	lost := e.restoreLocked(ctx)
	if len(lost) == 0 {
		return
	}
	slices.SortFunc(lost, func(a, b Identity) int { return cmp.Compare(a.ID, b.ID) })
	if e.onLost != nil {
		e.onLost(lost)
	}
}

func (e *Etcd) restoreLocked(ctx context.Context) []Identity {
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	if e.lease == nil {
		return nil // closed
	}
	e.refMu.Lock()
	refs := make(map[uint32]Labels, len(e.refs))
	for id, r := range e.refs {
		refs[id] = r.labels
	}
	e.refMu.Unlock()
	var lost []Identity
	for id, l := range refs {
		key := l.String()
		err := e.relink(ctx, id, key, l)
		if err == nil {
			continue
		}
		e.log.Warn("identity reference not restored after lease loss; its users allocate again", "id", id, "labels", key, "err", err)
		e.refMu.Lock()
		delete(e.refs, id)
		if e.refByKey[key] == id {
			delete(e.refByKey, key)
		}
		e.refMu.Unlock()
		lost = append(lost, Identity{ID: id, Labels: l.Clone()})
	}
	return lost
}

func (e *Etcd) relink(ctx context.Context, id uint32, key string, l Labels) error {
	for range maxAttempts {
		got, done, err := e.join(ctx, key, l)
		if err != nil {
			return err
		}
		if done {
			if got != id {
				// join referenced the new ID; this node holds no reference
				// on it (yet), so take the value key back.
				if err := e.kv.Delete(ctx, records.IdentityValueKey(key, e.node)); err != nil {
					e.log.Warn("cannot drop the value key of a re-allocated identity; it expires with the lease", "labels", key, "err", err)
				}
				return fmt.Errorf("labels now have identity %d (re-allocated while this node's lease was lost)", got)
			}
			return nil
		}
		idKey, claimKey := records.IdentityIDKey(id), records.IdentityLabelsKey(key)
		mv, err := records.IdentityRecord{ID: id, Labels: l}.Marshal()
		if err != nil {
			return err
		}
		ref, err := e.refValue(id)
		if err != nil {
			return err
		}
		applied, err := e.kv.Txn(ctx,
			[]kvstore.Cond{kvstore.KeyMissing(idKey), kvstore.KeyMissing(claimKey)},
			[]kvstore.Op{kvstore.OpPut(idKey, mv), kvstore.OpPut(claimKey, ref),
				kvstore.OpPutLeased(records.IdentityValueKey(key, e.node), ref, e.lease)})
		if err != nil {
			return err
		}
		if applied {
			e.cacheAdd(id, l)
			return nil
		}
		if _, found, err := e.kv.Get(ctx, idKey); err == nil && found {
			if _, cfound, _ := e.kv.Get(ctx, claimKey); !cfound {
				return fmt.Errorf("identity %d was re-allocated to other labels while this node's lease was lost", id)
			}
		}
	}
	return fmt.Errorf("gave up after %d attempts", maxAttempts)
}

// Close removes this node's references at once: by revoking the
// allocator's own lease, or, on a lease given by WithLease (which others
// still use), by deleting its value keys one by one. The allocator must not
// be used afterwards.
func (e *Etcd) Close(ctx context.Context) error {
	e.allocMu.Lock()
	lease, owns := e.lease, e.ownsLease
	var keys []string
	e.refMu.Lock()
	for _, r := range e.refs {
		keys = append(keys, records.IdentityValueKey(r.labels.String(), e.node))
	}
	clear(e.refs)
	clear(e.refByKey)
	e.refMu.Unlock()
	e.lease, e.ownsLease = nil, false
	e.allocMu.Unlock()
	// Outside allocMu: Lease.Close waits for the lease goroutine, which
	// may be waiting for allocMu in restore.
	if owns {
		return lease.Close(ctx)
	}
	var errs []error
	for _, k := range keys {
		errs = append(errs, e.kv.Delete(ctx, k))
	}
	return errors.Join(errs...)
}
