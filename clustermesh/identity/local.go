package identity

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
	"io/fs"
	"os"
	"slices"
	"sync"
)

// Local is an Allocator that keeps its state in memory and in a JSON file,
// written atomically whenever the set of identities changes. It is safe
// for concurrent use.
//
// A reference taken on or dropped from an identity that stays is counted
// in memory only: each write is two fsyncs, and most endpoint adds and
// deletes of a node only move a count. The counts in the file are as of
// the last change of the set, so after a restart the user sets them
// again from what uses them (SetRefs; the agent does, from its
// endpoints) before it allocates or releases anything.
//
// Every change rewrites the whole file, which is fine for the few hundred
// identities one node or a test uses; the etcd allocator is the scalable one.
type Local struct {
	mu        sync.Mutex
	path      string
	clusterID uint32
	// maxLocal bounds n in clusterID<<20|n; tests lower it to reach
	// exhaustion quickly.
	maxLocal uint32
	byID     map[uint32]*entry
	byKey    map[string]uint32 // Labels.String() -> ID
	// next is the n tried first by the next allocation. It only moves
	// forward (wrapping), so a freed ID is not handed out again right away
	// and a stale reference to it is less likely to hit a new owner.
	next uint32
	// version counts the changes of the set of identities (not of their
	// references), from 1: see Version.
	version uint64
}

type entry struct {
	labels Labels
	refs   uint64
}

var _ Allocator = (*Local)(nil)

// stateVersion is bumped on incompatible changes of the state file format.
const stateVersion = 1

type localState struct {
	Version    int          `json:"version"`
	ClusterID  uint32       `json:"clusterID"`
	Next       uint32       `json:"next"`
	Identities []stateEntry `json:"identities"`
}

type stateEntry struct {
	ID     uint32 `json:"id"`
	Labels Labels `json:"labels"`
	Refs   uint64 `json:"refs"`
}

// NewLocal opens (or starts) the allocator state in stateFile for the given
// cluster. A state file that cannot be read, does not parse, or was written
// for another cluster is an error: silently starting empty would hand out IDs
// that are still in use.
func NewLocal(stateFile string, clusterID uint32) (*Local, error) {
	if stateFile == "" {
		return nil, errors.New("identity allocator: state file path is empty")
	}
	if clusterID < 1 || clusterID > MaxClusterID {
		return nil, fmt.Errorf("identity allocator: cluster ID %d out of range 1-%d", clusterID, MaxClusterID)
	}
	a := &Local{
		path:      stateFile,
		clusterID: clusterID,
		maxLocal:  MaxLocal,
		byID:      map[uint32]*entry{},
		byKey:     map[string]uint32{},
		next:      1,
		version:   1,
	}
	data, err := os.ReadFile(stateFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return a, nil
	case err != nil:
		return nil, fmt.Errorf("identity allocator: %w", err)
	}
	if err := a.load(data); err != nil {
		return nil, fmt.Errorf("identity allocator: state file %s is corrupt: %w", stateFile, err)
	}
	return a, nil
}

func (a *Local) load(data []byte) error {
	var st localState
	if err := strictjson.Decode(data, &st); err != nil {
		return err
	}
	if st.Version != stateVersion {
		return fmt.Errorf("version %d, want %d", st.Version, stateVersion)
	}
	if st.ClusterID != a.clusterID {
		return fmt.Errorf("written for cluster ID %d, not %d", st.ClusterID, a.clusterID)
	}
	for i, e := range st.Identities {
		n := e.ID &^ (a.clusterID << localBits)
		switch {
		case ClusterIDOf(e.ID) != a.clusterID || n < 1 || n > MaxLocal:
			return fmt.Errorf("identities[%d]: ID %d is not an identity of cluster %d", i, e.ID, a.clusterID)
		case e.Refs == 0:
			return fmt.Errorf("identities[%d]: ID %d has no references", i, e.ID)
		case len(e.Labels) == 0:
			return fmt.Errorf("identities[%d]: ID %d has no labels", i, e.ID)
		}
		if err := e.Labels.Validate(); err != nil {
			return fmt.Errorf("identities[%d]: ID %d: %w", i, e.ID, err)
		}
		if _, dup := a.byID[e.ID]; dup {
			return fmt.Errorf("identities[%d]: ID %d appears more than once", i, e.ID)
		}
		key := e.Labels.String()
		if other, dup := a.byKey[key]; dup {
			return fmt.Errorf("identities[%d]: labels %q belong to both ID %d and ID %d", i, key, other, e.ID)
		}
		a.byID[e.ID] = &entry{labels: e.Labels, refs: e.Refs}
		a.byKey[key] = e.ID
	}
	if st.Next >= 1 && st.Next <= MaxLocal {
		a.next = st.Next
	}
	return nil
}

// Allocate implements Allocator. The labels must be a non-empty, valid set.
func (a *Local) Allocate(ctx context.Context, l Labels) (uint32, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if len(l) == 0 {
		return 0, errors.New("allocate identity: empty label set")
	}
	if err := l.Validate(); err != nil {
		return 0, fmt.Errorf("allocate identity: %w", err)
	}
	key := l.String()

	a.mu.Lock()
	defer a.mu.Unlock()

	if id, ok := a.byKey[key]; ok {
		a.byID[id].refs++ // in memory only (see Local)
		return id, nil
	}

	n, ok := a.findFree()
	if !ok {
		return 0, fmt.Errorf("allocate identity for %q: cluster %d identities exhausted (%d in use)", key, a.clusterID, len(a.byID))
	}
	id := a.clusterID<<localBits | n
	prevNext := a.next
	a.byID[id] = &entry{labels: l.Clone(), refs: 1}
	a.byKey[key] = id
	a.next = a.wrap(n + 1)
	if err := a.save(); err != nil {
		delete(a.byID, id)
		delete(a.byKey, key)
		a.next = prevNext
		return 0, err
	}
	a.version++
	return id, nil
}

// findFree returns the first unused n at or after the cursor, wrapping
// around once.
func (a *Local) findFree() (uint32, bool) {
	if uint64(len(a.byID)) >= uint64(a.maxLocal) {
		return 0, false
	}
	n := a.wrap(a.next)
	for range a.maxLocal {
		if _, used := a.byID[a.clusterID<<localBits|n]; !used {
			return n, true
		}
		n = a.wrap(n + 1)
	}
	return 0, false
}

func (a *Local) wrap(n uint32) uint32 {
	if n < 1 || n > a.maxLocal {
		return 1
	}
	return n
}

// Release implements Allocator. Releasing a reserved or unknown ID is an
// error (the unknown case wraps ErrNotFound).
func (a *Local) Release(ctx context.Context, id uint32) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if name, ok := ReservedName(id); ok {
		return fmt.Errorf("release identity %d: reserved identity %q cannot be released", id, name)
	}
	a.mu.Lock()
	defer a.mu.Unlock()

	e, ok := a.byID[id]
	if !ok {
		return fmt.Errorf("release identity %d: %w", id, ErrNotFound)
	}
	e.refs--
	if e.refs > 0 {
		return nil // in memory only (see Local)
	}
	key := e.labels.String()
	delete(a.byID, id)
	delete(a.byKey, key)
	if err := a.save(); err != nil {
		e.refs++
		a.byID[id] = e
		a.byKey[key] = id
		return err
	}
	a.version++
	return nil
}

// SetRefs sets the reference count of every identity to refs[id], the
// number of its users, and frees those with none; it returns the freed
// IDs. The agent calls it at start, from its endpoints (see Local).
func (a *Local) SetRefs(refs map[uint32]uint64) ([]uint32, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	old := make(map[uint32]entry, len(a.byID))
	var freed []uint32
	for id, e := range a.byID {
		old[id] = *e
		if refs[id] == 0 {
			freed = append(freed, id)
			continue
		}
		e.refs = refs[id]
	}
	for _, id := range freed {
		delete(a.byKey, a.byID[id].labels.String())
		delete(a.byID, id)
	}
	if err := a.save(); err != nil {
		for id, e := range old {
			a.byID[id] = &entry{labels: e.labels, refs: e.refs}
			a.byKey[e.labels.String()] = id
		}
		return nil, err
	}
	if len(freed) > 0 {
		a.version++
	}
	slices.Sort(freed)
	return freed, nil
}

// Version identifies the set of identities List returns: it changes when
// an identity is allocated or freed, not when one gains or loses a
// reference. What derives from the whole set (policy peers) is derived
// again only when it moved.
func (a *Local) Version() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.version
}

// Get implements Allocator. Reserved identities have the single label
// LabelReserved=<name>. The returned map is a copy.
func (a *Local) Get(id uint32) (Labels, bool) {
	if name, ok := ReservedName(id); ok {
		return Labels{LabelReserved: name}, true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.byID[id]
	if !ok {
		return nil, false
	}
	return e.labels.Clone(), true
}

// List implements Allocator.
func (a *Local) List() []Identity {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]Identity, 0, len(a.byID))
	for id, e := range a.byID {
		out = append(out, Identity{ID: id, Labels: e.labels.Clone()})
	}
	slices.SortFunc(out, func(x, y Identity) int { return cmp.Compare(x.ID, y.ID) })
	return out
}

// save writes the whole state; callers hold a.mu and undo their change when
// it fails, so memory never runs ahead of disk.
func (a *Local) save() error {
	st := localState{Version: stateVersion, ClusterID: a.clusterID, Next: a.next, Identities: make([]stateEntry, 0, len(a.byID))}
	for id, e := range a.byID {
		st.Identities = append(st.Identities, stateEntry{ID: id, Labels: e.labels, Refs: e.refs})
	}
	slices.SortFunc(st.Identities, func(x, y stateEntry) int { return cmp.Compare(x.ID, y.ID) })
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("identity allocator: encode state: %w", err)
	}
	if err := atomicfile.Write(a.path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("identity allocator: save state: %w", err)
	}
	return nil
}
