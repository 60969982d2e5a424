package localapi

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// kindOf maps an API kind argument to the canonical kind.
func kindOf(s string) (string, error) {
	for _, k := range []string{objects.KindService, objects.KindNetworkPolicy, objects.KindL2AnnouncementPolicy} {
		if strings.EqualFold(s, k) {
			return k, nil
		}
	}
	return "", api.Errorf(http.StatusBadRequest, "unknown kind %q: want %s, %s or %s", s, objects.KindService, objects.KindNetworkPolicy, objects.KindL2AnnouncementPolicy)
}

// Apply implements api.Backend: decode, validate and conflict-check the whole
// batch, persist it, and wait for the datapath. A bad batch changes nothing;
// one the datapath cannot take is rolled back.
func (h *Handlers) Apply(ctx context.Context, data []byte) (api.ApplyResult, error) {
	objs, err := objects.Decode(data)
	if err != nil {
		return api.ApplyResult{}, api.WithStatus(http.StatusBadRequest, err)
	}
	if h.mesh != nil {
		return h.mesh.Apply(ctx, objs)
	}
	h.mu.Lock()
	defer h.mu.Unlock()

	cur := h.objects()
	batch, err := desired.ValidateBatch(objs)
	if err != nil {
		return api.ApplyResult{}, err
	}
	if err := batch.CheckConflicts(cur); err != nil {
		return api.ApplyResult{}, err
	}

	res, put, err := batch.Plan(h.store.Object)
	if err != nil {
		return api.ApplyResult{}, err
	}
	if len(put) == 0 {
		return res, nil
	}

	undoPut, undoDel := h.undoFor(slices.Collect(maps.Keys(put)))
	if err := h.store.UpdateObjects(put, nil); err != nil {
		return api.ApplyResult{}, err
	}
	next := maps.Clone(cur)
	for k := range put {
		next[k] = batch.Objects[k]
	}
	h.local.Set(next)
	if err := h.rec.Converge(ctx); err != nil {
		h.rollbackObjects(cur, undoPut, undoDel)
		return api.ApplyResult{}, fmt.Errorf("the datapath did not take the change, nothing was applied: %w", err)
	}
	for _, r := range res.Objects {
		h.log.Info("object applied", "kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "action", r.Action)
	}
	return res, nil
}

// undoFor records how to put keys back as they are now.
func (h *Handlers) undoFor(keys []string) (put map[string][]byte, del []string) {
	put = map[string][]byte{}
	for _, k := range keys {
		if old, ok := h.store.Object(k); ok {
			put[k] = old
		} else {
			del = append(del, k)
		}
	}
	return put, del
}

func (h *Handlers) rollbackObjects(prev desired.Objects, put map[string][]byte, del []string) {
	if err := h.store.UpdateObjects(put, del); err != nil {
		h.log.Error("roll back objects", "err", err)
	}
	h.local.Set(prev)
	h.rec.Request()
}

// ListObjects implements api.Backend.
func (h *Handlers) ListObjects(ctx context.Context, kind string) ([]api.Object, error) {
	if kind != "" {
		k, err := kindOf(kind)
		if err != nil {
			return nil, err
		}
		kind = k
	}
	// Both modes answer from memory, never from etcd: the applied objects
	// the datapath enforces (in cluster mode the ones the watcher keeps,
	// or, until etcd was listed once, those the last run persisted). While
	// the kvstore is unreachable that is the last state seen; `isthmus
	// status` says whether it is connected.
	set := h.objects()
	var out []api.Object
	for _, key := range slices.Sorted(maps.Keys(set)) {
		o := set[key]
		if kind != "" && o.GetKind() != kind {
			continue
		}
		raw, err := json.Marshal(o)
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", key, err)
		}
		m := o.GetMeta()
		out = append(out, api.Object{Kind: o.GetKind(), Namespace: m.Namespace, Name: m.Name, Object: raw})
	}
	return out, nil
}

// DeleteObject implements api.Backend.
func (h *Handlers) DeleteObject(ctx context.Context, kind, namespace, name string) error {
	k, err := kindOf(kind)
	if err != nil {
		return err
	}
	if namespace == "" {
		namespace = objects.DefaultNamespace
	}
	key := k + "/" + namespace + "/" + name
	if h.mesh != nil {
		return h.mesh.DeleteObject(ctx, key)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	cur := h.objects()
	if _, ok := cur[key]; !ok {
		return api.Errorf(http.StatusNotFound, "%s %s/%s not found", k, namespace, name)
	}
	undoPut, _ := h.undoFor([]string{key})
	if err := h.store.UpdateObjects(nil, []string{key}); err != nil {
		return err
	}
	next := maps.Clone(cur)
	delete(next, key)
	h.local.Set(next)
	if err := h.rec.Converge(ctx); err != nil {
		h.rollbackObjects(cur, undoPut, nil)
		return fmt.Errorf("the datapath did not take the change, %s was not deleted: %w", key, err)
	}
	h.log.Info("object deleted", "kind", k, "namespace", namespace, "name", name)
	return nil
}
