package kube

import (
	"context"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/k8s/translate"
)

// These tests use client-go's fake clientset: they check the source's own
// logic (what it publishes and when). The end-to-end tests in tests/k8s
// run it against a real API server and real kubelets.

func ptr[T any](v T) *T { return &v }

func service(ns, name, ip string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, ResourceVersion: "1"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: ip, ClusterIPs: []string{ip},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}}},
	}
}

func slice(ns, svc, name string, addrs ...string) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	for _, a := range addrs {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}})
	}
	return sl
}

func newSource(t *testing.T, state string, objs ...runtime.Object) (*Source, *fake.Clientset) {
	t.Helper()
	client := fake.NewClientset(objs...)
	dyn := dynamicfake.NewSimpleDynamicClient(runtime.NewScheme())
	return NewWithClients(Config{NodeName: "n1", StateFile: state}, client, dyn), client
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func backendsOf(objs map[string]objects.Object, key string) []string {
	svc, ok := objs[key].(*objects.Service)
	if !ok {
		return nil
	}
	var out []string
	for _, b := range svc.Spec.Backends {
		out = append(out, b.IP)
	}
	return out
}

func TestWaitNodeWaitsForPodCIDRs(t *testing.T) {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.11"}, {Type: corev1.NodeHostName, Address: "n1"}}}}
	s, client := newSource(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	type result struct {
		n   Node
		err error
	}
	done := make(chan result, 1)
	go func() { n, err := s.WaitNode(ctx); done <- result{n, err} }()
	time.Sleep(300 * time.Millisecond) // no Node object yet
	select {
	case r := <-done:
		t.Fatalf("WaitNode returned before the node existed: %+v", r)
	default:
	}
	if _, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // a node without pod CIDRs is not enough
	select {
	case r := <-done:
		t.Fatalf("WaitNode returned before the node had pod CIDRs: %+v", r)
	default:
	}
	node.Spec.PodCIDRs = []string{"10.1.1.0/24", "fd00:1:0:1::/64"}
	if _, err := client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if len(r.n.PodCIDRs) != 2 || r.n.PodCIDRs[0].String() != "10.1.1.0/24" || len(r.n.IPs) != 1 || r.n.IPs[0].String() != "192.0.2.11" {
		t.Fatalf("node info %+v", r.n)
	}
}

func TestObjectsFollowTheAPIAndSurviveARestart(t *testing.T) {
	state := filepath.Join(t.TempDir(), "kubernetes-objects.json")
	denyAll := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "deny"},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
	ipBlock := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "cidr"},
		Spec: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "192.0.2.0/24"}}}}}}}
	s, client := newSource(t, state, service("default", "web", "10.96.0.10"), slice("default", "web", "web-1", "10.1.1.5"), denyAll, ipBlock)
	var changes int
	s.OnChange(func() { changes++ })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	waitFor(t, "sync", s.Synced)

	objs, gen := s.Objects()
	if got := backendsOf(objs, "Service/default/web"); len(got) != 1 || got[0] != "10.1.1.5" {
		t.Fatalf("service backends %v; objects %v", got, objs)
	}
	if _, ok := objs["NetworkPolicy/k8s/default/deny"]; !ok {
		t.Fatalf("deny policy missing: %v", objs)
	}
	if _, ok := objs["NetworkPolicy/k8s/default/cidr"]; ok {
		t.Fatal("a policy with an ipBlock (unsupported) was published")
	}
	if _, refused := s.Stats(); refused == 0 {
		t.Fatal("the refused policy was not counted")
	}

	// One more backend: a new snapshot with a higher generation.
	if _, err := client.DiscoveryV1().EndpointSlices("default").Create(ctx, slice("default", "web", "web-2", "10.1.2.7"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "second backend", func() bool { o, _ := s.Objects(); return len(backendsOf(o, "Service/default/web")) == 2 })
	if _, g := s.Objects(); g <= gen {
		t.Fatalf("generation %d did not move past %d", g, gen)
	}
	if changes == 0 {
		t.Fatal("OnChange was never called")
	}
	waitFor(t, "state file", func() bool {
		r, _ := newSource(t, state)
		if err := r.Load(); err != nil {
			t.Fatal(err)
		}
		o, _ := r.Objects()
		return len(backendsOf(o, "Service/default/web")) == 2
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// A restarted source serves the persisted objects until its informers
	// have listed: nothing is published half-listed.
	r, _ := newSource(t, state)
	if err := r.Load(); err != nil {
		t.Fatal(err)
	}
	o, _ := r.Objects()
	if len(backendsOf(o, "Service/default/web")) != 2 || o["NetworkPolicy/k8s/default/deny"] == nil {
		t.Fatalf("restarted source serves %v", o)
	}
	if r.Synced() {
		t.Fatal("synced before Run")
	}
}

func TestLabelsForJoinsPodAndNamespaceLabels(t *testing.T) {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"team": "a", "kubernetes.io/metadata.name": "shop"}}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-0", UID: "u1", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{NodeName: "n1"}}
	s, _ := newSource(t, "", ns, pod)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = s.Run(ctx) }()
	waitFor(t, "sync", s.Synced)
	l, err := s.LabelsFor(ctx, "shop", "web-0", "u1")
	if err != nil {
		t.Fatal(err)
	}
	if l["app"] != "web" || l[translate.NamespaceLabelKey("team")] != "a" || l[translate.NamespaceLabelKey("kubernetes.io/metadata.name")] != "shop" {
		t.Fatalf("labels %v", l)
	}
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	if _, err := s.LabelsFor(short, "shop", "web-0", "other-uid"); err == nil {
		t.Fatal("a pod with another UID was accepted")
	}
	if _, err := s.LabelsFor(short, "shop", "nope", ""); err == nil {
		t.Fatal("an unknown pod got labels")
	}
}

// Until every informer has listed, a translated object is kept but not
// handed to the reconciler: the snapshot persisted by the previous run
// stays what the datapath serves.
func TestNothingIsPublishedBeforeTheInformersListed(t *testing.T) {
	s, _ := newSource(t, "")
	before, gen := s.Objects()
	changed := 0
	s.OnChange(func() { changed++ })
	svc := &objects.Service{Metadata: objects.Meta{Name: "web", Namespace: "default"}}
	s.set("Service/default/web", svc, "", nil)
	if objs, g := s.Objects(); g != gen || len(objs) != len(before) || changed != 0 {
		t.Fatalf("published before sync: gen %d -> %d, %d objects, %d change calls", gen, g, len(objs), changed)
	}
	s.mu.Lock()
	s.synced.Store(true)
	s.publishLocked()
	s.mu.Unlock()
	if objs, g := s.Objects(); g == gen || objs["Service/default/web"] == nil || changed != 1 {
		t.Fatalf("not published once synced: gen %d, objects %v, %d change calls", g, objs, changed)
	}
}

// TestConcurrentEventsLeaveTheLatestTranslation: the informers of Services
// and of EndpointSlices call their handlers from their own goroutines, each
// after its indexer changed. A handler that translated from the indexers,
// then lost the CPU while another handler translated a newer state and
// stored it, must not overwrite that with its older translation: the
// Service would keep stale backends until its next event (seen once in CI
// as a rolled agent serving a global service without its own cluster's
// backends for over a minute).
func TestConcurrentEventsLeaveTheLatestTranslation(t *testing.T) {
	s, _ := newSource(t, "")
	s.svcLister = cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	s.slices = cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{byService: sliceService})
	if err := s.svcLister.Add(service("default", "web", "10.96.0.10")); err != nil {
		t.Fatal(err)
	}
	if err := s.slices.Add(slice("default", "web", "web-1")); err != nil { // no endpoint yet
		t.Fatal(err)
	}
	web := types.NamespacedName{Namespace: "default", Name: "web"}

	// The Service handler translates the empty slice, then stalls (up to
	// 300 ms) until the EndpointSlice handler has run with the newer slice.
	translated, newerDone := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	afterTranslate = func() {
		if first.CompareAndSwap(false, true) {
			close(translated)
			select {
			case <-newerDone:
			case <-time.After(300 * time.Millisecond): // it waits for this one's lock
			}
		}
	}
	t.Cleanup(func() { afterTranslate = func() {} })
	var wg sync.WaitGroup
	wg.Go(func() { s.serviceChanged(web) })
	<-translated
	if err := s.slices.Update(slice("default", "web", "web-1", "10.1.1.5")); err != nil {
		t.Fatal(err)
	}
	s.serviceChanged(web)
	close(newerDone)
	wg.Wait()

	s.mu.Lock()
	got := backendsOf(s.objs, "Service/default/web")
	s.mu.Unlock()
	if len(got) != 1 || got[0] != "10.1.1.5" {
		t.Fatalf("backends %v after both handlers ran; the indexers hold 10.1.1.5", got)
	}
}
