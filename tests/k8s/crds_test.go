package k8s

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/k8s/apis/v1alpha1"
)

// cr is a cluster-scoped isthmus.io custom resource.
func cr(kind, name string, spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.GroupVersion.String(), "kind": kind,
		"metadata": map[string]any{"name": name}, "spec": spec,
	}}
}

// readyOf returns the status, reason and message of a resource's Ready
// condition for its current generation ("" status: none yet).
func readyOf(u *unstructured.Unstructured) (status, reason, msg string) {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == v1alpha1.ConditionReady && fmt.Sprint(m["observedGeneration"]) == fmt.Sprint(u.GetGeneration()) {
			return fmt.Sprint(m["status"]), fmt.Sprint(m["reason"]), fmt.Sprint(m["message"])
		}
	}
	return "", "", ""
}

// checkCustomResources: the isthmus.io kinds of the standalone YAML in c1.
//   - The API server refuses what the CRD schema forbids.
//   - The clustermesh server applies the valid ones (Ready=True) and
//     refuses, with Ready=False and the reason, what Isthmus cannot apply:
//     a BGPPeeringPolicy with AS_TRANS (Invalid), a pool overlapping
//     another (Conflict); the rest keeps working.
//   - A LoadBalancer Service gets addresses from the pool in its
//     status.loadBalancer.ingress, and answers on them from a node and,
//     through the L2AnnouncementPolicy's ARP/NDP answers, from a client
//     behind the router.
func checkCustomResources(t *testing.T, e *env, echoLabels map[string]string) {
	ctx := e.ctx
	dyn, err := dynamic.NewForConfig(e.k1.Config)
	if err != nil {
		t.Fatal(err)
	}
	create := func(gvr schema.GroupVersionResource, u *unstructured.Unstructured) error {
		_, err := dyn.Resource(gvr).Create(ctx, u, metav1.CreateOptions{})
		return err
	}
	pool := e.c1.LBPool() // inside c1's node segment
	pools := v1alpha1.LoadBalancerIPPoolResource

	t.Run("invalid objects are refused by the API server's validation", func(t *testing.T) {
		for _, bad := range []struct {
			gvr  schema.GroupVersionResource
			u    *unstructured.Unstructured
			want string // in the API server's message
		}{
			{pools, cr("LoadBalancerIPPool", "ilab-bad-both", map[string]any{"blocks": []any{map[string]any{"cidr": "10.1.0.0/24", "start": "10.1.0.1", "stop": "10.1.0.2"}}}), "give either cidr, or start and stop"},
			{pools, cr("LoadBalancerIPPool", "ilab-bad-cidr", map[string]any{"blocks": []any{map[string]any{"cidr": "10.1.0.0/33"}}}), "must be a CIDR"},
			{pools, cr("LoadBalancerIPPool", "ilab-bad-family", map[string]any{"blocks": []any{map[string]any{"start": "10.1.0.1", "stop": "fd00::1"}}}), "start and stop must be of one family"},
			{v1alpha1.BGPPeeringPolicyResource, cr("BGPPeeringPolicy", "ilab-bad-asn", map[string]any{"localASN": 0, "neighbors": []any{map[string]any{"address": "10.1.0.1", "peerASN": 65001}}}), "spec.localASN"},
			{v1alpha1.L2AnnouncementPolicyResource, cr("L2AnnouncementPolicy", "ilab-bad-l2", map[string]any{"interfaces": []any{"eth0"}, "interfaceRegex": "eth.*"}), "give interfaces or interfaceRegex, exactly one"},
		} {
			err := create(bad.gvr, bad.u)
			if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), bad.want) {
				t.Errorf("%s %s: %v, want refused as invalid naming %q", bad.u.GetKind(), bad.u.GetName(), err, bad.want)
				_ = dyn.Resource(bad.gvr).Delete(ctx, bad.u.GetName(), metav1.DeleteOptions{})
			}
		}
	})

	// The valid objects, and two the server cannot apply.
	for _, o := range []struct {
		gvr schema.GroupVersionResource
		u   *unstructured.Unstructured
	}{
		{pools, cr("LoadBalancerIPPool", "ilab-pool", map[string]any{"blocks": []any{map[string]any{"cidr": pool[0].String()}, map[string]any{"cidr": pool[1].String()}}})},
		{v1alpha1.L2AnnouncementPolicyResource, cr("L2AnnouncementPolicy", "ilab-l2", map[string]any{"interfaces": []any{"eth0"}})},
		{v1alpha1.BGPPeeringPolicyResource, cr("BGPPeeringPolicy", "ilab-as-trans", map[string]any{"localASN": 23456, "neighbors": []any{map[string]any{"address": e.c1.RouterIPs()[0].String(), "peerASN": 65000}}})},
	} {
		if err := create(o.gvr, o.u); err != nil {
			t.Fatalf("%s %s: %v", o.u.GetKind(), o.u.GetName(), err)
		}
	}
	// Created after ilab-pool was applied, so it is the one that conflicts.
	if err := eventually(30*time.Second, func() error {
		u, err := dyn.Resource(pools).Get(ctx, "ilab-pool", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if st, _, _ := readyOf(u); st != "True" {
			return fmt.Errorf("ilab-pool not Ready yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	overlap := netip.PrefixFrom(pool[0].Addr(), pool[0].Bits()+1)
	if err := create(pools, cr("LoadBalancerIPPool", "ilab-pool-overlap", map[string]any{"blocks": []any{map[string]any{"cidr": overlap.String()}}})); err != nil {
		t.Fatal(err)
	}

	t.Run("the server reports Ready, or Ready=False with the reason", func(t *testing.T) {
		for _, w := range []struct {
			gvr                       schema.GroupVersionResource
			name, status, reason, msg string
		}{
			{pools, "ilab-pool", "True", v1alpha1.ReasonApplied, "applied to the etcd of cluster"},
			{v1alpha1.L2AnnouncementPolicyResource, "ilab-l2", "True", v1alpha1.ReasonApplied, "applied"},
			{v1alpha1.BGPPeeringPolicyResource, "ilab-as-trans", "False", v1alpha1.ReasonInvalid, "spec.localASN: 23456 is AS_TRANS"},
			{pools, "ilab-pool-overlap", "False", v1alpha1.ReasonConflict, "overlaps block " + pool[0].Addr().String()},
		} {
			var got string
			err := eventually(30*time.Second, func() error {
				u, err := dyn.Resource(w.gvr).Get(ctx, w.name, metav1.GetOptions{})
				if err != nil {
					return err
				}
				st, reason, msg := readyOf(u)
				got = fmt.Sprintf("Ready=%s %s: %s", st, reason, msg)
				if st != w.status || reason != w.reason || !strings.Contains(msg, w.msg) {
					return fmt.Errorf("%s %s: %s, want Ready=%s %s containing %q", w.gvr.Resource, w.name, got, w.status, w.reason, w.msg)
				}
				return nil
			})
			if err != nil {
				t.Error(err)
			} else {
				t.Logf("%s %s: %s", w.gvr.Resource, w.name, got)
			}
		}
	})

	svc, err := e.k1.Client.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "ilab-echo-lb"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: echoLabels, IPFamilyPolicy: ptr(corev1.IPFamilyPolicyRequireDualStack),
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(connectivity.EchoPort), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var lbIPs []netip.Addr
	t.Run("a LoadBalancer Service gets addresses of the pool in its status", func(t *testing.T) {
		t0 := time.Now()
		err := eventually(30*time.Second, func() error {
			s, err := e.k1.Client.CoreV1().Services("default").Get(ctx, svc.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			lbIPs = nil
			for _, in := range s.Status.LoadBalancer.Ingress {
				a, err := netip.ParseAddr(in.IP)
				if err != nil || !slices.ContainsFunc(pool, func(p netip.Prefix) bool { return p.Contains(a) }) {
					return fmt.Errorf("status.loadBalancer.ingress %+v: %q not in the pool %v", s.Status.LoadBalancer.Ingress, in.IP, pool)
				}
				lbIPs = append(lbIPs, a)
			}
			if len(lbIPs) != 2 {
				return fmt.Errorf("status.loadBalancer.ingress %+v: want an IPv4 and an IPv6 address", s.Status.LoadBalancer.Ingress)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		step(t, "info: LoadBalancer Service %s: addresses %v in its status after %v", svc.Name, lbIPs, time.Since(t0).Round(time.Millisecond))
	})
	if len(lbIPs) != 2 {
		return
	}

	t.Run("the LoadBalancer Service answers on its addresses from a node and from outside", func(t *testing.T) {
		out, err := e.c1.Outside("outside")
		if err != nil {
			t.Fatal(err)
		}
		// The node that answers an address's ARP/NDP does not reach it
		// from its own host namespace (a known limit, docs/kubernetes.md:
		// the connection times out). So each address is asked from a
		// node that does not lead it, and from outside.
		leader := func(a netip.Addr) (string, error) {
			st, err := api.NewClient(e.c1.Agents[0].Socket).Status(ctx)
			if err != nil {
				return "", err
			}
			if st.L2 != nil {
				for _, l := range st.L2.Addresses {
					if l.Address == a.String() && l.Leader != "" {
						return l.Leader, nil
					}
				}
			}
			return "", fmt.Errorf("no L2 leader for %s yet", a)
		}
		for _, a := range lbIPs {
			var lead string
			if err := eventually(30*time.Second, func() (err error) { lead, err = leader(a); return err }); err != nil {
				t.Fatal(err)
			}
			node := e.c1.Agents[0].Node
			if node.NodeName() == lead {
				node = e.c1.Agents[1].Node
			}
			dst := netip.AddrPortFrom(a, 80)
			for _, from := range []struct{ what, netns string }{
				{"node " + node.NodeName() + " (" + lead + " leads the address)", node.Path()},
				{"a client behind the router (L2 announcement)", out.Path()},
			} {
				seen := map[string]bool{}
				err := eventually(30*time.Second, func() error {
					r, err := e.fetch(from.netns, dst)
					if err != nil {
						return err
					}
					if seen[r.Pod] = true; len(seen) < 2 {
						return fmt.Errorf("answered by %v only", seen)
					}
					return nil
				})
				if err != nil {
					t.Errorf("%s -> %s: %v", from.what, dst, err)
				}
			}
		}
	})
}
