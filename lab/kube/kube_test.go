package kube_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/kube"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

func TestFindBinariesNamesMakeTarget(t *testing.T) {
	t.Setenv(kube.EnvBinDir, t.TempDir())
	_, err := kube.FindBinaries()
	if err == nil || !strings.Contains(err.Error(), "make kube-binaries") {
		t.Fatalf("FindBinaries in an empty dir: %v; want an error naming make kube-binaries", err)
	}
}

// A cluster with its control plane in a router namespace and two nodes,
// a Deployment spread over both, and nothing left after the lab closes.
func TestClusterInNamespaces(t *testing.T) {
	labtest.SkipUnlessRoot(t)
	bins, err := kube.FindBinaries()
	if err != nil {
		testenv.Skip(t, "%v", err)
	}
	for _, tool := range []string{"containerd", "runc", "ctr", "etcd", "/usr/lib/cni/ptp"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Skip(t, "%s not installed (make deps): %v", tool, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	t0 := time.Now()
	img := labtest.StaticCLI(t)
	t.Logf("static isthmus built in %v", time.Since(t0).Round(time.Millisecond))

	var l *lab.Lab
	var prefix, dir string
	cniBefore := cniNetns()
	shimsBefore := shimSockets()
	t.Run("cluster", func(t *testing.T) {
		var closing time.Time
		t.Cleanup(func() { t.Logf("teardown (lab close) took %v", time.Since(closing).Round(time.Millisecond)) })
		l = labtest.New(t)
		t.Cleanup(func() { closing = time.Now() })
		prefix, dir = l.Prefix(), l.Dir()
		images := filepath.Join(l.Dir(), "images.tar")
		t1 := time.Now()
		if err := kube.WriteImages(img, images); err != nil {
			t.Fatal(err)
		}
		t.Logf("images written in %v", time.Since(t1).Round(time.Millisecond))

		rtr, err := l.AddRouter("kcp")
		if err != nil {
			t.Fatal(err)
		}
		var nodes []*lab.Node
		for i := 1; i <= 2; i++ {
			n, err := l.AddNode(fmt.Sprintf("k%d", i))
			if err != nil {
				t.Fatal(err)
			}
			gw := netip.AddrFrom4([4]byte{10, 200, byte(i), 1})
			ip := netip.AddrFrom4([4]byte{10, 200, byte(i), 2})
			if _, err := l.Link(rtr, n, netip.PrefixFrom(gw, 24), netip.PrefixFrom(ip, 24)); err != nil {
				t.Fatal(err)
			}
			if err := n.AddRoute(netip.Prefix{}, gw); err != nil {
				t.Fatal(err)
			}
			nodes = append(nodes, n)
		}
		t2 := time.Now()
		c, err := kube.Start(ctx, l, kube.ClusterOptions{
			Name: "c1", ControlPlane: rtr, AdvertiseAddr: netip.MustParseAddr("10.200.1.1"), Binaries: &bins,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("apiserver ready in %v", time.Since(t2).Round(time.Millisecond))

		t3 := time.Now()
		var knodes []*kube.Node
		for i, n := range nodes {
			kn, err := c.AddNode(ctx, n, kube.NodeOptions{
				Name: n.FullName(), IP: netip.AddrFrom4([4]byte{10, 200, byte(i + 1), 2}), Images: []string{images},
			})
			if err != nil {
				t.Fatal(err)
			}
			knodes = append(knodes, kn)
		}
		t.Logf("nodes registered in %v", time.Since(t3).Round(time.Millisecond))
		var names []string
		for _, kn := range knodes {
			cidrs, err := kn.WritePTPConfig(ctx)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("node %s: pod CIDRs %v", kn.Name, cidrs)
			for _, p := range cidrs {
				if p.Addr().Is4() {
					if err := rtr.AddRoute(p, kn.IP); err != nil {
						t.Fatal(err)
					}
				}
			}
			names = append(names, kn.Name)
		}
		if err := c.WaitNodesReady(ctx, names...); err != nil {
			t.Fatal(err)
		}
		t.Logf("nodes Ready %v after their start", time.Since(t3).Round(time.Millisecond))

		// A Deployment of two echo servers, one per node.
		t4 := time.Now()
		cs := c.Client
		for {
			if _, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err == nil {
				break
			}
			if ctx.Err() != nil {
				t.Fatal("no default service account")
			}
			time.Sleep(100 * time.Millisecond)
		}
		labels := map[string]string{"app": "echo"}
		replicas := int32(2)
		env := func(name, path string) corev1.EnvVar {
			return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
		}
		dep := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: "echo"},
			Spec: appsv1.DeploymentSpec{
				Replicas: &replicas,
				Selector: &metav1.LabelSelector{MatchLabels: labels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec: corev1.PodSpec{
						TerminationGracePeriodSeconds: new(int64),
						Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
							RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
								LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
								TopologyKey:   "kubernetes.io/hostname",
							}},
						}},
						Containers: []corev1.Container{{
							Name:            "echo",
							Image:           kube.ToolsImage,
							ImagePullPolicy: corev1.PullNever,
							Args:            []string{"lab", "echo-server", "--pod", "$(POD_NAME)", "--node", "$(NODE_NAME)", "--cluster", "c1"},
							Env:             []corev1.EnvVar{env("POD_NAME", "metadata.name"), env("NODE_NAME", "spec.nodeName")},
						}},
					},
				},
			},
		}
		if _, err := cs.AppsV1().Deployments("default").Create(ctx, dep, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		var pods []corev1.Pod
		for {
			list, err := cs.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
			if err != nil {
				t.Fatal(err)
			}
			pods = pods[:0]
			onNodes := map[string]bool{}
			for _, p := range list.Items {
				if p.Status.Phase == corev1.PodRunning && len(p.Status.PodIPs) > 0 {
					pods = append(pods, p)
					onNodes[p.Spec.NodeName] = true
				}
			}
			if len(pods) == 2 && len(onNodes) == 2 {
				break
			}
			if ctx.Err() != nil {
				for _, p := range list.Items {
					t.Logf("pod %s on %q: %s %v", p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.Conditions)
				}
				t.Fatal("pods not Running on both nodes")
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Logf("2 pods Running on 2 nodes %v after the Deployment was created", time.Since(t4).Round(time.Millisecond))
		// Every pod answers on each of its IPv4 addresses, from the router.
		for _, p := range pods {
			t.Logf("pod %s on %s: %v", p.Name, p.Spec.NodeName, p.Status.PodIPs)
			for _, ip := range p.Status.PodIPs {
				a := netip.MustParseAddr(ip.IP)
				if !a.Is4() {
					continue
				}
				// Running is not listening yet: the pods have no
				// readiness probe, so try for a while.
				var body string
				var err error
				for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
					if body, err = httpGet(rtr, netip.AddrPortFrom(a, 8080).String()); err == nil || time.Now().After(deadline) {
						break
					}
				}
				if err != nil {
					t.Fatalf("GET %s:8080 from the router: %v", a, err)
				}
				if !strings.Contains(body, p.Name) {
					t.Errorf("pod %s answered %q", p.Name, body)
				}
			}
		}
	})
	if l == nil {
		return
	}
	// The lab is closed now (labtest.New's cleanup ran at the end of the subtest).
	_ = l.Close()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("lab dir %s still there: %v", dir, err)
	}
	if m := kube.MountsUnder(dir); len(m) > 0 {
		t.Errorf("mounts left under %s: %v", dir, m)
	}
	for f := range cniNetns() {
		if !cniBefore[f] {
			t.Errorf("pod sandbox netns %s left", f)
		}
	}
	for f := range shimSockets() {
		if !shimsBefore[f] {
			t.Errorf("containerd shim socket %s left", f)
		}
	}
	if p := kube.ProcessesOf(prefix, dir); len(p) > 0 {
		t.Errorf("processes left: %v", p)
	}
	mounts, _ := lab.CgroupMounts()
	for _, m := range mounts {
		if g, _ := filepath.Glob(filepath.Join(m, prefix+"*")); len(g) > 0 {
			t.Errorf("cgroups left: %v", g)
		}
	}
}

func httpGet(ns *lab.Node, addr string) (string, error) {
	var body string
	err := ns.Do(func() error {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
		b, err := bufio.NewReader(c).ReadString(0)
		body = b
		if err != nil && b != "" {
			err = nil
		}
		return err
	})
	return body, err
}

func cniNetns() map[string]bool {
	m := map[string]bool{}
	g, _ := filepath.Glob("/run/netns/cni-*")
	for _, f := range g {
		m[f] = true
	}
	return m
}

func shimSockets() map[string]bool {
	m := map[string]bool{}
	g, _ := filepath.Glob("/run/containerd/s/*")
	for _, f := range g {
		m[f] = true
	}
	return m
}
