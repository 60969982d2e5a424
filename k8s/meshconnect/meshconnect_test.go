package meshconnect

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The server pod as the chart renders it: the cluster name from the
// ConfigMap through $(CLUSTER_NAME), the data dir literal.
func chartPod(args ...string) corev1.Pod {
	return corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "isthmus-clustermesh-abc", Namespace: "kube-system"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "clustermesh",
			Args: args,
			EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: "isthmus-config"}}}},
		}}},
	}
}

func TestServerFromPod(t *testing.T) {
	cm := &corev1.ConfigMap{Data: map[string]string{"CLUSTER_NAME": "c1", "CLUSTER_ID": "1"}}
	p := chartPod("--kubernetes", "--cluster-name=$(CLUSTER_NAME)", "--cluster-id=$(CLUSTER_ID)", "--data-dir=/var/lib/isthmus-clustermesh/c1")
	if name := configMapOf(p); name != "isthmus-config" {
		t.Fatalf("configMapOf: %q", name)
	}
	s, err := ServerFromPod(p, cm)
	if err != nil {
		t.Fatal(err)
	}
	if s.Cluster != "c1" || s.DataDir != "/var/lib/isthmus-clustermesh/c1" || s.Container != "clustermesh" || s.Pod != "isthmus-clustermesh-abc" || s.Namespace != "kube-system" {
		t.Errorf("server %+v", s)
	}

	for _, tc := range []struct {
		name string
		pod  corev1.Pod
		cm   *corev1.ConfigMap
		want string
	}{
		{"unresolved cluster name", p, nil, "--cluster-name"},
		{"a bad cluster name", chartPod("--cluster-name=Not_A_Label", "--data-dir=/d"), nil, "--cluster-name"},
		{"external etcd, no data dir", chartPod("--cluster-name=c1", "--etcd-endpoints=https://192.0.2.1:2379"), nil, "without --data-dir"},
		{"no server container", corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "a"}, {Name: "b"}}}}, nil, "no container named clustermesh"},
	} {
		if _, err := ServerFromPod(tc.pod, tc.cm); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %q", tc.name, err, tc.want)
		}
	}
}

func TestExpand(t *testing.T) {
	vars := map[string]string{"A": "x", "B": "y"}
	for in, want := range map[string]string{
		"$(A)":        "x",
		"p-$(A)-$(B)": "p-x-y",
		"$(C)":        "$(C)", // unknown: left as the kubelet leaves it
		"$(A":         "$(A",
		"plain":       "plain",
	} {
		if got := expand(in, vars); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}
