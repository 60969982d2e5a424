// Package meshconnect connects two clusters that run Isthmus from its Helm
// chart, both ways, through their Kubernetes APIs only (`isthmus
// clustermesh connect --kubeconfig`): nothing needs to reach either
// cluster's etcd from where it runs.
//
// For each direction (cluster A mirrored by cluster B):
//
//  1. in A's clustermesh server pod it runs `isthmus clustermesh certs
//     --for-remote B --out -` (pods/exec), which creates A's read-only etcd
//     user remote-B and prints a bundle for it;
//  2. it keeps that bundle as the Secret isthmus-peer-A (key bundle.json,
//     the shape of the chart's mesh.peers) in B's release namespace, so a
//     `helm upgrade` with mesh.peers connects it again later;
//  3. in B's server pod it runs `isthmus clustermesh connect --bundle -`
//     with the bundle on stdin and --wait, which checks the remote (name,
//     ID, pod CIDRs) before it writes anything and returns once B mirrors A.
//
// The server pods run the same isthmus binary as the CLI, next to their
// data dir and root credential, so the credentials never leave the two
// clusters except inside the Secret.
package meshconnect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/streaming/pkg/httpstream"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// ServerSelector selects the chart's clustermesh server pods.
const ServerSelector = "app.kubernetes.io/name=isthmus,app.kubernetes.io/component=clustermesh"

// cliPath is the isthmus CLI in the clustermesh image (internal/ociimage).
const cliPath = "/usr/local/bin/isthmus"

// BundleKey is the key of the bundle in a peer Secret (the chart's
// mesh.peers[].secretName).
const BundleKey = "bundle.json"

// PeerSecretName is the Secret that holds the bundle of cluster for the
// cluster whose namespace it is in.
func PeerSecretName(cluster string) string { return "isthmus-peer-" + cluster }

// Side is one cluster: its API and the namespace of its Isthmus release.
type Side struct {
	Config    *rest.Config
	Namespace string
}

// Options of Connect.
type Options struct {
	// Timeout bounds each server's attempt to reach the other (connect
	// --timeout); default 10s.
	Timeout time.Duration
	// Wait bounds the wait until a mirror is synced (connect --wait);
	// default 1m.
	Wait time.Duration
	// Logf receives one line per step; nil discards them.
	Logf func(format string, args ...any)
}

// Server is a cluster's clustermesh server pod.
type Server struct {
	Namespace, Pod, Container string
	Cluster                   string // its --cluster-name
	DataDir                   string // its --data-dir
}

// Connect connects a and b both ways and returns what the two connects
// printed.
func Connect(ctx context.Context, a, b Side, o Options) ([]string, error) {
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	if o.Wait == 0 {
		o.Wait = time.Minute
	}
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	ca, err := newConn(a)
	if err != nil {
		return nil, err
	}
	cb, err := newConn(b)
	if err != nil {
		return nil, err
	}
	if ca.server, err = FindServer(ctx, ca.cs, a.Namespace); err != nil {
		return nil, err
	}
	if cb.server, err = FindServer(ctx, cb.cs, b.Namespace); err != nil {
		return nil, err
	}
	if ca.server.Cluster == cb.server.Cluster {
		return nil, fmt.Errorf("both kubeconfigs lead to a cluster named %q: give the kubeconfigs of two different clusters (names are unique in a mesh)", ca.server.Cluster)
	}
	var out []string
	for _, dir := range [][2]*conn{{ca, cb}, {cb, ca}} {
		lines, err := connectOne(ctx, dir[0], dir[1], o, logf)
		out = append(out, lines...)
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

type conn struct {
	side   Side
	cs     kubernetes.Interface
	server Server
}

func newConn(s Side) (*conn, error) {
	if s.Config == nil {
		return nil, errors.New("meshconnect: no Kubernetes config")
	}
	if s.Namespace == "" {
		return nil, errors.New("meshconnect: no namespace")
	}
	cs, err := kubernetes.NewForConfig(s.Config)
	if err != nil {
		return nil, err
	}
	return &conn{side: s, cs: cs}, nil
}

// connectOne makes to's server mirror from's cluster.
func connectOne(ctx context.Context, from, to *conn, o Options, logf func(string, ...any)) ([]string, error) {
	fs, ts := from.server, to.server
	logf("exporting a bundle of cluster %s for cluster %s (server pod %s/%s)", fs.Cluster, ts.Cluster, fs.Namespace, fs.Pod)
	raw, err := Exec(ctx, from.side.Config, from.cs, fs, nil,
		cliPath, "clustermesh", "certs", "--data-dir", fs.DataDir, "--for-remote", ts.Cluster, "--out", "-")
	if err != nil {
		return nil, err
	}
	bundle, err := etcdserver.ParseBundle("from the server of "+fs.Cluster, raw)
	if err != nil {
		return nil, err
	}
	if bundle.Cluster != fs.Cluster {
		return nil, fmt.Errorf("the server of %s exported a bundle of cluster %q", fs.Cluster, bundle.Cluster)
	}
	name := PeerSecretName(fs.Cluster)
	logf("keeping it as Secret %s/%s in cluster %s", ts.Namespace, name, ts.Cluster)
	if err := upsertSecret(ctx, to.cs, ts.Namespace, name, fs.Cluster, raw); err != nil {
		return nil, fmt.Errorf("cluster %s: Secret %s/%s: %w", ts.Cluster, ts.Namespace, name, err)
	}
	logf("connecting: the server of %s mirrors %s", ts.Cluster, fs.Cluster)
	out, err := Exec(ctx, to.side.Config, to.cs, ts, raw,
		cliPath, "clustermesh", "connect", "--bundle", "-", "--name", fs.Cluster,
		"--timeout", o.Timeout.String(), "--wait", o.Wait.String())
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l != "" {
			lines = append(lines, ts.Cluster+": "+l)
		}
	}
	return lines, err
}

// upsertSecret creates or replaces the peer Secret.
func upsertSecret(ctx context.Context, cs kubernetes.Interface, ns, name, cluster string, bundle []byte) error {
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{
			"app.kubernetes.io/part-of": "isthmus",
			"isthmus.io/remote-cluster": cluster,
		}},
		Type: corev1.SecretTypeOpaque,
		Data: map[string][]byte{BundleKey: bundle},
	}
	_, err := cs.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		_, err = cs.CoreV1().Secrets(ns).Update(ctx, s, metav1.UpdateOptions{})
	}
	return err
}

// FindServer finds the ready clustermesh server pod of the release in ns,
// its cluster name (from the ConfigMap its container reads) and data dir.
func FindServer(ctx context.Context, cs kubernetes.Interface, ns string) (Server, error) {
	pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: ServerSelector})
	if err != nil {
		return Server{}, fmt.Errorf("listing the clustermesh server pods in %s: %w", ns, err)
	}
	var ready []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && podReady(p) {
			ready = append(ready, p)
		}
	}
	if len(ready) == 0 {
		return Server{}, fmt.Errorf("no ready Isthmus clustermesh server in namespace %s (%d pods match %s): is the chart installed there and its server up? (kubectl -n %s get pods -l %s)",
			ns, len(pods.Items), ServerSelector, ns, ServerSelector)
	}
	sort.Slice(ready, func(i, j int) bool { return ready[i].Name < ready[j].Name })
	p := ready[0]
	var cm *corev1.ConfigMap
	if name := configMapOf(p); name != "" {
		if cm, err = cs.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
			return Server{}, fmt.Errorf("the ConfigMap of server pod %s/%s: %w", ns, p.Name, err)
		}
	}
	return ServerFromPod(p, cm)
}

// ServerFromPod reads the server container's cluster name and data dir from
// its args, resolving $(VAR) references through cm.
func ServerFromPod(p corev1.Pod, cm *corev1.ConfigMap) (Server, error) {
	s := Server{Namespace: p.Namespace, Pod: p.Name}
	var c *corev1.Container
	for i := range p.Spec.Containers {
		if p.Spec.Containers[i].Name == "clustermesh" || len(p.Spec.Containers) == 1 {
			c = &p.Spec.Containers[i]
			break
		}
	}
	if c == nil {
		return Server{}, fmt.Errorf("server pod %s/%s has no container named clustermesh", p.Namespace, p.Name)
	}
	s.Container = c.Name
	vars := map[string]string{}
	if cm != nil {
		for k, v := range cm.Data {
			vars[k] = v
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			vars[e.Name] = e.Value
		}
	}
	for _, a := range c.Args {
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			continue
		}
		v = expand(v, vars)
		switch k {
		case "--cluster-name":
			s.Cluster = v
		case "--data-dir":
			s.DataDir = v
		}
	}
	if err := records.ValidateClusterName(s.Cluster); err != nil {
		return Server{}, fmt.Errorf("server pod %s/%s: --cluster-name: %w", p.Namespace, p.Name, err)
	}
	if s.DataDir == "" {
		return Server{}, fmt.Errorf("server pod %s/%s runs without --data-dir=", p.Namespace, p.Name)
	}
	return s, nil
}

// expand resolves $(NAME) as the kubelet does for args.
func expand(v string, vars map[string]string) string {
	for {
		i := strings.Index(v, "$(")
		if i < 0 {
			return v
		}
		j := strings.IndexByte(v[i:], ')')
		if j < 0 {
			return v
		}
		name := v[i+2 : i+j]
		val, ok := vars[name]
		if !ok {
			return v
		}
		v = v[:i] + val + v[i+j+1:]
	}
}

func configMapOf(p corev1.Pod) string {
	for _, c := range p.Spec.Containers {
		for _, ef := range c.EnvFrom {
			if ef.ConfigMapRef != nil {
				return ef.ConfigMapRef.Name
			}
		}
	}
	return ""
}

func podReady(p corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Exec runs argv in the server's container (pods/exec, WebSocket with a
// SPDY fallback) with stdin when not nil, and returns its stdout; a
// failure carries its stderr.
func Exec(ctx context.Context, cfg *rest.Config, cs kubernetes.Interface, s Server, stdin []byte, argv ...string) ([]byte, error) {
	req := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(s.Namespace).Name(s.Pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: s.Container, Command: argv, Stdin: stdin != nil, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	spdy, err := remotecommand.NewSPDYExecutor(cfg, "POST", req.URL())
	if err != nil {
		return nil, err
	}
	ws, err := remotecommand.NewWebSocketExecutor(cfg, "GET", req.URL().String())
	if err != nil {
		return nil, err
	}
	ex, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return nil, err
	}
	var stdout, stderr bytes.Buffer
	so := remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr}
	if stdin != nil {
		so.Stdin = io.NopCloser(bytes.NewReader(stdin))
	}
	if err := ex.StreamWithContext(ctx, so); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(stdout.String())
		}
		return stdout.Bytes(), fmt.Errorf("%s in server pod %s/%s: %v: %s", strings.Join(argv[1:3], " "), s.Namespace, s.Pod, err, msg)
	}
	return stdout.Bytes(), nil
}
