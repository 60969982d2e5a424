package kvstore

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// op names one kind of etcd call for the counters.
type op int

const (
	opGet op = iota
	opGetPrefix
	opPut
	opDelete
	opDeletePrefix
	opTxn
	opLeaseGrant
	opLeaseRevoke
	opAuth
	opStatus
	numOps
)

var opNames = [numOps]string{
	opGet:          "get",
	opGetPrefix:    "get_prefix",
	opPut:          "put",
	opDelete:       "delete",
	opDeletePrefix: "delete_prefix",
	opTxn:          "txn",
	opLeaseGrant:   "lease_grant",
	opLeaseRevoke:  "lease_revoke",
	opAuth:         "auth",
	opStatus:       "status",
}

// OpStats counts one kind of call. A call that was retried counts once, with
// the latency of all its attempts.
type OpStats struct {
	Count   uint64        // calls made
	Errors  uint64        // calls that returned an error
	Latency time.Duration // sum of the latencies of all calls
}

// Stats is a snapshot of a client's counters.
type Stats struct {
	// Ops is keyed by operation: get, get_prefix, put, delete,
	// delete_prefix, txn, lease_grant, lease_revoke, auth, status.
	Ops map[string]OpStats
	// Retries counts attempts repeated after a transient error.
	Retries uint64
	// LeaseRegrants counts leases granted anew after the old one was lost.
	LeaseRegrants uint64
	// WatchEvents counts Upsert and Delete events delivered by WatchPrefix,
	// synthesised deletions included.
	WatchEvents uint64
	// WatchRelists counts lists made by WatchPrefix after the first one.
	WatchRelists uint64
	// WatchErrors counts watch streams that failed (compaction, lost
	// leader, closed connection) and were replaced by a re-list.
	WatchErrors uint64
	// WatchStaleDeletes counts deletions synthesised after a re-list.
	WatchStaleDeletes uint64
}

type opCounters struct {
	count, errors atomic.Uint64
	latency       atomic.Int64 // nanoseconds
}

type counters struct {
	ops               [numOps]opCounters
	retries           atomic.Uint64
	leaseRegrants     atomic.Uint64
	watchEvents       atomic.Uint64
	watchRelists      atomic.Uint64
	watchErrors       atomic.Uint64
	watchStaleDeletes atomic.Uint64
	// m, when set (Config.Metrics), gets every count too.
	m *Metrics
}

func (c *counters) observe(o op, start time.Time, err error) {
	d := time.Since(start)
	oc := &c.ops[o]
	oc.count.Add(1)
	oc.latency.Add(int64(d))
	if err != nil {
		oc.errors.Add(1)
	}
	if c.m != nil {
		c.m.observe(o, d, err)
	}
}

// add counts one event in n and in its Prometheus twin.
func (c *counters) add(n *atomic.Uint64, twin func(*Metrics) prometheus.Counter) {
	n.Add(1)
	if c.m != nil {
		twin(c.m).Inc()
	}
}

func (c *counters) retry() {
	c.add(&c.retries, func(m *Metrics) prometheus.Counter { return m.retries })
}
func (c *counters) leaseRegrant() {
	c.add(&c.leaseRegrants, func(m *Metrics) prometheus.Counter { return m.leaseRegrants })
}
func (c *counters) watchEvent() {
	c.add(&c.watchEvents, func(m *Metrics) prometheus.Counter { return m.watchEvents })
}
func (c *counters) watchRelist() {
	c.add(&c.watchRelists, func(m *Metrics) prometheus.Counter { return m.watchRelists })
}
func (c *counters) watchError() {
	c.add(&c.watchErrors, func(m *Metrics) prometheus.Counter { return m.watchErrors })
}
func (c *counters) watchStaleDelete() {
	c.add(&c.watchStaleDeletes, func(m *Metrics) prometheus.Counter { return m.watchStaleDeletes })
}

// watching counts a running watch (+1 at start, -1 at its end).
func (c *counters) watching(delta float64) {
	if c.m != nil {
		c.m.watches.Add(delta)
	}
}

// Stats returns a snapshot of the client's counters.
func (c *Client) Stats() Stats {
	s := Stats{
		Ops:               make(map[string]OpStats, numOps),
		Retries:           c.stats.retries.Load(),
		LeaseRegrants:     c.stats.leaseRegrants.Load(),
		WatchEvents:       c.stats.watchEvents.Load(),
		WatchRelists:      c.stats.watchRelists.Load(),
		WatchErrors:       c.stats.watchErrors.Load(),
		WatchStaleDeletes: c.stats.watchStaleDeletes.Load(),
	}
	for i := range numOps {
		oc := &c.stats.ops[i]
		s.Ops[opNames[i]] = OpStats{
			Count:   oc.count.Load(),
			Errors:  oc.errors.Load(),
			Latency: time.Duration(oc.latency.Load()),
		}
	}
	return s
}
