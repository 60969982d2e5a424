// Package localapi is the local API's side of the agent (api.Backend): the
// source of desired state that users drive with the isthmus CLI.
//
// Every request is validated before it touches state, and a failed one
// changes nothing: an endpoint add rolls back the veth, the addresses and
// the identity; an apply of several documents is all or nothing. Add,
// apply and delete return once the reconcilers took the change, so when
// the CLI returns, the datapath enforces it.
//
// Locking: calls for one endpoint run one after the other (a per-endpoint
// lock), so each sees the state the previous one left. The API lock
// (Config.Lock) is held only for local steps, never across a call to
// etcd. An endpoint add takes it only to check and reserve the pod's
// netns and to publish the endpoint to the mesh: its addresses (the IPAM
// has its own lock and shares a write among adds made together), its
// identity (in cluster mode in etcd), the plumbing, its file in the store
// and the wait for the datapath happen without it, so the adds of pods
// created together proceed side by side, and adds of other pods, deletes
// and applies proceed while etcd is slow or unreachable. Reads (status,
// endpoint list, get, identities) take no lock that is held across I/O
// and never call etcd.
//
//	endpoints.go  add and delete (allocate, plumb, attach, persist), and at
//	              start RestoreEndpoints and CollectGarbage
//	objects.go    apply, get and delete of Services and NetworkPolicies
//	              (on this node; in cluster mode in the cluster's etcd)
//	status.go     status and identities
//	wireguard.go  key rotation
package localapi

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/bigtcp"
	"github.com/isthmus-mesh/isthmus/agent/clustermode"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/encryption"
	"github.com/isthmus-mesh/isthmus/agent/internal/keyed"
	"github.com/isthmus-mesh/isthmus/agent/ipam"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// Config is what the handlers work with.
type Config struct {
	Node, Cluster string
	ClusterID     uint32
	MTU           int // of pod veths
	Started       time.Time
	Log           *slog.Logger

	// Lock serialises the local steps of API mutations (endpoint
	// add/delete, apply, delete) that must see the state the previous one
	// left; an endpoint add holds it for its checks only (see the package
	// comment). It is never held across a call to etcd; the reconcilers
	// never take it.
	Lock *sync.Mutex

	// Desired state and the allocators behind it.
	Store      *state.Store
	IPAM       *ipam.IPAM
	Identities identity.Allocator
	// LocalObjects are the objects applied on this node (standalone mode);
	// Objects is what the reconcilers read (in cluster mode etcd's).
	LocalObjects *desired.ObjectTable
	Objects      func() desired.Objects

	Datapath datapath.Datapath // attach and detach pods, map sizes
	// IPCache returns the BPF ipcache's entries and the mesh entries left
	// out of it (full) after the last reconcile, known without walking a
	// map of up to 512k entries.
	IPCache   func() (entries, overflow int)
	Plumb     Plumber
	Reconcile *reconcile.Trigger
	Mesh      *clustermode.Mesh     // nil in standalone mode
	WireGuard *encryption.WireGuard // nil without encryption
	BigTCP    *bigtcp.Reconciler    // device sizes, for the status
	// Kubernetes is the Kubernetes source's status (nil outside
	// Kubernetes mode).
	Kubernetes func() *api.KubernetesStatus
	// BGP is the BGP speaker's status (nil when no policy selects the
	// node), with its routes when asked.
	BGP func(ctx context.Context, routes bool) *api.BGPStatus
	// NorthSouth is the way in from outside (nil: not set up).
	NorthSouth func() *api.NorthSouthStatus
	// L2 is the L2 announcements' status (nil: not reported).
	L2 func() *api.L2Status

	// LabelsFor, when set, gives the labels of an endpoint whose add
	// carries none (Kubernetes mode: the pod's labels and its namespace's).
	// podUID may be empty. An error fails the add with 503, which the CNI
	// plugin reports as "try again later" (the pod may not be known yet).
	LabelsFor func(ctx context.Context, namespace, name, podUID string) (map[string]string, error)
	// ObserveAdd, when set, is told the duration of every add that
	// created an endpoint (the agent's isthmus_endpoint_add_seconds).
	ObserveAdd func(time.Duration)
}

// Handlers implement api.Backend.
type Handlers struct {
	node, cluster string
	clusterID     uint32
	mtu           int
	started       time.Time
	log           *slog.Logger
	mu            *sync.Mutex
	endpointLocks keyed.Mutex
	// pendingNetns holds the netns of adds that passed their checks and
	// are not in the store yet (allocating an identity), by endpoint key;
	// guarded by mu.
	pendingNetns map[string]string
	store        *state.Store
	ipam         *ipam.IPAM
	ids          identity.Allocator
	local        *desired.ObjectTable
	objects      func() desired.Objects
	dp           datapath.Datapath
	ipcache      func() (entries, overflow int)
	plumb        Plumber
	rec          *reconcile.Trigger
	mesh         *clustermode.Mesh
	enc          *encryption.WireGuard
	bigtcp       *bigtcp.Reconciler
	kubernetes   func() *api.KubernetesStatus
	bgp          func(ctx context.Context, routes bool) *api.BGPStatus
	northSouth   func() *api.NorthSouthStatus
	l2           func() *api.L2Status
	labelsFor    func(ctx context.Context, namespace, name, podUID string) (map[string]string, error)
	observeAdd   func(time.Duration)
	// addDurations holds how long the add of each endpoint took, by
	// endpoint key, for the endpoint's ID (in memory only).
	addDurMu     sync.Mutex
	addDurations map[string]addDuration
}

type addDuration struct {
	id uint32
	d  time.Duration
}

var _ api.Backend = (*Handlers)(nil)

// New returns the handlers.
func New(cfg Config) *Handlers {
	return &Handlers{
		node: cfg.Node, cluster: cfg.Cluster, clusterID: cfg.ClusterID, mtu: cfg.MTU, started: cfg.Started, log: cfg.Log,
		mu: cfg.Lock, pendingNetns: map[string]string{}, store: cfg.Store, ipam: cfg.IPAM, ids: cfg.Identities, local: cfg.LocalObjects, objects: cfg.Objects,
		dp: cfg.Datapath, plumb: cfg.Plumb, rec: cfg.Reconcile, mesh: cfg.Mesh, enc: cfg.WireGuard, ipcache: cfg.IPCache,
		bigtcp: cfg.BigTCP, kubernetes: cfg.Kubernetes, bgp: cfg.BGP, northSouth: cfg.NorthSouth, l2: cfg.L2, labelsFor: cfg.LabelsFor, observeAdd: cfg.ObserveAdd, addDurations: map[string]addDuration{},
	}
}

func (h *Handlers) logErr(what string, err error) {
	if err != nil {
		h.log.Error(what, "err", err)
	}
}
