package kubesync

// Services of type LoadBalancer. Their translation (an Isthmus Service of
// type LoadBalancer, with spec.loadBalancerIP as its requested address) is
// written to etcd like a global Service's, so LB-IPAM (lbipamsync)
// allocates for it; the assignment (isthmus/state/lbipam/v1/<ns>/<name>)
// is written back into the Service's status.loadBalancer.ingress, which
// the agents' Kubernetes source serves. One direction: Service -> etcd ->
// LB-IPAM -> Service status -> agents. A Service with a
// spec.loadBalancerClass belongs to another controller and is left alone.

import (
	"context"
	"slices"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// isLoadBalancer reports whether LB-IPAM serves the Service.
func isLoadBalancer(svc *corev1.Service) bool {
	return svc.Spec.Type == corev1.ServiceTypeLoadBalancer && svc.Spec.LoadBalancerClass == nil
}

// watchLB keeps s.lb equal to LB-IPAM's assignments and marks the
// Services whose assignment changed.
func (s *Syncer) watchLB(ctx context.Context, mark func(nsname string)) {
	for ev := range s.cfg.KV.WatchPrefix(ctx, records.LBIPAMPrefix) {
		switch ev.Type {
		case kvstore.EventListDone:
			s.mu.Lock()
			first := !s.lbListed
			s.lbListed = true
			keys := s.svcs.ListKeys()
			s.mu.Unlock()
			if first {
				for _, k := range keys {
					mark(k)
				}
			}
		case kvstore.EventUpsert, kvstore.EventDelete:
			ns, name, err := records.ParseLBIPAMKey(ev.Key)
			if err != nil {
				continue
			}
			nsname := ns + "/" + name
			s.mu.Lock()
			delete(s.lb, nsname)
			if ev.Type == kvstore.EventUpsert {
				if r, err := records.ValidateLBAssignment(ev.Key, ev.Value); err == nil {
					s.lb[nsname] = r
				} else {
					s.log.Warn("kubernetes: unreadable LB-IPAM assignment ignored", "key", ev.Key, "err", err)
				}
			}
			s.mu.Unlock()
			mark(nsname)
		}
	}
}

// syncLBStatus writes the addresses LB-IPAM assigned to a LoadBalancer
// Service into its status.loadBalancer.ingress (none: an empty list), once
// the assignments were listed.
func (s *Syncer) syncLBStatus(ctx context.Context, nsname string) error {
	obj, ok, _ := s.svcs.GetByKey(nsname)
	if !ok {
		return nil
	}
	svc := obj.(*corev1.Service)
	if !isLoadBalancer(svc) {
		return nil
	}
	s.mu.Lock()
	listed := s.lbListed
	r := s.lb[nsname]
	s.mu.Unlock()
	if !listed {
		return nil
	}
	var want []corev1.LoadBalancerIngress
	for _, a := range r.Addresses {
		want = append(want, corev1.LoadBalancerIngress{IP: a.IP.String(), IPMode: ptrTo(corev1.LoadBalancerIPModeVIP)})
	}
	ips := func(in []corev1.LoadBalancerIngress) []string {
		var out []string
		for _, i := range in {
			out = append(out, i.IP)
		}
		return out
	}
	if slices.Equal(ips(svc.Status.LoadBalancer.Ingress), ips(want)) {
		return nil
	}
	svc = svc.DeepCopy()
	svc.Status.LoadBalancer.Ingress = want
	if _, err := s.client.CoreV1().Services(svc.Namespace).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		return err
	}
	s.log.Info("kubernetes: load-balancer addresses written to the Service's status", "service", nsname, "addresses", ips(want), "refused", r.Refused)
	return nil
}

func ptrTo[T any](v T) *T { return &v }
