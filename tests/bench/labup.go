package main

// Section "labup": the time `isthmus lab up` takes from its start until
// the mesh is ready (built, connected, every agent sees every cluster's
// nodes, pods and service, WireGuard peers in place), for 2 clusters x 2
// nodes and 4 x 3. It runs lab.Up in-process, the code behind `lab up`,
// with the binaries built beforehand (as `make lab` has them), and tears
// each lab down before the next. The connectivity test that `lab up` runs
// afterwards is not included.

import (
	"context"
	"flag"
	"fmt"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

var labupEncryption = flag.String("labup-encryption", "wireguard", "labup: encryption of the lab (wireguard or none)")

func labupBench(ctx context.Context) error {
	if _, err := labtest.Binaries(); err != nil {
		return err
	}
	for _, size := range []struct{ clusters, nodes int }{{2, 2}, {4, 3}} {
		start := time.Now()
		l, _, err := lab.Up(ctx, lab.UpOptions{Binaries: labtest.Binaries, Clusters: size.clusters, Nodes: size.nodes, PodsPerNode: 2, Encryption: *labupEncryption})
		d := time.Since(start)
		if err != nil {
			return fmt.Errorf("%dx%d: %w", size.clusters, size.nodes, err)
		}
		if err := l.Close(); err != nil {
			return fmt.Errorf("%dx%d: lab down: %w", size.clusters, size.nodes, err)
		}
		line(fmt.Sprintf("labup-%dx%d", size.clusters, size.nodes), d.Seconds(), "s",
			fmt.Sprintf("info: lab up to ready, %d clusters x %d nodes, 2 echo pods per node, encryption %s", size.clusters, size.nodes, *labupEncryption))
	}
	return nil
}
