package servicesync

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// ConfigPrefix holds the applied objects, isthmus/config/<Kind>/<ns>/<name>;
// ServiceConfigPrefix the Services among them.
const (
	ConfigPrefix        = records.Root + "config/"
	ServiceConfigPrefix = ConfigPrefix + objects.KindService + "/"
)

// Config configures a Syncer.
type Config struct {
	Cluster   string
	ClusterID uint32
	// PodCIDRs are the cluster's (its cluster config's): an ipcache entry
	// outside them, or with a reserved identity, backs no service
	// (records.Owner), so one forged endpoint record does not put a
	// foreign address into a published service — which remote clusters
	// would refuse whole. Empty: every entry of the cluster's ID counts.
	PodCIDRs []netip.Prefix
	// Client reads and writes the cluster's etcd.
	Client *kvstore.Client
	// Debounce is the shortest time between two writes (default 10 ms):
	// a change after a quiet spell is written at once (with whatever
	// changes were already queued), changes within Debounce of the last
	// write wait until Debounce has passed since it and go together, so a
	// steady trickle is written within milliseconds and a flood in
	// batches, at most one per Debounce.
	Debounce time.Duration
	Logger   *slog.Logger
	// Decoded, when not nil, decodes the applied services, shared with
	// the other readers of them (the server's LB-IPAM syncer): each
	// value is decoded once.
	Decoded *objects.DecodeCache
}

// Stats counts what a Syncer did.
type Stats struct {
	// Services is the number of service records written by the last sync.
	Services int       `json:"services"`
	Syncs    uint64    `json:"syncs"`
	Puts     uint64    `json:"puts"`
	Deletes  uint64    `json:"deletes"`
	Invalid  uint64    `json:"invalid"`
	LastSync time.Time `json:"lastSync,omitzero"`
	LastErr  string    `json:"lastError,omitempty"`
}

// Syncer keeps isthmus/state/services/v1/<cluster>/ equal to what the
// cluster's Services, ipcache and identities say. See the package doc.
type Syncer struct {
	cfg Config
	log *slog.Logger

	// Owned by Run.
	t      *tables
	out    map[string][]byte // what the output prefix holds
	listed map[string]bool
	synced bool // the first write after the lists was made

	mu    sync.Mutex
	stats Stats
}

// New checks cfg and returns a Syncer; Run starts it.
func New(cfg Config) (*Syncer, error) {
	if cfg.Client == nil {
		return nil, errors.New("servicesync: no kvstore client")
	}
	if err := records.ValidateClusterName(cfg.Cluster); err != nil {
		return nil, fmt.Errorf("servicesync: %w", err)
	}
	if err := records.ValidateClusterID(cfg.ClusterID); err != nil {
		return nil, fmt.Errorf("servicesync: %w", err)
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 10 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	log := cfg.Logger.With("component", "servicesync")
	return &Syncer{cfg: cfg, log: log, t: newTables(cfg.Cluster, cfg.ClusterID, log),
		out: map[string][]byte{}, listed: map[string]bool{}}, nil
}

// Stats returns the counters.
func (s *Syncer) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

func (s *Syncer) outPrefix() string {
	return records.StateClusterPrefix(records.KindServices, s.cfg.Cluster)
}

func (s *Syncer) prefixes() []string {
	return []string{
		ServiceConfigPrefix,
		records.StateClusterPrefix(records.KindIP, s.cfg.Cluster),
		records.IdentityIDPrefix,
		s.outPrefix(),
	}
}

// Run syncs until ctx ends. Nothing is written before every watched prefix
// has been listed once, so a partial view never deletes records.
func (s *Syncer) Run(ctx context.Context) error {
	return s.cfg.Client.RunSyncLoop(ctx, kvstore.SyncLoop{
		Prefixes: s.prefixes(), Debounce: s.cfg.Debounce,
		Apply: s.apply, Ready: s.ready, Write: s.sync,
		Failed: func(err error, retry time.Duration) {
			s.log.Warn("servicesync: sync failed, retrying", "err", err, "in", retry)
			s.setErr(err)
		},
	})
}

func (s *Syncer) ready() bool {
	for _, p := range s.prefixes() {
		if !s.listed[p] {
			return false
		}
	}
	return true
}

// apply updates the tables with one event and reports whether a sync may
// be needed.
func (s *Syncer) apply(prefix string, ev kvstore.Event) bool {
	if ev.Type == kvstore.EventListDone {
		first := !s.listed[prefix]
		s.listed[prefix] = true
		return first || s.ready()
	}
	del := ev.Type == kvstore.EventDelete
	switch prefix {
	case ServiceConfigPrefix:
		if del {
			s.t.deleteService(ev.Key)
			s.cfg.Decoded.Forget(ev.Key)
			return true
		}
		svc, err := decodeService(s.cfg.Decoded, ev.Key, ev.Value)
		if err != nil {
			s.t.deleteService(ev.Key)
			s.invalid(ev.Key, err)
			return true
		}
		s.t.putService(ev.Key, svc)
	case records.IdentityIDPrefix:
		id, err := records.ParseIdentityIDKey(ev.Key)
		if err != nil {
			s.invalid(ev.Key, err)
			return false
		}
		if records.ValidateClusterID(id>>20) != nil || id>>20 != s.cfg.ClusterID {
			return false // another cluster's (or reserved): not ours to sync
		}
		if del {
			s.t.deleteIdentity(id)
			return true
		}
		r, err := records.ValidateIdentity(ev.Key, ev.Value, s.cfg.Cluster, s.cfg.ClusterID)
		if err != nil {
			s.t.deleteIdentity(id)
			s.invalid(ev.Key, err)
			return true
		}
		s.t.putIdentity(id, r.Labels)
	case s.outPrefix():
		if del {
			_, had := s.out[ev.Key]
			delete(s.out, ev.Key)
			if had {
				s.t.pending[ev.Key] = struct{}{}
			}
			return had
		}
		if bytes.Equal(s.out[ev.Key], ev.Value) {
			return false // our own write coming back
		}
		s.out[ev.Key] = ev.Value
		s.t.pending[ev.Key] = struct{}{} // someone else's write: compare it
		return true
	default: // ipcache
		if del {
			s.t.deleteIP(ev.Key)
			return true
		}
		ent, err := records.ValidateIPCacheEntry(ev.Key, ev.Value, s.cfg.Cluster, s.cfg.ClusterID)
		if err == nil && len(s.cfg.PodCIDRs) > 0 {
			o := records.Owner{Cluster: s.cfg.Cluster, ID: s.cfg.ClusterID, PodCIDRs: s.cfg.PodCIDRs}
			err = o.CheckIPCacheEntry(ent, nil)
		}
		if err != nil {
			s.t.deleteIP(ev.Key)
			s.invalid(ev.Key, err)
			return true
		}
		s.t.putIP(ev.Key, ent)
	}
	return true
}

func (s *Syncer) invalid(key string, err error) {
	s.mu.Lock()
	s.stats.Invalid++
	s.mu.Unlock()
	s.log.Warn("servicesync: skipping invalid record", "key", key, "err", err)
}

func (s *Syncer) setErr(err error) {
	s.mu.Lock()
	s.stats.LastErr = err.Error()
	s.mu.Unlock()
}

// decodeService decodes an applied Service read at key.
func decodeService(dc *objects.DecodeCache, key string, value []byte) (objects.Service, error) {
	objs, err := dc.Decode(key, value)
	if err != nil {
		return objects.Service{}, fmt.Errorf("%s: %w", key, err)
	}
	if len(objs) != 1 {
		return objects.Service{}, fmt.Errorf("%s: %d objects in one key", key, len(objs))
	}
	svc, ok := objs[0].(*objects.Service)
	if !ok {
		return objects.Service{}, fmt.Errorf("%s: holds a %s", key, objs[0].GetKind())
	}
	if want := ConfigPrefix + objects.Key(svc); want != key {
		return objects.Service{}, fmt.Errorf("%s: holds %s", key, objects.Key(svc))
	}
	return *svc, nil
}

// sync writes what changed: it rebuilds the records of the services
// whose inputs changed and makes the output keys they touched (and any
// someone else wrote) equal to what is desired, in transactions of at most
// 128 operations. The first sync compares every key of the output prefix,
// so records of services that are gone are deleted.
func (s *Syncer) sync(ctx context.Context) error {
	t := s.t
	t.rebuild()
	if !s.synced {
		for k := range s.out {
			t.pending[k] = struct{}{}
		}
	}
	var ops []kvstore.Op
	var puts, dels uint64
	for _, k := range slices.Sorted(maps.Keys(t.pending)) {
		want, ok := t.desired[k]
		cur, has := s.out[k]
		switch {
		case ok && (!has || !bytes.Equal(cur, want)):
			ops = append(ops, kvstore.OpPut(k, want))
			puts++
		case !ok && has:
			ops = append(ops, kvstore.OpDelete(k))
			dels++
		}
	}
	for len(ops) > 0 {
		n := min(len(ops), 128)
		if _, err := s.cfg.Client.Txn(ctx, nil, ops[:n]); err != nil {
			return err // pending stays: compared again on the retry
		}
		ops = ops[n:]
	}
	// The watch reports these writes back; knowing them now keeps the echo
	// from triggering another sync.
	for k := range t.pending {
		if v, ok := t.desired[k]; ok {
			s.out[k] = v
		} else {
			delete(s.out, k)
		}
	}
	clear(t.pending)
	s.synced = true
	s.mu.Lock()
	s.stats.Services = len(t.desired)
	s.stats.Syncs++
	s.stats.Puts += puts
	s.stats.Deletes += dels
	s.stats.LastSync = time.Now().UTC()
	s.stats.LastErr = ""
	s.mu.Unlock()
	if puts+dels > 0 {
		s.log.Info("servicesync: service records updated", "written", puts, "deleted", dels, "services", len(t.desired))
	}
	return nil
}
