package kvstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/backoff"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// LeaseID is an etcd lease ID.
type LeaseID int64

// ErrLeaseLost is wrapped by errors of writes whose lease no longer exists
// (expired or revoked). The Lease re-grants itself; its OnRegrant callbacks
// write the keys again.
var ErrLeaseLost = errors.New("lease lost")

// isEtcdError reports whether err (or an error it wraps) is the etcd error
// target, also when it still is a raw gRPC status.
func isEtcdError(err, target error) bool {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if errors.Is(rpctypes.Error(e), target) {
			return true
		}
	}
	return false
}

func leaseErr(err error) error {
	if isEtcdError(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("%w: %w", ErrLeaseLost, err)
	}
	return err
}

// Lease is a lease kept alive in the background. When it is lost anyway (a
// partition longer than its TTL, a revoke, an etcd restore), a new lease is
// granted with backoff and the OnRegrant callbacks run, because every key
// that was attached to the old lease is gone.
type Lease struct {
	c   *Client
	ttl time.Duration

	mu        sync.Mutex
	id        LeaseID
	callbacks []func(ctx context.Context, id LeaseID)
	// expires is when etcd drops the lease at the latest, as of the last
	// grant or keepalive answer (estimated late by the answer's latency).
	expires time.Time

	// kick carries IDs that etcd reported as not found on a write, so the
	// loss is acted on at once and not only at the next keepalive (which,
	// at TTL/3, can be minutes away).
	kick chan LeaseID

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// markLost tells the keepalive loop that etcd no longer knows lease id.
func (l *Lease) markLost(id LeaseID) {
	select {
	case l.kick <- id:
	default:
	}
}

// GrantLease grants a lease of ttl (rounded up to whole seconds, at least
// one) and keeps it alive until Close or the client's Close.
func (c *Client) GrantLease(ctx context.Context, ttl time.Duration) (*Lease, error) {
	if ttl < time.Second {
		ttl = time.Second
	}
	id, err := c.grant(ctx, ttl)
	if err != nil {
		return nil, err
	}
	lctx, cancel := context.WithCancel(c.ctx)
	l := &Lease{c: c, ttl: ttl, id: id, kick: make(chan LeaseID, 1), ctx: lctx, cancel: cancel, done: make(chan struct{}),
		expires: time.Now().Add(ttl)}
	go l.run()
	return l, nil
}

func (c *Client) grant(ctx context.Context, ttl time.Duration) (LeaseID, error) {
	secs := int64((ttl + time.Second - 1) / time.Second)
	var id LeaseID
	err := c.do(ctx, opLeaseGrant, fmt.Sprintf("ttl=%ds", secs), func(ctx context.Context) error {
		resp, err := c.cli.Grant(ctx, secs)
		if err != nil {
			return err
		}
		id = LeaseID(resp.ID)
		return nil
	})
	return id, err
}

// ID returns the current lease ID; it changes after a re-grant.
func (l *Lease) ID() LeaseID {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.id
}

// Expires returns when etcd drops the lease unless it hears from this
// client again, as of the last keepalive answer: a holder that must stop
// acting before others may take over (an L2 leader) stops some margin
// before it.
func (l *Lease) Expires() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.expires
}

// TTL returns the lease's time to live as granted.
func (l *Lease) TTL() time.Duration { return l.ttl }

// OnRegrant registers f to run after the lease was lost and a new one was
// granted. f runs on the lease's goroutine, one callback after another,
// with a context that ends when the lease is closed; it should re-put the
// caller's leased keys and return.
func (l *Lease) OnRegrant(f func(ctx context.Context, id LeaseID)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.callbacks = append(l.callbacks, f)
}

// Close stops the keepalive and revokes the lease, which deletes every key
// attached to it at once.
func (l *Lease) Close(ctx context.Context) error {
	l.cancel()
	<-l.done
	return l.c.RevokeLease(ctx, l.ID())
}

// keepAlive drains keepalive responses until the channel closes (the lease
// expired or was revoked, no keepalive got through for a whole TTL, or
// Close) or a write reported the lease as gone.
func (l *Lease) keepAlive(ch <-chan *clientv3.LeaseKeepAliveResponse, id LeaseID) {
	for {
		select {
		case resp, ok := <-ch:
			if !ok {
				return
			}
			if resp.TTL > 0 {
				l.mu.Lock()
				l.expires = time.Now().Add(time.Duration(resp.TTL) * time.Second)
				l.mu.Unlock()
			}
		case lost := <-l.kick:
			if lost == id {
				return
			}
		}
	}
}

// run keeps the lease alive and replaces it when it is lost.
func (l *Lease) run() {
	defer close(l.done)
	b := backoff.Backoff{Min: l.c.cfg.BackoffMin, Max: l.c.cfg.BackoffMax}
	for {
		id := l.ID()
		kctx, kcancel := context.WithCancel(l.ctx)
		ch, err := l.c.cli.KeepAlive(kctx, clientv3.LeaseID(id))
		if err == nil {
			l.keepAlive(ch, id)
		}
		kcancel()
		if l.ctx.Err() != nil {
			return
		}
		l.c.log.Warn("kvstore: lease lost, granting a new one; keys attached to it are gone",
			"lease", id, "ttl", l.ttl, "err", err)
		var newID LeaseID
		for {
			newID, err = l.c.grant(l.ctx, l.ttl)
			if err == nil {
				break
			}
			if l.ctx.Err() != nil {
				return
			}
			l.c.log.Warn("kvstore: granting a replacement lease failed", "err", err)
			if b.Wait(l.ctx) != nil {
				return
			}
		}
		b.Reset()
		l.c.stats.leaseRegrant()
		l.mu.Lock()
		l.id = newID
		l.expires = time.Now().Add(l.ttl)
		cbs := append([]func(context.Context, LeaseID){}, l.callbacks...)
		l.mu.Unlock()
		l.c.log.Info("kvstore: lease re-granted", "old", id, "new", newID)
		for _, f := range cbs {
			f(l.ctx, newID)
		}
	}
}

// RevokeLease revokes a lease by ID, deleting every key attached to it: to
// clean up after a node known to be dead, or to inject a lease loss in
// tests. A missing lease is not an error.
func (c *Client) RevokeLease(ctx context.Context, id LeaseID) error {
	return c.do(ctx, opLeaseRevoke, fmt.Sprint(id), func(ctx context.Context) error {
		_, err := c.cli.Revoke(ctx, clientv3.LeaseID(id))
		if isEtcdError(err, rpctypes.ErrLeaseNotFound) {
			return nil
		}
		return err
	})
}
