package k8s

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/internal/testenv"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/kube"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// TestLabUpKubernetes runs what a new user runs, with the CLI built the
// way `make lab LAB_ARGS=--kubernetes` builds it (static, next to each
// other): `isthmus lab up --kubernetes` (two Kubernetes clusters of two
// nodes, Isthmus installed into each by its Helm chart, connected with
// `clustermesh connect --kubeconfig`, the connectivity test), then a chart
// upgrade in both clusters that rolls every agent while a cross-cluster TCP
// stream keeps running, then `isthmus lab down`, after which nothing of
// the lab may remain on the host.
func TestLabUpKubernetes(t *testing.T) {
	labtest.SkipUnlessRoot(t)
	if _, err := kube.FindBinaries(); err != nil {
		testenv.Skip(t, "%v", err)
	}
	if _, err := kube.FindHelm(); err != nil {
		testenv.Skip(t, "%v", err)
	}
	for _, tool := range []string{"containerd", "runc", "ctr", "etcd", "nsenter", "/usr/lib/cni/loopback"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Skip(t, "%s not installed (make deps): %v", tool, err)
		}
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	tmp := t.TempDir()
	// Static and side by side, as make lab builds them.
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	cli := bins.CLI
	stateFile := filepath.Join(tmp, "up.json")
	run := func(d time.Duration, args ...string) (string, error) {
		cctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		cmd := exec.CommandContext(cctx, cli, args...)
		// In the source tree: the CLI finds the Kubernetes binaries, Helm
		// and the chart there.
		cmd.Dir = root
		cmd.Env = append(os.Environ(), lab.EnvStateFile+"="+stateFile)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() {
		if _, err := os.Stat(stateFile); err == nil {
			out, err := run(3*time.Minute, "lab", "down")
			t.Logf("cleanup: isthmus lab down: %v\n%s", err, out)
		}
	})

	t0 := time.Now()
	step(t, "isthmus lab up --kubernetes")
	out, err := run(12*time.Minute, "lab", "up", "--kubernetes", "--encryption", "wireguard")
	if err != nil {
		t.Fatalf("lab up --kubernetes: %v\n%s", err, out)
	}
	step(t, "info: labup-kubernetes-2x2 %.1f s (lab up --kubernetes, binaries built, connectivity test included)", time.Since(t0).Seconds())
	for _, want := range []string{"18 passed, 0 failed", "NetworkPolicy default/echo-from-echo (networking.k8s.io/v1)", "isthmus lab kubectl c1 --"} {
		if !strings.Contains(out, want) {
			t.Errorf("lab up output lacks %q:\n%s", want, out)
		}
	}
	st, err := lab.ReadState(stateFile)
	if err != nil {
		t.Fatal(err)
	}
	if st.Kubernetes == nil || len(st.Clusters) != 2 || !st.Ready {
		t.Fatalf("state: %+v", st)
	}
	var podNetns []string
	for _, p := range st.Pods {
		podNetns = append(podNetns, p.Netns)
		if !strings.HasPrefix(p.Netns, "cni-") {
			t.Errorf("pod %s runs in netns %s, not a container runtime's sandbox", p.Name, p.Netns)
		}
	}
	c1, c2 := st.Clusters[0], st.Clusters[1]
	kubectl := func(c lab.StateCluster, args ...string) (string, error) {
		return run(time.Minute, append([]string{"lab", "kubectl", c.Name, "--"}, args...)...)
	}

	t.Run("the bundles were exchanged as Secrets", func(t *testing.T) {
		for _, pair := range [][2]lab.StateCluster{{c1, c2}, {c2, c1}} {
			in, of := pair[0], pair[1]
			out, err := kubectl(in, "-n", st.Kubernetes.Namespace, "get", "secret", "isthmus-peer-"+of.Name, "-o", `jsonpath={.metadata.labels.isthmus\.io/remote-cluster} {.data.bundle\.json}`)
			if err != nil {
				t.Fatalf("%s: %v\n%s", in.Name, err, out)
			}
			label, data, _ := strings.Cut(strings.TrimSpace(out), " ")
			if label != of.Name || len(data) < 100 {
				t.Errorf("Secret isthmus-peer-%s in %s: label %q, %d bytes of bundle", of.Name, in.Name, label, len(data))
			}
		}
	})

	t.Run("every cluster keeps the ServiceImport of the global service", func(t *testing.T) {
		// Written by each chart-installed server (its RBAC must allow it).
		for _, c := range []lab.StateCluster{c1, c2} {
			err := eventually(30*time.Second, func() error {
				out, err := kubectl(c, "-n", "default", "get", "serviceimports.multicluster.x-k8s.io", "echo", "-o", "jsonpath={.status.clusters[*].cluster}")
				if err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				if got := strings.Fields(out); !slices.Contains(got, c1.Name) || !slices.Contains(got, c2.Name) {
					return fmt.Errorf("status.clusters %q, want %s and %s", out, c1.Name, c2.Name)
				}
				return nil
			})
			if err != nil {
				t.Errorf("%s: ServiceImport default/echo: %v", c.Name, err)
			}
		}
	})

	t.Run("connect refuses one cluster twice", func(t *testing.T) {
		out, err := run(time.Minute, "lab", "exec", "fabric", "--", cli, "clustermesh", "connect", "--kubeconfig", c1.Kubeconfig, "--remote-kubeconfig", c1.Kubeconfig)
		if err == nil || !strings.Contains(out, `both kubeconfigs lead to a cluster named "c1"`) {
			t.Errorf("connect c1 with c1: %v\n%s", err, out)
		}
	})

	t.Run("helm upgrade rolls every agent while a cross-cluster stream keeps running", func(t *testing.T) {
		var src, dst lab.StatePod
		for _, p := range st.Pods {
			// The denied pods: no policy selects them, so any port is open.
			if p.Role == connectivity.RoleDenied {
				if p.Cluster == c1.Name {
					src = p
				} else {
					dst = p
				}
			}
		}
		s, err := connectivity.StartStream(ctx, lab.NetnsPath(src.Netns), lab.NetnsPath(dst.Netns), netip.AddrPortFrom(dst.IPv4, 9100))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Stop()
		agentPods := func(c lab.StateCluster) []string {
			out, err := kubectl(c, "-n", st.Kubernetes.Namespace, "get", "pods", "-l", "app.kubernetes.io/component=agent", "-o", "name")
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			names := strings.Fields(out)
			sort.Strings(names)
			return names
		}
		before := map[string][]string{c1.Name: agentPods(c1), c2.Name: agentPods(c2)}
		time.Sleep(time.Second)
		t0 := time.Now()
		step(t, "helm upgrade --set agent.logLevel=debug in both clusters, then kubectl rollout status")
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, c := range []lab.StateCluster{c1, c2} {
			wg.Go(func() { errs[i] = helmUpgrade(ctx, st, c, run, "agent.logLevel=debug") })
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		step(t, "info: agents of both clusters rolled in %v", time.Since(t0).Round(time.Millisecond))
		time.Sleep(2 * time.Second)
		stall, trips, err := s.Result()
		step(t, "info: k8s-agent-rollout-stream-stall-max %d ms (%d round trips, %s -> %s port 9100)", stall.Milliseconds(), trips, src.Name, dst.Name)
		if err != nil {
			t.Fatalf("the stream broke during the rollout: %v", err)
		}
		if stall > 5*time.Second {
			t.Errorf("the stream stalled for %v during the rollout", stall)
		}
		for _, c := range []lab.StateCluster{c1, c2} {
			after := agentPods(c)
			for _, old := range before[c.Name] {
				for _, n := range after {
					if n == old {
						t.Errorf("%s: agent pod %s was not replaced", c.Name, old)
					}
				}
			}
		}
		out, err := run(3*time.Minute, "connectivity", "test")
		if err != nil || !strings.Contains(out, "18 passed, 0 failed") {
			t.Errorf("connectivity test after the rollout: %v\n%s", err, out)
			// What the API and the agents say, for the failure's cause.
			for _, c := range []lab.StateCluster{c1, c2} {
				out, _ := kubectl(c, "get", "endpointslices", "-A", "-o", "wide")
				t.Logf("%s: endpointslices:\n%s", c.Name, out)
				out, _ = kubectl(c, "-n", st.Kubernetes.Namespace, "logs", "-l", "app.kubernetes.io/component=agent", "--tail", "40", "--prefix")
				t.Logf("%s: agent logs:\n%s", c.Name, out)
			}
		}
	})

	step(t, "isthmus lab down")
	if out, err := run(3*time.Minute, "lab", "down"); err != nil {
		t.Fatalf("lab down: %v\n%s", err, out)
	}
	if left := kube.Leftovers(st.Prefix, st.Dir, podNetns); len(left) > 0 {
		t.Errorf("left on the host after lab down:\n  %s", strings.Join(left, "\n  "))
	}
	if _, err := os.Stat(stateFile); !os.IsNotExist(err) {
		t.Errorf("state file %s still there: %v", stateFile, err)
	}
}

// helmUpgrade upgrades cluster c's release with its lab values and one
// --set, and waits for the agents to roll (kubectl rollout status).
func helmUpgrade(ctx context.Context, st *lab.State, c lab.StateCluster, run func(time.Duration, ...string) (string, error), set string) error {
	k := st.Kubernetes
	home := filepath.Join(st.Dir, "helm-home")
	cctx, cancel := context.WithTimeout(ctx, 6*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, "nsenter", "--net="+lab.NetnsPath(c.Router), "--",
		k.Helm, "upgrade", k.Release, k.Chart, "--kubeconfig", c.Kubeconfig, "-n", k.Namespace,
		"-f", filepath.Join(st.Dir, "helm-values-"+c.Name+".yaml"), "--set", set, "--timeout", "5m")
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home+"/cache", "HELM_CONFIG_HOME="+home+"/config", "HELM_DATA_HOME="+home+"/data")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: helm upgrade: %v\n%s", c.Name, err, out)
	}
	out, err := run(5*time.Minute, "lab", "kubectl", c.Name, "--", "-n", k.Namespace, "rollout", "status", "ds/"+k.Release+"-agent", "--timeout", "4m")
	if err != nil {
		return fmt.Errorf("%s: rollout status: %v\n%s", c.Name, err, out)
	}
	return nil
}
