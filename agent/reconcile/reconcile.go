// Package reconcile runs the agent's reconcilers: requests for a run
// coalesce into one, runs happen one at a time (on request, retried with
// backoff, and every ResyncInterval), and a caller that changed the desired
// state can wait until a run covering its change finished (Converge).
//
// It knows nothing of what a run does. The agent has two Triggers: the
// datapath loop (the BPF maps), which API calls wait for, and the
// follow-up loop (routes, WireGuard, L2, BIG TCP, BGP, north-south), which
// each datapath run requests and nothing waits for.
package reconcile

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// ResyncInterval bounds how long drift (a map entry removed by hand, a
	// node address that changed without a netlink event) can last.
	ResyncInterval = time.Minute
	maxBackoff     = 10 * time.Second
	// ConvergeTimeout bounds how long an API call waits for the datapath.
	ConvergeTimeout = 30 * time.Second
)

// Trigger coalesces requests for a reconcile and lets callers wait until
// the datapath reflects the desired state they wrote.
type Trigger struct {
	trigger chan struct{} // capacity 1: any number of requests, one pending run
	// softFailed: the last run could not finish routes or tunnels (which
	// fail no API call); the loop retries with backoff.
	softFailed atomic.Bool

	mu          sync.Mutex
	want        uint64 // generation of the desired state, bumped per request
	done        uint64 // highest generation a successful run covered
	failed      uint64 // highest generation a failed run covered
	lastErr     error
	runs        uint64
	lastSuccess time.Time
	finished    chan struct{} // closed and replaced after every run

	// For /metrics.
	errors    uint64        // runs that failed
	covered   uint64        // highest generation any finished run covered
	startedAt time.Time     // of the run in progress
	busy      time.Duration // time spent in runs
}

// New returns a Trigger with no run requested.
func New() *Trigger {
	return &Trigger{trigger: make(chan struct{}, 1), finished: make(chan struct{})}
}

// Request asks for a run and returns the generation it will cover.
func (r *Trigger) Request() uint64 {
	r.mu.Lock()
	r.want++
	gen := r.want
	r.mu.Unlock()
	select {
	case r.trigger <- struct{}{}:
	default: // a run is already pending and will see this generation
	}
	return gen
}

// Start returns the generation a run starting now covers.
func (r *Trigger) Start() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.startedAt = time.Now()
	return r.want
}

// Finish records the end of the run Start returned gen for.
func (r *Trigger) Finish(gen uint64, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.runs++
	r.covered = max(r.covered, gen)
	r.busy += time.Since(r.startedAt)
	if err == nil {
		r.done = max(r.done, gen)
		r.lastErr = nil
		r.lastSuccess = time.Now()
	} else {
		r.failed = max(r.failed, gen)
		r.lastErr = err
		r.errors++
	}
	close(r.finished)
	r.finished = make(chan struct{})
}

// SoftFail marks the run in progress as incomplete in a way that fails no
// API call (a route, a tunnel): the loop retries it soon, with backoff.
func (r *Trigger) SoftFail() { r.softFailed.Store(true) }

// wait returns once a run covering gen succeeded, or with the error of the
// first run covering gen that failed.
func (r *Trigger) wait(ctx context.Context, gen uint64) error {
	for {
		r.mu.Lock()
		done, failed, err, ch := r.done, r.failed, r.lastErr, r.finished
		r.mu.Unlock()
		switch {
		case done >= gen:
			return nil
		case failed >= gen && err != nil:
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("datapath not updated within %s: %w", ConvergeTimeout, ctx.Err())
		case <-ch:
		}
	}
}

// Converge requests a run and waits for the datapath to reflect the
// desired state as it is now.
func (r *Trigger) Converge(ctx context.Context) error {
	gen := r.Request()
	ctx, cancel := context.WithTimeout(ctx, ConvergeTimeout)
	defer cancel()
	return r.wait(ctx, gen)
}

// Stats is what the status and /metrics show of the runs.
type Stats struct {
	Runs, Errors uint64
	Pending      uint64 // requests no finished run covers yet
	Failing      bool   // the last run failed
	LastErr      error  // of the last run
	LastSuccess  time.Time
	Busy         time.Duration
}

// Stats returns the counters of the runs so far.
func (r *Trigger) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Stats{Runs: r.runs, Errors: r.errors, Pending: r.want - r.covered,
		Failing: r.lastErr != nil, LastErr: r.lastErr, LastSuccess: r.lastSuccess, Busy: r.busy}
}

// Loop is the only caller of run once the agent has started: one run at
// a time, on request, retried with backoff, and periodically.
func (r *Trigger) Loop(ctx context.Context, log *slog.Logger, run func(context.Context) error) {
	var backoff time.Duration
	timer := time.NewTimer(ResyncInterval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.trigger:
		case <-timer.C:
		}
		gen := r.Start()
		err := run(ctx)
		r.Finish(gen, err)
		if err != nil {
			backoff = min(max(2*backoff, 100*time.Millisecond), maxBackoff)
			log.Error("reconcile failed; retrying", "in", backoff, "err", err)
			timer.Reset(backoff)
			continue
		}
		if r.softFailed.Swap(false) {
			// Routes or tunnels are incomplete: retry soon, without
			// failing the run (API calls it serves succeeded).
			backoff = min(max(2*backoff, time.Second), maxBackoff)
			timer.Reset(backoff)
			continue
		}
		backoff = 0
		timer.Reset(ResyncInterval)
	}
}
