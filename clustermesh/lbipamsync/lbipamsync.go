// Package lbipamsync runs LB-IPAM in the clustermesh server: it watches
// the applied Services and LoadBalancerIPPools (isthmus/config/...) and
// its own assignment records (records.LBIPAMPrefix), runs the allocator
// (package lbipam) with the stored assignments as the previous ones, and
// writes what changed in transactions. Only the server writes the
// records; agents read them into the services' status.
//
// The applied objects are watched as one prefix, not one per kind: an
// apply is one transaction whose events come in key order, so a pool
// (LoadBalancerIPPool/...) edited in the same apply as a new service
// (Service/...) is seen before the service. With a watch per kind the
// service could come first and get an address of the old pool.
//
// When all that changed since the last write is services added (the
// common bulk apply), only those are allocated (lbipam.Extend) and
// written; anything else (a pool, a deleted or edited service, a record
// written by someone else) runs the whole allocation again.
//
// Nothing is written before all three prefixes were listed once, so a
// restarted server starts from what it stored: addresses stick across
// restarts. A record that does not decode (or names another service than
// its key) is logged, counted and treated as absent: the next write
// replaces it with the allocator's answer (or deletes it).
//
// Contract:
//
//	func New(cfg Config) (*Syncer, error)
//	func (s *Syncer) Run(ctx context.Context) error
//	func (s *Syncer) Stats() Stats
package lbipamsync

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/big"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipam"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Keys of the applied objects LB-IPAM reads; both are under
// records.ConfigPrefix, which is watched.
const (
	ServicePrefix = records.ConfigPrefix + objects.KindService + "/"
	PoolPrefix    = records.ConfigPrefix + objects.KindLoadBalancerIPPool + "/"
)

// Config configures a Syncer.
type Config struct {
	Client *kvstore.Client
	// Debounce is the shortest time between two writes (default 10 ms).
	Debounce time.Duration
	Logger   *slog.Logger
	// Decoded, when not nil, decodes the applied objects, shared with
	// the other readers of them (the server's service syncer): each value
	// is decoded once.
	Decoded *objects.DecodeCache
}

// PoolStats is the usage of one pool after the last sync.
type PoolStats struct {
	Name string `json:"name"`
	Used int    `json:"used"`
	// Total is the number of addresses in its blocks (float: an IPv6
	// block may hold more than 2^64).
	Total    float64 `json:"total"`
	Kept     int     `json:"kept"`
	Disabled bool    `json:"disabled,omitempty"`
}

// Stats counts what a Syncer did.
type Stats struct {
	Services int         `json:"services"` // LoadBalancer services with a record
	Refused  int         `json:"refused"`  // of which refused
	Pools    []PoolStats `json:"pools"`
	Syncs    uint64      `json:"syncs"`
	Puts     uint64      `json:"puts"`
	Deletes  uint64      `json:"deletes"`
	// Invalid counts inputs skipped: objects that do not decode and
	// assignment records that do not (those are rewritten).
	Invalid  uint64    `json:"invalid"`
	LastSync time.Time `json:"lastSync,omitzero"`
	LastErr  string    `json:"lastError,omitempty"`
}

// Syncer keeps records.LBIPAMPrefix equal to what the allocator says.
type Syncer struct {
	cfg Config
	log *slog.Logger

	// Owned by Run.
	svcs   map[string]*objects.Service           // by config key
	pools  map[string]objects.LoadBalancerIPPool // by config key
	out    map[string][]byte                     // what the output prefix holds
	prev   map[string]lbipam.Assignment          // decodable records, by service key
	listed map[string]bool
	// last is the allocator's result of the last write, usable as the
	// starting point of lbipam.Extend while lastOK; added are the config
	// keys of the services added since, and changed says that something
	// else changed (then the whole allocation runs).
	last    lbipam.Result
	lastOK  bool
	added   map[string]bool
	changed bool
	// taken indexes the VIPs and external IPs of svcs and the addresses
	// held in last, kept as they change, so that an extension costs what
	// was added rather than a walk of every service.
	taken *lbipam.Taken

	mu    sync.Mutex
	stats Stats
}

// New checks cfg and returns a Syncer; Run starts it.
func New(cfg Config) (*Syncer, error) {
	if cfg.Client == nil {
		return nil, errors.New("lbipamsync: no kvstore client")
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 10 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Syncer{cfg: cfg, log: cfg.Logger.With("component", "lbipam"),
		svcs: map[string]*objects.Service{}, pools: map[string]objects.LoadBalancerIPPool{},
		out: map[string][]byte{}, prev: map[string]lbipam.Assignment{}, listed: map[string]bool{}, added: map[string]bool{},
		taken: lbipam.NewTaken()}, nil
}

// Stats returns the counters.
func (s *Syncer) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.Pools = slices.Clone(st.Pools)
	return st
}

func prefixes() []string { return []string{records.ConfigPrefix, records.LBIPAMPrefix} }

// Run syncs until ctx ends.
func (s *Syncer) Run(ctx context.Context) error {
	return s.cfg.Client.RunSyncLoop(ctx, kvstore.SyncLoop{
		Prefixes: prefixes(), Debounce: s.cfg.Debounce,
		Apply: s.apply, Ready: s.ready, Write: s.sync,
		Failed: func(err error, retry time.Duration) {
			s.log.Warn("lbipam: writing assignments failed, retrying", "err", err, "in", retry)
			s.mu.Lock()
			s.stats.LastErr = err.Error()
			s.mu.Unlock()
		},
	})
}

func (s *Syncer) ready() bool {
	for _, p := range prefixes() {
		if !s.listed[p] {
			return false
		}
	}
	return true
}

// apply takes one event into the inputs and reports whether a sync may be
// needed.
func (s *Syncer) apply(prefix string, ev kvstore.Event) bool {
	if ev.Type == kvstore.EventListDone {
		s.listed[prefix] = true
		s.changed = true
		return true
	}
	del := ev.Type == kvstore.EventDelete
	switch prefix {
	case records.ConfigPrefix:
		isSvc := strings.HasPrefix(ev.Key, ServicePrefix)
		if !isSvc && !strings.HasPrefix(ev.Key, PoolPrefix) {
			return false // another kind: not LB-IPAM's input
		}
		old, hadSvc := s.svcs[ev.Key]
		if hadSvc {
			s.taken.Reserve(old, false)
		}
		delete(s.svcs, ev.Key)
		delete(s.pools, ev.Key)
		if del {
			s.cfg.Decoded.Forget(ev.Key)
			s.changed = true
			return true
		}
		o, err := decodeObject(s.cfg.Decoded, ev.Key, ev.Value)
		if err != nil {
			s.invalid(ev.Key, err)
			s.changed = true
			return true
		}
		switch v := o.(type) {
		case *objects.Service:
			s.svcs[ev.Key] = v
			s.taken.Reserve(v, true)
			if !hadSvc || s.added[ev.Key] {
				s.added[ev.Key] = true // new since the last write
			} else {
				s.changed = true // an edit
			}
		case *objects.LoadBalancerIPPool:
			s.pools[ev.Key] = *v
			s.changed = true
		}
	case records.LBIPAMPrefix:
		if !del && bytes.Equal(s.out[ev.Key], ev.Value) {
			return false // our own write coming back
		}
		s.changed = true // not our write: the previous assignments changed
		ns, name, kerr := records.ParseLBIPAMKey(ev.Key)
		if kerr == nil {
			delete(s.prev, ns+"/"+name)
		}
		if del {
			delete(s.out, ev.Key)
			return true
		}
		s.out[ev.Key] = ev.Value
		r, err := records.ValidateLBAssignment(ev.Key, ev.Value)
		if err != nil {
			// Treated as absent: the next sync rewrites or deletes it.
			s.invalid(ev.Key, err)
			return true
		}
		s.prev[ns+"/"+name] = lbipam.FromRecord(r)
	}
	return true
}

func (s *Syncer) invalid(key string, err error) {
	s.mu.Lock()
	s.stats.Invalid++
	s.mu.Unlock()
	s.log.Warn("lbipam: skipping invalid record", "key", key, "err", err)
}

// decodeObject decodes an applied object read at key and checks it
// belongs there.
func decodeObject(dc *objects.DecodeCache, key string, value []byte) (objects.Object, error) {
	objs, err := dc.Decode(key, value)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if len(objs) != 1 {
		return nil, fmt.Errorf("%s: %d objects in one key", key, len(objs))
	}
	if want := records.ConfigPrefix + objects.Key(objs[0]); want != key {
		return nil, fmt.Errorf("%s: holds %s", key, objects.Key(objs[0]))
	}
	return objs[0], nil
}

// sync runs the allocator and makes the output prefix equal to its
// result. Deletes go first, so an address a gone service frees is never
// held by two records, and one transaction holds everything when it fits.
func (s *Syncer) sync(ctx context.Context) error {
	pools := slices.Collect(maps.Values(s.pools))
	res, ops, err := s.extend(pools)
	if err != nil {
		return err
	}
	extended := ops != nil
	if !extended {
		res, ops, err = s.allocate(pools)
		if err != nil {
			return err
		}
	}
	// Plain puts and deletes, in transactions as large as the etcd takes
	// (each one commit: 10,000 new services are 10 of them in the embedded
	// etcd, not 79).
	txn := make([]kvstore.Op, len(ops))
	for i, w := range ops {
		txn[i] = w.op()
	}
	if err := s.cfg.Client.WriteOps(ctx, txn); err != nil {
		return err // the inputs stay: compared again on the retry
	}
	// The watch reports these writes back; knowing them now keeps the
	// echo from triggering another sync.
	puts, dels := 0, 0
	for _, w := range ops {
		if w.del {
			delete(s.out, w.key)
			dels++
		} else {
			s.out[w.key] = w.value
			puts++
		}
	}
	s.prev = res.Assignments
	s.last, s.lastOK, s.changed = res, true, false
	if extended {
		for k := range s.added {
			if sv := s.svcs[k]; sv != nil {
				s.taken.Hold(res.Assignments[lbipam.ServiceKey(*sv)])
			}
		}
	} else {
		s.taken.HoldOnly(res.Assignments)
	}
	clear(s.added)
	var ps []PoolStats
	for _, p := range pools {
		u := res.Pools[p.Metadata.Name]
		total, _ := new(big.Float).SetInt(u.Total).Float64()
		ps = append(ps, PoolStats{Name: p.Metadata.Name, Used: u.Used, Total: total, Kept: len(u.Kept), Disabled: p.Spec.Disabled})
	}
	slices.SortFunc(ps, func(a, b PoolStats) int { return strings.Compare(a.Name, b.Name) })
	s.mu.Lock()
	s.stats.Services = len(res.Assignments)
	s.stats.Refused = res.Refused()
	s.stats.Pools = ps
	s.stats.Syncs++
	s.stats.Puts += uint64(puts)
	s.stats.Deletes += uint64(dels)
	s.stats.LastSync = time.Now().UTC()
	s.stats.LastErr = ""
	s.mu.Unlock()
	if puts+dels > 0 {
		s.log.Info("lbipam: assignments updated", "written", puts, "deleted", dels,
			"services", len(res.Assignments), "refused", res.Refused())
	}
	return nil
}

// extend allocates for the services added since the last write alone,
// when nothing else changed and lbipam.Extend agrees; ops is nil when it
// does not apply (then allocate runs).
func (s *Syncer) extend(pools []objects.LoadBalancerIPPool) (lbipam.Result, []write, error) {
	if !s.lastOK || s.changed || len(s.added) == 0 {
		return lbipam.Result{}, nil, nil
	}
	added := make([]objects.Service, 0, len(s.added))
	for k := range s.added {
		added = append(added, *s.svcs[k])
	}
	res, ok := lbipam.Extend(pools, s.taken.Has, s.last, added)
	if !ok {
		return lbipam.Result{}, nil, nil
	}
	// Extend extended s.last's assignments in place: if a write below
	// fails, the whole allocation runs on the retry.
	s.lastOK = false
	ops := []write{}
	for _, sv := range added {
		key := lbipam.ServiceKey(sv)
		a, isLB := res.Assignments[key]
		if !isLB {
			continue // not of type LoadBalancer
		}
		r := a.Record(key)
		raw, err := r.Marshal()
		if err != nil {
			return lbipam.Result{}, nil, fmt.Errorf("encode the assignment of %s: %w", key, err)
		}
		ops = append(ops, write{key: records.LBIPAMKey(r.Namespace, r.Name), value: raw})
	}
	slices.SortFunc(ops, func(a, b write) int { return strings.Compare(a.key, b.key) })
	return res, ops, nil
}

// allocate runs the whole allocation and returns the writes that make the
// output prefix equal to it: deletes first.
func (s *Syncer) allocate(pools []objects.LoadBalancerIPPool) (lbipam.Result, []write, error) {
	svcs := make([]objects.Service, 0, len(s.svcs))
	for _, v := range s.svcs {
		svcs = append(svcs, *v)
	}
	res := lbipam.Allocate(pools, svcs, s.prev)
	want := map[string][]byte{}
	for key, a := range res.Assignments {
		r := a.Record(key)
		raw, err := r.Marshal()
		if err != nil {
			// The allocator's own output: a bug, not an input problem.
			return lbipam.Result{}, nil, fmt.Errorf("encode the assignment of %s: %w", key, err)
		}
		want[records.LBIPAMKey(r.Namespace, r.Name)] = raw
	}
	ops := []write{}
	for _, k := range slices.Sorted(maps.Keys(s.out)) {
		if _, ok := want[k]; !ok {
			ops = append(ops, write{key: k, del: true})
		}
	}
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if cur, ok := s.out[k]; !ok || !bytes.Equal(cur, want[k]) {
			ops = append(ops, write{key: k, value: want[k]})
		}
	}
	return res, ops, nil
}

// write is one change of the output prefix.
type write struct {
	key   string
	value []byte
	del   bool
}

func (w write) op() kvstore.Op {
	if w.del {
		return kvstore.OpDelete(w.key)
	}
	return kvstore.OpPut(w.key, w.value)
}
