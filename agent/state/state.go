package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/internal/keyed"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
)

// File names inside the state directory.
const (
	// EndpointsDir holds one file per endpoint, <namespace>.<name>.json:
	// adding or deleting one writes one small file, whatever the number of
	// endpoints on the node.
	EndpointsDir = "endpoints"
	// EndpointIDsFile holds the next endpoint ID.
	EndpointIDsFile = "endpoint-ids.json"
	// EndpointsFile is where agents before the per-endpoint files kept
	// every endpoint in one file (rewritten whole on every change); Open
	// moves its content into EndpointsDir and removes it.
	EndpointsFile = "endpoints.json"
	ObjectsFile   = "objects.json"
)

// Endpoint is one pod the agent plumbed, as promised to the user.
type Endpoint struct {
	Name       string          `json:"name"`
	Namespace  string          `json:"namespace"`
	Labels     identity.Labels `json:"labels,omitempty"` // as given by the user, without isthmus.io/ labels
	NetnsPath  string          `json:"netnsPath"`
	HostIfName string          `json:"hostIfName"`
	IfIndex    int             `json:"ifIndex"`
	IPs        []netip.Addr    `json:"ips"`
	Identity   uint32          `json:"identity"`
	ID         uint32          `json:"id"` // node-local endpoint ID, keys the policy map
	HostMAC    string          `json:"hostMAC"`
	PodMAC     string          `json:"podMAC"`
	Created    time.Time       `json:"created"`
	// Set for endpoints added through the CNI plugin; absent in files of
	// older agents and for CLI endpoints.
	ContainerID string `json:"containerID,omitempty"` // the pod sandbox's
	PodIfName   string `json:"podIfName,omitempty"`   // "" is eth0
	PodUID      string `json:"podUID,omitempty"`
}

// Key is "namespace/name", unique per node.
func (e Endpoint) Key() string { return EndpointKey(e.Namespace, e.Name) }

// EndpointKey builds the key of an endpoint.
func EndpointKey(namespace, name string) string { return namespace + "/" + name }

func (e Endpoint) clone() Endpoint {
	e.Labels = e.Labels.Clone()
	e.IPs = slices.Clone(e.IPs)
	return e
}

type endpointsFile struct {
	Version int `json:"version"`
	// NextID is the next endpoint ID to hand out. IDs are never reused, so a
	// policy entry left behind by a deleted endpoint can never apply to a new one.
	NextID    uint32     `json:"nextID"`
	Endpoints []Endpoint `json:"endpoints"`
}

// endpointFile is one file of EndpointsDir.
type endpointFile struct {
	Version  int      `json:"version"`
	Endpoint Endpoint `json:"endpoint"`
}

// idsFile is EndpointIDsFile.
type idsFile struct {
	Version int `json:"version"`
	// NextID is the next endpoint ID to hand out. IDs are never reused, so a
	// policy entry left behind by a deleted endpoint can never apply to a new one.
	NextID uint32 `json:"nextID"`
}

type objectsFile struct {
	Version int                        `json:"version"`
	Objects map[string]json.RawMessage `json:"objects"` // by objects.Key: "Kind/namespace/name"
}

// Store holds the desired state in memory and on disk. It is safe for
// concurrent use; every mutation is on disk before it returns, and a failed
// write leaves the in-memory state unchanged.
type Store struct {
	dir string

	mu sync.Mutex
	// keys serialises the writes of one endpoint's file (and its entry in
	// endpoints), which happen without mu.
	keys      keyed.Mutex
	nextID    uint32
	savedNext uint32 // the bound EndpointIDsFile holds
	endpoints map[string]Endpoint
	// gen counts the changes of endpoints: readers that keep what they
	// derived from them know when to derive again, and changes (the last
	// maxChangeLog) which endpoint each changed, so that they derive again
	// only what changed (EndpointsChangedSince). snap is the sorted
	// snapshot EndpointsGen last made, at snapGen.
	gen     uint64
	changes []keyChange
	snap    []Endpoint
	snapGen uint64
	objects map[string]json.RawMessage
	// lbLines keeps each assignment SaveLBAssignments encoded, by
	// service, with the line it became: an unchanged one is not validated
	// and encoded again.
	lbLines map[string]lbLine
}

// Open loads the state in dir, creating the directory (0700) if needed.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w", dir, err)
	}
	s := &Store{dir: dir, nextID: 1, endpoints: map[string]Endpoint{}, objects: map[string]json.RawMessage{}}

	legacy, err := s.loadLegacyEndpoints()
	if err != nil {
		return nil, err
	}
	if err := s.loadEndpoints(); err != nil {
		return nil, err
	}
	var ids idsFile
	found, err := readJSON(s.path(EndpointIDsFile), &ids)
	if err != nil {
		return nil, err
	}
	if found && ids.Version != fileVersion {
		return nil, fmt.Errorf("state file %s has version %d, this agent reads version %d", s.path(EndpointIDsFile), ids.Version, fileVersion)
	}
	s.nextID = max(s.nextID, ids.NextID, 1)
	s.savedNext = ids.NextID
	for _, e := range s.endpoints {
		if e.ID >= s.nextID {
			s.nextID = e.ID + 1
		}
	}
	if legacy {
		if err := s.migrateLegacy(); err != nil {
			return nil, err
		}
	}

	var of objectsFile
	found, err = readJSON(s.path(ObjectsFile), &of)
	if err != nil {
		return nil, err
	}
	if found {
		if of.Version != fileVersion {
			return nil, fmt.Errorf("state file %s has version %d, this agent reads version %d", s.path(ObjectsFile), of.Version, fileVersion)
		}
		if of.Objects != nil {
			s.objects = of.Objects
		}
	}
	return s, nil
}

// Dir is the state directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(name string) string { return filepath.Join(s.dir, name) }

// Endpoints returns every endpoint, sorted by key.
func (s *Store) Endpoints() []Endpoint {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Endpoint, 0, len(s.endpoints))
	for _, k := range slices.Sorted(maps.Keys(s.endpoints)) {
		out = append(out, s.endpoints[k].clone())
	}
	return out
}

// Endpoint returns one endpoint.
func (s *Store) Endpoint(namespace, name string) (Endpoint, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.endpoints[EndpointKey(namespace, name)]
	return e.clone(), ok
}

// idBlock is how far ahead of the next endpoint ID EndpointIDsFile is
// written (see PutEndpoint).
const idBlock = 64

// AllocateEndpointID reserves a node-local endpoint ID. It is persisted with
// the next endpoint write; an ID given out for an add that failed is skipped.
func (s *Store) AllocateEndpointID() uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	id := s.nextID
	s.nextID++
	if s.nextID == 0 {
		s.nextID = 1
	}
	return id
}

// PutEndpoint adds or replaces an endpoint and persists it (its own file;
// the next endpoint ID first, if it moved). The file is written without
// the store's lock, under the endpoint's own: pods added together write
// theirs side by side (the file system commits their syncs together)
// instead of one after the other.
func (s *Store) PutEndpoint(e Endpoint) error {
	if err := checkFileName(e.Namespace, e.Name); err != nil {
		return err
	}
	defer s.keys.Lock(e.Key())()
	if err := s.writeEndpoint(e); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endpoints[e.Key()] = e.clone()
	s.changed(e.Key())
	return nil
}

// StageEndpoint adds a new endpoint to memory at once, so that the
// datapath can take it while its file is written, and returns the function
// that writes the file (as PutEndpoint does). An add answers only after
// commit returned nil, so an endpoint is durable before its caller hears
// of it, while the maps may hold it a moment before the disk does: a
// restart in that moment finds no file, the maps are rebuilt from the
// files, and the caller, never answered, tries again.
//
// commit must be called once; the endpoint's other calls (a delete) wait
// for it. When it fails the endpoint is still in memory, and the caller
// removes it with DeleteEndpoint, as for any add rolled back. An endpoint
// that exists already is an error: replacing one goes through PutEndpoint.
func (s *Store) StageEndpoint(e Endpoint) (commit func() error, err error) {
	if err := checkFileName(e.Namespace, e.Name); err != nil {
		return nil, err
	}
	unlock := s.keys.Lock(e.Key())
	s.mu.Lock()
	if _, ok := s.endpoints[e.Key()]; ok {
		s.mu.Unlock()
		unlock()
		return nil, fmt.Errorf("endpoint %s exists already", e.Key())
	}
	s.endpoints[e.Key()] = e.clone()
	s.changed(e.Key())
	s.mu.Unlock()
	return sync.OnceValue(func() error {
		defer unlock()
		return s.writeEndpoint(e)
	}), nil
}

// writeEndpoint writes e's file, the next endpoint ID first if it moved.
// The caller holds e's key lock.
func (s *Store) writeEndpoint(e Endpoint) error {
	if err := s.saveNextID(); err != nil {
		return err
	}
	if err := writeJSON(s.endpointPath(e.Namespace, e.Name), endpointFile{Version: fileVersion, Endpoint: e}); err != nil {
		return err
	}
	if afterEndpointWrite != nil {
		afterEndpointWrite(e)
	}
	return nil
}

// afterEndpointWrite, when set (tests), runs after an endpoint's file is
// written (in PutEndpoint before its entry in memory): a write that takes
// its time.
var afterEndpointWrite func(Endpoint)

// saveNextID keeps EndpointIDsFile ahead of every ID given out so far.
// EndpointIDsFile holds a bound no ID given out reaches. It moves idBlock
// IDs ahead of the next one, so that one add in idBlock writes it (each
// write is two fsyncs, on the path of every add otherwise); a restart skips
// the IDs left of the block. It is written again when the next ID passed
// it, or when the next ID wrapped around below it.
func (s *Store) saveNextID() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nextID > s.savedNext || s.savedNext-s.nextID > idBlock {
		bound := s.nextID + idBlock
		if bound < s.nextID {
			bound = s.nextID // no room for a block before the wrap
		}
		if err := writeJSON(s.path(EndpointIDsFile), idsFile{Version: fileVersion, NextID: bound}); err != nil {
			return err
		}
		s.savedNext = bound
	}
	return nil
}

// DeleteEndpoint removes an endpoint and persists the removal. A missing
// endpoint is not an error.
func (s *Store) DeleteEndpoint(namespace, name string) error {
	k := EndpointKey(namespace, name)
	defer s.keys.Lock(k)()
	s.mu.Lock()
	_, ok := s.endpoints[k]
	s.mu.Unlock()
	if !ok {
		return nil
	}
	if err := atomicfile.Remove(s.endpointPath(namespace, name)); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.endpoints, k)
	s.changed(k)
	return nil
}

// keyChange is one change of the endpoints: the generation it made and
// the key of the endpoint it put or deleted.
type keyChange struct {
	gen uint64
	key string
}

// maxChangeLog bounds the change log: a reader further behind derives
// everything again, which costs what it would have without the log.
const maxChangeLog = 4096

// changed records a change of endpoint key; callers hold mu.
func (s *Store) changed(key string) {
	s.gen++
	if len(s.changes) >= maxChangeLog {
		s.changes = slices.Delete(s.changes, 0, len(s.changes)-maxChangeLog/2)
	}
	s.changes = append(s.changes, keyChange{gen: s.gen, key: key})
}

// changedSince returns the keys changed after generation since up to
// current, each once; ok is false when the log does not reach back that
// far. Callers hold mu.
func (s *Store) changedSince(since, current uint64) (keys []string, ok bool) {
	if since == current {
		return nil, true
	}
	if since > current || current > s.gen || len(s.changes) == 0 || s.changes[0].gen > since+1 {
		return nil, false
	}
	// The log holds one entry per generation, in order.
	first := int(since + 1 - s.changes[0].gen)
	seen := map[string]bool{}
	for _, c := range s.changes[first : first+int(current-since)] {
		if !seen[c.key] {
			seen[c.key] = true
			keys = append(keys, c.key)
		}
	}
	return keys, true
}

// EndpointsChangedSince returns the keys of the endpoints put or deleted
// between generation since and current (EndpointsGen's), each once; ok
// is false when that is not known (too far behind) and the caller must
// look at every endpoint. Its cost is the changes, not the endpoints:
// what lets a reconciler do per run the work of what changed.
func (s *Store) EndpointsChangedSince(since, current uint64) (keys []string, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changedSince(since, current)
}

// EndpointInNetns returns the key of the endpoint plumbed into the
// network namespace at path, if any (without copying every endpoint).
func (s *Store) EndpointInNetns(path string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, e := range s.endpoints {
		if e.NetnsPath == path {
			return k, true
		}
	}
	return "", false
}

// checkFileName refuses names that cannot be a file name of EndpointsDir
// (the API allows DNS labels only, which always can).
func checkFileName(namespace, name string) error {
	for _, x := range []string{namespace, name} {
		if x == "" || x[0] == '.' || strings.ContainsAny(x, "/.\x00") {
			return fmt.Errorf("endpoint %q/%q: namespace and name must be non-empty and contain no '/' or '.'", namespace, name)
		}
	}
	return nil
}

func (s *Store) endpointPath(namespace, name string) string {
	return filepath.Join(s.dir, EndpointsDir, namespace+"."+name+".json")
}

// loadEndpoints reads EndpointsDir. A file that does not decode, or whose
// name does not match its endpoint, is an error: the agent does not guess
// at the state of a pod.
func (s *Store) loadEndpoints() error {
	dir := filepath.Join(s.dir, EndpointsDir)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read state directory %s: %w", dir, err)
	}
	for _, ent := range ents {
		name := ent.Name()
		if strings.HasPrefix(name, ".") {
			continue // a write a crash interrupted (atomicfile's temp file)
		}
		p := filepath.Join(dir, name)
		var f endpointFile
		if _, err := readJSON(p, &f); err != nil {
			return err
		}
		if f.Version != fileVersion {
			return fmt.Errorf("state file %s has version %d, this agent reads version %d", p, f.Version, fileVersion)
		}
		e := f.Endpoint
		if e.Name == "" || e.Namespace == "" || p != s.endpointPath(e.Namespace, e.Name) {
			return fmt.Errorf("state file %s is corrupt: it holds endpoint %q/%q (fix or move it away; the agent will not overwrite it)", p, e.Namespace, e.Name)
		}
		s.endpoints[e.Key()] = e // over the legacy file's: written later
	}
	return nil
}

// loadLegacyEndpoints reads EndpointsFile, if an older agent left one.
func (s *Store) loadLegacyEndpoints() (bool, error) {
	var ef endpointsFile
	found, err := readJSON(s.path(EndpointsFile), &ef)
	if err != nil || !found {
		return false, err
	}
	if ef.Version != fileVersion {
		return false, fmt.Errorf("state file %s has version %d, this agent reads version %d", s.path(EndpointsFile), ef.Version, fileVersion)
	}
	for _, e := range ef.Endpoints {
		if e.Name == "" || e.Namespace == "" {
			return false, fmt.Errorf("state file %s is corrupt: an endpoint has no name or namespace", s.path(EndpointsFile))
		}
		if _, dup := s.endpoints[e.Key()]; dup {
			return false, fmt.Errorf("state file %s is corrupt: endpoint %s appears twice", s.path(EndpointsFile), e.Key())
		}
		if err := checkFileName(e.Namespace, e.Name); err != nil {
			return false, fmt.Errorf("state file %s: %w", s.path(EndpointsFile), err)
		}
		s.endpoints[e.Key()] = e
	}
	s.nextID = max(ef.NextID, 1)
	return true, nil
}

// migrateLegacy writes what EndpointsFile held as per-endpoint files, then
// removes it. A crash in between leaves it: the next Open does it again
// (the files written are the same).
func (s *Store) migrateLegacy() error {
	if err := writeJSON(s.path(EndpointIDsFile), idsFile{Version: fileVersion, NextID: s.nextID}); err != nil {
		return err
	}
	s.savedNext = s.nextID
	for _, e := range s.endpoints {
		if err := writeJSON(s.endpointPath(e.Namespace, e.Name), endpointFile{Version: fileVersion, Endpoint: e}); err != nil {
			return err
		}
	}
	return atomicfile.Remove(s.path(EndpointsFile))
}

// EndpointsGen returns the endpoints, sorted by key, with the generation
// they are at (equal generations: same endpoints). The slice and the
// endpoints in it are shared (with the next snapshots too) and must not be
// modified: a reconcile of an unchanged node copies nothing, and one
// after a change copies the slice, not every endpoint's labels and
// addresses (the store never modifies an endpoint it holds; PutEndpoint
// replaces it).
func (s *Store) EndpointsGen() ([]Endpoint, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap != nil && s.snapGen == s.gen {
		return s.snap, s.gen
	}
	keys, ok := s.changedSince(s.snapGen, s.gen)
	if s.snap == nil || !ok || len(keys) > len(s.snap)/4 {
		s.snap = make([]Endpoint, 0, len(s.endpoints))
		for _, k := range slices.Sorted(maps.Keys(s.endpoints)) {
			s.snap = append(s.snap, s.endpoints[k])
		}
	} else {
		s.snap = s.patchSnapshot(keys)
	}
	s.snapGen = s.gen
	return s.snap, s.gen
}

// SearchEndpoints returns the position of the endpoint with key key in
// eps, which are sorted by key (as EndpointsGen gives them), or where it
// would be, and whether it is there.
func SearchEndpoints(eps []Endpoint, key string) (int, bool) {
	return slices.BinarySearchFunc(eps, key, func(e Endpoint, k string) int { return strings.Compare(e.Key(), k) })
}

// patchSnapshot returns a copy of the snapshot with the endpoints of keys
// as they are now. Callers hold mu.
func (s *Store) patchSnapshot(keys []string) []Endpoint {
	snap := slices.Clone(s.snap)
	for _, k := range keys {
		i, found := SearchEndpoints(snap, k)
		e, ok := s.endpoints[k]
		switch {
		case ok && found:
			snap[i] = e
		case ok:
			snap = slices.Insert(snap, i, e)
		case found:
			snap = slices.Delete(snap, i, i+1)
		}
	}
	return snap
}

// Objects returns the applied objects as JSON documents by key.
func (s *Store) Objects() map[string][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string][]byte, len(s.objects))
	for k, v := range s.objects {
		out[k] = slices.Clone(v)
	}
	return out
}

// Object returns one applied object.
func (s *Store) Object(key string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.objects[key]
	return slices.Clone(v), ok
}

// encodeObjects is objects.json for objs, in key order, one object per
// line. The values are valid JSON (checked on the way in), so they are
// copied as they are: encoding/json would scan, compact and indent every
// one again, which cost an agent more than anything else in persisting
// 10,000 services.
func encodeObjects(objs map[string]json.RawMessage) []byte {
	size := 64
	for k, v := range objs {
		size += len(k) + len(v) + 16
	}
	b := make([]byte, 0, size)
	b = fmt.Appendf(b, "{\n  \"version\": %d,\n  \"objects\": {", fileVersion)
	for i, k := range slices.Sorted(maps.Keys(objs)) {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, "\n    "...)
		key, _ := json.Marshal(k) // a string always encodes
		b = append(b, key...)
		b = append(b, ": "...)
		b = append(b, objs[k]...)
	}
	if len(objs) > 0 {
		b = append(b, "\n  "...)
	}
	return append(b, "}\n}\n"...)
}

// UpdateObjects stores put and removes del in one write: either all of it is
// on disk or none of it.
func (s *Store) UpdateObjects(put map[string][]byte, del []string) error {
	for k, v := range put {
		if !json.Valid(v) {
			return fmt.Errorf("object %s is not valid JSON", k)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	next := maps.Clone(s.objects)
	for _, k := range del {
		delete(next, k)
	}
	for k, v := range put {
		next[k] = slices.Clone(v)
	}
	if err := WriteFileAtomic(s.path(ObjectsFile), encodeObjects(next), 0o600); err != nil {
		return err
	}
	s.objects = next
	return nil
}
