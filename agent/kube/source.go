// Package kube is the agent's Kubernetes source (Kubernetes mode): shared
// informers on the API server feed the same desired state that the local
// API feeds in standalone mode.
//
//	Node (own, by name)            → the node's pod CIDRs and addresses (at start)
//	Pod (own node, field selector) → the labels of an endpoint at CNI ADD,
//	+ Namespace                       and which endpoints lost their pod
//	Service + EndpointSlice        → Services served by the eBPF datapath
//	networking.k8s.io NetworkPolicy→ policies with Kubernetes semantics
//	isthmus.io NetworkPolicy (CRD) → policies with Isthmus semantics
//	isthmus.io BGPPeeringPolicy,   → the node's BGP speaker and ARP/NDP
//	L2AnnouncementPolicy (CRDs)       answers (as applied in cluster mode)
//
// The addresses of a LoadBalancer Service are those of its
// status.loadBalancer.ingress, which the clustermesh server writes from
// LB-IPAM's assignment (k8s/translate). LoadBalancerIPPools and
// ExternalWorkloads concern the server only.
//
// Objects are translated by package k8s/translate, one object per event:
// a change costs the object it touches, and the result is handed to the
// reconciler as a new snapshot (desired.Objects) with a generation. An
// object that cannot be translated is left out, logged once per version
// and counted; everything else keeps working. Its status (a False
// condition on the CRD, an Event on a Kubernetes NetworkPolicy) is written
// once per cluster by the clustermesh server, not by every agent.
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/servicesync"
	"github.com/isthmus-mesh/isthmus/k8s/apis/mcs"
	"github.com/isthmus-mesh/isthmus/k8s/apis/v1alpha1"
	"github.com/isthmus-mesh/isthmus/k8s/kubeclient"
	"github.com/isthmus-mesh/isthmus/k8s/translate"
)

// Config configures the source.
type Config struct {
	// Kubeconfig is the path of a kubeconfig; "" uses the in-cluster
	// credentials (the pod's service account).
	Kubeconfig string
	// NodeName is this node's Kubernetes node name.
	NodeName string
	Log      *slog.Logger
	// StateFile keeps the last synced objects, so a restarted agent serves
	// them until its informers have listed again ("" keeps nothing).
	StateFile string
	// PolicyPeersCluster, when not empty, limits the pod and namespace
	// peers of Kubernetes NetworkPolicies to that cluster's pods (the
	// agent's own cluster, by default); "" lets them match the whole mesh.
	// See translate.NetworkPolicy.
	PolicyPeersCluster string
}

// Source watches the API server.
type Source struct {
	cfg     Config
	log     *slog.Logger
	client  kubernetes.Interface
	dynamic dynamic.Interface

	cluster informers.SharedInformerFactory // namespaces, services, slices, policies
	pods    informers.SharedInformerFactory // this node's pods
	crds    dynamicinformer.DynamicSharedInformerFactory

	podLister cache.Indexer
	nsLister  cache.Indexer
	svcLister cache.Indexer
	slices    cache.Indexer // by service
	exports   atomic.Pointer[cache.Indexer]

	mu      sync.Mutex // serialises object updates
	objs    map[string]objects.Object
	refused map[string]string // key -> resource version logged as refused
	snap    atomic.Pointer[snapshot]
	synced  atomic.Bool

	// warned: Service key -> the translation warnings last logged for it
	// (logged when they change, not on every slice event).
	warned sync.Map

	translated, refusals atomic.Uint64
	changed              atomic.Value // func(): objects changed
	podLabels            atomic.Value // func(namespace, name string): a pod's identity labels may have changed
	save                 chan struct{}
}

// OnChange sets what is called after the objects changed (the agent asks
// for a reconcile run).
func (s *Source) OnChange(f func()) { s.changed.Store(f) }

func (s *Source) notify() { s.changed.Load().(func())() }

// OnPodLabels sets what is called when the identity labels of one of this
// node's pods may have changed: its own labels, or its namespace's.
func (s *Source) OnPodLabels(f func(namespace, name string)) { s.podLabels.Store(f) }

func (s *Source) podLabelsChanged(namespace, name string) {
	if f, ok := s.podLabels.Load().(func(string, string)); ok && f != nil {
		f(namespace, name)
	}
}

type snapshot struct {
	objs desired.Objects
	gen  uint64
}

// New connects to the API server (nothing is listed until Run).
func New(cfg Config) (*Source, error) {
	rc, err := kubeclient.RESTConfig(cfg.Kubeconfig)
	if err != nil {
		return nil, err
	}
	rc.UserAgent = "isthmus-agent/" + cfg.NodeName
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	return NewWithClients(cfg, client, dyn), nil
}

// NewWithClients is New with given clients.
func NewWithClients(cfg Config, client kubernetes.Interface, dyn dynamic.Interface) *Source {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &Source{cfg: cfg, log: cfg.Log.With("source", "kubernetes"), client: client, dynamic: dyn,
		objs: map[string]objects.Object{}, refused: map[string]string{}}
	s.snap.Store(&snapshot{objs: desired.Objects{}})
	s.changed.Store(func() {})
	s.cluster = informers.NewSharedInformerFactory(client, 0)
	s.pods = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
	}))
	s.crds = dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	return s
}

// Client is the typed client (for callers that write to the API).
func (s *Source) Client() kubernetes.Interface { return s.client }

// Node is what the API says about this node.
type Node struct {
	PodCIDRs []netip.Prefix
	IPs      []netip.Addr // InternalIP addresses
	// Labels are the Node object's labels when the agent started (a
	// BGPPeeringPolicy's nodeSelector matches them).
	Labels map[string]string
}

// WaitNode returns the node's pod CIDRs and addresses once the Node
// object has pod CIDRs (assigned by kube-controller-manager's node IPAM,
// or by whatever allocates them), retrying with backoff until ctx ends.
func (s *Source) WaitNode(ctx context.Context) (Node, error) {
	delay := 200 * time.Millisecond
	var last error
	for {
		n, err := s.client.CoreV1().Nodes().Get(ctx, s.cfg.NodeName, metav1.GetOptions{})
		switch {
		case err == nil:
			var info Node
			info, err = nodeInfo(n)
			if err == nil {
				return info, nil
			}
		case apierrors.IsNotFound(err):
			err = fmt.Errorf("node %q is not registered yet (is its kubelet running?)", s.cfg.NodeName)
		}
		if last == nil || err.Error() != last.Error() {
			s.log.Info("waiting for the node's pod CIDRs", "node", s.cfg.NodeName, "reason", err)
		}
		last = err
		select {
		case <-ctx.Done():
			return Node{}, fmt.Errorf("kubernetes: node %s: %w (last: %v)", s.cfg.NodeName, ctx.Err(), last)
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}

func nodeInfo(n *corev1.Node) (Node, error) {
	info := Node{Labels: n.Labels}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	if len(cidrs) == 0 {
		return info, fmt.Errorf("node %q has no spec.podCIDRs yet (kube-controller-manager --allocate-node-cidrs assigns them)", n.Name)
	}
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return info, fmt.Errorf("node %q: spec.podCIDRs %q: %w", n.Name, c, err)
		}
		info.PodCIDRs = append(info.PodCIDRs, p.Masked())
	}
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			info.IPs = append(info.IPs, ip)
		}
	}
	return info, nil
}

// Run starts the informers and keeps the objects current until ctx ends.
// Synced reports when every informer has listed once.
func (s *Source) Run(ctx context.Context) error {
	podInf := s.pods.Core().V1().Pods().Informer()
	nsInf := s.cluster.Core().V1().Namespaces().Informer()
	svcInf := s.cluster.Core().V1().Services().Informer()
	sliceInf := s.cluster.Discovery().V1().EndpointSlices().Informer()
	npInf := s.cluster.Networking().V1().NetworkPolicies().Informer()
	if err := sliceInf.AddIndexers(cache.Indexers{byService: sliceService}); err != nil {
		return err
	}
	s.podLister, s.nsLister, s.svcLister, s.slices = podInf.GetIndexer(), nsInf.GetIndexer(), svcInf.GetIndexer(), sliceInf.GetIndexer()

	handle := func(f func(obj any)) cache.ResourceEventHandlerFuncs {
		return cache.ResourceEventHandlerFuncs{
			AddFunc:    f,
			UpdateFunc: func(_, obj any) { f(obj) },
			DeleteFunc: func(obj any) {
				if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
					obj = d.Obj
				}
				f(obj)
			},
		}
	}
	for _, reg := range []struct {
		inf cache.SharedIndexInformer
		f   func(any)
	}{
		{svcInf, func(o any) { s.serviceChanged(metaKey(o)) }},
		{sliceInf, func(o any) {
			if sl, ok := o.(*discoveryv1.EndpointSlice); ok {
				if name := sl.Labels[discoveryv1.LabelServiceName]; name != "" {
					s.serviceChanged(types.NamespacedName{Namespace: sl.Namespace, Name: name})
				}
			}
		}},
		{npInf, func(o any) { s.k8sPolicyChanged(metaKey(o)) }},
	} {
		if _, err := reg.inf.AddEventHandler(handle(reg.f)); err != nil {
			return err
		}
	}
	if _, err := podInf.AddEventHandler(cache.ResourceEventHandlerFuncs{UpdateFunc: func(oldObj, newObj any) {
		o, ok1 := oldObj.(*corev1.Pod)
		n, ok2 := newObj.(*corev1.Pod)
		if ok1 && ok2 && !maps.Equal(o.Labels, n.Labels) {
			s.podLabelsChanged(n.Namespace, n.Name)
		}
	}}); err != nil {
		return err
	}
	if _, err := nsInf.AddEventHandler(cache.ResourceEventHandlerFuncs{UpdateFunc: func(oldObj, newObj any) {
		o, ok1 := oldObj.(*corev1.Namespace)
		n, ok2 := newObj.(*corev1.Namespace)
		if !ok1 || !ok2 || maps.Equal(o.Labels, n.Labels) {
			return
		}
		for _, p := range s.podLister.List() {
			if pod := p.(*corev1.Pod); pod.Namespace == n.Name {
				s.podLabelsChanged(pod.Namespace, pod.Name)
			}
		}
	}}); err != nil {
		return err
	}
	s.pods.Start(ctx.Done())
	s.cluster.Start(ctx.Done())

	// The CRD: only once the API serves it (it is installed with the
	// chart; an agent started before it waits for it).
	crdSynced := s.startDynamic(ctx, v1alpha1.NetworkPolicyResource, "isthmus.io NetworkPolicy", s.crdPolicyChanged, nil)
	bgpSynced := s.startDynamic(ctx, v1alpha1.BGPPeeringPolicyResource, "isthmus.io BGPPeeringPolicy", s.configChanged(func(u *unstructured.Unstructured) (objects.Object, error) {
		var p v1alpha1.BGPPeeringPolicy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p); err != nil {
			return nil, fmt.Errorf("decode: %w", err)
		}
		o, err := p.ToObject()
		return &o, err
	}), nil)
	l2Synced := s.startDynamic(ctx, v1alpha1.L2AnnouncementPolicyResource, "isthmus.io L2AnnouncementPolicy", s.configChanged(func(u *unstructured.Unstructured) (objects.Object, error) {
		var p v1alpha1.L2AnnouncementPolicy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p); err != nil {
			return nil, fmt.Errorf("decode: %w", err)
		}
		o, err := p.ToObject()
		return &o, err
	}), nil)
	exportsSynced := s.startDynamic(ctx, mcs.ServiceExports, "multicluster.x-k8s.io ServiceExport", func(o any, _ bool) {
		s.serviceChanged(metaKey(o))
	}, func(idx cache.Indexer) { s.exports.Store(&idx) })

	if !cache.WaitForCacheSync(ctx.Done(), podInf.HasSynced, nsInf.HasSynced, svcInf.HasSynced, sliceInf.HasSynced, npInf.HasSynced) {
		return ctx.Err()
	}
	for _, ch := range []<-chan struct{}{crdSynced, bgpSynced, l2Synced, exportsSynced} {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if s.cfg.StateFile != "" {
		s.save = make(chan struct{}, 1)
		go s.saveLoop(ctx)
	}
	s.mu.Lock()
	s.synced.Store(true)
	s.publishLocked()
	s.mu.Unlock()
	s.log.Info("kubernetes informers synced", "pods", len(s.podLister.ListKeys()), "services", len(s.svcLister.ListKeys()),
		"objects", len(s.objs))
	<-ctx.Done()
	s.pods.Shutdown()
	s.cluster.Shutdown()
	s.crds.Shutdown()
	return nil
}

// startDynamic waits (in the background) until the API serves gvr (a
// CRD: installed with the chart, maybe after the agent started), then
// starts its informer with handler f; the channel is closed once it has
// listed, or at once when the kind is not served yet (the other kinds
// need not wait for it).
func (s *Source) startDynamic(ctx context.Context, gvr schema.GroupVersionResource, what string, f func(obj any, deleted bool), started func(cache.Indexer)) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		closed := false
		finish := func() {
			if !closed {
				closed = true
				close(done)
			}
		}
		defer finish()
		delay := 500 * time.Millisecond
		warned := false
		for !kubeclient.Served(s.client.Discovery(), gvr) {
			if !warned {
				s.log.Warn("kind not served by the API server yet; waiting for its CRD (other sources work)", "kind", what)
				warned = true
				finish()
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			delay = min(2*delay, 10*time.Second)
		}
		inf := s.crds.ForResource(gvr).Informer()
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(o any) { f(o, false) },
			UpdateFunc: func(_, o any) { f(o, false) },
			DeleteFunc: func(o any) {
				if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
					o = d.Obj
				}
				f(o, true)
			},
		}); err != nil {
			s.log.Error("informer", "kind", what, "err", err)
			return
		}
		if started != nil {
			started(inf.GetIndexer())
		}
		s.crds.Start(ctx.Done())
		cache.WaitForCacheSync(ctx.Done(), inf.HasSynced)
	}()
	return done
}

// Synced reports whether every informer has listed once.
func (s *Source) Synced() bool { return s.synced.Load() }

// Objects returns the translated Services and NetworkPolicies and their
// generation (bumped by every change).
func (s *Source) Objects() (desired.Objects, uint64) {
	p := s.snap.Load()
	return p.objs, p.gen
}

// Status is the source's state for `isthmus status` and /metrics.
func (s *Source) Status() *api.KubernetesStatus {
	objs, _ := s.Objects()
	s.mu.Lock()
	refused := len(s.refused)
	s.mu.Unlock()
	return &api.KubernetesStatus{Synced: s.Synced(), Objects: len(objs), Refused: refused,
		Translations: s.translated.Load(), Refusals: s.refusals.Load()}
}

// Stats counts translations and refusals since start.
func (s *Source) Stats() (translated, refused uint64) { return s.translated.Load(), s.refusals.Load() }

const byService = "service"

func sliceService(obj any) ([]string, error) {
	sl, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	name := sl.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return nil, nil
	}
	return []string{sl.Namespace + "/" + name}, nil
}

func metaKey(o any) types.NamespacedName {
	m, err := apimeta.Accessor(o)
	if err != nil {
		return types.NamespacedName{}
	}
	return types.NamespacedName{Namespace: m.GetNamespace(), Name: m.GetName()}
}

// Keys of the objects map: the two NetworkPolicy kinds share a namespace
// and names, so their keys say which API they came from.
func serviceKey(n types.NamespacedName) string { return "Service/" + n.Namespace + "/" + n.Name }
func k8sPolicyKey(n types.NamespacedName) string {
	return "NetworkPolicy/k8s/" + n.Namespace + "/" + n.Name
}
func crdPolicyKey(n types.NamespacedName) string {
	return "NetworkPolicy/isthmus/" + n.Namespace + "/" + n.Name
}

func (s *Source) serviceChanged(n types.NamespacedName) {
	if n.Name == "" {
		return
	}
	// Translated and stored under one lock: the Service and EndpointSlice
	// informers call this from their own goroutines, each after its
	// indexer changed, so the last one to store has read the newest
	// state. Without the lock a handler that read the indexers first
	// could store last and leave the Service with stale backends until
	// its next event.
	s.mu.Lock()
	defer s.mu.Unlock()
	key := serviceKey(n)
	obj, exists, err := s.svcLister.GetByKey(n.Namespace + "/" + n.Name)
	if err != nil || !exists {
		s.setLocked(key, nil, "", nil)
		return
	}
	svc := obj.(*corev1.Service)
	var slices []*discoveryv1.EndpointSlice
	items, _ := s.slices.ByIndex(byService, n.Namespace+"/"+n.Name)
	for _, it := range items {
		slices = append(slices, it.(*discoveryv1.EndpointSlice))
	}
	out, served, warnings, err := translate.ServiceWithWarnings(svc, slices)
	s.warnService(key, warnings)
	afterTranslate()
	if err != nil || !served {
		s.setLocked(key, nil, svc.ResourceVersion, err)
		return
	}
	if ex := s.exports.Load(); ex != nil {
		if _, exported, _ := (*ex).GetByKey(n.Namespace + "/" + n.Name); exported {
			if out.Metadata.Annotations == nil {
				out.Metadata.Annotations = map[string]string{}
			}
			out.Metadata.Annotations[servicesync.AnnotationGlobal] = "true"
		}
	}
	s.setLocked(key, &out, "", nil)
}

// afterTranslate is a test hook: it runs between a Service's translation
// and its store.
var afterTranslate = func() {}

// warnService logs what the translation of a Service approximated or
// left out (a named targetPort, node ports it cannot serve), once per
// change of the warnings.
func (s *Source) warnService(key string, warnings []string) {
	joined := fmt.Sprint(warnings)
	if prev, ok := s.warned.Load(key); (ok && prev == joined) || (!ok && len(warnings) == 0) {
		return
	}
	s.warned.Store(key, joined)
	for _, w := range warnings {
		s.log.Warn("kubernetes service translated with a warning", "object", key, "warning", w)
	}
}

func (s *Source) k8sPolicyChanged(n types.NamespacedName) {
	if n.Name == "" {
		return
	}
	s.mu.Lock() // as in serviceChanged
	defer s.mu.Unlock()
	key := k8sPolicyKey(n)
	obj, exists, err := s.cluster.Networking().V1().NetworkPolicies().Informer().GetIndexer().GetByKey(n.Namespace + "/" + n.Name)
	if err != nil || !exists {
		s.setLocked(key, nil, "", nil)
		return
	}
	np := obj.(*networkingv1.NetworkPolicy)
	out, err := translate.NetworkPolicy(np, s.cfg.PolicyPeersCluster)
	if err != nil {
		s.setLocked(key, nil, np.ResourceVersion, err)
		return
	}
	s.setLocked(key, &out, "", nil)
}

func (s *Source) crdPolicyChanged(o any, deleted bool) {
	u, ok := o.(*unstructured.Unstructured)
	if !ok {
		return
	}
	key := crdPolicyKey(types.NamespacedName{Namespace: u.GetNamespace(), Name: u.GetName()})
	if deleted {
		s.set(key, nil, "", nil)
		return
	}
	out, err := CRDPolicy(u)
	if err != nil {
		s.set(key, nil, u.GetResourceVersion(), err)
		return
	}
	s.set(key, &out, "", nil)
}

// configChanged returns the handler of a cluster-scoped isthmus.io kind
// the agent uses as it is (BGP and L2 policies): convert, validated, kept
// under its objects.Key. A refused one is left out (its Ready condition is
// the server's).
func (s *Source) configChanged(convert func(*unstructured.Unstructured) (objects.Object, error)) func(o any, deleted bool) {
	return func(o any, deleted bool) {
		u, ok := o.(*unstructured.Unstructured)
		if !ok {
			return
		}
		key := u.GetKind() + "/" + objects.DefaultNamespace + "/" + u.GetName()
		if deleted {
			s.set(key, nil, "", nil)
			return
		}
		out, err := convert(u)
		if err != nil {
			s.set(key, nil, u.GetResourceVersion(), err)
			return
		}
		s.set(key, out, "", nil)
	}
}

// CRDPolicy converts an isthmus.io NetworkPolicy read through the dynamic
// client into the Isthmus kind, validated.
func CRDPolicy(u *unstructured.Unstructured) (objects.NetworkPolicy, error) {
	var np v1alpha1.NetworkPolicy
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &np); err != nil {
		return objects.NetworkPolicy{}, fmt.Errorf("decode: %w", err)
	}
	return np.ToObject()
}

// set replaces (obj != nil) or removes one object and publishes a new
// snapshot when that changed anything. A refusal (err != nil) removes the
// object: what cannot be enforced as written is not enforced half.
func (s *Source) set(key string, obj objects.Object, version string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.setLocked(key, obj, version, err)
}

// setLocked is set with s.mu held.
func (s *Source) setLocked(key string, obj objects.Object, version string, err error) {
	if err != nil {
		s.refusals.Add(1)
		if s.refused[key] != version {
			s.refused[key] = version
			s.log.Warn("kubernetes object refused; left out of the datapath", "object", key, "err", err)
		}
	} else {
		delete(s.refused, key)
	}
	old, had := s.objs[key]
	if obj == nil {
		if !had {
			return
		}
		delete(s.objs, key)
	} else {
		if had && reflect.DeepEqual(old, obj) {
			return
		}
		s.objs[key] = obj
		s.translated.Add(1)
	}
	if s.synced.Load() {
		s.publishLocked()
	}
}

// publishLocked hands the objects to the reconciler as a new snapshot.
// Until the informers have listed everything once, nothing is published:
// a Service seen before its EndpointSlices would lose its backends for a
// moment. The snapshot persisted by the previous run serves until then.
func (s *Source) publishLocked() {
	prev := s.snap.Load()
	s.snap.Store(&snapshot{objs: maps.Clone(desired.Objects(s.objs)), gen: prev.gen + 1})
	s.notify()
	if s.save != nil {
		select {
		case s.save <- struct{}{}:
		default:
		}
	}
}

// Pod is one of this node's pods as the API lists it.
type Pod struct {
	Namespace, Name string
	UID             string
}

// LabelsFor returns the identity labels of a pod of this node: its labels
// and its namespace's (under translate.NamespaceLabelKey). A pod the
// informer has not seen yet is waited for briefly (the kubelet runs CNI
// ADD right after the pod was bound, so the watch is normally ahead); a
// pod with another UID than uid (when given) is an error.
func (s *Source) LabelsFor(ctx context.Context, namespace, name, uid string) (map[string]string, error) {
	if s.podLister == nil {
		return nil, errors.New("kubernetes source not started")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		obj, exists, err := s.podLister.GetByKey(namespace + "/" + name)
		if err == nil && exists {
			pod := obj.(*corev1.Pod)
			if uid == "" || string(pod.UID) == uid {
				var nsLabels map[string]string
				if nsObj, ok, _ := s.nsLister.GetByKey(namespace); ok {
					nsLabels = nsObj.(*corev1.Namespace).Labels
				}
				l, warnings := translate.PodLabels(pod.Labels, nsLabels)
				for _, w := range warnings {
					s.log.Warn("pod label left out of its identity", "pod", namespace+"/"+name, "reason", w)
				}
				return l, nil
			}
		}
		select {
		case <-ctx.Done():
			if uid != "" {
				return nil, fmt.Errorf("pod %s/%s (uid %s) is not known to this node's agent yet: %w", namespace, name, uid, ctx.Err())
			}
			return nil, fmt.Errorf("pod %s/%s is not known to this node's agent yet: %w", namespace, name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Pods lists this node's pods (after Synced).
func (s *Source) Pods() []Pod {
	var out []Pod
	for _, o := range s.podLister.List() {
		p := o.(*corev1.Pod)
		out = append(out, Pod{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)})
	}
	return out
}
