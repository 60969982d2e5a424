package kvstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/backoff"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Config says how to reach etcd.
type Config struct {
	// Endpoints are etcd client URLs, e.g. "https://10.0.0.1:2379".
	Endpoints []string
	// TLS enables TLS when set. With a client certificate and etcd's
	// --client-cert-auth, the certificate's common name is the etcd user.
	TLS *tls.Config
	// Username and Password log in with etcd password auth (optional).
	Username, Password string
	// DialTimeout bounds Connect's first contact with etcd. Default 5 s.
	DialTimeout time.Duration
	// RequestTimeout bounds each attempt of a call; a timed out attempt is
	// retried while the caller's context allows. Default 10 s.
	RequestTimeout time.Duration
	// MaxRetries bounds the retries of one call after transient errors
	// (no leader, unavailable, timeout). Default 5.
	MaxRetries int
	// BackoffMin and BackoffMax bound the jittered exponential waits
	// between retries and between watch re-lists. Defaults 50 ms and 5 s.
	// BackoffMax also caps the wait before etcd is dialled again (which
	// starts at dialBackoffMin).
	BackoffMin, BackoffMax time.Duration
	// Logger receives the client's log lines. Default slog.Default().
	Logger *slog.Logger
	// Metrics, when set, counts the client's calls for Prometheus (see
	// NewMetrics); several clients may share one.
	Metrics *Metrics
}

// dialBackoffMin is the first wait before a failed connection to etcd is
// dialled again.
const dialBackoffMin = 200 * time.Millisecond

func (c *Config) setDefaults() {
	if c.DialTimeout <= 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = 10 * time.Second
	}
	if c.MaxRetries <= 0 {
		c.MaxRetries = 5
	}
	if c.BackoffMin <= 0 {
		c.BackoffMin = 50 * time.Millisecond
	}
	if c.BackoffMax <= 0 {
		c.BackoffMax = 5 * time.Second
	}
	if c.BackoffMax < c.BackoffMin {
		c.BackoffMax = c.BackoffMin
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Client is a connection to one etcd cluster. It is safe for concurrent use.
type Client struct {
	cli   *clientv3.Client
	cfg   Config
	log   *slog.Logger
	stats counters
	// ctx ends when the client is closed; background work (leases,
	// watches) stops with it.
	ctx    context.Context
	cancel context.CancelFunc
	// ident, for an in-process client (InProcess), gives each request's
	// context the identity the etcd server checks.
	ident func(context.Context) context.Context
}

// KeyValue is one key read from etcd.
type KeyValue struct {
	Key            string
	Value          []byte
	CreateRevision int64
	ModRevision    int64
	Lease          LeaseID
}

// Connect dials etcd and checks that it answers (and accepts the
// credentials) within DialTimeout, so that a wrong address, CA or client
// certificate is reported here, not at the first write.
func Connect(ctx context.Context, cfg Config) (*Client, error) {
	cfg.setDefaults()
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("kvstore: no etcd endpoints configured")
	}
	if cfg.TLS != nil {
		for _, ep := range cfg.Endpoints {
			if strings.HasPrefix(ep, "http://") {
				return nil, fmt.Errorf("kvstore: endpoint %s is plain http but TLS is configured", ep)
			}
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		TLS:         cfg.TLS,
		Username:    cfg.Username,
		Password:    cfg.Password,
		DialTimeout: cfg.DialTimeout,
		// etcd's own zap logs are noise for us; errors come back as
		// returned errors and we log those with slog.
		Logger:               zap.NewNop(),
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		// Ping also while no call is in flight, so that a dead connection
		// is noticed (and re-dialled) before the next call needs it.
		PermitWithoutStream: true,
		// gRPC's own re-dial backoff starts at 1 s and grows to 120 s: a
		// first attempt lost to a network that is still settling (a node
		// just joined its segment) left no second attempt inside
		// DialTimeout, and after a long etcd outage the mesh came back
		// up to two minutes late. Re-dial from 200 ms up to BackoffMax,
		// giving each attempt DialTimeout.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: dialBackoffMin, Multiplier: 1.6, Jitter: 0.2, MaxDelay: cfg.BackoffMax},
			MinConnectTimeout: cfg.DialTimeout,
		})},
	})
	if err != nil {
		return nil, fmt.Errorf("kvstore: connect to %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	cctx, cancel := context.WithCancel(context.Background())
	c := &Client{cli: cli, cfg: cfg, log: cfg.Logger, ctx: cctx, cancel: cancel}
	c.stats.m = cfg.Metrics
	if err := c.probe(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// probe asks every endpoint for its status at once and returns at the first
// answer, so a dead member (even the first one listed) costs nothing. Status
// needs an authenticated user when auth is on but no permission on any key,
// so it checks TLS, credentials and liveness without assuming a key layout.
func (c *Client) probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	results := make(chan error, len(c.cfg.Endpoints))
	for _, ep := range c.cfg.Endpoints {
		go func() {
			start := time.Now()
			_, err := c.cli.Status(ctx, ep)
			c.stats.observe(opStatus, start, err)
			if err != nil {
				err = fmt.Errorf("%s: %w", ep, err)
			}
			results <- err
		}()
	}
	var errs []error
	for range c.cfg.Endpoints {
		err := <-results
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	return fmt.Errorf("kvstore: no etcd endpoint answered within %s (wrong address, CA or client certificate?): %w",
		c.cfg.DialTimeout, errors.Join(errs...))
}

// Close stops leases and watches of this client and closes the connection.
// Leases are not revoked (their keys expire by TTL); use Lease.Close first
// to remove them at once.
// InProcess wraps cli, a client that calls an etcd server embedded in
// this process directly (v3client.New: no gRPC, no TLS, no encoding of the
// request), for a hot path of requests: the mirror's cache transactions,
// whose gRPC and TLS on both ends were about a sixth of the clustermesh
// server's CPU in a full sync. ident gives each request's context the
// identity etcd's auth checks: the embedded etcd takes a request's user
// from its TLS peer, which an in-process call does not have. Requests
// only (Get, Put, Txn, ...): its watches and leases are not covered by
// ident.
func InProcess(cli *clientv3.Client, cfg Config, ident func(context.Context) context.Context) *Client {
	cfg.setDefaults()
	cctx, cancel := context.WithCancel(context.Background())
	c := &Client{cli: cli, cfg: cfg, log: cfg.Logger, ctx: cctx, cancel: cancel, ident: ident}
	c.stats.m = cfg.Metrics
	return c
}

func (c *Client) Close() error {
	c.cancel()
	return c.cli.Close()
}

// Endpoints returns the configured endpoints.
func (c *Client) Endpoints() []string { return append([]string(nil), c.cfg.Endpoints...) }

// retryable reports whether err is a transient failure after which the same
// call may succeed: etcd has no leader, the connection is not ready, or the
// attempt timed out.
func retryable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted:
		return true
	}
	switch rpctypes.Error(err) {
	case rpctypes.ErrNoLeader, rpctypes.ErrLeaderChanged, rpctypes.ErrTimeout,
		rpctypes.ErrTimeoutDueToLeaderFail, rpctypes.ErrTimeoutDueToConnectionLost,
		rpctypes.ErrTooManyRequests:
		return true
	}
	return false
}

// do runs f with a per-attempt timeout, retrying transient errors with
// backoff while ctx allows. Only idempotent calls go through do: a retried
// Put writes the same value again, a retried Delete deletes nothing.
func (c *Client) do(ctx context.Context, o op, what string, f func(ctx context.Context) error) error {
	start := time.Now()
	b := backoff.Backoff{Min: c.cfg.BackoffMin, Max: c.cfg.BackoffMax}
	var err error
	for attempt := 0; ; attempt++ {
		actx, cancel := context.WithTimeout(c.identify(ctx), c.cfg.RequestTimeout)
		err = f(actx)
		cancel()
		if err == nil || ctx.Err() != nil || !retryable(err) || attempt >= c.cfg.MaxRetries {
			break
		}
		c.stats.retry()
		c.log.Debug("kvstore: retrying after transient error", "op", opNames[o], "key", what, "attempt", attempt+1, "err", err)
		if b.Wait(ctx) != nil {
			break
		}
	}
	c.stats.observe(o, start, err)
	if err != nil {
		return fmt.Errorf("kvstore: %s %s: %w", opNames[o], what, err)
	}
	return nil
}

func (c *Client) identify(ctx context.Context) context.Context {
	if c.ident != nil {
		return c.ident(ctx)
	}
	return ctx
}

// once runs f a single time with the per-attempt timeout: for calls that
// are not safe to repeat blindly (transactions), whose caller decides.
func (c *Client) once(ctx context.Context, o op, what string, f func(ctx context.Context) error) error {
	start := time.Now()
	actx, cancel := context.WithTimeout(c.identify(ctx), c.cfg.RequestTimeout)
	err := f(actx)
	cancel()
	c.stats.observe(o, start, err)
	if err != nil {
		return fmt.Errorf("kvstore: %s %s: %w", opNames[o], what, err)
	}
	return nil
}

func toKV(kv interface {
	GetKey() []byte
	GetValue() []byte
	GetCreateRevision() int64
	GetModRevision() int64
	GetLease() int64
}) KeyValue {
	return KeyValue{
		Key:            string(kv.GetKey()),
		Value:          kv.GetValue(),
		CreateRevision: kv.GetCreateRevision(),
		ModRevision:    kv.GetModRevision(),
		Lease:          LeaseID(kv.GetLease()),
	}
}

// Get reads one key. found is false when the key does not exist.
func (c *Client) Get(ctx context.Context, key string) (kv KeyValue, found bool, err error) {
	err = c.do(ctx, opGet, key, func(ctx context.Context) error {
		resp, err := c.cli.Get(ctx, key)
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 1 {
			kv, found = toKV(resp.Kvs[0]), true
		}
		return nil
	})
	return kv, found, err
}

// listPageSize bounds the keys read by one range request; big prefixes are
// read in pages at one revision, so the result is still one snapshot.
var listPageSize int64 = 5000

// listPages reads every key under prefix in pages of listPageSize, all at
// the revision of the first page (one consistent snapshot), and hands each
// page to page in key order, while the next page is already being read:
// a consumer of a big list works on the first keys while the rest is still
// on the wire. It makes one attempt (each page bounded by RequestTimeout);
// an error of page stops it and is returned as is.
func (c *Client) listPages(ctx context.Context, prefix string, page func([]KeyValue) error) (rev int64, err error) {
	start := time.Now()
	defer func() { c.stats.observe(opGetPrefix, start, err) }()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends a prefetch nobody waits for
	end := clientv3.GetPrefixRangeEnd(prefix)
	type result struct {
		resp *clientv3.GetResponse
		err  error
	}
	fetch := func(from string, rev int64) <-chan result {
		ch := make(chan result, 1)
		go func() {
			opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(listPageSize)}
			if rev != 0 {
				opts = append(opts, clientv3.WithRev(rev))
			}
			actx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
			defer cancel()
			resp, err := c.cli.Get(actx, from, opts...)
			ch <- result{resp, err}
		}()
		return ch
	}
	next := fetch(prefix, 0)
	for {
		r := <-next
		if r.err != nil {
			return 0, fmt.Errorf("kvstore: %s %s: %w", opNames[opGetPrefix], prefix, r.err)
		}
		if rev == 0 {
			rev = r.resp.Header.Revision
		}
		more := r.resp.More && len(r.resp.Kvs) > 0
		if more {
			next = fetch(string(r.resp.Kvs[len(r.resp.Kvs)-1].Key)+"\x00", rev)
		}
		kvs := make([]KeyValue, len(r.resp.Kvs))
		for i, kv := range r.resp.Kvs {
			kvs[i] = toKV(kv)
		}
		if err := page(kvs); err != nil {
			return 0, err
		}
		if !more {
			return rev, nil
		}
	}
}

// GetPrefix reads every key under prefix, sorted by key, as one consistent
// snapshot, and returns the revision of that snapshot.
func (c *Client) GetPrefix(ctx context.Context, prefix string) (kvs []KeyValue, rev int64, err error) {
	kvs, _, rev, err = c.getPrefix(ctx, prefix, 0)
	return kvs, rev, err
}

// GetPrefixSince is GetPrefix for a reader that holds the keys under
// prefix as of an earlier revision since-1: it returns only the keys
// modified since (ModRevision >= since), and count, the number of keys
// under prefix in the snapshot. Keys deleted since are not returned;
// the reader knows of some when it holds more keys than count after
// taking in kvs. Values that did not change do not cross the wire.
func (c *Client) GetPrefixSince(ctx context.Context, prefix string, since int64) (kvs []KeyValue, count, rev int64, err error) {
	return c.getPrefix(ctx, prefix, since)
}

func (c *Client) getPrefix(ctx context.Context, prefix string, since int64) (kvs []KeyValue, count, rev int64, err error) {
	err = c.do(ctx, opGetPrefix, prefix, func(ctx context.Context) error {
		kvs, count, rev = nil, 0, 0
		end := clientv3.GetPrefixRangeEnd(prefix)
		from := prefix
		for {
			opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(listPageSize)}
			if rev != 0 {
				opts = append(opts, clientv3.WithRev(rev))
			}
			if since > 0 {
				opts = append(opts, clientv3.WithMinModRev(since))
			}
			resp, err := c.cli.Get(ctx, from, opts...)
			if err != nil {
				return err
			}
			if rev == 0 {
				rev, count = resp.Header.Revision, resp.Count // the first page counts the whole prefix
			}
			for _, kv := range resp.Kvs {
				kvs = append(kvs, toKV(kv))
			}
			if !resp.More || len(resp.Kvs) == 0 {
				return nil
			}
			from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		}
	})
	return kvs, count, rev, err
}

// Put writes key without a lease: it stays until deleted.
func (c *Client) Put(ctx context.Context, key string, value []byte) error {
	return c.do(ctx, opPut, key, func(ctx context.Context) error {
		_, err := c.cli.Put(ctx, key, string(value))
		return err
	})
}

// PutLeased writes key attached to lease, so that it vanishes when the
// lease's owner dies. If the lease was lost, the error wraps ErrLeaseLost;
// the lease's OnRegrant callbacks are the place to write such keys again.
func (c *Client) PutLeased(ctx context.Context, key string, value []byte, lease *Lease) error {
	id := lease.ID()
	err := c.do(ctx, opPut, key, func(ctx context.Context) error {
		_, err := c.cli.Put(ctx, key, string(value), clientv3.WithLease(clientv3.LeaseID(id)))
		return err
	})
	if err = leaseErr(err); errors.Is(err, ErrLeaseLost) {
		lease.markLost(id)
	}
	return err
}

// Delete removes key. Deleting a missing key is not an error.
func (c *Client) Delete(ctx context.Context, key string) error {
	return c.do(ctx, opDelete, key, func(ctx context.Context) error {
		_, err := c.cli.Delete(ctx, key)
		return err
	})
}

// DeletePrefix removes every key under prefix and returns how many there
// were. An empty prefix is refused: it would wipe the whole keyspace.
func (c *Client) DeletePrefix(ctx context.Context, prefix string) (int64, error) {
	if prefix == "" {
		return 0, errors.New("kvstore: delete_prefix: refusing an empty prefix (it would delete every key)")
	}
	var n int64
	err := c.do(ctx, opDeletePrefix, prefix, func(ctx context.Context) error {
		resp, err := c.cli.Delete(ctx, prefix, clientv3.WithPrefix())
		if err != nil {
			return err
		}
		n += resp.Deleted
		return nil
	})
	return n, err
}

// Cond is a precondition of a transaction.
type Cond struct{ cmp clientv3.Cmp }

// KeyMissing holds while key does not exist.
func KeyMissing(key string) Cond {
	return Cond{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)}
}

// KeyExists holds while key exists.
func KeyExists(key string) Cond {
	return Cond{clientv3.Compare(clientv3.CreateRevision(key), ">", 0)}
}

// KeyModRevision holds while key was last written at rev (0: key missing).
// Read-then-write code uses it to write only if nothing changed since the
// read.
func KeyModRevision(key string, rev int64) Cond {
	return Cond{clientv3.Compare(clientv3.ModRevision(key), "=", rev)}
}

// KeyValueIs holds while key exists and has exactly value.
func KeyValueIs(key string, value []byte) Cond {
	return Cond{clientv3.Compare(clientv3.Value(key), "=", string(value))}
}

// PrefixEmpty holds while no key exists under prefix (etcd compares every
// key of the range; an empty range compares as a missing key).
func PrefixEmpty(prefix string) Cond {
	return Cond{clientv3.Compare(clientv3.CreateRevision(prefix), "=", 0).WithPrefix()}
}

// Op is a write of a transaction.
type Op struct {
	op clientv3.Op
	// lease, when set, is resolved at call time so that an Op built before
	// a re-grant uses the current lease.
	lease *Lease
	key   string
	value []byte
}

// OpPut writes key (without lease).
func OpPut(key string, value []byte) Op { return Op{op: clientv3.OpPut(key, string(value))} }

// OpPutLeased writes key attached to lease.
func OpPutLeased(key string, value []byte, lease *Lease) Op {
	return Op{lease: lease, key: key, value: value}
}

// OpDelete deletes key.
func OpDelete(key string) Op { return Op{op: clientv3.OpDelete(key)} }

// etcd returns the etcd op and the lease ID it uses (0: none).
func (o Op) etcd() (clientv3.Op, LeaseID) {
	if o.lease != nil {
		id := o.lease.ID()
		return clientv3.OpPut(o.key, string(o.value), clientv3.WithLease(clientv3.LeaseID(id))), id
	}
	return o.op, 0
}

// Etcd's limits of operations per transaction: its default (an external
// etcd as configured out of the box), and what Isthmus's embedded etcd
// accepts (etcdserver.MaxTxnOps).
const (
	DefaultMaxTxnOps  = 128
	EmbeddedMaxTxnOps = 1024
)

// TooManyOps reports whether err is etcd refusing a transaction for its
// number of operations.
func TooManyOps(err error) bool {
	return err != nil && strings.Contains(err.Error(), "too many operations")
}

// WriteOps applies plain puts and deletes (no conditions, no order among
// transactions) in transactions of up to EmbeddedMaxTxnOps; an etcd that
// refuses that many gets transactions of DefaultMaxTxnOps instead. The
// whole is not atomic: after an error, some transactions may have applied.
func (c *Client) WriteOps(ctx context.Context, ops []Op) error {
	for len(ops) > 0 {
		n := min(len(ops), EmbeddedMaxTxnOps)
		_, err := c.Txn(ctx, nil, ops[:n])
		if n > DefaultMaxTxnOps && TooManyOps(err) {
			err = c.writeChunks(ctx, ops[:n], DefaultMaxTxnOps)
		}
		if err != nil {
			return err
		}
		ops = ops[n:]
	}
	return nil
}

// writeChunks applies ops in transactions of size ops each.
func (c *Client) writeChunks(ctx context.Context, ops []Op, size int) error {
	for len(ops) > 0 {
		n := min(len(ops), size)
		if _, err := c.Txn(ctx, nil, ops[:n]); err != nil {
			return err
		}
		ops = ops[n:]
	}
	return nil
}

// Txn applies ops atomically if all conds hold and reports whether they
// did. It is not retried: after an ambiguous error (timeout, lost
// connection) the caller cannot know whether it applied and must re-read.
func (c *Client) Txn(ctx context.Context, conds []Cond, ops []Op) (applied bool, err error) {
	cmps := make([]clientv3.Cmp, len(conds))
	for i, cd := range conds {
		cmps[i] = cd.cmp
	}
	eops := make([]clientv3.Op, len(ops))
	leaseIDs := make([]LeaseID, len(ops))
	for i, o := range ops {
		eops[i], leaseIDs[i] = o.etcd()
	}
	what := "(no ops)"
	if len(ops) > 0 {
		what = string(eops[0].KeyBytes())
	}
	err = c.once(ctx, opTxn, what, func(ctx context.Context) error {
		resp, err := c.cli.Txn(ctx).If(cmps...).Then(eops...).Commit()
		if err != nil {
			return err
		}
		applied = resp.Succeeded
		return nil
	})
	if err = leaseErr(err); errors.Is(err, ErrLeaseLost) {
		for i, o := range ops {
			if o.lease != nil {
				o.lease.markLost(leaseIDs[i])
			}
		}
	}
	return applied, err
}

// CreateOnly writes key only if it does not exist yet (compare-and-swap on
// CreateRevision == 0) and reports whether this call created it.
func (c *Client) CreateOnly(ctx context.Context, key string, value []byte) (created bool, err error) {
	return c.Txn(ctx, []Cond{KeyMissing(key)}, []Op{OpPut(key, value)})
}

// CreateOnlyLeased is CreateOnly for a key attached to lease.
func (c *Client) CreateOnlyLeased(ctx context.Context, key string, value []byte, lease *Lease) (created bool, err error) {
	return c.Txn(ctx, []Cond{KeyMissing(key)}, []Op{OpPutLeased(key, value, lease)})
}
