package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/backoff"
)

// errTransport marks errors of talking to the remote (as opposed to what
// it answered): they make a remote unreachable, not refused.
var errTransport = errors.New("remote unreachable")

// errExpired ends a session whose remote was unreachable for longer than
// the cache TTL.
var errExpired = errors.New("unreachable for longer than the cache TTL")

// remote mirrors one remote cluster: it (re)connects with backoff, checks
// the remote's cluster config, and runs a session of one watcher per kind
// plus a probe until something ends it.
type remote struct {
	m     *Manager
	rec   Remote
	box   *statusBox
	log   *slog.Logger
	since time.Time // when this mirror started, for the TTL of a never-reached remote

	cancel context.CancelFunc
	done   chan struct{}

	// Owned by the run goroutine.
	dropped     bool   // the cache was deleted (TTL or refusal) and not refilled since
	lastRefusal string // to log a repeated refusal once

	// reported holds the reason each refused record (by state key) was
	// last logged and counted with, across sessions: a re-list or a
	// reconnect does not log or count it again.
	reportedMu sync.Mutex
	reported   map[string]string
}

func newRemote(m *Manager, rec Remote, box *statusBox) *remote {
	return &remote{m: m, rec: rec, box: box, since: time.Now(), done: make(chan struct{}),
		log: m.log.With("remote", rec.Name), reported: map[string]string{}}
}

// noteVerdict logs and counts a record that became refused as not owned
// by the remote, once per key and reason; an accepted one is forgotten.
func (r *remote) noteVerdict(v records.Verdict) {
	reason := records.RefusalReason(v.Err)
	r.reportedMu.Lock()
	defer r.reportedMu.Unlock()
	if reason == "" {
		delete(r.reported, v.Key)
		return
	}
	if r.reported[v.Key] == reason {
		return
	}
	r.reported[v.Key] = reason
	r.box.refusal(reason, v.Err)
	r.log.Warn("mirror: refusing a record the remote cluster does not own", "key", v.Key, "reason", reason, "err", v.Err)
}

// forgetReported forgets the reported refusals of the kind's keys that
// keep reports no longer.
func (r *remote) forgetReported(prefix string, keep func(key string) bool) {
	r.reportedMu.Lock()
	defer r.reportedMu.Unlock()
	for k := range r.reported {
		if strings.HasPrefix(k, prefix) && !keep(k) {
			delete(r.reported, k)
		}
	}
}

// sessionGate is the records.Gate of one session, shared by the kind
// mirrors of nodes, ipcache and services: a node record decides what
// endpoints and backends on its addresses, and which other nodes' pod
// CIDRs, are accepted. A kind mirror that changes another kind's verdicts
// wakes that kind's mirror, which writes or deletes the cache keys.
type sessionGate struct {
	mu   sync.Mutex
	g    *records.Gate
	wake map[records.Kind]chan struct{}
	// refusedGen is the g.RefusedGen() of the refusal counts last
	// published to the status (under mu).
	refusedGen uint64
	// nodesListed is closed once the nodes' first list is applied: the
	// other kinds write their canaries only after it, so that what
	// depends on node addresses is decided by then.
	nodesListed chan struct{}
}

func newSessionGate(name string, cfg records.ClusterConfig, limits records.Limits) *sessionGate {
	g := records.NewGate(name, limits)
	g.SetConfig(&cfg)
	sg := &sessionGate{g: g, wake: map[records.Kind]chan struct{}{}, nodesListed: make(chan struct{})}
	for _, k := range gatedKinds {
		sg.wake[k] = make(chan struct{}, 1)
	}
	return sg
}

// gatedKinds are the kinds whose records go through the Gate.
var gatedKinds = []records.Kind{records.KindNodes, records.KindIP, records.KindServices}

// The gate is changed by one record at a time, 100,000 times in a full
// sync: each change is a method (no closure to allocate) that takes the
// lock once and wakes the mirrors of other kinds with changed verdicts.

func (sg *sessionGate) putNode(key string, n records.Node, raw []byte) {
	sg.mu.Lock()
	sg.g.PutNode(key, n, raw)
	sg.unlockAndWake(records.KindNodes)
}

func (sg *sessionGate) putIP(key string, e records.IPCacheEntry, raw []byte) {
	sg.mu.Lock()
	sg.g.PutIP(key, e, raw)
	sg.unlockAndWake(records.KindIP)
}

func (sg *sessionGate) putService(key string, svc records.ServiceRecord, raw []byte) {
	sg.mu.Lock()
	sg.g.PutService(key, svc, raw)
	sg.unlockAndWake(records.KindServices)
}

func (sg *sessionGate) delete(self records.Kind, key string) {
	sg.mu.Lock()
	sg.g.Delete(key)
	sg.unlockAndWake(self)
}

// unlockAndWake releases mu and wakes the mirrors of the kinds other than
// self whose verdicts changed.
func (sg *sessionGate) unlockAndWake(self records.Kind) {
	var dirty [3]bool
	for i, k := range gatedKinds {
		dirty[i] = k != self && sg.g.Dirty(k)
	}
	sg.mu.Unlock()
	for i, k := range gatedKinds {
		if dirty[i] {
			select {
			case sg.wake[k] <- struct{}{}:
			default:
			}
		}
	}
}

func (r *remote) start(ctx context.Context) {
	ctx, r.cancel = context.WithCancel(ctx)
	go r.run(ctx)
}

// stop ends the mirror and waits for it; the cache stays.
func (r *remote) stop() {
	r.cancel()
	<-r.done
}

func (r *remote) run(ctx context.Context) {
	defer close(r.done)
	b := backoff.Backoff{Min: r.m.cfg.RetryMin, Max: r.m.cfg.RetryMax}
	for {
		accepted, err := r.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if accepted {
			b.Reset()
		}
		r.box.setError(err)
		if b.Wait(ctx) != nil {
			return
		}
	}
}

// session connects, checks and mirrors until the first error. accepted
// reports whether the remote was accepted (the backoff starts over then).
func (r *remote) session(ctx context.Context) (accepted bool, err error) {
	name := r.rec.Name
	kc, err := r.rec.KVConfig(r.m.cfg.Local.Name)
	if err != nil {
		return false, r.refuse(ctx, err)
	}
	kc.DialTimeout = r.m.cfg.DialTimeout
	// Lists of big clusters are paged within one attempt: give them time.
	// Probes bound themselves with DialTimeout.
	kc.RequestTimeout = max(30*time.Second, r.m.cfg.DialTimeout)
	kc.MaxRetries = 1
	kc.BackoffMin, kc.BackoffMax = min(100*time.Millisecond, r.m.cfg.RetryMin), r.m.cfg.RetryMax
	kc.Logger = r.log
	cli, err := kvstore.Connect(ctx, kc)
	if err != nil {
		err, expired := r.unreachable(fmt.Errorf("%w: %w", errTransport, err))
		if expired {
			r.drop(ctx)
		}
		return false, err
	}
	defer cli.Close()

	cfg, first, rev, err := r.readConfig(ctx, cli)
	if err != nil {
		if ctx.Err() != nil {
			return false, nil
		}
		if errors.Is(err, errTransport) {
			err, expired := r.unreachable(err)
			if expired {
				r.drop(ctx)
			}
			return false, err
		}
		return false, r.refuse(ctx, err)
	}
	r.contact()
	if err := r.m.claim(name, cfg); err != nil {
		return false, r.refuse(ctx, fmt.Errorf("refusing cluster %q: %w", name, err))
	}
	// The mirrored cluster config goes first: agents need it to check
	// what follows, and its presence marks a cluster that may have cache.
	if err := r.writeConfig(ctx, first.Value); err != nil {
		return true, err
	}
	r.dropped, r.lastRefusal = false, ""
	r.box.update(func(s *Status) {
		s.setState(StateConnected)
		s.Connected, s.ClusterID, s.CacheExpires = true, cfg.ID, time.Time{}
	})
	r.log.Info("mirror: connected to remote cluster", "clusterID", cfg.ID, "podCIDRs", cfg.PodCIDRs)

	sctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, len(records.Kinds)+1)
	var wg sync.WaitGroup
	sg := newSessionGate(name, cfg, r.m.cfg.limits())
	r.box.setRefused(nil)
	for _, k := range records.Kinds {
		km := newKindMirror(r, k, cfg.ID, sg)
		wg.Go(func() { errc <- km.run(sctx, cli) })
	}
	wg.Go(func() { errc <- r.probe(sctx, cli, first, rev) })
	err = <-errc
	cancel()
	wg.Wait()
	if ctx.Err() != nil {
		return true, nil
	}
	if errors.Is(err, errExpired) {
		r.drop(ctx)
	} else {
		r.log.Warn("mirror: session ended, reconnecting", "err", err)
	}
	return true, err
}

// readConfig reads and checks the remote's cluster config: it must exist
// and name the cluster and ID of the record.
// It also returns the key as read and the revision of the remote store
// at the read.
func (r *remote) readConfig(ctx context.Context, cli *kvstore.Client) (records.ClusterConfig, kvstore.KeyValue, int64, error) {
	pctx, cancel := context.WithTimeout(ctx, r.m.cfg.DialTimeout)
	defer cancel()
	key := records.ClusterConfigKey(r.rec.Name)
	// A range read, for the store's revision (a plain get does not report
	// it); other keys of the range (configs of c2x for c2) are ignored.
	kvs, rev, err := cli.GetPrefix(pctx, key)
	if err != nil {
		return records.ClusterConfig{}, kvstore.KeyValue{}, 0, fmt.Errorf("%w: read %s: %w", errTransport, key, err)
	}
	var kv kvstore.KeyValue
	found := false
	for _, got := range kvs {
		if got.Key == key {
			kv, found = got, true
		}
	}
	if !found {
		return records.ClusterConfig{}, kvstore.KeyValue{}, 0, fmt.Errorf("%w: cluster %q has no %s: is %v the isthmus-clustermesh server of that cluster?",
			errNoConfig, r.rec.Name, key, r.rec.Endpoints)
	}
	cfg, err := records.ValidateClusterConfig(kv.Key, kv.Value, r.rec.Name, r.rec.ClusterID)
	if err != nil {
		return records.ClusterConfig{}, kvstore.KeyValue{}, 0, fmt.Errorf("refusing cluster %q: it is not what its record isthmus/remotes/%s says (ID %d): %w",
			r.rec.Name, r.rec.Name, r.rec.ClusterID, err)
	}
	return cfg, kv, rev, nil
}

// writeConfig copies the remote's cluster config into the local etcd.
func (r *remote) writeConfig(ctx context.Context, raw []byte) error {
	key := records.ClusterConfigKey(r.rec.Name)
	kv, found, err := r.m.kv.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("read local copy of %s: %w", key, err)
	}
	if found && bytes.Equal(kv.Value, raw) {
		return nil
	}
	if err := r.m.kv.Put(ctx, key, raw); err != nil {
		return fmt.Errorf("write local copy of %s: %w", key, err)
	}
	return nil
}

// probe re-reads the remote's cluster config every ProbeInterval. It ends
// the session when the config changed (to check it again), when the
// remote is no longer acceptable, when it was unreachable for longer than
// the cache TTL, or when the remote's etcd was reset: a store revision
// lower than before, or a config key created anew, means a new keyspace
// (restored from a backup, or wiped and rebuilt) whose revisions the
// running watches would misread — they would wait for revisions it has not
// reached and miss everything meanwhile. A new session lists it afresh.
func (r *remote) probe(ctx context.Context, cli *kvstore.Client, first kvstore.KeyValue, firstRev int64) error {
	lastRev := firstRev
	t := time.NewTicker(r.m.cfg.ProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		_, got, rev, err := r.readConfig(ctx, cli)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errTransport) {
			if err, expired := r.unreachable(err); expired {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if r.contact() {
			r.log.Info("mirror: contact with remote cluster restored")
		}
		if rev < lastRev || got.CreateRevision != first.CreateRevision {
			return fmt.Errorf("the etcd of cluster %q was reset (revision %d, was %d; cluster config created at revision %d, was %d): mirroring it afresh",
				r.rec.Name, rev, lastRev, got.CreateRevision, first.CreateRevision)
		}
		lastRev = rev
		if !bytes.Equal(got.Value, first.Value) {
			return fmt.Errorf("the cluster config of %q changed: checking it again", r.rec.Name)
		}
	}
}

// contact records that the remote answered; it reports whether it had
// been unreachable.
func (r *remote) contact() (restored bool) {
	r.box.update(func(s *Status) {
		s.LastContact = time.Now().UTC()
		restored = s.State == StateUnreachable
		if restored {
			s.setState(StateConnected)
			s.Connected, s.CacheExpires = true, time.Time{}
		}
	})
	return restored
}

// unreachable records a failed contact. expired reports that the remote
// has been unreachable for longer than the cache TTL (its cache is not
// dropped yet: the caller does that once nothing writes to it).
func (r *remote) unreachable(err error) (error, bool) {
	ttl := r.m.cfg.CacheTTL
	now := time.Now()
	var was State
	var last time.Time
	r.box.update(func(s *Status) {
		was = s.State
		last = s.LastContact
		if last.IsZero() {
			last = r.since
		}
		s.Connected = false
		if s.State == StateConnected {
			s.setState(StateUnreachable)
		}
		s.CacheExpires = time.Time{}
		if ttl > 0 && s.State == StateUnreachable {
			s.CacheExpires = last.Add(ttl).UTC()
		}
	})
	err = fmt.Errorf("cluster %q: %w", r.rec.Name, err)
	r.box.setError(err)
	if was == StateConnected {
		msg := "mirror: lost contact with remote cluster; its cache keeps serving"
		if ttl > 0 {
			msg += " until the cache TTL"
		}
		r.log.Warn(msg, "cacheTTL", ttl, "err", err)
	} else {
		r.log.Debug("mirror: remote cluster unreachable", "err", err)
	}
	expired := ttl > 0 && !r.dropped && now.Sub(last) > ttl
	if expired {
		return fmt.Errorf("%w: %w (last contact %s)", errExpired, err, last.UTC().Format(time.RFC3339)), true
	}
	return err, false
}

// drop deletes the cache of a remote unreachable for longer than the TTL.
func (r *remote) drop(ctx context.Context) {
	if r.dropped {
		return
	}
	r.log.Warn("mirror: remote cluster unreachable for longer than the cache TTL: deleting its cache", "cacheTTL", r.m.cfg.CacheTTL)
	r.m.dropCache(ctx, r.rec.Name, r.box)
	r.dropped = true
	r.box.update(func(s *Status) { s.setState(StateDropped); s.Connected, s.CacheExpires = false, time.Time{} })
}

// refuse stops mirroring a remote that is not acceptable: it deletes its
// cache and marks it refused. The caller retries later (the conflict may
// go away).
func (r *remote) refuse(ctx context.Context, err error) error {
	if err.Error() != r.lastRefusal {
		r.log.Error("mirror: remote cluster refused: nothing of it is mirrored", "err", err)
		r.lastRefusal = err.Error()
	}
	r.m.dropCache(ctx, r.rec.Name, r.box)
	r.box.update(func(s *Status) { s.setState(StateRefused); s.Connected, s.CacheExpires = false, time.Time{} })
	return err
}

// Batching of cache writes. Each transaction costs a raft round and an
// fsync, so large batches are what makes a full sync fast; the embedded etcd
// accepts maxBatchOps operations per transaction. An external etcd keeps
// its default limit unless raised: a batch it refuses is written in chunks
// of that size instead (kvstore.Client.WriteOps). The byte bound stays
// well below etcd's 1.5 MiB request limit.
const (
	maxBatchOps   = kvstore.EmbeddedMaxTxnOps
	maxBatchBytes = 1 << 20
	flushDelay    = 2 * time.Millisecond
	// maxBatchAge bounds how long a live change (after the first list)
	// waits in a batch while further changes keep coming without a pause
	// of flushDelay.
	maxBatchAge = 5 * time.Millisecond
	// maxInflight bounds the transactions written at once by one kind
	// mirror (and the memory of their batches); see flush.
	maxInflight = 4
)

// MaxTxnOps is the transaction size the embedded etcd must accept.
const MaxTxnOps = maxBatchOps

var hashSeed = maphash.MakeSeed()

// kindMirror mirrors one kind of a remote's state into the cache.
type kindMirror struct {
	r    *remote
	kind records.Kind
	id   uint32 // the remote's cluster ID
	src  string // prefix in the remote etcd
	dst  string // cache prefix in the local etcd

	// keys holds every cache key of this kind that is in the local etcd
	// (with a hash of its value) or whose remote record is there and
	// accepted (present), one map entry each; nPresent counts the
	// latter. invalid holds the remote keys currently skipped.
	keys     map[string]keyState
	nPresent int
	invalid  map[string]struct{}
	listed   bool // the first list is complete

	ops     []kvstore.Op
	opIndex map[string]int // key -> index in ops
	opBytes int
	// opsSince is when the first of ops was queued.
	opsSince time.Time
	// inflight are the transactions being written, oldest first: at
	// most maxInflight, no two naming the same key (see flush).
	inflight []*txnInFlight
	// commit writes one batch: write, but for tests that hold a batch.
	commit func(ctx context.Context, ops []kvstore.Op) error

	// validate checks a record against its key and the connection and,
	// for the kinds of the gate, puts it into the gate.
	validate func(key string, value []byte) error
	// gate is the session's (nil for identities, which it does not
	// check); wake is this kind's signal that the gate changed verdicts
	// of it.
	gate *sessionGate
	wake chan struct{}
}

func newKindMirror(r *remote, k records.Kind, id uint32, sg *sessionGate) *kindMirror {
	name := r.rec.Name
	km := &kindMirror{r: r, kind: k, id: id, dst: records.CachePrefix(k, name),
		keys: map[string]keyState{}, invalid: map[string]struct{}{},
		opIndex: map[string]int{}}
	km.commit = km.write
	if k != records.KindIdentities {
		km.gate, km.wake = sg, sg.wake[k]
	}
	switch k {
	case records.KindNodes:
		km.src = records.StateClusterPrefix(k, name)
		km.validate = func(key string, v []byte) error {
			n, err := records.ValidateNode(key, v, name, id)
			if err == nil {
				sg.putNode(key, n, v)
			}
			return err
		}
	case records.KindIP:
		km.src = records.StateClusterPrefix(k, name)
		km.validate = func(key string, v []byte) error {
			e, err := records.ValidateIPCacheEntry(key, v, name, id)
			if err == nil {
				sg.putIP(key, e, v)
			}
			return err
		}
	case records.KindServices:
		km.src = records.StateClusterPrefix(k, name)
		km.validate = func(key string, v []byte) error {
			s, err := records.ValidateService(key, v, name, id)
			if err == nil {
				sg.putService(key, s, v)
			}
			return err
		}
	case records.KindIdentities:
		// Masters of every cluster share one prefix; ValidateIdentity
		// refuses IDs outside the remote's range.
		km.src = records.IdentityIDPrefix
		km.validate = func(key string, v []byte) error { _, err := records.ValidateIdentity(key, v, name, id); return err }
	}
	return km
}

func (k *kindMirror) run(ctx context.Context, cli *kvstore.Client) error {
	local := k.r.m.kv
	kvs, _, err := local.GetPrefix(ctx, k.dst)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("read the local cache %s: %w", k.dst, err)
	}
	for _, kv := range kvs {
		k.keys[kv.Key] = keyState{hash: maphash.Bytes(hashSeed, kv.Value), cached: true}
	}
	k.r.box.setKind(k.kind, len(k.keys), 0)
	ch := cli.WatchPrefix(ctx, k.src)
	// Writes are batched: a batch goes out when it is full, at the end of
	// a list, or when no further event came within flushDelay (the events
	// of a list arrive back to back), and once the first list is complete
	// at the latest maxBatchAge after its first change (flushIn).
	pause := time.NewTimer(time.Hour)
	pause.Stop()
	defer pause.Stop()
	defer k.wait() // nothing writes to the cache once the session ended
	for {
		var pauseC <-chan time.Time
		if len(k.ops) > 0 {
			pause.Reset(k.flushIn())
			pauseC = pause.C
		}
		var ev kvstore.Event
		var ok bool
		select {
		case ev, ok = <-ch:
			pause.Stop()
		case <-pauseC:
			if err := k.flush(ctx); err != nil {
				return err
			}
			continue
		case err := <-k.oldestDone(): // nil channel while nothing is in flight
			k.inflight = k.inflight[1:]
			if err != nil {
				return err
			}
			continue
		case <-k.wake: // nil channel for identities
			if _, err := k.applyGate(ctx, ""); err != nil {
				return err
			}
			if len(k.ops) >= maxBatchOps || k.opBytes >= maxBatchBytes {
				if err := k.flush(ctx); err != nil {
					return err
				}
			}
			continue
		}
		if !ok {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("watch of %s ended", k.src)
		}
		if err := k.handle(ctx, ev); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if len(k.ops) > 0 && k.flushIn() <= 0 {
			if err := k.flush(ctx); err != nil {
				return err
			}
		}
	}
}

// flushIn returns how long the queued batch may wait for more: flushDelay
// after the last event, and for live changes (once the first list is
// complete) no longer than maxBatchAge after its first, so that a steady
// stream of changes is written every maxBatchAge instead of only when the
// batch is full. The events of a list come back to back and fill batches.
func (k *kindMirror) flushIn() time.Duration {
	if !k.listed {
		return flushDelay
	}
	return min(flushDelay, maxBatchAge-time.Since(k.opsSince))
}

func (k *kindMirror) handle(ctx context.Context, ev kvstore.Event) error {
	name := k.r.rec.Name
	switch ev.Type {
	case kvstore.EventUpsert:
		ck, err := records.CacheKey(ev.Key, name)
		if err == nil {
			err = k.validate(ev.Key, ev.Value)
		}
		if err != nil {
			k.reject(ev.Key, err)
			k.gateDelete(ev.Key)
			if ck != "" {
				// The writer's intent is unknown: keep nothing stale.
				k.drop(ck)
			}
			if _, err := k.applyGate(ctx, ""); err != nil {
				return err
			}
			break
		}
		if len(k.invalid) > 0 {
			delete(k.invalid, ev.Key)
		}
		if k.gate != nil {
			// The gate has the record: its verdict decides, and may have
			// changed others' (those of this kind are applied here).
			v, err := k.applyGate(ctx, ev.Key)
			if err != nil {
				return err
			}
			if !v.Accepted() {
				k.drop(ck)
				break
			}
		}
		if err := k.store(ctx, ck, ev.Value); err != nil {
			return err
		}
	case kvstore.EventDelete:
		delete(k.invalid, ev.Key)
		k.gateDelete(ev.Key)
		if ck, err := records.CacheKey(ev.Key, name); err == nil {
			k.drop(ck)
		}
		if _, err := k.applyGate(ctx, ""); err != nil {
			return err
		}
	case kvstore.EventListDone:
		if k.gate != nil {
			if err := k.gateListDone(ctx); err != nil {
				return err
			}
		}
		// Everything the remote has was reported: what the cache holds
		// beyond that is stale (deleted while nobody watched, or left
		// from before a restart of this server).
		for ck, st := range k.keys {
			if !st.present {
				k.drop(ck)
			}
		}
		if err := k.flush(ctx); err != nil {
			return err
		}
		if err := k.wait(); err != nil {
			return err
		}
		if err := k.writeCanary(ctx); err != nil {
			return err
		}
		k.listed = true
	}
	// Until the first list is complete the status keeps counting what the
	// cache held at the start.
	if k.listed {
		k.r.box.setKind(k.kind, k.nPresent, len(k.invalid))
	}
	if len(k.ops) >= maxBatchOps || k.opBytes >= maxBatchBytes {
		return k.flush(ctx)
	}
	return nil
}

// keyState is what a kind mirror knows of one cache key.
type keyState struct {
	hash    uint64 // of the value in the local etcd, if cached
	cached  bool   // the local etcd has the key (or will, once the queued write is applied)
	present bool   // the remote has the record, valid and accepted
}

// store writes value at cache key ck unless the cache has it already.
func (k *kindMirror) store(ctx context.Context, ck string, value []byte) error {
	st := k.keys[ck]
	if !st.present {
		st.present = true
		k.nPresent++
	}
	h := maphash.Bytes(hashSeed, value)
	if !st.cached || st.hash != h {
		if err := k.put(ctx, ck, value); err != nil {
			return err
		}
		st.hash, st.cached = h, true
	}
	k.keys[ck] = st
	return nil
}

// drop forgets cache key ck: it is no longer present, and deleted from the
// cache if the cache has it.
func (k *kindMirror) drop(ck string) {
	st, ok := k.keys[ck]
	if !ok {
		return
	}
	if st.present {
		k.nPresent--
	}
	delete(k.keys, ck)
	if st.cached {
		k.queue(ck, kvstore.OpDelete(ck), len(ck))
	}
}

// gateDelete takes key out of the gate, if this kind has one.
func (k *kindMirror) gateDelete(key string) {
	if k.gate != nil {
		k.gate.delete(k.kind, key)
		k.r.noteVerdict(records.Verdict{Key: key})
	}
}

// applyGate writes or deletes the cache keys of this kind whose verdict
// changed in the gate, logs and counts new refusals, and returns the
// verdict of key (if not ""), read at the same time, so that no change in
// between is missed. The caller applies that verdict to key's cache key;
// applyGate leaves it alone.
func (k *kindMirror) applyGate(ctx context.Context, key string) (records.Verdict, error) {
	if k.gate == nil {
		return records.Verdict{}, nil
	}
	sg := k.gate
	var vs []records.Verdict
	var v records.Verdict
	var refused map[string]int
	sg.mu.Lock()
	if sg.g.Dirty(k.kind) {
		vs = sg.g.Drain(k.kind)
	}
	if key != "" {
		v, _ = sg.g.Get(key)
	}
	gen := sg.g.RefusedGen()
	changed := gen != sg.refusedGen
	if changed {
		refused, sg.refusedGen = sg.g.Refused(), gen
	}
	sg.mu.Unlock()
	if changed {
		k.r.box.setRefused(refused)
	}
	for _, d := range vs {
		k.r.noteVerdict(d)
		if d.Key == key {
			continue
		}
		dck, err := records.CacheKey(d.Key, k.r.rec.Name)
		if err != nil {
			continue // the gate holds only keys that map
		}
		if d.Accepted() {
			if err := k.store(ctx, dck, d.Raw); err != nil {
				return v, err
			}
		} else {
			k.drop(dck)
		}
	}
	if k.listed && len(vs) > 0 {
		k.r.box.setKind(k.kind, k.nPresent, len(k.invalid))
	}
	return v, nil
}

// gateListDone runs at the end of a list of a gated kind, before its
// canary: the nodes mark their list applied; the other kinds wait for
// that (their verdicts depend on the accepted nodes' addresses) and apply
// what it changed.
func (k *kindMirror) gateListDone(ctx context.Context) error {
	if k.kind == records.KindNodes {
		select {
		case <-k.gate.nodesListed:
		default:
			close(k.gate.nodesListed)
		}
	} else {
		select {
		case <-k.gate.nodesListed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if _, err := k.applyGate(ctx, ""); err != nil {
		return err
	}
	// Refusals of keys the remote no longer has are forgotten.
	k.gate.mu.Lock()
	defer k.gate.mu.Unlock()
	k.r.forgetReported(k.src, func(key string) bool { _, ok := k.gate.g.Get(key); return ok })
	return nil
}

func (k *kindMirror) reject(key string, err error) {
	k.invalid[key] = struct{}{}
	reason := "invalid"
	switch {
	case errors.Is(err, records.ErrClusterMismatch):
		reason = "cluster-mismatch"
	case errors.Is(err, records.ErrMalformed):
		reason = "malformed"
	}
	k.r.box.update(func(s *Status) { s.Skipped++; s.LastInvalid = err.Error() })
	k.r.log.Warn("mirror: skipping invalid record", "key", key, "reason", reason, "err", err)
}

// put queues a write of key; a pending operation on the same key is
// replaced (etcd refuses a transaction that names a key twice).
func (k *kindMirror) put(ctx context.Context, key string, value []byte) error {
	if k.opBytes+len(value) > maxBatchBytes && len(k.ops) > 0 {
		if err := k.flush(ctx); err != nil {
			return err
		}
	}
	k.queue(key, kvstore.OpPut(key, value), len(key)+len(value))
	return nil
}

func (k *kindMirror) queue(key string, op kvstore.Op, size int) {
	if len(k.ops) == 0 {
		k.opsSince = time.Now()
	}
	if i, ok := k.opIndex[key]; ok {
		k.ops[i] = op
	} else {
		k.opIndex[key] = len(k.ops)
		k.ops = append(k.ops, op)
	}
	k.opBytes += size
}

// txnInFlight is a transaction of cache writes being written.
type txnInFlight struct {
	keys map[string]int // the keys it writes
	done chan error     // receives its result, once
}

// flush starts writing the queued operations in one transaction, in the
// background, so the next batch is built while etcd commits this one.
// More than one may be in flight: etcd commits the ones that arrive
// together with one raft round and fsync, and a live change need not wait
// for the commit of the batch before it. A kind mirror always has one
// transaction of its own; it starts more (up to maxInflight) only while
// no other kind mirror has one in flight: a lone remote is pipelined,
// while remotes syncing at once (which keep etcd busy already) write one
// each, as more would only add to etcd's work (the sync of 4 remotes read
// 15 % slower with more). etcd may apply concurrent
// transactions in any order, so a batch that names a key of one in flight
// waits until that one is done: the writes of one key are applied in the
// order they were queued. An error is returned by the run loop, the next
// flush or wait, and ends the session (the next one re-reads the cache
// and repairs it).
func (k *kindMirror) flush(ctx context.Context) error {
	if len(k.ops) == 0 {
		return nil
	}
	for len(k.inflight) > 0 {
		if len(k.inflight) < maxInflight && !k.conflicts() && k.r.m.startTxn(len(k.inflight)) {
			break
		}
		if err := k.waitOldest(); err != nil {
			return err
		}
	}
	if len(k.inflight) == 0 {
		k.r.m.startTxn(0)
	}
	ops, keys := k.ops, k.opIndex
	k.ops = make([]kvstore.Op, 0, maxBatchOps)
	k.opIndex = make(map[string]int, len(keys))
	k.opBytes = 0
	t := &txnInFlight{keys: keys, done: make(chan error, 1)}
	k.inflight = append(k.inflight, t)
	go func() {
		err := k.commit(ctx, ops)
		k.r.m.endTxn()
		t.done <- err
	}()
	return nil
}

// startTxn counts a cache transaction that starts, of a kind mirror that
// has mine in flight already: one beyond the first (mine > 0) only while
// no other kind mirror has one in flight.
func (m *Manager) startTxn(mine int) bool {
	m.txnMu.Lock()
	defer m.txnMu.Unlock()
	if mine > 0 && m.txns > mine {
		return false
	}
	m.txns++
	return true
}

func (m *Manager) endTxn() {
	m.txnMu.Lock()
	m.txns--
	m.txnMu.Unlock()
}

// conflicts reports whether a transaction in flight names a queued key.
func (k *kindMirror) conflicts() bool {
	for _, t := range k.inflight {
		small, large := k.opIndex, t.keys
		if len(small) > len(large) {
			small, large = large, small
		}
		for key := range small {
			if _, ok := large[key]; ok {
				return true
			}
		}
	}
	return false
}

// oldestDone is the result channel of the oldest transaction in flight
// (nil if none).
func (k *kindMirror) oldestDone() <-chan error {
	if len(k.inflight) == 0 {
		return nil
	}
	return k.inflight[0].done
}

// waitOldest waits for the oldest transaction in flight.
func (k *kindMirror) waitOldest() error {
	err := <-k.inflight[0].done
	k.inflight = k.inflight[1:]
	return err
}

// wait waits for every transaction in flight and returns the first error.
func (k *kindMirror) wait() error {
	var first error
	for len(k.inflight) > 0 {
		if err := k.waitOldest(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// write applies ops, retrying: they are plain puts and deletes, so
// repeating them is harmless.
func (k *kindMirror) write(ctx context.Context, ops []kvstore.Op) error {
	b := backoff.Backoff{Min: 50 * time.Millisecond, Max: 2 * time.Second}
	for attempt := 0; ; attempt++ {
		err := k.r.m.w.WriteOps(ctx, ops) // one transaction: a batch is at most MaxTxnOps
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if attempt >= 4 {
			return fmt.Errorf("write the cache %s: %w", k.dst, err)
		}
		if b.Wait(ctx) != nil {
			return ctx.Err()
		}
	}
	k.r.box.update(func(s *Status) { s.LastChange = time.Now().UTC() })
	return nil
}

func (k *kindMirror) writeCanary(ctx context.Context) error {
	name := k.r.rec.Name
	v, err := records.Stamp{Cluster: name, Time: time.Now().UTC()}.Marshal()
	if err != nil {
		return err
	}
	if err := k.r.m.kv.Put(ctx, records.SyncedKey(name, k.kind), v); err != nil {
		return fmt.Errorf("write the canary of %s: %w", k.kind, err)
	}
	k.r.box.setSynced(k.kind, true)
	k.r.log.Debug("mirror: kind synced", "kind", k.kind, "records", k.nPresent, "invalid", len(k.invalid))
	return nil
}

func marshalStatus(s Status) ([]byte, error) { return json.Marshal(s) }
