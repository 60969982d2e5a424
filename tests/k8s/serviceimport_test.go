package k8s

import (
	"cmp"
	"fmt"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"

	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/k8s/apis/mcs"
	"github.com/isthmus-mesh/isthmus/lab/kube"
)

// siPort is a port of a ServiceImport, as the API returns it.
type siPort struct {
	Name     string `json:"name,omitempty"`
	Protocol string `json:"protocol,omitempty"`
	Port     int32  `json:"port"`
}

type serviceImport struct {
	Labels map[string]string
	Spec   struct {
		Type  string   `json:"type"`
		IPs   []string `json:"ips"`
		Ports []siPort `json:"ports"`
	}
	Status struct {
		Clusters []struct {
			Cluster string `json:"cluster"`
		} `json:"clusters"`
	}
}

func (s *serviceImport) clusters() []string {
	var out []string
	for _, c := range s.Status.Clusters {
		out = append(out, c.Cluster)
	}
	return out
}

func sortPorts(ps []siPort) []siPort {
	ps = slices.Clone(ps)
	slices.SortFunc(ps, func(a, b siPort) int {
		return cmp.Or(cmp.Compare(a.Port, b.Port), cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Name, b.Name))
	})
	return slices.Compact(ps)
}

// getImport reads the ServiceImport default/name (nil, nil if there is
// none).
func getImport(e *env, dyn dynamic.Interface, name string) (*serviceImport, error) {
	u, err := dyn.Resource(mcs.ServiceImports).Namespace("default").Get(e.ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var si serviceImport
	si.Labels = u.GetLabels()
	if m, ok := u.Object["spec"].(map[string]any); ok {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &si.Spec); err != nil {
			return nil, err
		}
	}
	if m, ok := u.Object["status"].(map[string]any); ok {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &si.Status); err != nil {
			return nil, err
		}
	}
	return &si, nil
}

// checkServiceImports checks the ServiceImports of the exported Service
// default/name, which exists and is exported in both clusters: each
// cluster's clustermesh server keeps a ServiceImport with the ports of
// both clusters' Services merged (each first gets a port the other lacks,
// so the union is neither cluster's ports), the local ClusterIPs and both
// clusters in its status; when c1 withdraws its ServiceExport, the
// imports list c2 and its ports only; when c2 does too, they are gone. A ServiceImport
// the server did not make is never touched.
func checkServiceImports(t *testing.T, e *env, name string) {
	t.Helper()
	ctx := e.ctx
	ks := []*kube.Cluster{e.k1, e.k2}
	dyns := make([]dynamic.Interface, len(ks))
	for i, k := range ks {
		var err error
		if dyns[i], err = dynamic.NewForConfig(k.Config); err != nil {
			t.Fatal(err)
		}
	}

	// Someone else's ServiceImport, which the server must leave alone.
	foreign := &unstructured.Unstructured{Object: map[string]any{"apiVersion": mcs.GroupVersion.String(), "kind": "ServiceImport",
		"metadata": map[string]any{"name": name + "-foreign", "namespace": "default"},
		"spec":     map[string]any{"type": "ClusterSetIP", "ports": []any{map[string]any{"port": int64(9), "protocol": "TCP"}}}}}
	if _, err := dyns[0].Resource(mcs.ServiceImports).Namespace("default").Create(ctx, foreign, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Each cluster's Service gets a port the other lacks, so no one
	// cluster's ports are the union.
	extra := []corev1.ServicePort{
		{Name: "admin", Port: 9090, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(connectivity.EchoPort)},
		{Name: "alt", Port: 8080, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(connectivity.EchoPort)},
	}
	svcs := make([]*corev1.Service, len(ks))
	ports := make([][]siPort, len(ks)) // each Service's ports
	for i, k := range ks {
		svc, err := k.Client.CoreV1().Services("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		svc.Spec.Ports = append(svc.Spec.Ports, extra[i])
		if svcs[i], err = k.Client.CoreV1().Services("default").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, p := range svcs[i].Spec.Ports {
			ports[i] = append(ports[i], siPort{Name: p.Name, Protocol: string(p.Protocol), Port: p.Port})
		}
		ports[i] = sortPorts(ports[i])
	}
	union := sortPorts(append(slices.Clone(ports[0]), ports[1]...))
	if len(union) != 3 || slices.Equal(union, ports[0]) || slices.Equal(union, ports[1]) {
		t.Fatalf("the Services' ports %v and %v should merge into 3 distinct from either, got %v", ports[0], ports[1], union)
	}

	// expect waits until every cluster's import is as wanted (clusters
	// nil: gone).
	expect := func(what string, clusters []string, union []siPort) {
		t.Helper()
		t0 := time.Now()
		for i, k := range ks {
			err := eventually(30*time.Second, func() error {
				si, err := getImport(e, dyns[i], name)
				switch {
				case err != nil:
					return err
				case clusters == nil && si != nil:
					return fmt.Errorf("still there: %+v", *si)
				case clusters == nil:
					return nil
				case si == nil:
					return fmt.Errorf("no ServiceImport %s", name)
				case si.Labels["app.kubernetes.io/managed-by"] != "isthmus-clustermesh":
					return fmt.Errorf("labels %v", si.Labels)
				case si.Spec.Type != "ClusterSetIP":
					return fmt.Errorf("spec.type %q", si.Spec.Type)
				case !slices.Equal(sortPorts(si.Spec.Ports), union):
					return fmt.Errorf("spec.ports %v, want %v", si.Spec.Ports, union)
				case !slices.Equal(si.Spec.IPs, svcs[i].Spec.ClusterIPs):
					return fmt.Errorf("spec.ips %v, want the local ClusterIPs %v", si.Spec.IPs, svcs[i].Spec.ClusterIPs)
				case !slices.Equal(si.clusters(), clusters):
					return fmt.Errorf("status.clusters %v, want %v", si.clusters(), clusters)
				}
				return nil
			})
			if err != nil {
				t.Fatalf("%s: ServiceImport %s in %s: %v", what, name, k.Name, err)
			}
		}
		step(t, "info: ServiceImports %s: %s in %v", name, what, time.Since(t0).Round(time.Millisecond))
	}
	expect("exported by both clusters", []string{"c1", "c2"}, union)

	unexport := func(i int) {
		t.Helper()
		if err := dyns[i].Resource(mcs.ServiceExports).Namespace("default").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	unexport(0)
	expect("exported by c2 only", []string{"c2"}, ports[1])
	unexport(1)
	expect("exported by no cluster", nil, nil)

	if _, err := dyns[0].Resource(mcs.ServiceImports).Namespace("default").Get(ctx, name+"-foreign", metav1.GetOptions{}); err != nil {
		t.Errorf("a ServiceImport the server did not make: %v", err)
	}
}
