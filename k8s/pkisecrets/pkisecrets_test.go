package pkisecrets

import (
	"context"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
)

func TestEnsure(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset()
	o := Options{Namespace: "kube-system", Cluster: "c1", CASecret: "isthmus-clustermesh-ca", AgentsSecret: "isthmus-agents", RootSecret: "isthmus-root",
		Labels: map[string]string{"app.kubernetes.io/name": "isthmus"}}
	get := func(name string) map[string][]byte {
		s, err := cs.CoreV1().Secrets("kube-system").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s.Data
	}

	res, err := Ensure(ctx, cs, o)
	if err != nil || !res.CACreated || !res.AgentsIssued || !res.RootIssued {
		t.Fatalf("first run: %+v %v", res, err)
	}
	ca, agents := get(o.CASecret), get(o.AgentsSecret)
	c := etcdserver.CA{Cert: ca[KeyCACert], Key: ca[KeyCAKey]}
	if !c.ClientUsable("c1", etcdserver.UserAgents, agents[KeyClientCert], agents[KeyClientKey]) {
		t.Fatal("the agents Secret holds no usable agents credential of the CA")
	}
	root := get(o.RootSecret)
	if !c.ClientUsable("c1", etcdserver.UserRoot, root[KeyClientCert], root[KeyClientKey]) {
		t.Fatal("the root Secret holds no usable root credential of the CA")
	}
	if _, ok := agents[KeyCAKey]; ok {
		t.Fatal("the agents Secret holds the CA key")
	}

	// Again (an upgrade): nothing changes.
	res, err = Ensure(ctx, cs, o)
	if err != nil || res.CACreated || res.AgentsIssued || !res.AgentsCurrent || res.RootIssued {
		t.Fatalf("second run: %+v %v", res, err)
	}
	if string(get(o.CASecret)[KeyCAKey]) != string(ca[KeyCAKey]) || string(get(o.AgentsSecret)[KeyClientCert]) != string(agents[KeyClientCert]) {
		t.Fatal("the second run changed the Secrets")
	}

	// A broken agents Secret is re-issued from the same CA.
	s, _ := cs.CoreV1().Secrets("kube-system").Get(ctx, o.AgentsSecret, metav1.GetOptions{})
	s.Data[KeyClientCert] = []byte("garbage")
	if _, err := cs.CoreV1().Secrets("kube-system").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	res, err = Ensure(ctx, cs, o)
	if err != nil || res.CACreated || !res.AgentsIssued {
		t.Fatalf("re-issue: %+v %v", res, err)
	}
	agents = get(o.AgentsSecret)
	if !c.ClientUsable("c1", etcdserver.UserAgents, agents[KeyClientCert], agents[KeyClientKey]) {
		t.Fatal("the re-issued credential is not usable")
	}

	// The CA Secret of another cluster is refused, not replaced.
	o.Cluster = "c2"
	if _, err := Ensure(ctx, cs, o); err == nil {
		t.Fatal("the CA of c1 was used for c2")
	}
}
