// Package pkisecrets keeps a cluster's clustermesh PKI in Kubernetes
// Secrets, for the Helm chart: the CA, which the server is seeded from
// (isthmus-clustermesh --ca-dir), and the agents' shared etcd credential
// issued from it, which every agent mounts (--kvstore-bundle). The chart's
// pre-install/pre-upgrade hook job runs it (`isthmus clustermesh certs
// --kubernetes-secrets`).
//
// It is idempotent: an existing CA is kept (a new one would lock out every
// agent and remote cluster), and the agents' credential is kept while it is
// valid for that CA and not close to expiry, else re-issued.
package pkisecrets

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
)

// Keys of the Secrets. The agents Secret is a bundle directory as
// isthmus-agent --kvstore-bundle reads it.
const (
	KeyCACert     = etcdserver.CACertFile // both Secrets
	KeyCAKey      = etcdserver.CAKeyFile  // the CA Secret only
	KeyClientCert = "client.crt"
	KeyClientKey  = "client.key"
)

// Options name the Secrets.
type Options struct {
	Namespace    string
	Cluster      string
	CASecret     string
	AgentsSecret string
	// RootSecret, when set, gets the cluster's root credential (etcd user
	// root: everything, e.g. isthmus clustermesh connect) the same way.
	RootSecret string
	// Labels are put on Secrets this package creates.
	Labels map[string]string
}

// Result says what Ensure did.
type Result struct {
	CACreated     bool
	AgentsIssued  bool // a new agents certificate was written
	AgentsCurrent bool // the existing one was kept
	RootIssued    bool // a new root certificate was written (RootSecret)
}

// Ensure creates the CA Secret if it is missing and makes sure the agents
// Secret holds a usable credential issued by that CA.
func Ensure(ctx context.Context, cs kubernetes.Interface, o Options) (Result, error) {
	var res Result
	secrets := cs.CoreV1().Secrets(o.Namespace)
	var ca etcdserver.CA
	s, err := secrets.Get(ctx, o.CASecret, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if ca, err = etcdserver.NewCA(o.Cluster); err != nil {
			return res, err
		}
		_, err = secrets.Create(ctx, o.secret(o.CASecret, map[string][]byte{KeyCACert: ca.Cert, KeyCAKey: ca.Key}), metav1.CreateOptions{})
		if err != nil {
			return res, fmt.Errorf("create Secret %s/%s: %w", o.Namespace, o.CASecret, err)
		}
		res.CACreated = true
	case err != nil:
		return res, fmt.Errorf("get Secret %s/%s: %w", o.Namespace, o.CASecret, err)
	default:
		ca = etcdserver.CA{Cert: s.Data[KeyCACert], Key: s.Data[KeyCAKey]}
		if _, _, err := ca.IssueClient(o.Cluster, etcdserver.UserAgents); err != nil {
			return res, fmt.Errorf("the CA Secret %s/%s (keys %s, %s): %w", o.Namespace, o.CASecret, KeyCACert, KeyCAKey, err)
		}
	}

	issued, err := o.ensureClient(ctx, secrets, ca, o.AgentsSecret, etcdserver.UserAgents)
	if err != nil {
		return res, err
	}
	res.AgentsIssued, res.AgentsCurrent = issued, !issued
	if o.RootSecret != "" {
		if res.RootIssued, err = o.ensureClient(ctx, secrets, ca, o.RootSecret, etcdserver.UserRoot); err != nil {
			return res, err
		}
	}
	return res, nil
}

// ensureClient makes sure Secret name holds a usable credential of user
// issued by ca, and reports whether it wrote a new one.
func (o Options) ensureClient(ctx context.Context, secrets typedcorev1.SecretInterface, ca etcdserver.CA, name, user string) (bool, error) {
	cur, err := secrets.Get(ctx, name, metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return false, fmt.Errorf("get Secret %s/%s: %w", o.Namespace, name, err)
	}
	exists := err == nil
	if exists && string(cur.Data[KeyCACert]) == string(ca.Cert) &&
		ca.ClientUsable(o.Cluster, user, cur.Data[KeyClientCert], cur.Data[KeyClientKey]) {
		return false, nil
	}
	cert, key, err := ca.IssueClient(o.Cluster, user)
	if err != nil {
		return false, err
	}
	data := map[string][]byte{KeyCACert: ca.Cert, KeyClientCert: cert, KeyClientKey: key}
	if exists {
		cur = cur.DeepCopy()
		cur.Data = data
		_, err = secrets.Update(ctx, cur, metav1.UpdateOptions{})
	} else {
		_, err = secrets.Create(ctx, o.secret(name, data), metav1.CreateOptions{})
	}
	if err != nil {
		return false, fmt.Errorf("write Secret %s/%s: %w", o.Namespace, name, err)
	}
	return true, nil
}

func (o Options) secret(name string, data map[string][]byte) *corev1.Secret {
	return &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: o.Namespace, Labels: o.Labels},
		Type:       corev1.SecretTypeOpaque,
		Data:       data,
	}
}
