package kvstore

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the Prometheus metrics of the clients given them in
// Config.Metrics. A process makes one, registers it where it serves
// /metrics (it is a prometheus.Collector) and hands it to every client whose
// calls it wants counted; clients that share it add up.
type Metrics struct {
	ops      *prometheus.CounterVec
	errors   *prometheus.CounterVec
	duration *prometheus.HistogramVec

	retries           prometheus.Counter
	leaseRegrants     prometheus.Counter
	watches           prometheus.Gauge
	watchEvents       prometheus.Counter
	watchRelists      prometheus.Counter
	watchErrors       prometheus.Counter
	watchStaleDeletes prometheus.Counter
}

// NewMetrics returns metrics named isthmus_kvstore_*.
func NewMetrics() *Metrics {
	const ns, sub = "isthmus", "kvstore"
	m := &Metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "operations_total",
			Help: "etcd calls made, by operation; a call retried after transient errors counts once."}, []string{"operation"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "operation_errors_total",
			Help: "etcd calls that returned an error (after any retries), by operation."}, []string{"operation"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "operation_duration_seconds",
			Help: "Latency of etcd calls, retries and backoff included, by operation.",
			// From a local etcd's sub-millisecond reads up to calls that
			// retried through a leader election.
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"operation"}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "retries_total",
			Help: "Attempts of etcd calls repeated after a transient error (no leader, unavailable, timeout)."}),
		leaseRegrants: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "lease_regrants_total",
			Help: "Leases granted anew after the old one was lost (its keys were gone and are written again)."}),
		watches: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "watches",
			Help: "Prefix watches (list-then-watch streams) running."}),
		watchEvents: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "watch_events_total",
			Help: "Upsert and delete events delivered by prefix watches, deletions found by re-lists included."}),
		watchRelists: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "watch_relists_total",
			Help: "Lists made by prefix watches after their first one (after a watch failed)."}),
		watchErrors: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "watch_errors_total",
			Help: "Watch streams that failed (compaction, lost leader, closed connection) and were replaced by a re-list."}),
		watchStaleDeletes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "watch_stale_deletes_total",
			Help: "Deletions synthesised after a re-list for keys that vanished while the watch was down."}),
	}
	// Every operation is there from the first scrape, so rates and ratios
	// work before the first error.
	for _, name := range opNames {
		m.ops.WithLabelValues(name)
		m.errors.WithLabelValues(name)
		m.duration.WithLabelValues(name)
	}
	return m
}

func (m *Metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.ops, m.errors, m.duration, m.retries, m.leaseRegrants,
		m.watches, m.watchEvents, m.watchRelists, m.watchErrors, m.watchStaleDeletes}
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors() {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors() {
		c.Collect(ch)
	}
}

func (m *Metrics) observe(o op, d time.Duration, err error) {
	name := opNames[o]
	m.ops.WithLabelValues(name).Inc()
	m.duration.WithLabelValues(name).Observe(d.Seconds())
	if err != nil {
		m.errors.WithLabelValues(name).Inc()
	}
}
