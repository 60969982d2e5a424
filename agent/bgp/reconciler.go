package bgp

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	speaker "github.com/isthmus-mesh/isthmus/bgp"
)

// rederiveInterval bounds how long a changed password file goes unnoticed
// when nothing else changes.
const rederiveInterval = 30 * time.Second

// Reconciler converges the node's speaker to desired state.
type Reconciler struct {
	log *slog.Logger
	sp  *speaker.Speaker

	// Reconcile loop only.
	gens    [2]uint64
	derived time.Time
	memo    memo // what each service announced at the last derive

	mu   sync.Mutex
	plan Plan
	err  error // of the last Sync
}

// New returns a reconciler with a stopped speaker.
func New(log *slog.Logger) *Reconciler {
	return &Reconciler{log: log, sp: speaker.New(log)}
}

// Sync derives the speaker's configuration when its inputs moved (the
// generations of the objects and the endpoints) or a while passed, and
// converges the speaker. A failure concerns BGP only: the caller retries
// soon (reconcile's SoftFail).
func (r *Reconciler) Sync(ctx context.Context, in Input, objectsGen, endpointsGen uint64) error {
	gens := [2]uint64{objectsGen, endpointsGen}
	r.mu.Lock()
	lastErr := r.err
	r.mu.Unlock()
	if gens == r.gens && gens != [2]uint64{} && lastErr == nil && time.Since(r.derived) < rederiveInterval {
		return nil
	}
	plan := derive(in, &r.memo)
	r.gens, r.derived = gens, time.Now()
	err := r.sp.Reconcile(ctx, plan.Config)
	r.mu.Lock()
	changed := plan.Policy != r.plan.Policy
	r.plan, r.err = plan, err
	r.mu.Unlock()
	if changed {
		r.log.Info("bgp: peering policy for this node", "policy", plan.Policy, "ignored", plan.Ignored)
	}
	if plan.Err != "" {
		r.log.Warn("bgp: policy not usable", "err", plan.Err)
	}
	return err
}

// Detach leaves the peers holding our routes (graceful restart): for the
// agent's exit.
func (r *Reconciler) Detach(ctx context.Context) { r.sp.Detach(ctx) }

// Status is the BGP status; nil when no policy selects the node.
func (r *Reconciler) Status(ctx context.Context, routes bool) *api.BGPStatus {
	r.mu.Lock()
	plan, err := r.plan, r.err
	r.mu.Unlock()
	if plan.Policy == "" {
		return nil
	}
	st := &api.BGPStatus{Policy: plan.Policy, Ignored: plan.Ignored, LocalASN: plan.Config.ASN, Advertised: len(plan.Config.Paths), LastError: plan.Err}
	if plan.Config.RouterID.IsValid() {
		st.RouterID = plan.Config.RouterID.String()
	}
	if err != nil && st.LastError == "" {
		st.LastError = err.Error()
	}
	for _, p := range r.sp.Peers(ctx) {
		st.Peers = append(st.Peers, api.BGPPeer{
			Address: p.Address, Port: p.Port, PeerASN: p.ASN, State: p.State, Since: p.Since,
			LastError: p.LastError, LastErrorAt: p.LastErrorAt, Received: p.Received, Advertised: p.Advertised,
			Flaps: p.Flaps, MD5: p.MD5, GracefulRestart: p.GracefulRestart, RestartTime: int(p.RestartTime / time.Second),
		})
	}
	if routes {
		rs, err := r.sp.Routes(ctx)
		if err != nil && st.LastError == "" {
			st.LastError = err.Error()
		}
		for _, rt := range rs {
			st.Routes = append(st.Routes, api.BGPRoute{Prefix: rt.Prefix, Communities: rt.Communities, LocalPref: rt.LocalPref, Sources: plan.Sources[rt.Prefix]})
		}
	}
	return st
}
