package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/meshctl"
	"github.com/isthmus-mesh/isthmus/k8s/kubeclient"
	"github.com/isthmus-mesh/isthmus/k8s/meshconnect"
)

// kubeConnect is `isthmus clustermesh connect --kubeconfig`: two clusters
// installed with the Helm chart, connected both ways through their
// Kubernetes APIs (package meshconnect).
type kubeConnect struct {
	kubeconfig, remoteKubeconfig string
	namespace, remoteNamespace   string
	meshconnect.Options
}

func (k kubeConnect) run(ctx context.Context, out io.Writer, name string) error {
	if k.kubeconfig == "" || k.remoteKubeconfig == "" {
		return errors.New("connecting Kubernetes clusters needs both --kubeconfig (this cluster) and --remote-kubeconfig (the other one)")
	}
	if name != "" {
		return errors.New("--name comes from the remote cluster's server with --remote-kubeconfig: drop it")
	}
	if k.remoteNamespace == "" {
		k.remoteNamespace = k.namespace
	}
	a, err := kubeclient.RESTConfig(k.kubeconfig)
	if err != nil {
		return fmt.Errorf("--kubeconfig: %w", err)
	}
	b, err := kubeclient.RESTConfig(k.remoteKubeconfig)
	if err != nil {
		return fmt.Errorf("--remote-kubeconfig: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 2*(k.Timeout+k.Wait)+time.Minute)
	defer cancel()
	k.Logf = func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }
	lines, err := meshconnect.Connect(ctx, meshconnect.Side{Config: a, Namespace: k.namespace},
		meshconnect.Side{Config: b, Namespace: k.remoteNamespace}, k.Options)
	for _, l := range lines {
		fmt.Fprintln(out, l)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "connected both ways: isthmus connectivity test, or kubectl exec into a pod of either cluster")
	return nil
}

// readBundleArg reads --bundle: a file, a directory with bundle.json, or -
// for the JSON on stdin (what `connect --kubeconfig` passes through
// pods/exec).
func readBundleArg(arg string, in io.Reader) (etcdserver.Bundle, error) {
	if arg != "-" {
		return meshctl.ReadBundle(arg)
	}
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, io.LimitReader(in, 1<<20)); err != nil {
		return etcdserver.Bundle{}, fmt.Errorf("reading stdin: %w", err)
	}
	return etcdserver.ParseBundle("on stdin", buf.Bytes())
}
