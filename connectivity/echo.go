package connectivity

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"time"

	"github.com/vishvananda/netns"
)

// The echo server of the lab's pods and of the connectivity test's own
// endpoints: every HTTP request gets "pod=<pod> node=<node> cluster=<cluster>",
// so a client learns which backend of a service answered.

// EchoPort is where the echo servers listen in every echo pod.
const EchoPort = 8080

// Roles of the pods a connectivity test uses.
const (
	RoleEcho = "echo" // runs the echo server; the policy admits it
	// RoleDenied runs the echo server too (no policy selects its
	// ingress, so other pods prove its network by reaching it); the policy
	// admits it to no echo pod.
	RoleDenied = "denied"
)

// EchoHandler answers every request with the pod, node and cluster name,
// and the address the request came from as the pod sees it (peer=): a
// client learns whether its own address arrived (externalTrafficPolicy
// Local) or a node's (SNAT).
func EchoHandler(pod, node, cluster string) http.Handler {
	reply := fmt.Sprintf("pod=%s node=%s cluster=%s", pod, node, cluster)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		peer := ""
		if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
			peer = " peer=" + ap.Addr().Unmap().String()
		}
		io.WriteString(w, reply+peer+"\n")
	})
}

// ServeEcho serves EchoHandler on ln until ctx is done (`isthmus lab
// echo-server` in the lab's pods; the test's own pods with --agent).
func ServeEcho(ctx context.Context, ln net.Listener, pod, node, cluster string) error {
	srv := &http.Server{Handler: EchoHandler(pod, node, cluster), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Reply is a parsed echo answer: who answered.
type Reply struct {
	Pod, Node, Cluster string
	// Peer is the client address the pod saw (invalid when the reply has
	// none: an older echo server).
	Peer netip.Addr
}

func (r Reply) String() string {
	return fmt.Sprintf("pod=%s node=%s cluster=%s", r.Pod, r.Node, r.Cluster)
}

// ParseReply parses an echo server's answer.
func ParseReply(s string) (Reply, error) {
	var r Reply
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "pod":
			r.Pod = v
		case "node":
			r.Node = v
		case "cluster":
			r.Cluster = v
		case "peer":
			r.Peer, _ = netip.ParseAddr(v)
		}
	}
	if r.Pod == "" || r.Cluster == "" {
		return r, fmt.Errorf("not an echo reply: %q", s)
	}
	return r, nil
}

// FetchEcho sends one HTTP request from inside the network namespace at
// nsPath ("" for the current one) to addr and parses the echo reply.
// timeout bounds connect and answer each. An error of the connection
// attempt (entering the namespace, connecting) is a *ConnectError;
// Outcome tells the two phases apart.
func FetchEcho(ctx context.Context, nsPath string, addr netip.AddrPort, timeout time.Duration) (Reply, error) {
	conn, err := dialIn(ctx, nsPath, addr, timeout)
	if err != nil {
		return Reply{}, &ConnectError{Err: err}
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return Reply{}, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return Reply{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return Reply{}, err
	}
	if resp.StatusCode != http.StatusOK {
		return Reply{}, fmt.Errorf("HTTP %s", resp.Status)
	}
	return ParseReply(string(body))
}

// ConnectError is an error of FetchEcho before a connection was
// established: entering the namespace or connecting.
type ConnectError struct{ Err error }

func (e *ConnectError) Error() string { return e.Err.Error() }
func (e *ConnectError) Unwrap() error { return e.Err }

// dialIn opens a TCP connection from inside the network namespace at
// nsPath ("" for the current one). Only the socket is created there; using it afterwards works from
// any thread.
func dialIn(ctx context.Context, nsPath string, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var conn net.Conn
	err := inNetns(nsPath, func() error {
		// An IP literal: the dialer connects on this (locked) thread
		// without helper goroutines, so the socket is the namespace's.
		d := net.Dialer{Timeout: timeout}
		var err error
		conn, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	return conn, err
}

// DialIn opens a TCP connection from inside the network namespace at
// nsPath ("" for the current one), e.g. a pod's, for a stream the caller
// keeps using.
func DialIn(ctx context.Context, nsPath string, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	return dialIn(ctx, nsPath, addr, timeout)
}

// ListenIn opens a TCP listener inside the network namespace at nsPath
// ("" for the current one).
func ListenIn(nsPath, addr string) (net.Listener, error) {
	var ln net.Listener
	err := inNetns(nsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	return ln, err
}

// inNetns runs fn on an OS thread switched into the network namespace at
// path, and switches it back afterwards; with path "" it just runs fn.
func inNetns(path string, fn func() error) (err error) {
	if path == "" {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(path)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	defer func() {
		if rerr := netns.Set(orig); rerr != nil {
			// Leave the thread locked: the runtime ends it when this
			// goroutine exits instead of reusing it in the wrong netns.
			err = errors.Join(err, fmt.Errorf("restore netns: %w", rerr))
			return
		}
		runtime.UnlockOSThread()
	}()
	return fn()
}
