package main

import (
	"testing"

	"github.com/isthmus-mesh/isthmus/agent"
)

func TestMetricsAddrFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, agent.DefaultMetricsAddr},
		{[]string{"--metrics-addr", "127.0.0.1:19962"}, "127.0.0.1:19962"},
		{[]string{"--metrics-addr", ""}, ""},
	} {
		cfg, err := parse(t, append([]string{"--pod-cidr", "10.1.1.0/24"}, c.args...)...)
		if err != nil || cfg.MetricsAddr != c.want {
			t.Errorf("%v: MetricsAddr %q, %v; want %q", c.args, cfg.MetricsAddr, err, c.want)
		}
	}
}
