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
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipam"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// kindOf maps an API kind argument to the canonical kind.
func kindOf(s string) (string, error) {
	kinds := []string{objects.KindService, objects.KindNetworkPolicy, objects.KindLoadBalancerIPPool, objects.KindBGPPeeringPolicy, objects.KindL2AnnouncementPolicy}
	for _, k := range kinds {
		if strings.EqualFold(s, k) {
			return k, nil
		}
	}
	return "", api.Errorf(http.StatusBadRequest, "unknown kind %q: want one of %s", s, strings.Join(kinds, ", "))
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
	next := maps.Clone(cur)
	for k := range put {
		next[k] = batch.Objects[k]
	}
	next, err = h.allocateLB(cur, next)
	if err != nil {
		return api.ApplyResult{}, err
	}
	if err := h.store.UpdateObjects(put, nil); err != nil {
		h.restoreLB(cur)
		return api.ApplyResult{}, err
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

// allocateLB runs LB-IPAM (standalone mode) for the objects next will
// be, starting from the assignments cur's services hold, and stores the
// assignments when they change, before anything else is stored: a crash
// in between leaves addresses reserved for objects not applied, which the
// next start frees, never an address handed out twice.
func (h *Handlers) allocateLB(cur, next desired.Objects) (desired.Objects, error) {
	prev := lbipam.FromObjects(cur)
	next, asg := desired.AllocateLB(next, prev)
	if lbipam.Equal(prev, asg) {
		return next, nil
	}
	if err := h.store.SaveLBAssignments(lbipam.ToRecords(asg)); err != nil {
		return nil, fmt.Errorf("store LB-IPAM's assignments, nothing was applied: %w", err)
	}
	return next, nil
}

// restoreLB stores the assignments of cur again (a rollback).
func (h *Handlers) restoreLB(cur desired.Objects) {
	if err := h.store.SaveLBAssignments(lbipam.ToRecords(lbipam.FromObjects(cur))); err != nil {
		h.log.Error("roll back LB-IPAM's assignments", "err", err)
	}
}

func (h *Handlers) rollbackObjects(prev desired.Objects, put map[string][]byte, del []string) {
	if err := h.store.UpdateObjects(put, del); err != nil {
		h.log.Error("roll back objects", "err", err)
	}
	h.restoreLB(prev)
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
	next := maps.Clone(cur)
	delete(next, key)
	next, err = h.allocateLB(cur, next)
	if err != nil {
		return err
	}
	if err := h.store.UpdateObjects(nil, []string{key}); err != nil {
		h.restoreLB(cur)
		return err
	}
	h.local.Set(next)
	if err := h.rec.Converge(ctx); err != nil {
		h.rollbackObjects(cur, undoPut, nil)
		return fmt.Errorf("the datapath did not take the change, %s was not deleted: %w", key, err)
	}
	h.log.Info("object deleted", "kind", k, "namespace", namespace, "name", name)
	return nil
}
