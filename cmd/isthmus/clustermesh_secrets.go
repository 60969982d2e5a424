package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/k8s/kubeclient"
	"github.com/isthmus-mesh/isthmus/k8s/pkisecrets"
)

// kubeSecrets is `isthmus clustermesh certs --kubernetes-secrets`.
type kubeSecrets struct {
	namespace, cluster, caSecret, agentsSecret, rootSecret, kubeconfig string
}

func (k kubeSecrets) run(ctx context.Context, out io.Writer) error {
	if k.cluster == "" {
		return errors.New("--kubernetes-secrets needs --cluster-name: the cluster's name, as isthmus-clustermesh --cluster-name")
	}
	if err := records.ValidateClusterName(k.cluster); err != nil {
		return fmt.Errorf("--cluster-name: %w", err)
	}
	if k.caSecret == "" || k.agentsSecret == "" || k.caSecret == k.agentsSecret {
		return errors.New("--ca-secret and --agents-secret need two different names")
	}
	rc, err := kubeclient.RESTConfig(k.kubeconfig)
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	res, err := pkisecrets.Ensure(ctx, cs, pkisecrets.Options{Namespace: k.namespace, Cluster: k.cluster,
		CASecret: k.caSecret, AgentsSecret: k.agentsSecret, RootSecret: k.rootSecret,
		Labels: map[string]string{"app.kubernetes.io/part-of": "isthmus", "isthmus.io/cluster": k.cluster}})
	if err != nil {
		return err
	}
	if res.CACreated {
		fmt.Fprintf(out, "created the CA of cluster %s: Secret %s/%s\n", k.cluster, k.namespace, k.caSecret)
	} else {
		fmt.Fprintf(out, "kept the CA of cluster %s: Secret %s/%s\n", k.cluster, k.namespace, k.caSecret)
	}
	if res.AgentsIssued {
		fmt.Fprintf(out, "issued the agents' credential (etcd user agents): Secret %s/%s\n", k.namespace, k.agentsSecret)
	} else {
		fmt.Fprintf(out, "kept the agents' credential: Secret %s/%s\n", k.namespace, k.agentsSecret)
	}
	if res.RootIssued {
		fmt.Fprintf(out, "issued the root credential (etcd user root): Secret %s/%s\n", k.namespace, k.rootSecret)
	}
	return nil
}
