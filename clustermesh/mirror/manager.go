package mirror

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Config configures a Manager.
type Config struct {
	// Local is this cluster's config (name, ID, pod CIDRs): remotes that
	// conflict with it are refused.
	Local records.ClusterConfig
	// Client is the local etcd, with write access to isthmus/ (the
	// server's root client).
	Client *kvstore.Client
	// Writer writes the cache's batched transactions, the hot path of a
	// full sync: the server gives its in-process client of the embedded
	// etcd (etcdserver.Server.InProcessClient). Nil: Client.
	Writer *kvstore.Client
	// CacheTTL: a remote unreachable for longer than this has its cache,
	// canaries and cluster config deleted. 0 keeps the last state of an
	// unreachable remote forever (like Cilium's default).
	CacheTTL time.Duration
	// ProbeInterval is how often a connected remote's cluster config is
	// re-read, to notice lost contact and changes. Default 5 s.
	ProbeInterval time.Duration
	// DialTimeout bounds connecting to a remote and each probe. Default 5 s.
	DialTimeout time.Duration
	// RetryMin and RetryMax bound the jittered exponential wait between
	// attempts to (re)connect a remote. Defaults 1 s and 30 s.
	RetryMin, RetryMax time.Duration
	// StatusInterval is how often changed statuses are written to
	// isthmus/status/remotes/. Default 1 s.
	StatusInterval time.Duration
	// MaxIPCachePerRemote caps the ipcache entries mirrored of each
	// remote: past it, the entries whose keys sort last are refused
	// (records.Gate), so one cluster cannot fill the agents' shared BPF
	// ipcache. 0: records.DefaultMaxIPCacheEntries; negative: no cap.
	MaxIPCachePerRemote int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// limits returns the records.Limits of every remote.
func (c *Config) limits() records.Limits {
	switch n := c.MaxIPCachePerRemote; {
	case n == 0:
		return records.Limits{MaxIPCache: records.DefaultMaxIPCacheEntries}
	case n < 0:
		return records.Limits{}
	default:
		return records.Limits{MaxIPCache: n}
	}
}

func (c *Config) setDefaults() {
	if c.ProbeInterval <= 0 {
		c.ProbeInterval = 5 * time.Second
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.RetryMin <= 0 {
		c.RetryMin = time.Second
	}
	if c.RetryMax <= 0 {
		c.RetryMax = 30 * time.Second
	}
	if c.RetryMax < c.RetryMin {
		c.RetryMax = c.RetryMin
	}
	if c.StatusInterval <= 0 {
		c.StatusInterval = time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Manager mirrors every remote cluster named under isthmus/remotes/ into
// the local etcd. See the package documentation.
type Manager struct {
	cfg Config
	kv  *kvstore.Client
	w   *kvstore.Client // Config.Writer
	log *slog.Logger

	mu sync.Mutex
	// remotes are the running mirrors, by cluster.
	remotes map[string]*remote
	// boxes hold the status of every cluster with a record (also refused
	// and invalid ones).
	boxes map[string]*statusBox
	// claims are the configs of the accepted remotes: a new remote must
	// not conflict with any of them (nor with the local cluster).
	claims map[string]records.ClusterConfig
	// stored are statuses read at start, for LastContact across restarts.
	stored map[string]Status

	// statusMu serialises status writes and deletions in etcd.
	statusMu sync.Mutex
	written  map[string][]byte

	// txns counts the cache transactions in flight, of all kind mirrors
	// (see kindMirror.flush).
	txnMu sync.Mutex
	txns  int
}

// New checks cfg and returns a Manager; Run starts it.
func New(cfg Config) (*Manager, error) {
	cfg.setDefaults()
	if cfg.Client == nil {
		return nil, errors.New("mirror: no local kvstore client")
	}
	if err := cfg.Local.Validate(); err != nil {
		return nil, fmt.Errorf("mirror: local cluster: %w", err)
	}
	w := cfg.Writer
	if w == nil {
		w = cfg.Client
	}
	return &Manager{
		cfg: cfg, kv: cfg.Client, w: w, log: cfg.Logger.With("component", "mirror"),
		remotes: map[string]*remote{}, boxes: map[string]*statusBox{},
		claims: map[string]records.ClusterConfig{}, stored: map[string]Status{},
		written: map[string][]byte{},
	}, nil
}

// Status returns the status of every remote with a record, sorted by name.
func (m *Manager) Status() []Status {
	m.mu.Lock()
	boxes := slices.Collect(maps.Values(m.boxes))
	m.mu.Unlock()
	out := make([]Status, 0, len(boxes))
	for _, b := range boxes {
		out = append(out, b.get())
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Cluster, b.Cluster) })
	return out
}

// Run mirrors until ctx ends. On return every remote has stopped; caches
// stay (a restarted server keeps serving them and reconciles them).
func (m *Manager) Run(ctx context.Context) error {
	if err := m.loadStored(ctx); err != nil {
		return err
	}
	var wg sync.WaitGroup
	wg.Go(func() { m.writeStatuses(ctx) })
	defer func() {
		m.mu.Lock()
		rs := slices.Collect(maps.Values(m.remotes))
		m.mu.Unlock()
		for _, r := range rs {
			r.stop()
		}
		wg.Wait()
	}()
	listed := false
	for ev := range m.kv.WatchPrefix(ctx, etcdserver.RemotesPrefix) {
		switch ev.Type {
		case kvstore.EventUpsert:
			m.upsert(ctx, ev.Key, ev.Value)
		case kvstore.EventDelete:
			m.remove(ctx, ev.Key)
		case kvstore.EventListDone:
			if !listed {
				listed = true
				m.cleanupOrphans(ctx)
			}
		}
	}
	return nil
}

// loadStored reads the statuses a previous run wrote, and pre-claims the
// remotes whose mirrored config is there: after a restart, the clusters
// that were accepted before win over newcomers that conflict with them.
func (m *Manager) loadStored(ctx context.Context) error {
	kvs, _, err := m.kv.GetPrefix(ctx, etcdserver.RemoteStatusPrefix)
	if err != nil {
		return fmt.Errorf("mirror: read stored status: %w", err)
	}
	for _, kv := range kvs {
		if st, err := DecodeStatus(kv.Value); err == nil {
			m.stored[st.Cluster] = st
		}
	}
	recs, _, err := m.kv.GetPrefix(ctx, etcdserver.RemotesPrefix)
	if err != nil {
		return fmt.Errorf("mirror: read remotes: %w", err)
	}
	for _, kv := range recs {
		r, err := DecodeRemote(kv.Key, kv.Value, m.cfg.Local.Name)
		if err != nil {
			continue
		}
		ckv, found, err := m.kv.Get(ctx, records.ClusterConfigKey(r.Name))
		if err != nil {
			return fmt.Errorf("mirror: read mirrored cluster config: %w", err)
		}
		if !found {
			continue
		}
		cfg, err := records.ValidateClusterConfig(ckv.Key, ckv.Value, r.Name, r.ClusterID)
		if err != nil {
			continue
		}
		_ = m.claim(r.Name, cfg) // a conflict is found again by the session
	}
	return nil
}

// box returns the status box of cluster name, creating it.
func (m *Manager) box(name string) *statusBox {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.boxes[name]
	if !ok {
		b = newStatusBox(name)
		if st, ok := m.stored[name]; ok {
			b.s.LastContact = st.LastContact
		}
		m.boxes[name] = b
	}
	return b
}

func (m *Manager) upsert(ctx context.Context, key string, value []byte) {
	name, err := ParseRemoteKey(key)
	if err != nil {
		m.log.Error("mirror: ignoring a key under isthmus/remotes/ that names no cluster", "key", key, "err", err)
		return
	}
	rec, err := DecodeRemote(key, value, m.cfg.Local.Name)
	m.mu.Lock()
	old := m.remotes[name]
	m.mu.Unlock()
	if err != nil {
		m.log.Error("mirror: invalid remote record: not mirroring this cluster", "cluster", name, "err", err)
		if old != nil {
			old.stop()
		}
		m.mu.Lock()
		delete(m.remotes, name)
		m.mu.Unlock()
		b := m.box(name)
		m.dropCache(ctx, name, b)
		b.update(func(s *Status) { s.setState(StateInvalid); s.Connected, s.CacheExpires = false, time.Time{} })
		b.setError(err)
		return
	}
	if old != nil {
		if old.rec.equal(rec) {
			return
		}
		// New credentials or endpoints: reconnect. The cache stays and
		// the new session reconciles it against its first list.
		old.stop()
	}
	b := m.box(name)
	b.update(func(s *Status) { s.ClusterID, s.KVStoreEndpoints = rec.ClusterID, slices.Clone(rec.Endpoints) })
	r := newRemote(m, rec, b)
	m.mu.Lock()
	m.remotes[name] = r
	m.mu.Unlock()
	m.log.Info("mirror: remote cluster configured", "cluster", name, "clusterID", rec.ClusterID, "endpoints", rec.Endpoints)
	r.start(ctx)
}

func (m *Manager) remove(ctx context.Context, key string) {
	name, err := ParseRemoteKey(key)
	if err != nil {
		return
	}
	m.mu.Lock()
	r := m.remotes[name]
	delete(m.remotes, name)
	m.mu.Unlock()
	if r != nil {
		r.stop()
	}
	b := m.box(name)
	m.dropCache(ctx, name, b)
	m.mu.Lock()
	delete(m.boxes, name)
	m.mu.Unlock()
	m.statusMu.Lock()
	delete(m.written, name)
	if err := m.kv.Delete(ctx, etcdserver.RemoteStatusKey(name)); err != nil && ctx.Err() == nil {
		m.log.Warn("mirror: delete remote status", "cluster", name, "err", err)
	}
	m.statusMu.Unlock()
	m.log.Info("mirror: remote cluster disconnected: its cache is deleted", "cluster", name)
}

// claim accepts cfg for remote name unless it conflicts with the local
// cluster or another accepted remote. Checking and claiming are one step,
// so two remotes with the same ID can never both be accepted.
func (m *Manager) claim(name string, cfg records.ClusterConfig) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := records.CheckClusterConflicts(m.cfg.Local, cfg); err != nil {
		return fmt.Errorf("conflicts with this cluster: %w", err)
	}
	for _, other := range slices.Sorted(maps.Keys(m.claims)) {
		if other == name {
			continue
		}
		if err := records.CheckClusterConflicts(m.claims[other], cfg); err != nil {
			return fmt.Errorf("conflicts with connected cluster %q: %w", other, err)
		}
	}
	m.claims[name] = cfg
	return nil
}

func (m *Manager) release(name string) {
	m.mu.Lock()
	delete(m.claims, name)
	m.mu.Unlock()
}

// dropCache deletes everything mirrored of cluster name from the local
// etcd: cache first (agents see deletions), then canaries, then the
// mirrored cluster config (whose presence marks a cluster that may have
// cache, see cleanupOrphans). It also releases the cluster's claim.
func (m *Manager) dropCache(ctx context.Context, name string, b *statusBox) {
	if name == m.cfg.Local.Name || records.ValidateClusterName(name) != nil {
		return
	}
	m.release(name)
	var errs []error
	n := int64(0)
	for _, k := range records.Kinds {
		d, err := m.kv.DeletePrefix(ctx, records.CachePrefix(k, name))
		n += d
		errs = append(errs, err)
	}
	_, err := m.kv.DeletePrefix(ctx, records.SyncedPrefix+name+"/")
	errs = append(errs, err)
	errs = append(errs, m.kv.Delete(ctx, records.ClusterConfigKey(name)))
	if err := errors.Join(errs...); err != nil {
		if ctx.Err() == nil {
			m.log.Error("mirror: deleting the cache of a remote failed", "cluster", name, "err", err)
		}
		if b != nil {
			b.setError(fmt.Errorf("delete cache: %w", err))
		}
		return
	}
	if b != nil {
		b.cleared()
		if n > 0 {
			b.update(func(s *Status) { s.LastChange = time.Now().UTC() })
		}
	}
	if n > 0 {
		m.log.Info("mirror: deleted the cache of a remote cluster", "cluster", name, "keys", n)
	}
}

// cleanupOrphans deletes what was mirrored of clusters whose record is
// gone (disconnected while this server was down).
func (m *Manager) cleanupOrphans(ctx context.Context) {
	names := map[string]bool{}
	if kvs, _, err := m.kv.GetPrefix(ctx, records.ClusterConfigPrefix); err == nil {
		for _, kv := range kvs {
			if n, err := records.ParseClusterConfigKey(kv.Key); err == nil {
				names[n] = true
			}
		}
	}
	if kvs, _, err := m.kv.GetPrefix(ctx, records.SyncedPrefix); err == nil {
		for _, kv := range kvs {
			if n, _, err := records.ParseSyncedKey(kv.Key); err == nil {
				names[n] = true
			}
		}
	}
	if kvs, _, err := m.kv.GetPrefix(ctx, etcdserver.RemoteStatusPrefix); err == nil {
		for _, kv := range kvs {
			names[strings.TrimPrefix(kv.Key, etcdserver.RemoteStatusPrefix)] = true
		}
	}
	delete(names, m.cfg.Local.Name)
	for _, name := range slices.Sorted(maps.Keys(names)) {
		m.mu.Lock()
		_, known := m.boxes[name]
		m.mu.Unlock()
		if known {
			continue
		}
		// A cluster with its own heartbeat here is not a mirror's copy
		// (the server refuses to start on such an etcd); leave it alone.
		if _, hb, err := m.kv.Get(ctx, records.HeartbeatKey(name)); err != nil || hb {
			continue
		}
		m.log.Info("mirror: deleting the cache of a cluster that is no longer connected", "cluster", name)
		m.dropCache(ctx, name, nil)
		if err := m.kv.Delete(ctx, etcdserver.RemoteStatusKey(name)); err != nil && ctx.Err() == nil {
			m.log.Warn("mirror: delete remote status", "cluster", name, "err", err)
		}
	}
}

// writeStatuses writes the statuses that changed, every StatusInterval.
func (m *Manager) writeStatuses(ctx context.Context) {
	t := time.NewTicker(m.cfg.StatusInterval)
	defer t.Stop()
	for {
		m.flushStatuses(ctx)
		select {
		case <-ctx.Done():
			// One last write with a fresh context: the final state
			// (e.g. "unreachable") is worth keeping for the next start.
			fctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			m.flushStatuses(fctx)
			cancel()
			return
		case <-t.C:
		}
	}
}

func (m *Manager) flushStatuses(ctx context.Context) {
	m.statusMu.Lock()
	defer m.statusMu.Unlock()
	m.mu.Lock()
	boxes := maps.Clone(m.boxes)
	m.mu.Unlock()
	for name, b := range boxes {
		data, err := marshalStatus(b.get())
		if err != nil || string(data) == string(m.written[name]) {
			continue
		}
		if err := m.kv.Put(ctx, etcdserver.RemoteStatusKey(name), data); err != nil {
			if ctx.Err() == nil {
				m.log.Warn("mirror: write remote status", "cluster", name, "err", err)
			}
			continue
		}
		m.written[name] = data
	}
}
