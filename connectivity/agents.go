package connectivity

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// AgentsOptions describe the test's own objects on any agents of this host.
type AgentsOptions struct {
	Sockets   []string     // API sockets of the agents
	Namespace string       // of the test's pods, service and policy (default "isthmus-connectivity")
	VIPs      []netip.Addr // of the test's global service, at most one per family
}

// requestTimeout bounds one call to an agent.
const requestTimeout = time.Minute

const ctObjects = `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: echo-from-echo, namespace: %[1]s}
spec:
  endpointSelector: {matchLabels: {app: isthmus-connectivity, role: echo}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: isthmus-connectivity, role: echo}}]
      toPorts: [{port: %[2]d, protocol: TCP}]
---
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: echo
  namespace: %[1]s
  annotations: {isthmus.io/global: "true", isthmus.io/affinity: none}
spec:
  vips: [%[3]s]
  ports: [{port: 80, targetPort: %[2]d, protocol: TCP}]
  selector: {app: isthmus-connectivity, role: echo}
`

// NewAgentsTarget creates the test's own pods, service and policy on the
// agents behind o.Sockets, which must run on this host: per node two echo
// pods (network namespaces isthmus-ct-*, plumbed with the agent API, their
// echo servers inside this process), on the first node of each cluster a
// denied pod (with an echo server too), and a global Service "echo" and a NetworkPolicy in
// o.Namespace. Every step registers its undo first: call Target.Cleanup
// also when it returns an error with a non-nil target.
func NewAgentsTarget(ctx context.Context, o AgentsOptions, logf func(string, ...any)) (*Target, error) {
	if o.Namespace == "" {
		o.Namespace = "isthmus-connectivity"
	}
	t := &Target{Name: fmt.Sprintf("%d agents", len(o.Sockets)), Port: 80, VIPs: o.VIPs}
	var quoted []string
	for _, a := range o.VIPs {
		quoted = append(quoted, `"`+a.String()+`"`)
	}
	for _, sock := range o.Sockets {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		s, err := api.NewClient(sock).Status(cctx)
		cancel()
		if err != nil {
			return nil, err
		}
		n := Node{Name: s.Node, Cluster: s.Cluster, Socket: sock, Status: s}
		if s.ClusterMesh != nil {
			n.IPs = s.ClusterMesh.NodeIPs
		}
		// The agent runs in the node's namespace: the socket's peer is it.
		if pid, err := socketPeerPid(sock); err == nil {
			n.Netns = fmt.Sprintf("/proc/%d/ns/net", pid)
		}
		t.Nodes = append(t.Nodes, n)
	}

	// Objects first, so the pods are enforced from their first packet: once
	// per cluster in cluster mode (apply is cluster-wide), on every
	// standalone agent.
	yaml := fmt.Appendf(nil, ctObjects, o.Namespace, EchoPort, strings.Join(quoted, ", "))
	applied := map[string]bool{}
	for _, n := range t.Nodes {
		key := "standalone " + n.Socket
		if n.Status.ClusterMesh != nil {
			key = "cluster " + n.Cluster
		}
		if applied[key] {
			continue
		}
		applied[key] = true
		client := api.NewClient(n.Socket)
		t.cleanup = append(t.cleanup, func(ctx context.Context) error {
			return errors.Join(
				ignoreNotFound(client.DeleteObject(ctx, "Service", o.Namespace, "echo")),
				ignoreNotFound(client.DeleteObject(ctx, "NetworkPolicy", o.Namespace, "echo-from-echo")))
		})
		cctx, cancel := context.WithTimeout(ctx, requestTimeout)
		_, err := client.Apply(cctx, yaml)
		cancel()
		if err != nil {
			return t, fmt.Errorf("apply the test's service and policy on %s: %w", n.Name, err)
		}
	}

	run := randomSuffix(4)
	serveCtx, stopServers := context.WithCancel(context.WithoutCancel(ctx))
	t.cleanup = append(t.cleanup, func(context.Context) error { stopServers(); return nil })
	denied := map[string]bool{}
	for i, n := range t.Nodes {
		specs := []string{RoleEcho, RoleEcho}
		if !denied[n.Cluster] {
			denied[n.Cluster] = true
			specs = append(specs, RoleDenied)
		}
		for k, role := range specs {
			name := fmt.Sprintf("ct-%s-n%d-%s%d", run, i+1, role, k+1)
			if role == RoleDenied {
				name = fmt.Sprintf("ct-%s-n%d-%s", run, i+1, role)
			}
			nsName := "isthmus-" + name
			nsPath := filepath.Join("/var/run/netns", nsName)
			if out, err := exec.CommandContext(ctx, "ip", "netns", "add", nsName).CombinedOutput(); err != nil {
				return t, fmt.Errorf("ip netns add %s: %v: %s", nsName, err, strings.TrimSpace(string(out)))
			}
			t.cleanup = append(t.cleanup, func(ctx context.Context) error {
				if out, err := exec.CommandContext(ctx, "ip", "netns", "del", nsName).CombinedOutput(); err != nil {
					return fmt.Errorf("ip netns del %s: %v: %s", nsName, err, strings.TrimSpace(string(out)))
				}
				return nil
			})
			// Every pod serves, the denied ones too (see RoleDenied).
			// Listening before the pod has an address: the wildcard socket
			// picks eth0 up when the agent creates it.
			ln, err := ListenIn(nsPath, fmt.Sprintf(":%d", EchoPort))
			if err != nil {
				return t, err
			}
			go ServeEcho(serveCtx, ln, name, n.Name, n.Cluster)
			client := api.NewClient(n.Socket)
			t.cleanup = append(t.cleanup, func(ctx context.Context) error {
				return ignoreNotFound(client.DeleteEndpoint(ctx, o.Namespace, name))
			})
			cctx, cancel := context.WithTimeout(ctx, requestTimeout)
			ep, err := client.AddEndpoint(cctx, api.EndpointRequest{Name: name, Namespace: o.Namespace, Netns: nsPath,
				Labels: map[string]string{"app": "isthmus-connectivity", "role": role}})
			cancel()
			if err != nil {
				return t, fmt.Errorf("endpoint add %s on %s: %w", name, n.Name, err)
			}
			t.Pods = append(t.Pods, Pod{Name: name, Cluster: n.Cluster, Node: n.Name, Netns: nsPath, IPs: ep.IPs, Role: role})
		}
	}
	var vips []string
	for _, a := range o.VIPs {
		vips = append(vips, a.String())
	}
	logf("created %d test pods in namespace %s, Service %s/echo (%s) and NetworkPolicy %s/echo-from-echo", len(t.Pods), o.Namespace, o.Namespace, strings.Join(vips, ", "), o.Namespace)
	return t, nil
}

func ignoreNotFound(err error) error {
	if api.IsNotFound(err) {
		return nil
	}
	return err
}

func randomSuffix(n int) string {
	const alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
	b := make([]byte, n)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// socketPeerPid returns the pid of the process serving a unix socket.
func socketPeerPid(path string) (int, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd)
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		return 0, err
	}
	cred, err := syscall.GetsockoptUcred(fd, syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	if err != nil {
		return 0, err
	}
	return int(cred.Pid), nil
}
