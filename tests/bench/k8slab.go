package main

// Section "k8s-lab": `isthmus lab up --kubernetes` (lab/kube.Up, in
// process, with the binaries built beforehand as `make lab` has them):
//
//   - labup-kubernetes-2x2: from the start of kube.Up until the mesh is
//     ready: 2 Kubernetes clusters x 2 nodes, a Helm install of Isthmus
//     into each, the clusters connected (clustermesh connect
//     --kubeconfig), the echo workload Ready and seen by every agent. The
//     connectivity test is not included.
//   - k8s-agent-rollout-stream-stall-max: a TCP stream from c1's denied pod
//     to c2's (a round trip every 10 ms) while `helm upgrade --set
//     agent.logLevel=debug` rolls the agent DaemonSets of both clusters at
//     once, one node at a time each; the longest time without a round trip
//     (from before the upgrades until 2 s after both rollouts finished).

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/kube"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// k8sRolloutStallGoal: flows survive an agent restart (the datapath stays
// pinned), so a rolling update may pause a stream only briefly.
const k8sRolloutStallGoal = "<= 1000"

func k8sLabBench(ctx context.Context) error {
	if _, err := labtest.Binaries(); err != nil {
		return err
	}
	start := time.Now()
	kl, st, err := kube.Up(ctx, kube.UpOptions{Binaries: labtest.Binaries, Encryption: "wireguard"})
	d := time.Since(start)
	if err != nil {
		return err
	}
	defer kl.Close()
	line("labup-kubernetes-2x2", d.Seconds(), "s", "info: lab up --kubernetes to ready, 2 clusters x 2 nodes, Helm installs, clusters connected, WireGuard")

	var src, dst lab.StatePod
	for _, p := range st.Pods {
		if p.Role == connectivity.RoleDenied { // no policy selects them: any port
			if p.Cluster == st.Clusters[0].Name {
				src = p
			} else {
				dst = p
			}
		}
	}
	s, err := connectivity.StartStream(ctx, lab.NetnsPath(src.Netns), lab.NetnsPath(dst.Netns), netip.AddrPortFrom(dst.IPv4, 9100))
	if err != nil {
		return err
	}
	defer s.Stop()
	time.Sleep(time.Second)
	t0 := time.Now()
	errs := make([]error, len(kl.Clusters))
	var wg sync.WaitGroup
	for i := range kl.Clusters {
		wg.Go(func() {
			if errs[i] = kl.HelmInstall(ctx, i, "upgrade", "--set", "agent.logLevel=debug"); errs[i] == nil {
				errs[i] = kl.WaitRollout(ctx, i, 5*time.Minute)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	rolled := time.Since(t0)
	time.Sleep(2 * time.Second)
	stall, trips, err := s.Result()
	if err != nil {
		return fmt.Errorf("the stream broke during the rollout: %w", err)
	}
	line("k8s-agent-rollout-stream-stall-max", float64(stall.Milliseconds()), "ms",
		fmt.Sprintf("%s (%d round trips; both DaemonSets rolled in %.1fs)", k8sRolloutStallGoal, trips, rolled.Seconds()))
	return nil
}
