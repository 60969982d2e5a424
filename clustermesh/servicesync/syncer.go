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
	// Debounce: a sync runs this long after the last change (default
	// 200 ms), but no later than MaxDelay after the first unsynced change
	// (default 2 s), so a steady stream of changes cannot starve it.
	Debounce, MaxDelay time.Duration
	Logger             *slog.Logger
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
	svcs   map[string]objects.Service // by config key
	ips    map[string]records.IPCacheEntry
	labels map[uint32]map[string]string
	out    map[string][]byte // what the output prefix holds
	listed map[string]bool

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
		cfg.Debounce = 200 * time.Millisecond
	}
	if cfg.MaxDelay < cfg.Debounce {
		cfg.MaxDelay = max(2*time.Second, cfg.Debounce)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Syncer{cfg: cfg, log: cfg.Logger.With("component", "servicesync"),
		svcs: map[string]objects.Service{}, ips: map[string]records.IPCacheEntry{},
		labels: map[uint32]map[string]string{}, out: map[string][]byte{}, listed: map[string]bool{}}, nil
}

// Stats returns the counters.
func (s *Syncer) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

type event struct {
	prefix string
	ev     kvstore.Event
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
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan event)
	var wg sync.WaitGroup
	for _, p := range s.prefixes() {
		ch := s.cfg.Client.WatchPrefix(ctx, p)
		wg.Go(func() {
			for ev := range ch {
				select {
				case events <- event{p, ev}:
				case <-ctx.Done():
					return
				}
			}
		})
	}
	defer wg.Wait()
	defer cancel()

	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var dirtySince time.Time // zero: nothing to sync
	retry := s.cfg.Debounce
	schedule := func(d time.Duration) {
		if dirtySince.IsZero() {
			dirtySince = time.Now()
		}
		if deadline := time.Until(dirtySince.Add(s.cfg.MaxDelay)); d > deadline {
			d = max(deadline, 0)
		}
		timer.Reset(d)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case e := <-events:
			if s.apply(e) && s.ready() {
				schedule(s.cfg.Debounce)
			}
		case <-timer.C:
			if err := s.sync(ctx); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				s.log.Warn("servicesync: sync failed, retrying", "err", err, "in", retry)
				s.setErr(err)
				dirtySince = time.Time{}
				timer.Reset(retry)
				retry = min(2*retry, 10*time.Second)
				continue
			}
			retry = s.cfg.Debounce
			dirtySince = time.Time{}
		}
	}
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
func (s *Syncer) apply(e event) bool {
	ev := e.ev
	if ev.Type == kvstore.EventListDone {
		first := !s.listed[e.prefix]
		s.listed[e.prefix] = true
		return first || s.ready()
	}
	del := ev.Type == kvstore.EventDelete
	switch e.prefix {
	case ServiceConfigPrefix:
		delete(s.svcs, ev.Key)
		if del {
			return true
		}
		svc, err := decodeService(ev.Key, ev.Value)
		if err != nil {
			s.invalid(ev.Key, err)
			return true
		}
		s.svcs[ev.Key] = svc
	case records.IdentityIDPrefix:
		id, err := records.ParseIdentityIDKey(ev.Key)
		if err != nil {
			s.invalid(ev.Key, err)
			return false
		}
		if records.ValidateClusterID(id>>20) != nil || id>>20 != s.cfg.ClusterID {
			return false // another cluster's (or reserved): not ours to sync
		}
		delete(s.labels, id)
		if del {
			return true
		}
		r, err := records.ValidateIdentity(ev.Key, ev.Value, s.cfg.Cluster, s.cfg.ClusterID)
		if err != nil {
			s.invalid(ev.Key, err)
			return true
		}
		s.labels[id] = r.Labels
	case s.outPrefix():
		if del {
			_, had := s.out[ev.Key]
			delete(s.out, ev.Key)
			return had
		}
		if bytes.Equal(s.out[ev.Key], ev.Value) {
			return false // our own write coming back
		}
		s.out[ev.Key] = ev.Value
		return true
	default: // ipcache
		delete(s.ips, ev.Key)
		if del {
			return true
		}
		ent, err := records.ValidateIPCacheEntry(ev.Key, ev.Value, s.cfg.Cluster, s.cfg.ClusterID)
		if err == nil && len(s.cfg.PodCIDRs) > 0 {
			o := records.Owner{Cluster: s.cfg.Cluster, ID: s.cfg.ClusterID, PodCIDRs: s.cfg.PodCIDRs}
			err = o.CheckIPCacheEntry(ent, nil)
		}
		if err != nil {
			s.invalid(ev.Key, err)
			return true
		}
		s.ips[ev.Key] = ent
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
func decodeService(key string, value []byte) (objects.Service, error) {
	objs, err := objects.Decode(value)
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

// Desired computes the service records the tables call for, by key.
func (s *Syncer) desired() map[string][]byte {
	want := map[string][]byte{}
	if len(s.svcs) == 0 {
		return want
	}
	eps := Endpoints(s.cfg.Cluster, maps.Values(s.ips), s.labels)
	for _, key := range slices.Sorted(maps.Keys(s.svcs)) {
		svc := s.svcs[key]
		rec, annErr, err := Build(s.cfg.Cluster, s.cfg.ClusterID, svc, eps)
		if annErr != nil {
			s.log.Warn("servicesync: global-service annotations ignored", "service", key, "err", annErr)
		}
		if err != nil {
			s.log.Warn("servicesync: service not published", "service", key, "err", err)
			continue
		}
		value, err := rec.Marshal()
		if err != nil {
			s.log.Warn("servicesync: service not published", "service", key, "err", err)
			continue
		}
		want[records.ServiceKey(s.cfg.Cluster, rec.Namespace, rec.Name)] = value
	}
	return want
}

// sync makes the output prefix equal to desired(), writing only what
// differs, in transactions of at most 128 operations.
func (s *Syncer) sync(ctx context.Context) error {
	want := s.desired()
	var ops []kvstore.Op
	var puts, dels uint64
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if cur, ok := s.out[k]; !ok || !bytes.Equal(cur, want[k]) {
			ops = append(ops, kvstore.OpPut(k, want[k]))
			puts++
		}
	}
	for _, k := range slices.Sorted(maps.Keys(s.out)) {
		if _, ok := want[k]; !ok {
			ops = append(ops, kvstore.OpDelete(k))
			dels++
		}
	}
	for len(ops) > 0 {
		n := min(len(ops), 128)
		if _, err := s.cfg.Client.Txn(ctx, nil, ops[:n]); err != nil {
			return err
		}
		ops = ops[n:]
	}
	// The watch reports these writes back; knowing them now keeps the echo
	// from triggering another sync.
	for k, v := range want {
		s.out[k] = v
	}
	for k := range s.out {
		if _, ok := want[k]; !ok {
			delete(s.out, k)
		}
	}
	s.mu.Lock()
	s.stats.Services = len(want)
	s.stats.Syncs++
	s.stats.Puts += puts
	s.stats.Deletes += dels
	s.stats.LastSync = time.Now().UTC()
	s.stats.LastErr = ""
	s.mu.Unlock()
	if puts+dels > 0 {
		s.log.Info("servicesync: service records updated", "written", puts, "deleted", dels, "services", len(want))
	}
	return nil
}
