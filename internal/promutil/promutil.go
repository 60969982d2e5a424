// Package promutil holds the small helpers that the Prometheus collectors
// of isthmus-agent and isthmus-clustermesh share: they read their state at
// scrape time and send it as constant metrics.
package promutil

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Gauge returns a function that sends a constant gauge of d to ch.
func Gauge(ch chan<- prometheus.Metric) func(d *prometheus.Desc, v float64, labels ...string) {
	return func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
}

// Counter returns a function that sends a constant counter of d to ch.
func Counter(ch chan<- prometheus.Metric) func(d *prometheus.Desc, v float64, labels ...string) {
	return func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
}

// Bool is b as a metric value: 1 or 0.
func Bool(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// UnixSeconds is t as a Prometheus timestamp; the zero time is 0.
func UnixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
}

// ErrorLog is a promhttp.HandlerOpts.ErrorLog that logs to log as
// warnings.
func ErrorLog(log *slog.Logger) promhttp.Logger { return errorLog{log} }

type errorLog struct{ log *slog.Logger }

func (l errorLog) Println(v ...any) { l.log.Warn("metrics: " + fmt.Sprint(v...)) }
