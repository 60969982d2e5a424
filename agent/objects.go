package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// objectSet is an immutable snapshot of the applied objects by objects.Key.
// Mutations build a new set and swap it in, so the reconciler reads one
// without taking the API lock.
type objectSet map[string]objects.Object

func (s objectSet) split() (svcs []objects.Service, pols []objects.NetworkPolicy) {
	for _, k := range slices.Sorted(maps.Keys(s)) {
		switch o := s[k].(type) {
		case *objects.Service:
			svcs = append(svcs, *o)
		case *objects.NetworkPolicy:
			pols = append(pols, *o)
		}
	}
	return svcs, pols
}

func (a *Agent) objects() objectSet {
	// In cluster mode etcd is the source once it was listed; until then
	// the objects persisted by the last run keep the datapath as it was.
	if a.mesh != nil && a.mesh.tables.ObjectsListed() {
		return objectSet(a.mesh.tables.Objects())
	}
	if p := a.objSet.Load(); p != nil {
		return *p
	}
	return objectSet{}
}

func (a *Agent) setObjects(s objectSet) { a.objSet.Store(&s) }

// loadObjects decodes the stored objects. They were validated when applied;
// one that no longer decodes (an older agent wrote it) stops the start.
func (a *Agent) loadObjects() error {
	set := objectSet{}
	for key, raw := range a.store.Objects() {
		objs, err := objects.Decode(raw)
		if err != nil {
			return fmt.Errorf("stored object %s in %s does not decode: %w (delete it from the file or fix it)", key, a.store.Dir(), err)
		}
		if len(objs) != 1 || objects.Key(objs[0]) != key {
			return fmt.Errorf("stored object %s in %s does not match its key", key, a.store.Dir())
		}
		set[key] = objs[0]
	}
	a.setObjects(set)
	return nil
}

// kindOf maps an API kind argument to the canonical kind.
func kindOf(s string) (string, error) {
	for _, k := range []string{objects.KindService, objects.KindNetworkPolicy} {
		if strings.EqualFold(s, k) {
			return k, nil
		}
	}
	return "", api.Errorf(http.StatusBadRequest, "unknown kind %q: want %s or %s", s, objects.KindService, objects.KindNetworkPolicy)
}

// Apply implements api.Backend: decode, validate and conflict-check the whole
// batch, persist it, and wait for the datapath. A bad batch changes nothing;
// one the datapath cannot take is rolled back.
func (a *Agent) Apply(ctx context.Context, data []byte) (api.ApplyResult, error) {
	objs, err := objects.Decode(data)
	if err != nil {
		return api.ApplyResult{}, api.WithStatus(http.StatusBadRequest, err)
	}
	if a.mesh != nil {
		return a.applyMesh(ctx, objs)
	}
	a.mu.Lock()
	defer a.mu.Unlock()

	cur := a.objects()
	batch, order, err := validateBatch(objs)
	if err != nil {
		return api.ApplyResult{}, err
	}
	if err := checkServiceConflicts(cur, batch, order); err != nil {
		return api.ApplyResult{}, err
	}

	res, put, err := planApply(batch, order, a.store.Object)
	if err != nil {
		return api.ApplyResult{}, err
	}
	if len(put) == 0 {
		return res, nil
	}

	undoPut, undoDel := a.undoFor(slices.Collect(maps.Keys(put)))
	if err := a.store.UpdateObjects(put, nil); err != nil {
		return api.ApplyResult{}, err
	}
	next := maps.Clone(cur)
	for k := range put {
		next[k] = batch[k]
	}
	a.setObjects(next)
	if err := a.converge(ctx); err != nil {
		a.rollbackObjects(cur, undoPut, undoDel)
		return api.ApplyResult{}, fmt.Errorf("the datapath did not take the change, nothing was applied: %w", err)
	}
	for _, r := range res.Objects {
		a.log.Info("object applied", "kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "action", r.Action)
	}
	return res, nil
}

// validateBatch validates every object of an apply and indexes them by
// key, in input order.
// planApply says per object of the batch (in order) whether applying it
// creates, changes or leaves it unchanged, given what stored returns for a
// key, and returns the encoded objects to write.
func planApply(batch map[string]objects.Object, order []string, stored func(key string) ([]byte, bool)) (api.ApplyResult, map[string][]byte, error) {
	var res api.ApplyResult
	put := map[string][]byte{}
	for _, key := range order {
		o := batch[key]
		raw, err := json.Marshal(o)
		if err != nil {
			return api.ApplyResult{}, nil, fmt.Errorf("encode %s: %w", key, err)
		}
		m := o.GetMeta()
		r := api.ObjectResult{Kind: o.GetKind(), Namespace: m.Namespace, Name: m.Name, Action: api.ActionCreated}
		if old, ok := stored(key); ok {
			r.Action = api.ActionConfigured
			if jsonEqual(old, raw) {
				r.Action = api.ActionUnchanged
			}
		}
		if r.Action != api.ActionUnchanged {
			put[key] = raw
		}
		res.Objects = append(res.Objects, r)
	}
	return res, put, nil
}

func validateBatch(objs []objects.Object) (map[string]objects.Object, []string, error) {
	batch := map[string]objects.Object{}
	var order []string
	for _, o := range objs {
		key := objects.Key(o)
		if err := o.Validate(); err != nil {
			return nil, nil, api.Errorf(http.StatusBadRequest, "%s: %w", key, err)
		}
		if _, dup := batch[key]; dup {
			return nil, nil, api.Errorf(http.StatusBadRequest, "%s appears more than once in the input", key)
		}
		// The global-service annotations are checked in every mode, so a
		// manifest that works on one node also works cluster-wide.
		if s, ok := o.(*objects.Service); ok {
			if _, err := service.GlobalOf(*s); err != nil {
				return nil, nil, api.Errorf(http.StatusBadRequest, "%s: %w", key, err)
			}
		}
		batch[key] = o
		order = append(order, key)
	}
	return batch, order, nil
}

// checkServiceConflicts refuses a batch in which a Service claims a frontend
// (VIP, port, protocol) that another Service holds: one already applied and
// not replaced by the batch, or an earlier one of the same batch. An index
// of frontends keeps this linear in the number of services; the message
// comes from objects.CheckConflicts.
func checkServiceConflicts(cur objectSet, batch map[string]objects.Object, order []string) error {
	owner := map[bpf.Frontend]*objects.Service{}
	index := func(s *objects.Service) {
		fs, _ := s.Frontends()
		for _, f := range fs {
			owner[f] = s
		}
	}
	for key, o := range cur {
		if s, ok := o.(*objects.Service); ok {
			if _, replaced := batch[key]; !replaced {
				index(s)
			}
		}
	}
	for _, key := range order {
		s, ok := batch[key].(*objects.Service)
		if !ok {
			continue
		}
		fs, err := s.Frontends()
		if err != nil {
			return api.WithStatus(http.StatusBadRequest, err)
		}
		for _, f := range fs {
			if other, taken := owner[f]; taken && objects.Key(other) != key {
				err := objects.CheckConflicts([]objects.Service{*other}, *s)
				if err == nil {
					err = fmt.Errorf("%s: frontend %s is already used by %s", key, f, objects.Key(other))
				}
				return api.WithStatus(http.StatusConflict, err)
			}
		}
		index(s)
	}
	return nil
}

// undoFor records how to put keys back as they are now.
func (a *Agent) undoFor(keys []string) (put map[string][]byte, del []string) {
	put = map[string][]byte{}
	for _, k := range keys {
		if old, ok := a.store.Object(k); ok {
			put[k] = old
		} else {
			del = append(del, k)
		}
	}
	return put, del
}

func (a *Agent) rollbackObjects(prev objectSet, put map[string][]byte, del []string) {
	if err := a.store.UpdateObjects(put, del); err != nil {
		a.log.Error("roll back objects", "err", err)
	}
	a.setObjects(prev)
	a.rec.request()
}

// jsonOf encodes an object as stored.
func jsonOf(o objects.Object) ([]byte, error) { return json.Marshal(o) }

func jsonEqual(a, b []byte) bool {
	var x, y bytes.Buffer
	if json.Compact(&x, a) != nil || json.Compact(&y, b) != nil {
		return false
	}
	return bytes.Equal(x.Bytes(), y.Bytes())
}

// ListObjects implements api.Backend.
func (a *Agent) ListObjects(ctx context.Context, kind string) ([]api.Object, error) {
	if kind != "" {
		k, err := kindOf(kind)
		if err != nil {
			return nil, err
		}
		kind = k
	}
	if a.mesh != nil {
		return a.listMeshObjects(ctx, kind)
	}
	set := a.objects()
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
func (a *Agent) DeleteObject(ctx context.Context, kind, namespace, name string) error {
	k, err := kindOf(kind)
	if err != nil {
		return err
	}
	if namespace == "" {
		namespace = objects.DefaultNamespace
	}
	key := k + "/" + namespace + "/" + name
	if a.mesh != nil {
		return a.deleteMeshObject(ctx, key)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	cur := a.objects()
	if _, ok := cur[key]; !ok {
		return api.Errorf(http.StatusNotFound, "%s %s/%s not found", k, namespace, name)
	}
	undoPut, _ := a.undoFor([]string{key})
	if err := a.store.UpdateObjects(nil, []string{key}); err != nil {
		return err
	}
	next := maps.Clone(cur)
	delete(next, key)
	a.setObjects(next)
	if err := a.converge(ctx); err != nil {
		a.rollbackObjects(cur, undoPut, nil)
		return fmt.Errorf("the datapath did not take the change, %s was not deleted: %w", key, err)
	}
	a.log.Info("object deleted", "kind", k, "namespace", namespace, "name", name)
	return nil
}
