package main

import (
	"github.com/spf13/cobra"
)

func (c *cli) metricsCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "metrics",
		Short: "Print the agent's Prometheus metrics",
		Long: `metrics prints what the agent serves on /metrics (Prometheus text format),
read over the API socket: datapath forwards and drops by reason, map sizes,
the reconciler, the mesh per cluster, WireGuard peers, kvstore operations.
The same is on --metrics-addr (default :9962) for Prometheus to scrape;
docs/metrics.md lists every metric.`,
		Example: `  isthmus metrics
  isthmus metrics | grep isthmus_datapath_drop_packets_total`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := c.ctx(cmd)
			defer cancel()
			text, err := c.client().Metrics(ctx)
			if err != nil {
				return err
			}
			_, err = c.out.Write(text)
			return err
		},
	}
}
