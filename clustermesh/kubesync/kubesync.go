// Package kubesync is the clustermesh server's Kubernetes source: in a
// cluster that runs Kubernetes, the API server is where the cluster's
// Services live, so the server (one per cluster) takes them from there.
//
//   - Global Services (annotated isthmus.io/global, or exported with a
//     multicluster.x-k8s.io ServiceExport) are written, translated, into
//     the cluster's etcd under isthmus/config/Service/<ns>/<name>, where
//     the service syncer (package servicesync) turns them into the service
//     records other clusters mirror, exactly as for `isthmus apply`. Keys
//     this package wrote carry the annotation isthmus.io/source=kubernetes;
//     it deletes only those, so Services applied by hand stay.
//   - isthmus.io NetworkPolicies get a Ready condition saying whether the
//     agents enforce them (they run the same translation), once per
//     cluster rather than once per node; a Kubernetes NetworkPolicy that
//     uses what Isthmus cannot enforce gets a Warning Event.
//   - Every service some cluster of the mesh exports gets a
//     multicluster.x-k8s.io ServiceImport (serviceimport.go).
package kubesync

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/servicesync"
	"github.com/isthmus-mesh/isthmus/k8s/apis/mcs"
	"github.com/isthmus-mesh/isthmus/k8s/apis/v1alpha1"
	"github.com/isthmus-mesh/isthmus/k8s/kubeclient"
	"github.com/isthmus-mesh/isthmus/k8s/translate"
)

// AnnotationSource marks the config keys this package owns.
const (
	AnnotationSource = "isthmus.io/source"
	SourceKubernetes = "kubernetes"
)

// Config configures the sync.
type Config struct {
	REST    *rest.Config
	Cluster string
	KV      *kvstore.Client
	Log     *slog.Logger
}

// Syncer runs the sync.
type Syncer struct {
	cfg    Config
	log    *slog.Logger
	client kubernetes.Interface
	dyn    dynamic.Interface

	svcs, slices, exports cache.Indexer

	mu      sync.Mutex
	dirty   map[string]bool // ns/name of services to write again
	kick    chan struct{}
	written map[string][]byte // config key -> value last written
	synced  bool
	// lb: LB-IPAM's assignments by ns/name, once listed (lbListed).
	lb       map[string]records.LBAssignment
	lbListed bool
}

// New makes a syncer.
func New(cfg Config) (*Syncer, error) {
	client, err := kubernetes.NewForConfig(cfg.REST)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg.REST)
	if err != nil {
		return nil, err
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Syncer{cfg: cfg, log: cfg.Log.With("source", "kubernetes"), client: client, dyn: dyn,
		dirty: map[string]bool{}, kick: make(chan struct{}, 1), written: map[string][]byte{},
		lb: map[string]records.LBAssignment{}}, nil
}

// Run syncs until ctx ends.
func (s *Syncer) Run(ctx context.Context) error {
	f := informers.NewSharedInformerFactory(s.client, 0)
	svcInf := f.Core().V1().Services().Informer()
	sliceInf := f.Discovery().V1().EndpointSlices().Informer()
	npInf := f.Networking().V1().NetworkPolicies().Informer()
	if err := sliceInf.AddIndexers(cache.Indexers{"service": func(o any) ([]string, error) {
		sl, ok := o.(*discoveryv1.EndpointSlice)
		if !ok || sl.Labels[discoveryv1.LabelServiceName] == "" {
			return nil, nil
		}
		return []string{sl.Namespace + "/" + sl.Labels[discoveryv1.LabelServiceName]}, nil
	}}); err != nil {
		return err
	}
	s.svcs, s.slices = svcInf.GetIndexer(), sliceInf.GetIndexer()
	mark := func(key string) {
		s.mu.Lock()
		s.dirty[key] = true
		s.mu.Unlock()
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
	onKey := func(key func(any) string) cache.ResourceEventHandlerFuncs {
		h := func(o any) {
			if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = d.Obj
			}
			if k := key(o); k != "" {
				mark(k)
			}
		}
		return cache.ResourceEventHandlerFuncs{AddFunc: h, UpdateFunc: func(_, o any) { h(o) }, DeleteFunc: h}
	}
	objKey := func(o any) string {
		if m, err := apimeta.Accessor(o); err == nil {
			return m.GetNamespace() + "/" + m.GetName()
		}
		return ""
	}
	if _, err := svcInf.AddEventHandler(onKey(objKey)); err != nil {
		return err
	}
	if _, err := sliceInf.AddEventHandler(onKey(func(o any) string {
		if sl, ok := o.(*discoveryv1.EndpointSlice); ok && sl.Labels[discoveryv1.LabelServiceName] != "" {
			return sl.Namespace + "/" + sl.Labels[discoveryv1.LabelServiceName]
		}
		return ""
	})); err != nil {
		return err
	}
	if _, err := npInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.checkK8sPolicy(ctx, o) },
		UpdateFunc: func(_, o any) { s.checkK8sPolicy(ctx, o) },
	}); err != nil {
		return err
	}
	f.Start(ctx.Done())
	defer f.Shutdown()

	df := dynamicinformer.NewDynamicSharedInformerFactory(s.dyn, 0)
	defer df.Shutdown()
	synced := []cache.InformerSynced{svcInf.HasSynced, sliceInf.HasSynced, npInf.HasSynced}
	if kubeclient.Served(s.client.Discovery(), mcs.ServiceExports) {
		inf := df.ForResource(mcs.ServiceExports).Informer()
		if _, err := inf.AddEventHandler(onKey(objKey)); err != nil {
			return err
		}
		s.exports = inf.GetIndexer()
		synced = append(synced, inf.HasSynced)
	} else {
		s.log.Info("the Multi-Cluster Services API (ServiceExport) is not installed; global services come from the isthmus.io/global annotation only")
	}
	if kubeclient.Served(s.client.Discovery(), v1alpha1.NetworkPolicyResource) {
		inf := df.ForResource(v1alpha1.NetworkPolicyResource).Informer()
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(o any) { s.checkCRDPolicy(ctx, o) },
			UpdateFunc: func(_, o any) { s.checkCRDPolicy(ctx, o) },
		}); err != nil {
			return err
		}
		synced = append(synced, inf.HasSynced)
	} else {
		s.log.Warn("the Isthmus CRDs are not installed: isthmus.io NetworkPolicies get no status")
	}
	df.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return ctx.Err()
	}
	s.log.Info("kubernetes informers synced", "services", len(s.svcs.ListKeys()))
	ictx, stopImports := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopImports(); wg.Wait() }()
	wg.Go(func() { s.runConfigKinds(ictx, df) })
	wg.Go(func() { s.watchLB(ictx, mark) })
	if kubeclient.Served(s.client.Discovery(), mcs.ServiceImports) {
		wg.Go(func() { s.runImports(ictx, svcInf) })
	} else {
		s.log.Info("the Multi-Cluster Services API (ServiceImport) is not installed; no ServiceImports are kept")
	}

	// First pass: every owned key, so what was deleted while the server was
	// down goes too.
	if err := s.loadWritten(ctx); err != nil {
		return err
	}
	s.mu.Lock()
	for _, k := range s.svcs.ListKeys() {
		s.dirty[k] = true
	}
	for key := range s.written {
		s.dirty[nsName(key)] = true
	}
	s.synced = true
	s.mu.Unlock()
	for {
		if err := s.flush(ctx); err != nil {
			s.log.Warn("kubernetes: writing global services to etcd failed; retrying", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second):
			}
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		}
	}
}

func configKey(nsname string) string {
	return servicesync.ServiceConfigPrefix + nsname
}

func nsName(key string) string { return strings.TrimPrefix(key, servicesync.ServiceConfigPrefix) }

// loadWritten reads the keys this package owns.
func (s *Syncer) loadWritten(ctx context.Context) error {
	kvs, _, err := s.cfg.KV.GetPrefix(ctx, servicesync.ServiceConfigPrefix)
	if err != nil {
		return err
	}
	for _, kv := range kvs {
		if ownedValue(kv.Value) {
			s.written[kv.Key] = kv.Value
		}
	}
	return nil
}

// ownedValue reports whether a config value is a Service this package
// wrote (annotated isthmus.io/source: kubernetes).
func ownedValue(v []byte) bool {
	var m struct {
		Metadata objects.Meta `json:"metadata"`
	}
	return json.Unmarshal(v, &m) == nil && m.Metadata.Annotations[AnnotationSource] == SourceKubernetes
}

// flush writes the dirty services: a global one is put, anything else
// this package wrote before is deleted.
func (s *Syncer) flush(ctx context.Context) error {
	s.mu.Lock()
	keys := slices.Sorted(maps.Keys(s.dirty))
	s.dirty = map[string]bool{}
	s.mu.Unlock()
	var failed []string
	for _, k := range keys {
		if err := s.syncOne(ctx, k); err != nil {
			failed = append(failed, k)
			s.log.Warn("kubernetes: global service not written", "service", k, "err", err)
		}
	}
	if len(failed) > 0 {
		s.mu.Lock()
		for _, k := range failed {
			s.dirty[k] = true
		}
		s.mu.Unlock()
		return fmt.Errorf("%d services not written", len(failed))
	}
	return nil
}

func (s *Syncer) syncOne(ctx context.Context, nsname string) error {
	if err := s.syncConfig(ctx, nsname); err != nil {
		return err
	}
	return s.syncLBStatus(ctx, nsname)
}

func (s *Syncer) syncConfig(ctx context.Context, nsname string) error {
	key := configKey(nsname)
	want, err := s.desired(nsname)
	if err != nil {
		s.log.Warn("kubernetes: service not exported to the mesh", "service", nsname, "err", err)
		want = nil
	}
	have, owned := s.written[key]
	switch {
	case want == nil && owned:
		if err := s.cfg.KV.Delete(ctx, key); err != nil {
			return err
		}
		delete(s.written, key)
	case want != nil && (!owned || string(have) != string(want)):
		if !owned {
			// A key someone applied by hand is not ours to replace.
			if kv, found, err := s.cfg.KV.Get(ctx, key); err != nil {
				return err
			} else if found && !ownedValue(kv.Value) {
				return fmt.Errorf("%s holds a Service applied by hand; delete it to export the Kubernetes one", key)
			}
		}
		if err := s.cfg.KV.Put(ctx, key, want); err != nil {
			return err
		}
		s.written[key] = want
	}
	return nil
}

// desired is the config value of the service at ns/name, or nil when it
// is not global (or gone).
func (s *Syncer) desired(nsname string) ([]byte, error) {
	obj, ok, _ := s.svcs.GetByKey(nsname)
	if !ok {
		return nil, nil
	}
	svc := obj.(*corev1.Service)
	exported := false
	if s.exports != nil {
		_, exported, _ = s.exports.GetByKey(nsname)
	}
	if !exported && !strings.EqualFold(strings.TrimSpace(svc.Annotations[servicesync.AnnotationGlobal]), "true") && !isLoadBalancer(svc) {
		return nil, nil
	}
	var sl []*discoveryv1.EndpointSlice
	items, _ := s.slices.ByIndex("service", nsname)
	for _, it := range items {
		sl = append(sl, it.(*discoveryv1.EndpointSlice))
	}
	out, served, err := translate.Service(svc, sl)
	if err != nil || !served {
		return nil, err
	}
	out.APIVersion, out.Kind = objects.APIVersion, objects.KindService
	// The status (the addresses LB-IPAM assigned, read back from the
	// Service) is LB-IPAM's output, not its input.
	out.Status = objects.ServiceStatus{}
	if out.Metadata.Annotations == nil {
		out.Metadata.Annotations = map[string]string{}
	}
	out.Metadata.Annotations[AnnotationSource] = SourceKubernetes
	if exported {
		out.Metadata.Annotations[servicesync.AnnotationGlobal] = "true"
	}
	if err := out.Validate(); err != nil {
		return nil, err
	}
	return json.Marshal(out)
}

// checkK8sPolicy records a Warning Event on a Kubernetes NetworkPolicy
// the agents cannot enforce.
func (s *Syncer) checkK8sPolicy(ctx context.Context, o any) {
	np, ok := o.(*networkingv1.NetworkPolicy)
	if !ok {
		return
	}
	if _, err := translate.NetworkPolicy(np, ""); err != nil {
		s.event(ctx, np, "NetworkPolicy", networkingv1.SchemeGroupVersion.String(), err)
	}
}

func (s *Syncer) event(ctx context.Context, obj metav1.Object, kind, apiVersion string, err error) {
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{GenerateName: obj.GetName() + ".", Namespace: obj.GetNamespace()},
		InvolvedObject: corev1.ObjectReference{Kind: kind, APIVersion: apiVersion, Namespace: obj.GetNamespace(), Name: obj.GetName(), UID: obj.GetUID(), ResourceVersion: obj.GetResourceVersion()},
		Reason:         "Unsupported", Message: "not enforced by Isthmus: " + err.Error(), Type: corev1.EventTypeWarning,
		Source:         corev1.EventSource{Component: "isthmus-clustermesh"},
		FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
	}
	if _, err := s.client.CoreV1().Events(obj.GetNamespace()).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		s.log.Warn("kubernetes: cannot record an event", "object", obj.GetNamespace()+"/"+obj.GetName(), "err", err)
	}
	s.log.Warn("kubernetes: policy not enforced", "kind", kind, "object", obj.GetNamespace()+"/"+obj.GetName(), "err", err)
}

// checkCRDPolicy sets the Ready condition of an isthmus.io NetworkPolicy.
func (s *Syncer) checkCRDPolicy(ctx context.Context, o any) {
	u, ok := o.(*unstructured.Unstructured)
	if !ok {
		return
	}
	var np v1alpha1.NetworkPolicy
	status, reason, msg := metav1.ConditionTrue, v1alpha1.ReasonApplied, "enforced by the agents of cluster "+s.cfg.Cluster
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &np); err != nil {
		status, reason, msg = metav1.ConditionFalse, v1alpha1.ReasonInvalid, "decode: "+err.Error()
	} else if _, err := np.ToObject(); err != nil {
		status, reason, msg = metav1.ConditionFalse, v1alpha1.ReasonInvalid, err.Error()
	}
	s.setReady(ctx, v1alpha1.NetworkPolicyResource, u, status, reason, msg)
}
