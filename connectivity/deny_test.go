package connectivity

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// deniedBy sends one request the way the deny check does and judges it.
func deniedBy(t *testing.T, nsPath string, addr netip.AddrPort, timeout time.Duration) (bool, string) {
	t.Helper()
	reply, err := FetchEcho(context.Background(), nsPath, addr, timeout)
	denied, why := Denial(reply, err)
	t.Logf("%s: denied %v: %s", addr, denied, why)
	return denied, why
}

// fullListener listens on loopback with an accept queue of one that
// nobody accepts from: once one connection waits in it, the kernel drops
// every further SYN, as the datapath drops what a policy denies.
func fullListener(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port))
}

// Only a connection attempt that times out is a denial; with real
// sockets, every other way of getting no answer is not.
func TestDenialOnlyForAConnectTimeout(t *testing.T) {
	const short = 300 * time.Millisecond

	// A dropped SYN: the one outcome that is a denial. The first
	// connection fills the accept queue: it is established, and its
	// request gets no answer, which is no denial either.
	full := fullListener(t)
	if denied, why := deniedBy(t, "", full, short); denied || !strings.HasPrefix(why, OutcomeAnswerTimedOut) {
		t.Errorf("connected without an answer: denied %v (%s), want no denial, %q", denied, why, OutcomeAnswerTimedOut)
	}
	if denied, why := deniedBy(t, "", full, short); !denied || why != OutcomeTimedOut {
		t.Errorf("SYN dropped: denied %v (%s), want a denial", denied, why)
	}

	// An answer.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go ServeEcho(ctx, ln, "p1", "n1", "c1")
	echo := netip.MustParseAddrPort(ln.Addr().String())
	if denied, why := deniedBy(t, "", echo, short); denied || why != "answered (pod=p1 node=n1 cluster=c1)" {
		t.Errorf("echo server: denied %v (%s)", denied, why)
	}

	// Refused: nothing listens.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := netip.MustParseAddrPort(closed.Addr().String())
	closed.Close()
	if denied, why := deniedBy(t, "", refused, short); denied || !strings.HasPrefix(why, OutcomeRefused+" (") {
		t.Errorf("closed port: denied %v (%s), want refused", denied, why)
	}

	// Reset: a server that reads the request and answers with a RST.
	rst, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer rst.Close()
	go func() {
		for {
			c, err := rst.Accept()
			if err != nil {
				return
			}
			c.Read(make([]byte, 512))
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}()
	if denied, why := deniedBy(t, "", netip.MustParseAddrPort(rst.Addr().String()), short); denied || !strings.HasPrefix(why, OutcomeReset+" (") {
		t.Errorf("RST after the request: denied %v (%s), want reset", denied, why)
	}

	// An HTTP error, and an answer that is not an echo reply.
	for code, body := range map[int]string{http.StatusInternalServerError: "pod=p1 node=n1 cluster=c1\n", http.StatusOK: "hello\n"} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.WriteHeader(code)
			io.WriteString(w, body)
		}))
		if denied, why := deniedBy(t, "", netip.MustParseAddrPort(srv.Listener.Addr().String()), short); denied || !strings.HasPrefix(why, OutcomeError+" (") {
			t.Errorf("HTTP %d %q: denied %v (%s), want error", code, body, denied, why)
		}
		srv.Close()
	}

	// The pod's namespace cannot be entered.
	if denied, why := deniedBy(t, "/nonexistent/netns", echo, short); denied || !strings.Contains(why, "error (open netns /nonexistent/netns") {
		t.Errorf("no namespace: denied %v (%s), want error", denied, why)
	}
}

// No route: a fresh network namespace has only a loopback device, and it
// is down. Needs root (unshare).
func TestDenialNotForUnreachable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("unshare(CLONE_NEWNET) needs root")
	}
	type result struct {
		denied bool
		why    string
		err    error
	}
	done := make(chan result, 1)
	go func() {
		// The thread stays locked: it ends with this goroutine instead of
		// going back to the runtime in the new namespace.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- result{err: err}
			return
		}
		reply, err := FetchEcho(context.Background(), "", netip.MustParseAddrPort("10.1.2.3:8080"), 300*time.Millisecond)
		denied, why := Denial(reply, err)
		done <- result{denied: denied, why: why}
	}()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Logf("no route: denied %v: %s", r.denied, r.why)
	if r.denied || !strings.HasPrefix(r.why, OutcomeUnreachable+" (") {
		t.Fatalf("no route: denied %v (%s), want unreachable", r.denied, r.why)
	}
}

// A check with nothing to check does not pass: pods without an address
// family in common, a denied pod without targets, a service without
// backends. None of it sends a packet.
func TestNothingToCheckIsNoPass(t *testing.T) {
	nodes := []Node{{Name: "n1", Cluster: "c1"}, {Name: "n2", Cluster: "c1"}}
	v4, v6 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::2")
	tg := &Target{Name: "no families in common", Nodes: nodes, Pods: []Pod{
		{Name: "e1", Cluster: "c1", Node: "n1", IPs: []netip.Addr{v4}, Role: RoleEcho},
		{Name: "e2", Cluster: "c1", Node: "n2", IPs: []netip.Addr{v6}, Role: RoleEcho},
		{Name: "d1", Cluster: "c1", Node: "n1", Role: RoleDenied},
	}}
	rep := Run(context.Background(), tg, Options{Timeout: time.Second, DenyTimeout: 100 * time.Millisecond})
	want := map[string]string{
		"pod to pod, across nodes": "no address family in common",
		"policy denies":            "nothing to deny",
	}
	checkFails(t, rep, want)

	tg = &Target{Name: "no echo pods", Nodes: nodes, VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.1")}, Port: 80, Pods: []Pod{
		{Name: "d1", Cluster: "c1", Node: "n1", IPs: []netip.Addr{v4}, Role: RoleDenied},
	}}
	rep = Run(context.Background(), tg, Options{Timeout: time.Second, DenyTimeout: 100 * time.Millisecond})
	checkFails(t, rep, map[string]string{
		"global service from every cluster": "no echo pod",
		"policy denies":                     "no echo pod in cluster c1",
	})
}

// checkFails wants no PASS in rep, and a FAIL of every check in want
// whose detail holds the given text.
func checkFails(t *testing.T, rep Report, want map[string]string) {
	t.Helper()
	failed := map[string]bool{}
	for _, r := range rep.Results {
		t.Logf("%s: %s %s", r.Check, r.Result, r.Detail)
		if r.Result == Pass {
			t.Errorf("%s passed with nothing to check: %s", r.Check, r.Detail)
		}
		if w, ok := want[r.Check]; ok && r.Result == Fail && strings.Contains(r.Detail, w) {
			failed[r.Check] = true
		}
	}
	for check, w := range want {
		if !failed[check] {
			t.Errorf("%s: no FAIL with %q", check, w)
		}
	}
	if rep.Passed != 0 || rep.Failed < len(want) {
		t.Errorf("%s: %d passed, %d failed", rep.Target, rep.Passed, rep.Failed)
	}
}
