package kubesync

// ServiceImports of the Multi-Cluster Services API (KEP-1645).
//
// For every service (namespace/name) that some cluster of the mesh
// publishes as global (a service record with Global true, the local
// cluster's under isthmus/state/services/v1/<cluster>/ or a remote one's
// mirrored under isthmus/cache/services/v1/<remote>/), the server keeps a
// ServiceImport of the same namespace/name in its own cluster's API:
//
//   - spec.type ClusterSetIP;
//   - spec.ports: the union of the ports of every cluster's record, merged
//     by name, protocol and port;
//   - spec.ips: the ClusterIPs of the local Service of that name, if any;
//   - status.clusters: [{cluster: <name>}] of the clusters that publish it.
//
// ServiceImports this server made carry the label
// app.kubernetes.io/managed-by=isthmus-clustermesh; only those are ever
// updated or deleted. One whose namespace does not exist locally is skipped
// (logged once) and retried every few seconds; everything is compared again
// every minute, so a managed ServiceImport deleted by hand comes back.

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/k8s/apis/mcs"
)

// The label that marks the ServiceImports this server owns.
const (
	LabelManagedBy = "app.kubernetes.io/managed-by"
	ManagedBy      = "isthmus-clustermesh"
)

// ServiceImport types.
const (
	ImportClusterSetIP = "ClusterSetIP"
	ImportHeadless     = "Headless"
)

const (
	importDebounce = 200 * time.Millisecond
	importRetryMin = time.Second
	importRetryMax = 10 * time.Second
	// importPending: how often a ServiceImport whose namespace is missing
	// is tried again.
	importPending = 5 * time.Second
	// importResync: how often the ServiceImports are compared with the
	// records even when nothing changed (one someone deleted comes back).
	importResync = time.Minute
)

// ImportPort is one port of a ServiceImport.
type ImportPort struct {
	Name        string `json:"name,omitempty"`
	Protocol    string `json:"protocol,omitempty"`
	AppProtocol string `json:"appProtocol,omitempty"`
	Port        int32  `json:"port"`
}

// ImportSpec is the spec of a ServiceImport.
type ImportSpec struct {
	Type  string       `json:"type"`
	IPs   []string     `json:"ips,omitempty"`
	Ports []ImportPort `json:"ports,omitempty"`
}

// ImportCluster is one entry of a ServiceImport's status.clusters.
type ImportCluster struct {
	Cluster string `json:"cluster"`
}

// ImportStatus is the status of a ServiceImport.
type ImportStatus struct {
	Clusters []ImportCluster `json:"clusters,omitempty"`
}

// ServiceImport is what the server wants of one ServiceImport.
type ServiceImport struct {
	Namespace, Name string
	Spec            ImportSpec
	Status          ImportStatus
}

func (a ImportSpec) equal(b ImportSpec) bool {
	return a.Type == b.Type && slices.Equal(a.IPs, b.IPs) && slices.Equal(a.Ports, b.Ports)
}

func (a ImportStatus) equal(b ImportStatus) bool { return slices.Equal(a.Clusters, b.Clusters) }

// DesiredImports returns the ServiceImports the records call for, by
// "namespace/name": one per service that at least one record marks
// global. localIPs returns the ClusterIPs of the local Service ns/name
// (nil if there is none). Ports and clusters are sorted, so the result
// does not depend on the order of recs.
func DesiredImports(recs []records.ServiceRecord, localIPs func(nsname string) []string) map[string]ServiceImport {
	type acc struct {
		ns, name string
		ports    map[ImportPort]bool
		clusters map[string]bool
	}
	byName := map[string]*acc{}
	for _, r := range recs {
		if !r.Global {
			continue
		}
		key := r.Namespace + "/" + r.Name
		a := byName[key]
		if a == nil {
			a = &acc{ns: r.Namespace, name: r.Name, ports: map[ImportPort]bool{}, clusters: map[string]bool{}}
			byName[key] = a
		}
		a.clusters[r.Cluster] = true
		for _, f := range r.Frontends {
			a.ports[ImportPort{Name: f.PortName, Protocol: f.Protocol, Port: int32(f.Port)}] = true
		}
	}
	out := make(map[string]ServiceImport, len(byName))
	for key, a := range byName {
		si := ServiceImport{Namespace: a.ns, Name: a.name, Spec: ImportSpec{Type: ImportClusterSetIP}}
		si.Spec.Ports = slices.SortedFunc(maps.Keys(a.ports), func(x, y ImportPort) int {
			return cmp.Or(cmp.Compare(x.Port, y.Port), cmp.Compare(x.Protocol, y.Protocol), cmp.Compare(x.Name, y.Name))
		})
		if localIPs != nil {
			si.Spec.IPs = slices.Clone(localIPs(key))
		}
		for _, c := range slices.Sorted(maps.Keys(a.clusters)) {
			si.Status.Clusters = append(si.Status.Clusters, ImportCluster{Cluster: c})
		}
		out[key] = si
	}
	return out
}

// serviceIPs returns the ClusterIPs of a Service ("None" and empty ones
// left out).
func serviceIPs(svc *corev1.Service) []string {
	var ips []string
	for _, ip := range svc.Spec.ClusterIPs {
		if ip != "" && ip != corev1.ClusterIPNone {
			ips = append(ips, ip)
		}
	}
	if len(ips) == 0 && svc.Spec.ClusterIP != "" && svc.Spec.ClusterIP != corev1.ClusterIPNone {
		ips = append(ips, svc.Spec.ClusterIP)
	}
	return ips
}

// importer keeps the ServiceImports.
type importer struct {
	s    *Syncer
	recs map[string]records.ServiceRecord // etcd key -> record
	// skipped: ns/name -> why it is not in the API (missing namespace, a
	// ServiceImport someone else owns), logged once.
	skipped map[string]string
}

// runImports keeps the ServiceImports until ctx ends. svcInf is the
// (synced) Service informer: a local Service's ClusterIPs are the ips of
// its ServiceImport.
func (s *Syncer) runImports(ctx context.Context, svcInf cache.SharedIndexInformer) {
	kick := make(chan struct{}, 1)
	poke := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	if _, err := svcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { poke() },
		DeleteFunc: func(any) { poke() },
		UpdateFunc: func(o, n any) {
			a, ok1 := o.(*corev1.Service)
			b, ok2 := n.(*corev1.Service)
			if !ok1 || !ok2 || !slices.Equal(serviceIPs(a), serviceIPs(b)) {
				poke()
			}
		},
	}); err != nil {
		s.log.Warn("kubernetes: ServiceImports not kept", "err", err)
		return
	}
	local := records.StateClusterPrefix(records.KindServices, s.cfg.Cluster)
	remote := records.CacheRoot + string(records.KindServices) + "/v1/"
	lw, rw := s.cfg.KV.WatchPrefix(ctx, local), s.cfg.KV.WatchPrefix(ctx, remote)
	im := &importer{s: s, recs: map[string]records.ServiceRecord{}, skipped: map[string]string{}}
	listed := map[string]bool{}

	// The timer fires at the earliest time asked for: a change is
	// reconciled at most importDebounce after it, together with those that
	// follow it within that time.
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var due time.Time
	arm := func(d time.Duration) {
		if t := time.Now().Add(d); due.IsZero() || t.Before(due) {
			timer.Reset(d)
			due = t
		}
	}
	retry := importRetryMin
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-lw:
			if !ok {
				return
			}
			im.event(ev, local, listed)
			arm(importDebounce)
		case ev, ok := <-rw:
			if !ok {
				return
			}
			im.event(ev, remote, listed)
			arm(importDebounce)
		case <-kick:
			arm(importDebounce)
		case <-timer.C:
			due = time.Time{}
			// Only once both prefixes are listed: a partial view would
			// delete ServiceImports that are still exported.
			if !listed[local] || !listed[remote] {
				continue
			}
			pending, err := im.reconcile(ctx)
			switch {
			case err != nil:
				if ctx.Err() != nil {
					return
				}
				s.log.Warn("kubernetes: ServiceImports not in sync; retrying", "err", err, "in", retry)
				arm(retry)
				retry = min(2*retry, importRetryMax)
			case pending:
				retry = importRetryMin
				arm(importPending)
			default:
				retry = importRetryMin
				arm(importResync)
			}
		}
	}
}

// event applies one watch event of prefix to the records.
func (im *importer) event(ev kvstore.Event, prefix string, listed map[string]bool) {
	switch ev.Type {
	case kvstore.EventListDone:
		listed[prefix] = true
	case kvstore.EventDelete:
		delete(im.recs, ev.Key)
	case kvstore.EventUpsert:
		r, err := im.decode(ev.Key, ev.Value)
		if err != nil {
			delete(im.recs, ev.Key)
			im.s.log.Warn("kubernetes: service record ignored for ServiceImports", "key", ev.Key, "err", err)
			return
		}
		im.recs[ev.Key] = r
	}
}

// decode reads a service record, local (state key) or mirrored (cache
// key), and checks it names the cluster and service of its key.
func (im *importer) decode(key string, value []byte) (records.ServiceRecord, error) {
	stateKey := key
	if strings.HasPrefix(key, records.CacheRoot) {
		var err error
		if stateKey, _, err = records.StateKey(key); err != nil {
			return records.ServiceRecord{}, err
		}
	}
	cluster, ns, name, err := records.ParseServiceKey(stateKey)
	if err != nil {
		return records.ServiceRecord{}, err
	}
	r, err := records.DecodeService(value)
	if err != nil {
		return records.ServiceRecord{}, err
	}
	if r.Cluster != cluster || r.Namespace != ns || r.Name != name {
		return records.ServiceRecord{}, fmt.Errorf("record of %s/%s/%s under the key of %s/%s/%s", r.Cluster, r.Namespace, r.Name, cluster, ns, name)
	}
	return r, nil
}

func (im *importer) localIPs(nsname string) []string {
	obj, ok, _ := im.s.svcs.GetByKey(nsname)
	if !ok {
		return nil
	}
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return nil
	}
	return serviceIPs(svc)
}

// reconcile makes the managed ServiceImports what the records say.
// pending reports ServiceImports skipped for now (namespace missing).
func (im *importer) reconcile(ctx context.Context) (pending bool, err error) {
	want := DesiredImports(slices.Collect(maps.Values(im.recs)), im.localIPs)
	ri := im.s.dyn.Resource(mcs.ServiceImports)
	list, err := ri.List(ctx, metav1.ListOptions{LabelSelector: LabelManagedBy + "=" + ManagedBy})
	if err != nil {
		return false, fmt.Errorf("list ServiceImports: %w", err)
	}
	have := map[string]*unstructured.Unstructured{}
	for i := range list.Items {
		u := &list.Items[i]
		have[u.GetNamespace()+"/"+u.GetName()] = u
	}
	var errs []error
	for _, key := range slices.Sorted(maps.Keys(want)) {
		p, err := im.apply(ctx, want[key], have[key])
		pending = pending || p
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", key, err))
		}
	}
	for key, u := range have {
		if _, ok := want[key]; ok {
			continue
		}
		uid := u.GetUID()
		err := ri.Namespace(u.GetNamespace()).Delete(ctx, u.GetName(), metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("%s: delete: %w", key, err))
			continue
		}
		im.s.log.Info("kubernetes: ServiceImport deleted: no cluster exports the service any more", "service", key)
	}
	for key := range im.skipped {
		if _, ok := want[key]; !ok {
			delete(im.skipped, key)
		}
	}
	if len(errs) > 0 {
		return pending, fmt.Errorf("%d ServiceImports not written: %v", len(errs), errs)
	}
	return pending, nil
}

// skip logs, once per reason, that a ServiceImport is not written.
func (im *importer) skip(key, why string) {
	if im.skipped[key] != why {
		im.skipped[key] = why
		im.s.log.Info("kubernetes: ServiceImport skipped", "service", key, "reason", why)
	}
}

// apply creates or updates one ServiceImport (cur is the managed one in
// the API, or nil).
func (im *importer) apply(ctx context.Context, si ServiceImport, cur *unstructured.Unstructured) (pending bool, err error) {
	key := si.Namespace + "/" + si.Name
	ri := im.s.dyn.Resource(mcs.ServiceImports).Namespace(si.Namespace)
	spec, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&si.Spec)
	if err != nil {
		return false, err
	}
	status, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&si.Status)
	if err != nil {
		return false, err
	}
	if cur == nil {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": mcs.GroupVersion.String(), "kind": "ServiceImport",
			"metadata": map[string]any{"name": si.Name, "namespace": si.Namespace,
				"labels": map[string]any{LabelManagedBy: ManagedBy}},
			"spec": spec,
		}}
		created, err := ri.Create(ctx, u, metav1.CreateOptions{FieldManager: ManagedBy})
		switch {
		case apierrors.IsNotFound(err):
			im.skip(key, "namespace "+si.Namespace+" does not exist")
			return true, nil
		case apierrors.IsAlreadyExists(err):
			// Not labelled as ours (we listed ours): someone else's.
			im.skip(key, "a ServiceImport not managed by "+ManagedBy+" exists")
			return false, nil
		case err != nil:
			return false, fmt.Errorf("create: %w", err)
		}
		delete(im.skipped, key)
		im.s.log.Info("kubernetes: ServiceImport created", "service", key, "clusters", len(si.Status.Clusters), "ports", len(si.Spec.Ports))
		cur = created
	} else {
		var have ImportSpec
		if m, ok := cur.Object["spec"].(map[string]any); ok {
			_ = runtime.DefaultUnstructuredConverter.FromUnstructured(m, &have)
		}
		if !have.equal(si.Spec) {
			u := cur.DeepCopy()
			u.Object["spec"] = spec
			if cur, err = ri.Update(ctx, u, metav1.UpdateOptions{FieldManager: ManagedBy}); err != nil {
				return false, fmt.Errorf("update: %w", err)
			}
			im.s.log.Info("kubernetes: ServiceImport updated", "service", key, "ports", len(si.Spec.Ports))
		}
	}
	var have ImportStatus
	if m, ok := cur.Object["status"].(map[string]any); ok {
		_ = runtime.DefaultUnstructuredConverter.FromUnstructured(m, &have)
	}
	if !have.equal(si.Status) {
		u := cur.DeepCopy()
		u.Object["status"] = status
		if _, err := ri.UpdateStatus(ctx, u, metav1.UpdateOptions{FieldManager: ManagedBy}); err != nil {
			return false, fmt.Errorf("update status: %w", err)
		}
	}
	return false, nil
}
