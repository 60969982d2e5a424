package mirror

import (
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// State says where the mirror of one remote cluster is.
type State string

const (
	// StateConnecting: no contact yet (since the server or the record
	// started).
	StateConnecting State = "connecting"
	// StateConnected: the remote answers and is being mirrored.
	StateConnected State = "connected"
	// StateUnreachable: contact lost; the cache keeps serving the last
	// state (until the cache TTL, if one is set).
	StateUnreachable State = "unreachable"
	// StateDropped: unreachable for longer than the cache TTL; its cache
	// and canaries were deleted.
	StateDropped State = "dropped"
	// StateRefused: the remote conflicts with this cluster or another
	// connected one, or is not the cluster its record names; nothing of
	// it is mirrored.
	StateRefused State = "refused"
	// StateInvalid: the record isthmus/remotes/<cluster> is invalid.
	StateInvalid State = "invalid"
)

// Synced says which kinds have their canary written.
type Synced struct {
	Nodes      bool `json:"nodes"`
	Endpoints  bool `json:"endpoints"`
	Identities bool `json:"identities"`
	Services   bool `json:"services"`
}

// All reports whether every kind is synced.
func (s Synced) All() bool { return s.Nodes && s.Endpoints && s.Identities && s.Services }

// Status is the mirror's view of one remote cluster. The server keeps it
// in memory and writes it (JSON) to isthmus/status/remotes/<cluster>.
type Status struct {
	Cluster   string `json:"cluster"`
	ClusterID uint32 `json:"clusterID"`
	// KVStoreEndpoints are the remote server's URLs from its record.
	KVStoreEndpoints []string `json:"kvstoreEndpoints,omitempty"`
	State            State    `json:"state"`
	// Since is when State last changed.
	Since     time.Time `json:"since,omitzero"`
	Connected bool      `json:"connected"`
	// Ready: every kind is synced (its canary exists).
	Ready  bool   `json:"ready"`
	Synced Synced `json:"synced"`
	// Counts of the valid records mirrored.
	Nodes      int `json:"nodes"`
	Endpoints  int `json:"endpoints"`
	Identities int `json:"identities"`
	Services   int `json:"services"`
	// Invalid counts the remote's records currently skipped; Skipped the
	// invalid records seen since this server started.
	Invalid     int    `json:"invalid"`
	Skipped     uint64 `json:"skipped"`
	LastInvalid string `json:"lastInvalid,omitempty"`
	// Refused counts the remote's records refused now because the remote
	// does not own what they claim (records.Gate), by reason
	// (records.Reason*); RefusedTotal the refusals since this server
	// started, each once per key and reason (not on every re-list);
	// LastRefused is the last one.
	Refused      map[string]int    `json:"refused,omitempty"`
	RefusedTotal map[string]uint64 `json:"refusedTotal,omitempty"`
	LastRefused  string            `json:"lastRefused,omitempty"`
	// LastError is the most recent error (connection, refusal, write).
	LastError     string    `json:"lastError,omitempty"`
	LastErrorTime time.Time `json:"lastErrorTime,omitzero"`
	// LastContact is when the remote last answered.
	LastContact time.Time `json:"lastContact,omitzero"`
	// LastChange is when the mirror last changed the cache.
	LastChange time.Time `json:"lastChange,omitzero"`
	// CacheExpires is when the cache of an unreachable remote will be
	// dropped (zero without a cache TTL or while connected).
	CacheExpires time.Time `json:"cacheExpires,omitzero"`
}

func (s *Status) setState(st State) {
	if s.State != st {
		s.State, s.Since = st, time.Now().UTC()
	}
}

// CurrentError returns LastError if it happened in the current state or
// the state is not connected: an error from before the connection was
// (re)established is resolved.
func (s Status) CurrentError() string {
	if s.State == StateConnected && s.LastErrorTime.Before(s.Since) {
		return ""
	}
	return s.LastError
}

// DecodeStatus decodes a status read from isthmus/status/remotes/<c>.
func DecodeStatus(data []byte) (Status, error) {
	var s Status
	if err := strictjson.Decode(data, &s); err != nil {
		return Status{}, fmt.Errorf("remote status: %w", err)
	}
	if err := records.ValidateClusterName(s.Cluster); err != nil {
		return Status{}, fmt.Errorf("remote status: %w", err)
	}
	return s, nil
}

// statusBox is the live status of one remote, shared by its session
// goroutines.
type statusBox struct {
	mu sync.Mutex
	s  Status
	// counts and invalid keys per kind
	counts  map[records.Kind]int
	invalid map[records.Kind]int
	synced  map[records.Kind]bool
	refused map[string]int
}

func newStatusBox(name string) *statusBox {
	return &statusBox{s: Status{Cluster: name, State: StateConnecting, Since: time.Now().UTC()},
		counts: map[records.Kind]int{}, invalid: map[records.Kind]int{}, synced: map[records.Kind]bool{}}
}

func (b *statusBox) update(f func(s *Status)) {
	b.mu.Lock()
	f(&b.s)
	b.mu.Unlock()
}

func (b *statusBox) get() Status {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.s
	s.KVStoreEndpoints = slices.Clone(s.KVStoreEndpoints)
	s.Refused = nil
	if len(b.refused) > 0 {
		s.Refused = maps.Clone(b.refused)
	}
	s.RefusedTotal = maps.Clone(s.RefusedTotal)
	s.Nodes = b.counts[records.KindNodes]
	s.Endpoints = b.counts[records.KindIP]
	s.Identities = b.counts[records.KindIdentities]
	s.Services = b.counts[records.KindServices]
	s.Invalid = 0
	for _, n := range b.invalid {
		s.Invalid += n
	}
	s.Synced = Synced{
		Nodes: b.synced[records.KindNodes], Endpoints: b.synced[records.KindIP],
		Identities: b.synced[records.KindIdentities], Services: b.synced[records.KindServices],
	}
	s.Ready = s.Synced.All()
	return s
}

func (b *statusBox) setError(err error) {
	if err == nil {
		return
	}
	b.update(func(s *Status) { s.LastError, s.LastErrorTime = err.Error(), time.Now().UTC() })
}

func (b *statusBox) setKind(k records.Kind, count, invalid int) {
	b.mu.Lock()
	b.counts[k], b.invalid[k] = count, invalid
	b.mu.Unlock()
}

func (b *statusBox) setRefused(now map[string]int) {
	b.mu.Lock()
	b.refused = now
	b.mu.Unlock()
}

// refusal counts one refusal of a record.
func (b *statusBox) refusal(reason string, err error) {
	b.update(func(s *Status) {
		if s.RefusedTotal == nil {
			s.RefusedTotal = map[string]uint64{}
		}
		s.RefusedTotal[reason]++
		s.LastRefused = err.Error()
	})
}

func (b *statusBox) setSynced(k records.Kind, v bool) {
	b.mu.Lock()
	b.synced[k] = v
	b.mu.Unlock()
}

// cleared resets what describes the cache (after it was deleted).
func (b *statusBox) cleared() {
	b.mu.Lock()
	clear(b.counts)
	clear(b.invalid)
	clear(b.synced)
	b.refused = nil
	b.mu.Unlock()
}

// RefusedText summarises the records refused now as not owned by the
// remote, for the REFUSED column of `isthmus clustermesh status`: "0", or
// the total and the count per reason, e.g. "3 (over-cap 2, prefix-not-owned 1)".
func (s Status) RefusedText() string { return records.RefusedText(s.Refused) }
