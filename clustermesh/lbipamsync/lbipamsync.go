// Package lbipamsync runs LB-IPAM in the clustermesh server: it watches
// the applied Services and LoadBalancerIPPools (isthmus/config/...) and
// its own assignment records (records.LBIPAMPrefix), runs the allocator
// (package lbipam) with the stored assignments as the previous ones, and
// writes what changed in transactions. Only the server writes the
// records; agents read them into the services' status.
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

// Watched prefixes of applied objects.
const (
	ServicePrefix = records.ConfigPrefix + objects.KindService + "/"
	PoolPrefix    = records.ConfigPrefix + objects.KindLoadBalancerIPPool + "/"
)

// maxTxnOps is etcd's default limit of operations per transaction.
const maxTxnOps = 128

// Config configures a Syncer.
type Config struct {
	Client *kvstore.Client
	// Debounce is the shortest time between two writes (default 10 ms).
	Debounce time.Duration
	Logger   *slog.Logger
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
	svcs   map[string]objects.Service            // by config key
	pools  map[string]objects.LoadBalancerIPPool // by config key
	out    map[string][]byte                     // what the output prefix holds
	prev   map[string]lbipam.Assignment          // decodable records, by service key
	listed map[string]bool

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
		svcs: map[string]objects.Service{}, pools: map[string]objects.LoadBalancerIPPool{},
		out: map[string][]byte{}, prev: map[string]lbipam.Assignment{}, listed: map[string]bool{}}, nil
}

// Stats returns the counters.
func (s *Syncer) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.Pools = slices.Clone(st.Pools)
	return st
}

func prefixes() []string { return []string{ServicePrefix, PoolPrefix, records.LBIPAMPrefix} }

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
		return true
	}
	del := ev.Type == kvstore.EventDelete
	switch prefix {
	case ServicePrefix, PoolPrefix:
		delete(s.svcs, ev.Key)
		delete(s.pools, ev.Key)
		if del {
			return true
		}
		o, err := decodeObject(ev.Key, ev.Value)
		if err != nil {
			s.invalid(ev.Key, err)
			return true
		}
		switch v := o.(type) {
		case *objects.Service:
			s.svcs[ev.Key] = *v
		case *objects.LoadBalancerIPPool:
			s.pools[ev.Key] = *v
		}
	case records.LBIPAMPrefix:
		if !del && bytes.Equal(s.out[ev.Key], ev.Value) {
			return false // our own write coming back
		}
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
func decodeObject(key string, value []byte) (objects.Object, error) {
	objs, err := objects.Decode(value)
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
	svcs := slices.Collect(maps.Values(s.svcs))
	pools := slices.Collect(maps.Values(s.pools))
	res := lbipam.Allocate(pools, svcs, s.prev)

	want := map[string][]byte{}
	for key, a := range res.Assignments {
		r := a.Record(key)
		raw, err := r.Marshal()
		if err != nil {
			// The allocator's own output: a bug, not an input problem.
			return fmt.Errorf("encode the assignment of %s: %w", key, err)
		}
		want[records.LBIPAMKey(r.Namespace, r.Name)] = raw
	}
	var dels, puts []kvstore.Op
	for _, k := range slices.Sorted(maps.Keys(s.out)) {
		if _, ok := want[k]; !ok {
			dels = append(dels, kvstore.OpDelete(k))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if cur, ok := s.out[k]; !ok || !bytes.Equal(cur, want[k]) {
			puts = append(puts, kvstore.OpPut(k, want[k]))
		}
	}
	ops := append(dels, puts...)
	for len(ops) > 0 {
		n := min(len(ops), maxTxnOps)
		if _, err := s.cfg.Client.Txn(ctx, nil, ops[:n]); err != nil {
			return err // the inputs stay: compared again on the retry
		}
		ops = ops[n:]
	}
	// The watch reports these writes back; knowing them now keeps the
	// echo from triggering another sync.
	s.out = want
	s.prev = res.Assignments

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
	s.stats.Puts += uint64(len(puts))
	s.stats.Deletes += uint64(len(dels))
	s.stats.LastSync = time.Now().UTC()
	s.stats.LastErr = ""
	s.mu.Unlock()
	if len(puts)+len(dels) > 0 {
		s.log.Info("lbipam: assignments updated", "written", len(puts), "deleted", len(dels),
			"services", len(res.Assignments), "refused", res.Refused())
	}
	return nil
}
