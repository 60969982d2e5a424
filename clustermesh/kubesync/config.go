package kubesync

// The Isthmus custom resources of the standalone kinds
// (LoadBalancerIPPool, BGPPeeringPolicy, L2AnnouncementPolicy,
// ExternalWorkload, package k8s/apis/v1alpha1): each is converted
// (ToObject, validated) and written into the cluster's etcd where
// `isthmus apply` (or `isthmus vm apply`) writes it, annotated
// isthmus.io/source=kubernetes:
//
//   - pools and policies under isthmus/config/<Kind>/default/<name> (they
//     are cluster-scoped), where LB-IPAM (lbipamsync) and the agents read
//     them;
//   - ExternalWorkloads through enroll.Apply (isthmus-vm/workloads/<name>),
//     where enrollment reads them; their name is unique in the cluster,
//     whatever the namespace.
//
// Only keys this package wrote are replaced or deleted. The resource's
// Ready condition says what happened: True (Applied), or False with the
// reason (Invalid: ToObject refused it; Conflict: a pool overlapping
// another, a key applied by hand, a workload name another namespace holds,
// an enrolled workload whose identity changed) and nothing written; the
// other objects are not affected. Any event of a kind re-checks every
// object of that kind, so a pool that overlapped one since deleted is
// applied then.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/clustermesh/enroll"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/k8s/apis/v1alpha1"
	"github.com/isthmus-mesh/isthmus/k8s/kubeclient"
)

// configKind is one custom resource kind the server writes to etcd.
type configKind struct {
	kind string // the Isthmus kind
	gvr  schema.GroupVersionResource
	// convert decodes and converts a resource into a pointer to the
	// Isthmus object (nil error: valid).
	convert func(u *unstructured.Unstructured) (any, error)
}

func convertCR[T, O any](u *unstructured.Unstructured, to func(*T) (O, error)) (any, error) {
	var cr T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &cr); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	o, err := to(&cr)
	if err != nil {
		return nil, err
	}
	return &o, nil
}

var configKinds = []configKind{
	{objects.KindLoadBalancerIPPool, v1alpha1.LoadBalancerIPPoolResource, func(u *unstructured.Unstructured) (any, error) {
		return convertCR(u, (*v1alpha1.LoadBalancerIPPool).ToObject)
	}},
	{objects.KindBGPPeeringPolicy, v1alpha1.BGPPeeringPolicyResource, func(u *unstructured.Unstructured) (any, error) {
		return convertCR(u, (*v1alpha1.BGPPeeringPolicy).ToObject)
	}},
	{objects.KindL2AnnouncementPolicy, v1alpha1.L2AnnouncementPolicyResource, func(u *unstructured.Unstructured) (any, error) {
		return convertCR(u, (*v1alpha1.L2AnnouncementPolicy).ToObject)
	}},
	{objects.KindExternalWorkload, v1alpha1.ExternalWorkloadResource, func(u *unstructured.Unstructured) (any, error) {
		return convertCR(u, (*v1alpha1.ExternalWorkload).ToObject)
	}},
}

// errConflict marks a refusal with reason Conflict (else Invalid).
var errConflict = errors.New("conflict")

// configSync keeps one kind's resources in etcd.
type configSync struct {
	s    *Syncer
	k    configKind
	inf  cache.SharedIndexInformer
	kick chan struct{}
}

// runConfigKinds waits (per kind) until the API serves the kind's CRD,
// then keeps its resources in etcd until ctx ends.
func (s *Syncer) runConfigKinds(ctx context.Context, df dynamicinformer.DynamicSharedInformerFactory) {
	var wg sync.WaitGroup
	for _, k := range configKinds {
		wg.Go(func() {
			c := &configSync{s: s, k: k, kick: make(chan struct{}, 1)}
			c.run(ctx, df)
		})
	}
	wg.Wait()
}

func (c *configSync) poke() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *configSync) run(ctx context.Context, df dynamicinformer.DynamicSharedInformerFactory) {
	log := c.s.log.With("kind", c.k.kind)
	delay := 500 * time.Millisecond
	for warned := false; !kubeclient.Served(c.s.client.Discovery(), c.k.gvr); {
		if !warned {
			log.Warn("custom resource not served by the API server (CRD not installed yet); waiting for it", "resource", c.k.gvr.Resource)
			warned = true
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, 10*time.Second)
	}
	c.inf = df.ForResource(c.k.gvr).Informer()
	h := func(any) { c.poke() }
	if _, err := c.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: h, UpdateFunc: func(_, o any) { h(o) }, DeleteFunc: h}); err != nil {
		log.Error("informer", "err", err)
		return
	}
	df.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), c.inf.HasSynced) {
		return
	}
	c.poke()
	retry := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.kick:
		}
		if err := c.syncAll(ctx); err != nil {
			log.Warn("kubernetes: custom resources not all written to etcd; retrying", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(retry):
			}
			retry = min(2*retry, 10*time.Second)
			c.poke()
			continue
		}
		retry = time.Second
	}
}

// owned reads the objects of the kind this package wrote, by etcd key.
func (c *configSync) owned(ctx context.Context) (map[string][]byte, error) {
	prefix := records.ConfigPrefix + c.k.kind + "/"
	if c.k.kind == objects.KindExternalWorkload {
		prefix = enroll.WorkloadsPrefix
	}
	kvs, _, err := c.s.cfg.KV.GetPrefix(ctx, prefix)
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for _, kv := range kvs {
		if ownedValue(kv.Value) {
			out[kv.Key] = kv.Value
		}
	}
	return out, nil
}

// syncAll writes every resource of the kind, in name order, deletes the
// owned keys no resource wants, and sets the Ready conditions.
func (c *configSync) syncAll(ctx context.Context) error {
	owned, err := c.owned(ctx)
	if err != nil {
		return err
	}
	var pools []objects.LoadBalancerIPPool
	if c.k.kind == objects.KindLoadBalancerIPPool {
		kvs, _, err := c.s.cfg.KV.GetPrefix(ctx, records.ConfigPrefix+objects.KindLoadBalancerIPPool+"/")
		if err != nil {
			return err
		}
		for _, kv := range kvs {
			var p objects.LoadBalancerIPPool
			if json.Unmarshal(kv.Value, &p) != nil {
				continue
			}
			// A pool this package wrote for a resource since deleted
			// is about to go: it conflicts with nothing.
			_, mine := owned[kv.Key]
			if _, exists, _ := c.inf.GetStore().GetByKey(p.Metadata.Name); !mine || exists {
				pools = append(pools, p)
			}
		}
	}
	items := c.inf.GetStore().List()
	slices.SortFunc(items, func(a, b any) int {
		return strings.Compare(a.(*unstructured.Unstructured).GetNamespace()+"/"+a.(*unstructured.Unstructured).GetName(),
			b.(*unstructured.Unstructured).GetNamespace()+"/"+b.(*unstructured.Unstructured).GetName())
	})
	wanted := map[string]bool{}
	var errs []error
	for _, it := range items {
		u, ok := it.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		key, err := c.apply(ctx, u, owned, &pools)
		if key != "" {
			wanted[key] = true
		}
		switch {
		case err == nil:
			c.s.setReady(ctx, c.k.gvr, u, metav1.ConditionTrue, v1alpha1.ReasonApplied, "applied to the etcd of cluster "+c.s.cfg.Cluster)
		case errors.Is(err, errConflict):
			c.s.setReady(ctx, c.k.gvr, u, metav1.ConditionFalse, v1alpha1.ReasonConflict, strings.TrimPrefix(err.Error(), errConflict.Error()+": "))
		case errors.Is(err, errEtcd):
			errs = append(errs, err) // retried; the condition stays as it was
		default:
			c.s.setReady(ctx, c.k.gvr, u, metav1.ConditionFalse, v1alpha1.ReasonInvalid, err.Error())
		}
	}
	for _, key := range slices.Sorted(maps.Keys(owned)) {
		if wanted[key] {
			continue
		}
		if c.k.kind == objects.KindExternalWorkload {
			err = enroll.Delete(ctx, c.s.cfg.KV, c.s.cfg.Cluster, strings.TrimPrefix(key, enroll.WorkloadsPrefix))
		} else {
			err = c.s.cfg.KV.Delete(ctx, key)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", key, err))
			continue
		}
		c.s.log.Info("kubernetes: custom resource gone; deleted from etcd", "key", key)
	}
	return errors.Join(errs...)
}

// errEtcd marks a failure to read or write etcd (retried, not reported
// on the resource).
var errEtcd = errors.New("etcd")

// apply converts one resource and writes it unless it is refused. key is
// the etcd key the resource holds (it is not deleted), "" if none.
func (c *configSync) apply(ctx context.Context, u *unstructured.Unstructured, owned map[string][]byte, pools *[]objects.LoadBalancerIPPool) (key string, err error) {
	o, err := c.k.convert(u)
	if err != nil {
		return "", err
	}
	var m objects.Meta
	switch o := o.(type) {
	case *objects.ExternalWorkload:
		m = o.Metadata
		key = enroll.WorkloadKey(m.Name)
	case objects.Object:
		m = o.GetMeta()
		key = records.ConfigPrefix + objects.Key(o)
	}
	have, mine := owned[key]
	if !mine {
		_, found, err := c.s.cfg.KV.Get(ctx, key)
		if err != nil {
			return "", fmt.Errorf("%w: %v", errEtcd, err)
		}
		if found {
			return "", fmt.Errorf("%w: %s %s was applied outside Kubernetes (isthmus apply or isthmus vm apply); delete it there to manage it here", errConflict, c.k.kind, m.Name)
		}
	}
	ann := map[string]string{AnnotationSource: SourceKubernetes}
	var value []byte
	switch o := o.(type) {
	case *objects.ExternalWorkload:
		if mine {
			var prev objects.ExternalWorkload
			if json.Unmarshal(have, &prev) == nil && prev.Metadata.Namespace != m.Namespace {
				return "", fmt.Errorf("%w: the name %s is taken by ExternalWorkload %s/%s (names are unique in the cluster)", errConflict, m.Name, prev.Metadata.Namespace, m.Name)
			}
			o.Status = prev.Status
		}
		o.Metadata.Annotations = ann
		if value, err = json.Marshal(o); err != nil {
			return "", err
		}
		if mine && bytes.Equal(value, have) {
			return key, nil
		}
		if err := enroll.Apply(ctx, c.s.cfg.KV, *o); err != nil {
			if strings.Contains(err.Error(), "is enrolled") {
				return key, fmt.Errorf("%w: %v", errConflict, err)
			}
			return key, fmt.Errorf("%w: %v", errEtcd, err)
		}
		return key, nil
	case *objects.LoadBalancerIPPool:
		o.Metadata.Annotations = ann
		if err := objects.CheckPoolOverlap(*pools, *o); err != nil {
			return "", fmt.Errorf("%w: %v", errConflict, err)
		}
		*pools = append(*pools, *o)
		value, err = json.Marshal(o)
	case *objects.BGPPeeringPolicy:
		o.Metadata.Annotations = ann
		value, err = json.Marshal(o)
	case *objects.L2AnnouncementPolicy:
		o.Metadata.Annotations = ann
		value, err = json.Marshal(o)
	default:
		return "", fmt.Errorf("%T not handled", o)
	}
	if err != nil {
		return "", err
	}
	if mine && bytes.Equal(value, have) {
		return key, nil
	}
	if err := c.s.cfg.KV.Put(ctx, key, value); err != nil {
		return key, fmt.Errorf("%w: %v", errEtcd, err)
	}
	c.s.log.Info("kubernetes: custom resource written to etcd", "key", key)
	return key, nil
}

// setReady sets the Ready condition of a resource unless it already says
// the same about its generation.
func (s *Syncer) setReady(ctx context.Context, gvr schema.GroupVersionResource, u *unstructured.Unstructured, status metav1.ConditionStatus, reason, msg string) {
	var st v1alpha1.ObjectStatus
	if m, ok := u.Object["status"].(map[string]any); ok {
		_ = runtime.DefaultUnstructuredConverter.FromUnstructured(m, &st)
	}
	cond := metav1.Condition{Type: v1alpha1.ConditionReady, Status: status, Reason: reason, Message: msg, ObservedGeneration: u.GetGeneration()}
	if c := apimeta.FindStatusCondition(st.Conditions, cond.Type); c != nil && c.Status == cond.Status && c.Reason == cond.Reason &&
		c.Message == cond.Message && c.ObservedGeneration == cond.ObservedGeneration && st.ObservedGeneration == u.GetGeneration() {
		return
	}
	if status == metav1.ConditionFalse {
		s.log.Warn("kubernetes: custom resource not applied", "resource", gvr.Resource, "object", nsNameOf(u), "reason", reason, "err", msg)
	}
	apimeta.SetStatusCondition(&st.Conditions, cond)
	st.ObservedGeneration = u.GetGeneration()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&st)
	if err != nil {
		return
	}
	u = u.DeepCopy()
	u.Object["status"] = m
	if _, err := s.dyn.Resource(gvr).Namespace(u.GetNamespace()).UpdateStatus(ctx, u, metav1.UpdateOptions{}); err != nil {
		s.log.Warn("kubernetes: cannot set the status of a custom resource", "resource", gvr.Resource, "object", nsNameOf(u), "err", err)
	}
}

func nsNameOf(u *unstructured.Unstructured) string {
	if u.GetNamespace() == "" {
		return u.GetName()
	}
	return u.GetNamespace() + "/" + u.GetName()
}
