package k8s

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/internal/testenv"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/kube"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// helmVersion is the Makefile's HELM_VERSION (make helm builds
// bin/helm-<version>).
const helmVersion = "v4.3.2"

const helmNamespace = "kube-system"

// helmEnv is one Kubernetes cluster of two nodes with Isthmus installed by
// its Helm chart: the agents as a DaemonSet, the server as a Deployment,
// from the images `make images` writes, imported into every node.
type helmEnv struct {
	*env
	c         *lab.Cluster
	k         *kube.Cluster
	root      string // module root
	helm      string
	helmHome  string
	values    string
	runDir    string
	dsName    string
	serverDep string
}

// buildChartImages builds the static binaries and runs the images program
// (scripts/images, what `make images` runs) into dir; it returns the
// tarballs and the static isthmus CLI.
func buildChartImages(t *testing.T, root, dir string) ([]string, string) {
	t.Helper()
	static := filepath.Join(dir, "static")
	build := exec.Command("go", "build", "-o", static+"/", "./cmd/isthmus-agent", "./cmd/isthmus-cni", "./cmd/isthmus-clustermesh", "./cmd/isthmus")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("static binaries: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "images")
	img := exec.Command("go", "run", "./scripts/images", "--bin", static, "--out", out)
	img.Dir = root
	if b, err := img.CombinedOutput(); err != nil {
		t.Fatalf("scripts/images: %v\n%s", err, b)
	}
	tars, err := filepath.Glob(filepath.Join(out, "*.tar"))
	if err != nil || len(tars) < 2 {
		t.Fatalf("scripts/images wrote %v (%v)", tars, err)
	}
	return tars, filepath.Join(static, "isthmus")
}

func startHelmEnv(t *testing.T) *helmEnv {
	labtest.SkipUnlessRoot(t)
	if _, err := kube.FindBinaries(); err != nil {
		testenv.Skip(t, "%v", err)
	}
	for _, tool := range []string{"containerd", "runc", "ctr", "etcd", "/usr/lib/cni/loopback"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Skip(t, "%s not installed (make deps): %v", tool, err)
		}
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	h := &helmEnv{root: root, helm: filepath.Join(root, "bin", "helm-"+helmVersion)}
	if _, err := os.Stat(h.helm); err != nil {
		testenv.Skip(t, "%s not found: make helm builds it", h.helm)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	t.Cleanup(cancel)
	l := labtest.New(t)
	h.env = &env{t: t, ctx: ctx, lab: l, clusters: map[string]*kube.Cluster{}}

	t0 := time.Now()
	step(t, "building the chart's images (static binaries, scripts/images)")
	tars, cli := buildChartImages(t, root, t.TempDir())
	images := filepath.Join(l.Dir(), "images.tar")
	if err := kube.WriteImages(cli, images); err != nil {
		t.Fatal(err)
	}
	step(t, "info: images built in %v", time.Since(t0).Round(time.Millisecond))

	t0 = time.Now()
	step(t, "building Kubernetes cluster c1 (control plane in its router, 2 nodes with containerd and kubelet, no Isthmus yet)")
	m := kube.NewMesh(kube.MeshOptions{Images: images, ExtraImages: tars, InstallWithHelm: true})
	var o lab.ClusterOptions
	m.Enable(&o)
	if h.c, err = l.AddCluster(ctx, 1, o); err != nil {
		t.Fatal(err)
	}
	h.k = m.Cluster(h.c.Name)
	h.clusters[h.c.Name] = h.k
	step(t, "info: cluster up (nodes not Ready: no CNI yet) in %v", time.Since(t0).Round(time.Millisecond))

	// Values for the lab: the API server directly (no kube-proxy), the
	// server on node 1's host network and the agents pointed at it, and
	// per-node paths (the lab's nodes share one filesystem).
	bin, conf := kube.HelmCNIDirs(l)
	h.runDir = filepath.Join(l.Dir(), "helm-run")
	var cidrs []string
	for _, p := range h.c.PodCIDRs() {
		cidrs = append(cidrs, p.String())
	}
	server := h.c.Nodes[0]
	values := map[string]any{
		"cluster":    map[string]any{"name": h.c.Name, "id": h.c.ID, "podCIDRs": cidrs},
		"k8sService": map[string]any{"host": h.k.AdvertiseAddr.String(), "port": fmt.Sprint(kube.APIServerPort)},
		"agent": map[string]any{
			"kvstoreEndpoints": []string{fmt.Sprintf("https://%s", net.JoinHostPort(h.c.NodeIPs(1)[0].String(), "2379"))},
			"cni":              map[string]any{"binDir": bin, "confDir": conf, "nodeSubPath": true},
			"runDir":           h.runDir,
			"stateDir":         filepath.Join(l.Dir(), "helm-state"),
			// The host's /sys/fs/bpf is a private mount.
			"bpffsMountPropagation": "None",
		},
		"clustermesh": map[string]any{
			"nodeSelector": map[string]string{"kubernetes.io/hostname": server.NodeName()},
			// The agents' etcd client verifies the address it dials (not
			// only <cluster>.mesh.isthmus.io): the certificate must name it.
			"tlsSANs": []string{h.c.NodeIPs(1)[0].String()},
		},
	}
	b, err := yaml.Marshal(values)
	if err != nil {
		t.Fatal(err)
	}
	h.values = filepath.Join(l.Dir(), "helm-values.yaml")
	if err := os.WriteFile(h.values, b, 0o644); err != nil {
		t.Fatal(err)
	}
	h.helmHome = filepath.Join(l.Dir(), "helm-home")
	h.dsName, h.serverDep = "isthmus-agent", "isthmus-clustermesh"
	return h
}

// helmCmd runs helm in the control plane's namespace (where the admin
// kubeconfig's server is reachable).
func (h *helmEnv) helmCmd(args ...string) error {
	args = append([]string{h.helm, "--kubeconfig", h.k.AdminKubeconfig, "-n", helmNamespace}, args...)
	cmd := h.k.ControlPlane.Command(h.ctx, args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+h.helmHome+"/cache", "HELM_CONFIG_HOME="+h.helmHome+"/config", "HELM_DATA_HOME="+h.helmHome+"/data")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("helm %s: %v\n%s", strings.Join(args[3:], " "), err, out)
	}
	return nil
}

// diagnose logs the pods of the release and the tails of their logs.
func (h *helmEnv) diagnose() {
	t := h.t
	if out, err := h.k.Kubectl(context.Background(), "get", "pods", "-A", "-o", "wide"); err == nil {
		t.Logf("pods:\n%s", out)
	}
	if out, err := h.k.Kubectl(context.Background(), "get", "events", "-A", "--sort-by=.lastTimestamp"); err == nil {
		t.Logf("events:\n%s", lab.Tail(string(out), 6000))
	}
	pods, err := h.k.Client.CoreV1().Pods(helmNamespace).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, p := range pods.Items {
		for _, c := range p.Spec.Containers {
			out, _ := h.k.Kubectl(context.Background(), "logs", "-n", helmNamespace, p.Name, "-c", c.Name, "--tail=40")
			t.Logf("logs of %s/%s:\n%s", p.Name, c.Name, out)
		}
	}
}

// waitRollout waits until the agent DaemonSet has an updated, ready pod on
// every node and the server Deployment is ready.
func (h *helmEnv) waitRollout(d time.Duration) error {
	return eventually(d, func() error {
		ds, err := h.k.Client.AppsV1().DaemonSets(helmNamespace).Get(h.ctx, h.dsName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		s := ds.Status
		if s.ObservedGeneration < ds.Generation || s.DesiredNumberScheduled != 2 || s.UpdatedNumberScheduled != 2 || s.NumberReady != 2 || s.NumberAvailable != 2 {
			return fmt.Errorf("DaemonSet %s: %+v", h.dsName, s)
		}
		dep, err := h.k.Client.AppsV1().Deployments(helmNamespace).Get(h.ctx, h.serverDep, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if dep.Status.ReadyReplicas != 1 {
			return fmt.Errorf("Deployment %s: %+v", h.serverDep, dep.Status)
		}
		return nil
	})
}

// agentPods returns the names of the agent DaemonSet's pods.
func (h *helmEnv) agentPods(t *testing.T) map[string]bool {
	t.Helper()
	list, err := h.k.Client.CoreV1().Pods(helmNamespace).List(h.ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent"})
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, p := range list.Items {
		names[p.Name] = true
	}
	if len(names) == 0 {
		t.Fatal("no agent pods")
	}
	return names
}

// endpoint finds a pod's endpoint through the agent socket of its node.
func (h *helmEnv) endpoint(pod corev1.Pod) (api.Endpoint, error) {
	sock := filepath.Join(h.runDir, pod.Spec.NodeName+".sock")
	eps, err := api.NewClient(sock).ListEndpoints(h.ctx)
	if err != nil {
		return api.Endpoint{}, err
	}
	for _, ep := range eps {
		if ep.Namespace == pod.Namespace && ep.Name == pod.Name {
			return ep, nil
		}
	}
	return api.Endpoint{}, fmt.Errorf("pod %s/%s has no endpoint on the agent of %s", pod.Namespace, pod.Name, pod.Spec.NodeName)
}

func TestHelmInstall(t *testing.T) {
	h := startHelmEnv(t)
	ctx := h.ctx

	t0 := time.Now()
	step(t, "helm install (pre-install PKI job, CRDs, agent DaemonSet, server Deployment)")
	if err := h.helmCmd("install", "isthmus", filepath.Join(h.root, "deploy", "helm", "isthmus"), "-f", h.values, "--timeout", "5m"); err != nil {
		h.diagnose()
		t.Fatal(err)
	}
	step(t, "info: helm install returned in %v", time.Since(t0).Round(time.Millisecond))
	if err := h.waitRollout(4 * time.Minute); err != nil {
		h.diagnose()
		t.Fatalf("install: %v", err)
	}
	step(t, "info: agents Ready on both nodes and server Ready %v after helm install", time.Since(t0).Round(time.Millisecond))
	if err := h.k.WaitNodesReady(ctx); err != nil {
		h.diagnose()
		t.Fatal(err)
	}

	t0 = time.Now()
	step(t, "deploying echo (2 replicas, one per node)")
	if _, err := h.k.Client.AppsV1().Deployments("default").Create(ctx, echoDeployment(h.c.Name, "echo", 2, map[string]string{"app": "echo"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	echo := h.podsOf(h.k, "app=echo", 2)
	if echo[0].Spec.NodeName == echo[1].Spec.NodeName {
		t.Fatalf("both echo pods on %s", echo[0].Spec.NodeName)
	}
	step(t, "info: echo pods Ready in %v", time.Since(t0).Round(time.Millisecond))
	var eps [2]api.Endpoint
	for i, p := range echo {
		ep, err := h.endpoint(p)
		if err != nil {
			t.Fatal(err)
		}
		if ep.ContainerID == "" {
			t.Fatalf("endpoint %+v was not made through CNI (no container ID)", ep)
		}
		cidrs, err := h.k.Nodes()[p.Spec.NodeName].PodCIDRs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, ip := range p.Status.PodIPs {
			a := netip.MustParseAddr(ip.IP)
			ok := false
			for _, c := range cidrs {
				ok = ok || c.Contains(a)
			}
			if !ok {
				t.Errorf("pod %s address %s outside its node's pod CIDRs %v", p.Name, a, cidrs)
			}
		}
		eps[i] = ep
	}

	t.Run("pod to pod across nodes, IPv4 and IPv6", func(t *testing.T) {
		for i, dst := range echo {
			src := eps[1-i]
			for _, v6 := range []bool{false, true} {
				addr := netip.AddrPortFrom(podAddr(dst, v6), connectivity.EchoPort)
				r, err := h.fetch(src.Netns, addr)
				if err != nil || r.Pod != dst.Name {
					t.Errorf("%s -> %s %s: %v %v", src.Name, dst.Name, addr, r, err)
				}
			}
		}
	})

	t.Run("helm upgrade rolls the agents while a pod-to-pod stream keeps running", func(t *testing.T) {
		s, err := startPodStream(ctx, eps[0].Netns, eps[1].Netns, podAddr(echo[1], false))
		if err != nil {
			t.Fatal(err)
		}
		defer s.stop()
		time.Sleep(time.Second)
		ds, err := h.k.Client.AppsV1().DaemonSets(helmNamespace).Get(ctx, h.dsName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		before := ds.Spec.Template.Spec.Containers[0].Args
		oldPods := h.agentPods(t)
		t0 := time.Now()
		step(t, "helm upgrade --set agent.logLevel=debug")
		if err := h.helmCmd("upgrade", "isthmus", filepath.Join(h.root, "deploy", "helm", "isthmus"), "-f", h.values, "--set", "agent.logLevel=debug", "--timeout", "5m"); err != nil {
			h.diagnose()
			t.Fatal(err)
		}
		if err := h.waitRollout(4 * time.Minute); err != nil {
			h.diagnose()
			t.Fatalf("upgrade: %v", err)
		}
		step(t, "info: agents rolled in %v", time.Since(t0).Round(time.Millisecond))
		time.Sleep(2 * time.Second)
		ds, err = h.k.Client.AppsV1().DaemonSets(helmNamespace).Get(ctx, h.dsName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for name := range h.agentPods(t) {
			if oldPods[name] {
				t.Errorf("agent pod %s was not replaced", name)
			}
		}
		if after := ds.Spec.Template.Spec.Containers[0].Args; strings.Join(after, " ") == strings.Join(before, " ") || !strings.Contains(strings.Join(after, " "), "--log-level=debug") {
			t.Errorf("the upgrade did not change the agent's args: %v", after)
		}
		stall, echoed, err := s.result()
		step(t, "info: k8s-agent-rollout-stream-stall-max %d ms (%d round trips)", stall.Milliseconds(), echoed)
		if err != nil {
			t.Fatalf("stream: %v", err)
		}
		if stall > 5*time.Second {
			t.Errorf("the stream stalled for %v during the rollout", stall)
		}
		// Pod to pod still works with the new agents.
		for _, v6 := range []bool{false, true} {
			addr := netip.AddrPortFrom(podAddr(echo[1], v6), connectivity.EchoPort)
			if err := eventually(10*time.Second, func() error { _, err := h.fetch(eps[0].Netns, addr); return err }); err != nil {
				t.Errorf("after the rollout: %s: %v", addr, err)
			}
		}
	})
}

// podStream is a TCP echo stream from one pod's namespace to a listener in
// another pod's namespace: a round trip every 10ms; it records the longest
// time without one.
type podStream struct {
	ln     net.Listener
	conn   net.Conn
	done   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	stall  time.Duration
	last   time.Time // the latest round trip
	echoed int
	err    error
}

func startPodStream(ctx context.Context, srcNetns, dstNetns string, dst netip.Addr) (*podStream, error) {
	const port = 9100
	ln, err := connectivity.ListenIn(dstNetns, fmt.Sprintf(":%d", port))
	if err != nil {
		return nil, err
	}
	s := &podStream{ln: ln, done: make(chan struct{}), last: time.Now()}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	if s.conn, err = connectivity.DialIn(ctx, srcNetns, netip.AddrPortFrom(dst, port), 5*time.Second); err != nil {
		ln.Close()
		return nil, err
	}
	s.wg.Add(1)
	go s.run()
	return s, nil
}

func (s *podStream) run() {
	defer s.wg.Done()
	msg := []byte("isthmus-rollout-stream-0123456789\n")
	buf := make([]byte, len(msg))
	for {
		select {
		case <-s.done:
			return
		case <-time.After(10 * time.Millisecond):
		}
		_ = s.conn.SetDeadline(time.Now().Add(30 * time.Second))
		_, err := s.conn.Write(msg)
		if err == nil {
			_, err = io.ReadFull(s.conn, buf)
		}
		now := time.Now()
		s.mu.Lock()
		if err != nil {
			select {
			case <-s.done:
			default:
				s.err = err
			}
			s.mu.Unlock()
			return
		}
		if gap := now.Sub(s.last); gap > s.stall {
			s.stall = gap
		}
		s.echoed++
		s.last = now
		s.mu.Unlock()
	}
}

// result returns the longest time without a round trip so far (one still
// going on included), the round trips and the stream's error.
func (s *podStream) result() (time.Duration, int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if gap := time.Since(s.last); gap > s.stall {
		s.stall = gap
	}
	err := s.err
	if err == nil && s.echoed == 0 {
		err = errors.New("no round trip")
	}
	return s.stall, s.echoed, err
}

func (s *podStream) stop() {
	close(s.done)
	s.conn.Close()
	s.ln.Close()
	s.wg.Wait()
}
