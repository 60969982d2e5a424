package state

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// File names inside the state directory.
const (
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

type objectsFile struct {
	Version int                        `json:"version"`
	Objects map[string]json.RawMessage `json:"objects"` // by objects.Key: "Kind/namespace/name"
}

// Store holds the desired state in memory and on disk. It is safe for
// concurrent use; every mutation is on disk before it returns, and a failed
// write leaves the in-memory state unchanged.
type Store struct {
	dir string

	mu        sync.Mutex
	nextID    uint32
	endpoints map[string]Endpoint
	// gen counts the changes of endpoints: readers that keep what they
	// derived from them know when to derive again. snap is the sorted
	// copy EndpointsGen last made, at snapGen.
	gen     uint64
	snap    []Endpoint
	snapGen uint64
	objects map[string]json.RawMessage
}

// Open loads the state in dir, creating the directory (0700) if needed.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w", dir, err)
	}
	s := &Store{dir: dir, nextID: 1, endpoints: map[string]Endpoint{}, objects: map[string]json.RawMessage{}}

	var ef endpointsFile
	found, err := readJSON(s.path(EndpointsFile), &ef)
	if err != nil {
		return nil, err
	}
	if found {
		if ef.Version != fileVersion {
			return nil, fmt.Errorf("state file %s has version %d, this agent reads version %d", s.path(EndpointsFile), ef.Version, fileVersion)
		}
		for _, e := range ef.Endpoints {
			if e.Name == "" || e.Namespace == "" {
				return nil, fmt.Errorf("state file %s is corrupt: an endpoint has no name or namespace", s.path(EndpointsFile))
			}
			if _, dup := s.endpoints[e.Key()]; dup {
				return nil, fmt.Errorf("state file %s is corrupt: endpoint %s appears twice", s.path(EndpointsFile), e.Key())
			}
			s.endpoints[e.Key()] = e
			if e.ID >= ef.NextID {
				ef.NextID = e.ID + 1
			}
		}
		s.nextID = max(ef.NextID, 1)
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

// PutEndpoint adds or replaces an endpoint and persists it.
func (s *Store) PutEndpoint(e Endpoint) error {
	if e.Name == "" || e.Namespace == "" {
		return fmt.Errorf("endpoint without name or namespace")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	next := maps.Clone(s.endpoints)
	next[e.Key()] = e.clone()
	if err := s.writeEndpoints(next); err != nil {
		return err
	}
	s.endpoints = next
	s.gen++
	return nil
}

// DeleteEndpoint removes an endpoint and persists the removal. A missing
// endpoint is not an error.
func (s *Store) DeleteEndpoint(namespace, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := EndpointKey(namespace, name)
	if _, ok := s.endpoints[k]; !ok {
		return nil
	}
	next := maps.Clone(s.endpoints)
	delete(next, k)
	if err := s.writeEndpoints(next); err != nil {
		return err
	}
	s.endpoints = next
	s.gen++
	return nil
}

// EndpointsGen returns the endpoints, sorted by key, with the generation
// they are at (equal generations: same endpoints). The slice is shared
// until the next change (a reconcile of an unchanged node copies
// nothing): it must not be modified.
func (s *Store) EndpointsGen() ([]Endpoint, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap == nil || s.snapGen != s.gen {
		s.snap = make([]Endpoint, 0, len(s.endpoints))
		for _, k := range slices.Sorted(maps.Keys(s.endpoints)) {
			s.snap = append(s.snap, s.endpoints[k].clone())
		}
		s.snapGen = s.gen
	}
	return s.snap, s.gen
}

func (s *Store) writeEndpoints(eps map[string]Endpoint) error {
	f := endpointsFile{Version: fileVersion, NextID: s.nextID, Endpoints: make([]Endpoint, 0, len(eps))}
	for _, k := range slices.Sorted(maps.Keys(eps)) {
		f.Endpoints = append(f.Endpoints, eps[k])
	}
	return writeJSON(s.path(EndpointsFile), f)
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
	if err := writeJSON(s.path(ObjectsFile), objectsFile{Version: fileVersion, Objects: next}); err != nil {
		return err
	}
	s.objects = next
	return nil
}
