package clustermode

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// configWriteAttempts bounds the retries of an apply or delete that lost
// the race against a concurrent write of applied objects.
const configWriteAttempts = 8

// Apply is the local API's apply in cluster mode: validate, check VIP
// conflicts against the objects in etcd, write the batch in one
// transaction, then wait until this node's watcher brought it into the
// datapath.
func (m *Mesh) Apply(ctx context.Context, objs []objects.Object) (api.ApplyResult, error) {
	batch, err := desired.ValidateBatch(objs)
	if err != nil {
		return api.ApplyResult{}, err
	}
	c, err := m.kv()
	if err != nil {
		return api.ApplyResult{}, err
	}
	ctx = context.WithoutCancel(ctx) // a started write is seen through

	var res api.ApplyResult
	var put map[string][]byte
	for attempt := 1; ; attempt++ {
		cur, err := m.readConfig(ctx, c, "")
		if err != nil {
			return api.ApplyResult{}, api.WithStatus(http.StatusServiceUnavailable, err)
		}
		if err := batch.CheckConflictsMemo(desired.Objects(cur.Objects), &m.frontends); err != nil {
			return api.ApplyResult{}, err
		}
		res, put, err = batch.Plan(func(key string) ([]byte, bool) {
			raw, ok := cur.Raw[key]
			return raw, ok
		})
		if err != nil {
			return api.ApplyResult{}, err
		}
		if len(put) == 0 {
			return res, nil
		}
		err = meshsync.WriteConfig(ctx, c, cur, m.cfg.Local.Cluster, put, nil)
		if errors.Is(err, meshsync.ErrConcurrentChange) && attempt < configWriteAttempts {
			continue
		}
		if err != nil {
			// A transaction that timed out may or may not have applied:
			// say so rather than guess.
			return api.ApplyResult{}, api.Errorf(http.StatusServiceUnavailable, "store objects in the kvstore (check with get whether they were stored): %w", err)
		}
		break
	}
	for _, r := range res.Objects {
		m.log.Info("object applied to the cluster", "kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "action", r.Action)
	}
	// The watch has delivered the objects when the tables hold the values
	// written, byte for byte; the reconciler reads its objects from the
	// same tables. (Comparing against the objects with status rebuilt
	// that snapshot on every poll while a bulk apply streamed in.)
	m.await(ctx, func() bool { return m.tables.HasObjects(put) })
	return res, nil
}

// awaitObjects waits until the applied objects the reconciler reads satisfy
// done and the datapath reflects them, at most reconcile.ConvergeTimeout. The change
// is already stored cluster-wide, so running late is logged, not failed.
func (m *Mesh) awaitObjects(ctx context.Context, done func(desired.Objects) bool) {
	m.await(ctx, func() bool { return done(m.cfg.Objects()) })
}

// await is awaitObjects with a condition that reads what it needs itself.
func (m *Mesh) await(ctx context.Context, done func() bool) {
	deadline := time.Now().Add(reconcile.ConvergeTimeout)
	for !done() {
		if time.Now().After(deadline) {
			m.log.Warn("clustermesh: stored in the kvstore, but this node's watcher has not delivered it yet", "waited", reconcile.ConvergeTimeout)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
	if err := m.cfg.Converge(ctx); err != nil {
		m.log.Warn("clustermesh: stored in the kvstore, but the local datapath has not taken it yet", "err", err)
	}
}

// DeleteObject is the local API's delete in cluster mode; key is an
// objects.Key.
func (m *Mesh) DeleteObject(ctx context.Context, key string) error {
	c, err := m.kv()
	if err != nil {
		return err
	}
	ctx = context.WithoutCancel(ctx)
	for attempt := 1; ; attempt++ {
		cur, err := m.readConfig(ctx, c, kindOfKey(key))
		if err != nil {
			return api.WithStatus(http.StatusServiceUnavailable, err)
		}
		if _, ok := cur.Raw[key]; !ok {
			return api.Errorf(http.StatusNotFound, "%s not found", key)
		}
		err = meshsync.WriteConfig(ctx, c, cur, m.cfg.Local.Cluster, nil, []string{key})
		if errors.Is(err, meshsync.ErrConcurrentChange) && attempt < configWriteAttempts {
			continue
		}
		if err != nil {
			return api.Errorf(http.StatusServiceUnavailable, "delete %s from the kvstore: %w", key, err)
		}
		break
	}
	m.log.Info("object deleted from the cluster", "key", key)
	m.awaitObjects(ctx, func(set desired.Objects) bool {
		_, ok := set[key]
		return !ok
	})
	return nil
}

// kindOfKey returns the kind of an objects.Key.
func kindOfKey(key string) string {
	kind, _, _ := strings.Cut(key, "/")
	return kind
}

// kvstoreReadTimeout bounds how long a CLI request waits for an unreachable
// cluster kvstore before it is told so (the kvstore client retries inside).
const kvstoreReadTimeout = 10 * time.Second

// readConfig reads the applied objects from etcd, failing within
// kvstoreReadTimeout with an error that says the kvstore is unreachable.
func (m *Mesh) readConfig(ctx context.Context, c *kvstore.Client, kind string) (meshsync.Config, error) {
	rctx, cancel := context.WithTimeout(ctx, kvstoreReadTimeout)
	defer cancel()
	cur, err := m.configs.Read(rctx, c, kind)
	if err != nil {
		return cur, fmt.Errorf("the cluster's kvstore is unreachable (is isthmus-clustermesh running? `isthmus status` shows the connection): %w", err)
	}
	return cur, nil
}
