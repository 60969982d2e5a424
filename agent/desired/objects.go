package desired

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// Objects is an immutable snapshot of the applied objects by objects.Key.
// Mutations build a new set and swap it in, so the reconciler reads one
// without taking the API lock.
type Objects map[string]objects.Object

// Split returns the services and the policies, in key order.
func (s Objects) Split() (svcs []objects.Service, pols []objects.NetworkPolicy) {
	svcs, _, pols = s.SplitSources()
	return svcs, pols
}

// SplitSources is Split with the objects the services are copied from
// (src[i] for svcs[i]; desired.State.ServiceSources).
func (s Objects) SplitSources() (svcs []objects.Service, src []*objects.Service, pols []objects.NetworkPolicy) {
	keys := slices.Sorted(maps.Keys(s))
	nSvcs := 0
	for _, o := range s {
		if _, ok := o.(*objects.Service); ok {
			nSvcs++
		}
	}
	svcs, src = make([]objects.Service, 0, nSvcs), make([]*objects.Service, 0, nSvcs)
	for _, k := range keys {
		switch o := s[k].(type) {
		case *objects.Service:
			svcs = append(svcs, *o)
			src = append(src, o)
		case *objects.NetworkPolicy:
			pols = append(pols, *o)
		}
	}
	return svcs, src, pols
}

// Policies returns the network policies, in key order, without copying
// the services.
func (s Objects) Policies() []objects.NetworkPolicy {
	var keys []string
	for k, o := range s {
		if _, ok := o.(*objects.NetworkPolicy); ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var out []objects.NetworkPolicy
	for _, k := range keys {
		out = append(out, *s[k].(*objects.NetworkPolicy))
	}
	return out
}

// L2Policies returns the L2 announcement policies, in key order.
func (s Objects) L2Policies() []objects.L2AnnouncementPolicy {
	var out []objects.L2AnnouncementPolicy
	for _, k := range slices.Sorted(maps.Keys(s)) {
		if p, ok := s[k].(*objects.L2AnnouncementPolicy); ok {
			out = append(out, *p)
		}
	}
	return out
}

// ObjectTable holds the objects applied on this node (standalone mode),
// or, in cluster mode, the ones persisted by the last run until etcd is
// listed. The zero value is empty.
type ObjectTable struct{ p atomic.Pointer[versioned] }

type versioned struct {
	objs Objects
	gen  uint64
}

// Get returns the current snapshot.
func (t *ObjectTable) Get() Objects {
	o, _ := t.GetGen()
	return o
}

// GetGen returns the current snapshot and its generation (bumped by every
// Set).
func (t *ObjectTable) GetGen() (Objects, uint64) {
	if p := t.p.Load(); p != nil {
		return p.objs, p.gen
	}
	return Objects{}, 0
}

// Set swaps in a new snapshot. Sets are serialised by the caller (the
// local API's lock).
func (t *ObjectTable) Set(s Objects) {
	_, gen := t.GetGen()
	t.p.Store(&versioned{objs: s, gen: gen + 1})
}

// LoadObjects decodes the objects stored in store. They were validated when
// applied; one that no longer decodes (an older agent wrote it) is an error.
func LoadObjects(store *state.Store) (Objects, error) {
	set := Objects{}
	for key, raw := range store.Objects() {
		objs, err := objects.Decode(raw)
		if err != nil {
			return nil, fmt.Errorf("stored object %s in %s does not decode: %w (delete it from the file or fix it)", key, store.Dir(), err)
		}
		if len(objs) != 1 || objects.Key(objs[0]) != key {
			return nil, fmt.Errorf("stored object %s in %s does not match its key", key, store.Dir())
		}
		set[key] = objs[0]
	}
	return set, nil
}

// Batch is a validated apply: the objects by key, and the keys in input
// order.
type Batch struct {
	Objects map[string]objects.Object
	Order   []string
}

// ValidateBatch validates every object of an apply and indexes them by
// key, in input order.
func ValidateBatch(objs []objects.Object) (Batch, error) {
	b := Batch{Objects: map[string]objects.Object{}}
	for _, o := range objs {
		key := objects.Key(o)
		if err := o.Validate(); err != nil {
			return Batch{}, api.Errorf(http.StatusBadRequest, "%s: %w", key, err)
		}
		if _, dup := b.Objects[key]; dup {
			return Batch{}, api.Errorf(http.StatusBadRequest, "%s appears more than once in the input", key)
		}
		// The global-service annotations are checked in every mode, so a
		// manifest that works on one node also works cluster-wide.
		if s, ok := o.(*objects.Service); ok {
			if _, err := service.GlobalOf(*s); err != nil {
				return Batch{}, api.Errorf(http.StatusBadRequest, "%s: %w", key, err)
			}
		}
		b.Objects[key] = o
		b.Order = append(b.Order, key)
	}
	return b, nil
}

// Plan says per object of the batch (in order) whether applying it
// creates, changes or leaves it unchanged, given what stored returns for a
// key, and returns the encoded objects to write.
func (b Batch) Plan(stored func(key string) ([]byte, bool)) (api.ApplyResult, map[string][]byte, error) {
	var res api.ApplyResult
	put := map[string][]byte{}
	for _, key := range b.Order {
		o := b.Objects[key]
		raw, err := json.Marshal(o)
		if err != nil {
			return api.ApplyResult{}, nil, fmt.Errorf("encode %s: %w", key, err)
		}
		m := o.GetMeta()
		r := api.ObjectResult{Kind: o.GetKind(), Namespace: m.Namespace, Name: m.Name, Action: api.ActionCreated}
		if old, ok := stored(key); ok {
			r.Action = api.ActionConfigured
			if JSONEqual(old, raw) {
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

// CheckConflicts refuses a batch in which a Service claims a frontend
// (VIP, external address or node port; port, protocol) that another
// Service holds, or a
// LoadBalancerIPPool shares addresses with another pool: one already
// applied (in cur) and not replaced by the batch, or an earlier one of the
// same batch. An index of frontends keeps this linear in the number of services;
// the message comes from objects.CheckConflicts.
func (b Batch) CheckConflicts(cur Objects) error {
	return b.CheckConflictsMemo(cur, nil)
}

// CheckConflictsMemo is CheckConflicts taking the frontends of cur's
// services from memo (nil: none), which a caller keeps from one apply to
// the next when cur holds the same objects each time (cluster mode reads
// them through a cache): the frontends of every applied service,
// computed again per apply, were a tenth of a bulk apply's CPU.
func (b Batch) CheckConflictsMemo(cur Objects, memo *FrontendMemo) error {
	owner := map[bpf.Frontend]*objects.Service{}
	index := func(s *objects.Service, fs []bpf.Frontend) {
		for _, f := range fs {
			owner[f] = s
		}
	}
	defer memo.done()
	for key, o := range cur {
		if s, ok := o.(*objects.Service); ok {
			if _, replaced := b.Objects[key]; !replaced {
				index(s, memo.frontends(s))
			}
		}
	}
	for _, key := range b.Order {
		s, ok := b.Objects[key].(*objects.Service)
		if !ok {
			continue
		}
		fs, err := s.AllFrontends()
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
		index(s, fs)
	}
	return b.checkPools(cur)
}

// FrontendMemo keeps Service.AllFrontends per service object (objects
// are immutable once decoded) for CheckConflictsMemo; it holds those of
// the last call's services only. The zero value is ready; it is safe for
// concurrent use (one call at a time).
type FrontendMemo struct {
	mu         sync.Mutex
	last, next map[*objects.Service][]bpf.Frontend
}

// frontends returns s.AllFrontends(), from the memo when it has them; a
// nil memo computes them. The first use in a call locks the memo until
// done.
func (m *FrontendMemo) frontends(s *objects.Service) []bpf.Frontend {
	if m == nil {
		fs, _ := s.AllFrontends()
		return fs
	}
	if m.next == nil {
		m.mu.Lock()
		m.next = map[*objects.Service][]bpf.Frontend{}
	}
	fs, ok := m.last[s]
	if !ok {
		fs, _ = s.AllFrontends()
	}
	m.next[s] = fs
	return fs
}

// done ends a call: what it did not use is forgotten.
func (m *FrontendMemo) done() {
	if m == nil || m.next == nil {
		return
	}
	m.last, m.next = m.next, nil
	m.mu.Unlock()
}

// checkPools refuses a batch in which a LoadBalancerIPPool shares an
// address with another pool: one applied (in cur) and not replaced by the
// batch, or an earlier one of the batch. An address in two pools would
// have two owners, so overlaps are refused at the door.
func (b Batch) checkPools(cur Objects) error {
	var pools []objects.LoadBalancerIPPool
	for key, o := range cur {
		if p, ok := o.(*objects.LoadBalancerIPPool); ok {
			if _, replaced := b.Objects[key]; !replaced {
				pools = append(pools, *p)
			}
		}
	}
	slices.SortFunc(pools, func(x, y objects.LoadBalancerIPPool) int { return strings.Compare(x.Metadata.Name, y.Metadata.Name) })
	for _, key := range b.Order {
		p, ok := b.Objects[key].(*objects.LoadBalancerIPPool)
		if !ok {
			continue
		}
		if err := objects.CheckPoolOverlap(pools, *p); err != nil {
			return api.WithStatus(http.StatusConflict, err)
		}
		pools = append(pools, *p)
	}
	return nil
}

// JSONEqual reports whether two encoded objects are the same, ignoring
// white space.
func JSONEqual(a, b []byte) bool {
	var x, y bytes.Buffer
	if json.Compact(&x, a) != nil || json.Compact(&y, b) != nil {
		return false
	}
	return bytes.Equal(x.Bytes(), y.Bytes())
}
