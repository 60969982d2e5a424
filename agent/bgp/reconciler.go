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

	mu   sync.Mutex
	der  *deriver // changed by Sync under mu: Status reads its sources
	plan Plan     // without paths and sources (see der)
	err  error    // of the last Sync
}

// New returns a reconciler with a stopped speaker.
func New(log *slog.Logger) *Reconciler {
	return &Reconciler{log: log, sp: speaker.New(log), der: newDeriver()}
}

// Sync derives the speaker's configuration when its inputs moved (the
// generations of the objects and the endpoints) or a while passed, and
// converges the speaker. in.ChangedSince, when set, tells which objects
// changed since a generation: then only those are derived again, and only
// the paths that changed are handed to the speaker. A failure concerns
// BGP only: the caller retries soon (reconcile's SoftFail).
func (r *Reconciler) Sync(ctx context.Context, in Input, objectsGen, endpointsGen uint64) error {
	gens := [2]uint64{objectsGen, endpointsGen}
	r.mu.Lock()
	lastErr := r.err
	r.mu.Unlock()
	if gens == r.gens && gens != [2]uint64{} && lastErr == nil && time.Since(r.derived) < rederiveInterval {
		return nil
	}
	var changed []string
	known := false
	if in.ChangedSince != nil && r.gens[0] != 0 && objectsGen != 0 {
		changed, known = in.ChangedSince(r.gens[0])
	}
	// Everything again now and then: a password file may have changed.
	full := time.Since(r.derived) >= rederiveInterval
	r.mu.Lock()
	r.der.update(in, changed, known, endpointsGen == 0 || endpointsGen != r.gens[1], full)
	plan := r.der.plan
	set, del := r.der.take()
	r.mu.Unlock()
	if full || !known {
		r.derived = time.Now()
	}
	r.gens = gens
	err := r.sp.ReconcileChanges(ctx, plan.Config, set, del)
	r.mu.Lock()
	changedPolicy := plan.Policy != r.plan.Policy
	r.plan, r.err = plan, err
	r.mu.Unlock()
	if changedPolicy {
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
	plan, err, advertised := r.plan, r.err, len(r.der.paths)
	r.mu.Unlock()
	if plan.Policy == "" {
		return nil
	}
	st := &api.BGPStatus{Policy: plan.Policy, Ignored: plan.Ignored, LocalASN: plan.Config.ASN, Advertised: advertised, LastError: plan.Err}
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
		r.mu.Lock()
		for _, rt := range rs {
			st.Routes = append(st.Routes, api.BGPRoute{Prefix: rt.Prefix, Communities: rt.Communities, LocalPref: rt.LocalPref, Sources: r.der.sources(rt.Prefix)})
		}
		r.mu.Unlock()
	}
	return st
}
