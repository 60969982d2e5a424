package main

// Section "k8s": Kubernetes mode (package lab/kube: real kube-apiservers,
// kubelets, containerd and pods in the lab's namespaces, the agents in
// Kubernetes mode with the isthmus-cni plugin).
//
//   - k8s-binaries-build: scripts/kube-binaries.sh into a fresh directory
//     (the binaries this section runs): a relink from the Go build cache
//     when it is warm, a full build when it is cold; the line says which.
//   - k8s-cluster-bringup: one 2-node Kubernetes cluster (c1) from the
//     start of lab.AddCluster until both nodes are Ready.
//   - k8s-cni-add: the CNI ADD of kubelet-driven pod creation, as the agent
//     measured it (api.Endpoint.AddDuration: from the local API request's
//     arrival to its response, waiting for the pod's labels and the
//     reconcile run that enforces the endpoint included), over the pods of
//     one Deployment scaled to -k8s-cni-pods replicas at once across c1's
//     two nodes.
//   - k8s-pod-to-remote-cluster: from a pod's CNI ADD (its endpoint's
//     Created, as c1's agent records it) until a client pod of the
//     connected cluster c2 gets an answer from its echo server (HTTP GET
//     from the client pod's netns, a new attempt every 10 ms, each with a
//     150 ms timeout); -k8s-remote-pods pods created one by one. This
//     includes the kubelet starting the pod's container after its sandbox.
//   - k8s-pod-delete-to-remote-cluster: from a pod's deletion in c1's API
//     (grace period 0) until its /32 is gone from the BPF ipcache of a c2
//     agent; -k8s-delete-pods pods one by one.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/kube"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

var (
	k8sCNIPods    = flag.Int("k8s-cni-pods", 50, "k8s: replicas of the Deployment whose CNI ADDs are timed")
	k8sRemotePods = flag.Int("k8s-remote-pods", 20, "k8s: pods created one by one and reached from the other cluster")
	k8sDeletePods = flag.Int("k8s-delete-pods", 10, "k8s: pods deleted one by one (at most -k8s-remote-pods)")
	k8sAttach     = flag.String("k8s-endpoint-attach", "", "k8s: the agents' --endpoint-attach (tc or tcx; \"\": the agent's default), to compare the two")
)

// Goals of the k8s section.
const (
	k8sCNIAddGoal       = "<= 100"  // ms, p99
	k8sPodToRemoteGoal  = "<= 1000" // ms, p99
	k8sDeleteRemoteGoal = "<= 1000" // ms, p99
)

// coldBuild: a kube-binaries.sh run longer than this was a build, not a
// relink (the script: about ten minutes cold, a relink under a minute).
const coldBuild = 3 * time.Minute

func k8sBench(ctx context.Context) error {
	if *k8sDeletePods > *k8sRemotePods {
		return fmt.Errorf("-k8s-delete-pods %d > -k8s-remote-pods %d", *k8sDeletePods, *k8sRemotePods)
	}
	for _, tool := range []string{"containerd", "runc", "ctr", "etcd", "/usr/lib/cni/loopback"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not installed (make deps): %w", tool, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	if _, err := labtest.Binaries(); err != nil {
		return err
	}
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()

	// The Kubernetes binaries, linked afresh by the script.
	binDir := filepath.Join(l.Dir(), "kubernetes")
	start := time.Now()
	cmd := exec.CommandContext(ctx, filepath.Join(root, "scripts", "kube-binaries.sh"), binDir)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("scripts/kube-binaries.sh: %v\n%s", err, out)
	}
	took := time.Since(start)
	kind := "warm relink from the Go build cache"
	if took > coldBuild {
		kind = "cold build (the Go build cache did not have Kubernetes)"
	}
	line("k8s-binaries-build", took.Seconds(), "s", "info: scripts/kube-binaries.sh into a fresh directory, "+kind)
	bins, err := kube.BinariesIn(binDir)
	if err != nil {
		return err
	}

	// The pods' images: a static isthmus.
	isthmus := filepath.Join(l.Dir(), "isthmus-static")
	build := exec.CommandContext(ctx, "go", "build", "-o", isthmus, "./cmd/isthmus")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build static isthmus: %v\n%s", err, out)
	}
	images := filepath.Join(l.Dir(), "images.tar")
	if err := kube.WriteImages(isthmus, images); err != nil {
		return err
	}

	m := kube.NewMesh(kube.MeshOptions{Images: images, Binaries: &bins})
	var o lab.ClusterOptions
	m.Enable(&o)
	if *k8sAttach != "" {
		o.AgentArgs = append(o.AgentArgs, "--endpoint-attach="+*k8sAttach)
	}
	start = time.Now()
	c1, err := l.AddCluster(ctx, 1, o)
	if err != nil {
		return fmt.Errorf("cluster c1: %w", err)
	}
	k1 := m.Cluster("c1")
	if err := k1.WaitNodesReady(ctx); err != nil {
		return err
	}
	line("k8s-cluster-bringup", time.Since(start).Seconds(), "s",
		"info: one Kubernetes cluster of 2 nodes (control plane, containerd, kubelets, agents, clustermesh server), lab.AddCluster to nodes Ready")

	if err := k8sCNIAdd(ctx, k1, c1); err != nil {
		return fmt.Errorf("CNI add: %w", err)
	}

	// The second cluster, connected, after the 50 pods are gone.
	c2, err := l.AddCluster(ctx, 2, o)
	if err != nil {
		return fmt.Errorf("cluster c2: %w", err)
	}
	k2 := m.Cluster("c2")
	if err := k2.WaitNodesReady(ctx); err != nil {
		return err
	}
	if err := lab.Connect(ctx, c1, c2); err != nil {
		return fmt.Errorf("connect c1 and c2: %w", err)
	}
	return k8sRemote(ctx, k1, c1, k2, c2)
}

// k8sCNIAdd scales a Deployment to -k8s-cni-pods replicas in c1 at once
// and reads each pod's CNI ADD duration from its agent; the pods are gone
// again when it returns.
func k8sCNIAdd(ctx context.Context, k *kube.Cluster, c *lab.Cluster) error {
	n := *k8sCNIPods
	labels := map[string]string{"app": "cni-bench"}
	deps := k.Client.AppsV1().Deployments("default")
	probeNs, err := c.Lab().AddPodNetns("rtnlprobe")
	if err != nil {
		return err
	}
	probe, err := startRTNLProbe(probeNs, 5*time.Millisecond)
	if err != nil {
		return err
	}
	if _, err := deps.Create(ctx, echoDeployment("c1", "cni-bench", int32(n), labels), metav1.CreateOptions{}); err != nil {
		_, _ = probe.Stop()
		return err
	}
	start := time.Now()
	pods, err := readyPods(ctx, k, "app=cni-bench", n, 3*time.Minute)
	waits, perr := probe.Stop()
	if err != nil {
		return err
	}
	if perr != nil {
		return fmt.Errorf("RTNL probe: %w", perr)
	}
	progress("k8s: %d pods of the Deployment ready after %v", n, time.Since(start).Round(time.Millisecond))
	eps, err := endpointsByName(ctx, c)
	if err != nil {
		return err
	}
	var durs []time.Duration
	perNode := map[string]int{}
	for _, p := range pods {
		ep, ok := eps[p.Name]
		if !ok || ep.ContainerID == "" {
			return fmt.Errorf("pod %s has no CNI endpoint on its agent", p.Name)
		}
		if ep.AddDuration <= 0 {
			return fmt.Errorf("endpoint of pod %s has no add duration", p.Name)
		}
		durs = append(durs, ep.AddDuration)
		perNode[p.Spec.NodeName]++
	}
	slices.Sort(durs)
	progress("k8s: CNI ADD durations (ms) %v; pods per node %v", msList(durs), perNode)
	line("k8s-cni-add-p50", ms(pct(durs, 50)), "ms",
		fmt.Sprintf("info: %d pods of one Deployment created at once over 2 nodes (%v), CNI ADD as the agent measured it; max %.2f ms", n, perNode, ms(durs[len(durs)-1])))
	line("k8s-cni-add-p99", ms(pct(durs, 99)), "ms", k8sCNIAddGoal)
	slices.Sort(waits)
	line("k8s-rtnl-request-during-burst-p99", ms(pct(waits, 99)), "ms",
		fmt.Sprintf("info: one rtnetlink request that takes the RTNL lock (lo up in a namespace of its own), every 5 ms while the %d pods started (%d requests): what each RTNL request of a pod's plumbing waits then; p50 %.2f ms, p90 %.2f ms, max %.2f ms; %.0f%% of the time in waits over 10 ms, %.0f%% over 100 ms", n, len(waits), ms(pct(waits, 50)), ms(pct(waits, 90)), ms(waits[len(waits)-1]), 100*probe.stalled(10*time.Millisecond), 100*probe.stalled(100*time.Millisecond)))

	// Clean up before the next measurements.
	if err := deps.Delete(ctx, "cni-bench", metav1.DeleteOptions{}); err != nil {
		return err
	}
	return poll(ctx, 2*time.Minute, 200*time.Millisecond, func() error {
		eps, err := endpointsByName(ctx, c)
		if err != nil {
			return err
		}
		if len(eps) > 0 {
			return fmt.Errorf("%d endpoints of the Deployment left", len(eps))
		}
		return nil
	})
}

// k8sRemote creates pods in c1 one by one and times how soon a client pod
// in c2 reaches each, then deletes some one by one and times how soon they
// leave c2's ipcache.
func k8sRemote(ctx context.Context, k1 *kube.Cluster, c1 *lab.Cluster, k2 *kube.Cluster, c2 *lab.Cluster) error {
	if _, err := k2.Client.CoreV1().Pods("default").Create(ctx, echoPod("c2", "client"), metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := readyPods(ctx, k2, "app=client", 1, 2*time.Minute); err != nil {
		return err
	}
	c2eps, err := endpointsByName(ctx, c2)
	if err != nil {
		return err
	}
	client, ok := c2eps["client"]
	if !ok {
		return errors.New("client pod has no endpoint in c2")
	}
	watch := c2.Agents[0] // whose ipcache the deletes leave

	// One pod first, not timed: the mesh is connected end to end.
	if _, err := reachRemote(ctx, k1, c1, client.Netns, "remote-warmup", 60*time.Second); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}

	var reach, adds []time.Duration
	var addrs []netip.Addr
	for i := range *k8sRemotePods {
		name := fmt.Sprintf("remote-%02d", i)
		ep, err := reachRemote(ctx, k1, c1, client.Netns, name, 30*time.Second)
		if err != nil {
			return err
		}
		reach = append(reach, ep.took)
		addrs = append(addrs, ep.addr)
		if ep.add > 0 {
			adds = append(adds, ep.add)
		}
	}
	progress("k8s: CNI ADD to reached from c2 (ms, in creation order) %v", msList(reach))
	slices.Sort(reach)
	line("k8s-pod-to-remote-cluster-p50", ms(pct(reach, 50)), "ms",
		fmt.Sprintf("info: %d pods created one by one in c1, from the endpoint's Created (c1's agent) to the first answer of its echo server to a c2 pod; max %.2f ms", len(reach), ms(reach[len(reach)-1])))
	line("k8s-pod-to-remote-cluster-p99", ms(pct(reach, 99)), "ms", k8sPodToRemoteGoal)
	if len(adds) > 0 {
		// Beside k8s-cni-add: the same figure without other pods' adds
		// waiting on the agent.
		slices.Sort(adds)
		line("k8s-cni-add-one-at-a-time-p50", ms(pct(adds, 50)), "ms",
			fmt.Sprintf("info: the CNI ADDs of these %d pods (created one by one) as the agent measured them; p99 %.2f ms", len(adds), ms(pct(adds, 99))))
	}

	var gone []time.Duration
	for i := range *k8sDeletePods {
		name, addr := fmt.Sprintf("remote-%02d", i), addrs[i]
		if has, err := ipcacheHas(watch, addr); err != nil || !has {
			return fmt.Errorf("%s (%s) not in c2's ipcache before its delete (%v)", name, addr, err)
		}
		t0 := time.Now()
		if err := k1.Client.CoreV1().Pods("default").Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr[int64](0)}); err != nil {
			return err
		}
		for {
			has, err := ipcacheHas(watch, addr)
			if err != nil {
				return err
			}
			if !has {
				break
			}
			if time.Since(t0) > 30*time.Second {
				return fmt.Errorf("%s (%s) still in c2's ipcache %v after its delete", name, addr, time.Since(t0).Round(time.Millisecond))
			}
			time.Sleep(5 * time.Millisecond)
		}
		gone = append(gone, time.Since(t0))
	}
	progress("k8s: pod deleted in c1 to gone from c2's ipcache (ms) %v", msList(gone))
	slices.Sort(gone)
	line("k8s-pod-delete-to-remote-cluster-p50", ms(pct(gone, 50)), "ms",
		fmt.Sprintf("info: %d pods deleted one by one in c1 (grace period 0), until their /32 is gone from a c2 agent's BPF ipcache; max %.2f ms", len(gone), ms(gone[len(gone)-1])))
	line("k8s-pod-delete-to-remote-cluster-p99", ms(pct(gone, 99)), "ms", k8sDeleteRemoteGoal)
	return nil
}

type reached struct {
	addr netip.Addr
	took time.Duration // the endpoint's Created to the first answer
	add  time.Duration // its CNI ADD, as the agent measured it
}

// reachRemote creates pod name in c1 and returns how long after its
// endpoint's creation the client in clientNetns (another cluster) got an
// answer from it.
func reachRemote(ctx context.Context, k1 *kube.Cluster, c1 *lab.Cluster, clientNetns, name string, limit time.Duration) (reached, error) {
	if _, err := k1.Client.CoreV1().Pods("default").Create(ctx, echoPod("c1", name), metav1.CreateOptions{}); err != nil {
		return reached{}, err
	}
	deadline := time.Now().Add(limit)
	// The endpoint, as soon as the agent lists it.
	var ep api.Endpoint
	for {
		if e, ok := findEndpoint(ctx, c1, name); ok && len(e.IPs) > 0 {
			ep = e
			break
		}
		if time.Now().After(deadline) {
			return reached{}, fmt.Errorf("pod %s: no endpoint within %v", name, limit)
		}
		time.Sleep(5 * time.Millisecond)
	}
	var addr netip.Addr
	for _, a := range ep.IPs {
		if a.Is4() {
			addr = a
		}
	}
	// Attempts every 10 ms, each its own connection (a dropped SYN would
	// be retried by TCP only after a second), until one is answered by
	// the pod.
	actx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	done := make(chan time.Time, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := connectivity.FetchEcho(actx, clientNetns, netip.AddrPortFrom(addr, connectivity.EchoPort), 150*time.Millisecond)
			if err == nil && r.Pod == name && r.Cluster == "c1" {
				select {
				case done <- time.Now():
				default:
				}
			}
		}()
		select {
		case at := <-done:
			cancel()
			r := reached{addr: addr, took: at.Sub(ep.Created)}
			// The add has answered by now (the pod runs): its duration.
			if e, ok := findEndpoint(ctx, c1, name); ok && e.ID == ep.ID {
				r.add = e.AddDuration
			}
			return r, nil
		case <-actx.Done():
			return reached{}, fmt.Errorf("pod %s (%s) not reached from c2 within %v", name, addr, limit)
		case <-tick.C:
		}
	}
}

// findEndpoint looks for the endpoint of pod name on c's agents.
func findEndpoint(ctx context.Context, c *lab.Cluster, name string) (api.Endpoint, bool) {
	for _, a := range c.Agents {
		eps, err := api.NewClient(a.Socket).ListEndpoints(ctx)
		if err != nil {
			continue
		}
		for _, e := range eps {
			if e.Namespace == "default" && e.Name == name {
				return e, true
			}
		}
	}
	return api.Endpoint{}, false
}

// endpointsByName lists the endpoints of the default namespace on every
// agent of c.
func endpointsByName(ctx context.Context, c *lab.Cluster) (map[string]api.Endpoint, error) {
	out := map[string]api.Endpoint{}
	for _, a := range c.Agents {
		eps, err := api.NewClient(a.Socket).ListEndpoints(ctx)
		if err != nil {
			// Whether the agent is still there says which side failed.
			select {
			case <-a.Proc.Done():
				err = fmt.Errorf("%w; the agent exited: %v", err, a.Proc.Wait())
			case <-time.After(time.Second):
				err = fmt.Errorf("%w; the agent still runs (pid %d)", err, a.Proc.Pid())
			}
			return nil, fmt.Errorf("endpoints of %s: %w", a.Node.NodeName(), err)
		}
		for _, e := range eps {
			if e.Namespace == "default" {
				out[e.Name] = e
			}
		}
	}
	return out, nil
}

// readyPods waits until exactly want pods match selector and all run ready.
func readyPods(ctx context.Context, k *kube.Cluster, selector string, want int, limit time.Duration) ([]corev1.Pod, error) {
	var ready []corev1.Pod
	err := poll(ctx, limit, 200*time.Millisecond, func() error {
		list, err := k.Client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return err
		}
		ready = ready[:0]
		for _, p := range list.Items {
			if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && podReady(p) && len(p.Status.PodIPs) > 0 {
				ready = append(ready, p)
			}
		}
		if len(ready) != want || len(list.Items) != want {
			return fmt.Errorf("%s: %d of %d pods %q ready", k.Name, len(ready), want, selector)
		}
		return nil
	})
	return ready, err
}

func podReady(p corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// poll runs f every interval until it succeeds or limit passes.
func poll(ctx context.Context, limit, interval time.Duration, f func() error) error {
	deadline := time.Now().Add(limit)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(interval):
		}
	}
}

// echoSpec runs the echo server of connectivity in the tools image.
func echoSpec(cluster string) corev1.PodSpec {
	env := []corev1.EnvVar{
		{Name: "POD", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
		{Name: "NODE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
	}
	return corev1.PodSpec{
		TerminationGracePeriodSeconds: ptr[int64](1),
		Containers: []corev1.Container{{
			Name: "echo", Image: kube.ToolsImage, ImagePullPolicy: corev1.PullNever,
			Args: []string{"lab", "echo-server", "--pod", "$(POD)", "--node", "$(NODE)", "--cluster", cluster, "--listen", fmt.Sprintf(":%d", connectivity.EchoPort)},
			Env:  env,
		}},
	}
}

// echoPod is one echo pod named name, labelled app=<name's kind>.
func echoPod(cluster, name string) *corev1.Pod {
	app := "remote"
	if name == "client" {
		app = "client"
	}
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": app}}, Spec: echoSpec(cluster)}
}

// echoDeployment spreads replicas echo pods evenly over the nodes.
func echoDeployment(cluster, name string, replicas int32, labels map[string]string) *appsv1.Deployment {
	spec := echoSpec(cluster)
	spec.TopologySpreadConstraints = []corev1.TopologySpreadConstraint{{MaxSkew: 1, TopologyKey: "kubernetes.io/hostname",
		WhenUnsatisfiable: corev1.DoNotSchedule, LabelSelector: &metav1.LabelSelector{MatchLabels: labels}}}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: spec},
		},
	}
}

func ptr[T any](v T) *T { return &v }

// ipcacheHas reports whether the agent's BPF ipcache holds addr itself
// (its /32 or /128, not a covering prefix).
func ipcacheHas(a *lab.Agent, addr netip.Addr) (bool, error) {
	m, err := bpf.ReadIPCache(a.Node.PinDir())
	if err != nil {
		return false, fmt.Errorf("ipcache of %s: %w", a.Node.NodeName(), err)
	}
	_, ok := m[netip.PrefixFrom(addr, addr.BitLen())]
	return ok, nil
}

func msList(ds []time.Duration) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = fmt.Sprintf("%.1f", ms(d))
	}
	return out
}

// moduleRoot is the first directory at or above the working directory
// with a go.mod.
func moduleRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod at or above %s", wd)
		}
	}
}
