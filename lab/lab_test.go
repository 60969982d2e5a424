package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

var (
	aV4 = netip.MustParsePrefix("192.0.2.1/24")
	bV4 = netip.MustParsePrefix("192.0.2.2/24")
	aV6 = netip.MustParsePrefix("fd00:1ab::1/64")
	bV6 = netip.MustParsePrefix("fd00:1ab::2/64")
)

// newLab is labtest.New for the package's own tests (labtest imports lab):
// a lab closed when the test ends; these tests start no project binaries.
func newLab(t *testing.T) *Lab {
	t.Helper()
	skipUnlessRoot(t)
	l, err := New(Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab: close: %v", err)
		}
	})
	return l
}

func skipUnlessRoot(t *testing.T) {
	t.Helper()
	testenv.Root(t, "lab tests create network namespaces and veths")
}

func mustNode(t *testing.T, l *Lab, name string) *Node {
	t.Helper()
	n, err := l.AddNode(name)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func ping(t *testing.T, from *Netns, to netip.Addr) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if out, err := from.Exec(ctx, "ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", to.String()); err != nil {
		t.Fatalf("ping %s from %s: %v", to, from.FullName(), err)
	} else if !strings.Contains(string(out), " 0% packet loss") {
		t.Fatalf("ping %s from %s lost packets:\n%s", to, from.FullName(), out)
	}
}

func TestNamesAndPrefix(t *testing.T) {
	l := newLab(t)
	if !prefixRE.MatchString(l.Prefix()) || len(l.Prefix()) != PrefixLen {
		t.Fatalf("prefix %q", l.Prefix())
	}
	if got := l.Name("n1"); got != l.Prefix()+"-n1" {
		t.Fatalf("Name = %q", got)
	}
	if n, err := l.IfName("wg0"); err != nil || len(n) > MaxIfNameLen {
		t.Fatalf("IfName(wg0) = %q, %v", n, err)
	}
	if _, err := l.IfName("muchtoolongname"); err == nil {
		t.Fatal("IfName accepted a name over 15 characters")
	}
	if _, err := l.AddNode("Bad_Name"); err == nil {
		t.Fatal("AddNode accepted a bad name")
	}
	if _, err := New(Options{Prefix: "nope1234"}); err == nil {
		t.Fatal("New accepted a prefix without the marker")
	}
	if _, err := New(Options{Prefix: l.Prefix()}); err == nil {
		t.Fatal("New accepted a prefix in use")
	}
	if _, err := os.Stat(l.Dir()); err != nil {
		t.Fatal(err)
	}
}

func TestTwoNodesPingV4V6(t *testing.T) {
	l := newLab(t)
	a, b := mustNode(t, l, "a"), mustNode(t, l, "b")
	lk, err := l.Link(a, b, aV4, bV4)
	if err != nil {
		t.Fatal(err)
	}
	if err := lk.AddAddrs(aV6, bV6); err != nil {
		t.Fatal(err)
	}
	if lk.AName != "v-b" || lk.BName != "v-a" || lk.AIndex == 0 || lk.BIndex == 0 || len(lk.AMAC) != 6 {
		t.Fatalf("link %+v", lk)
	}
	ping(t, a.Netns, bV4.Addr())
	ping(t, b.Netns, aV4.Addr())
	ping(t, a.Netns, bV6.Addr())
	ping(t, b.Netns, aV6.Addr())

	// Node sysctls are set inside the namespace, not on the host.
	out, err := a.Exec(context.Background(), "cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding", "/proc/sys/net/ipv4/conf/all/rp_filter")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Fields(string(out)); strings.Join(got, ",") != "1,1,0" {
		t.Fatalf("sysctls in node: %q", out)
	}
}

func TestRoutedThroughRouter(t *testing.T) {
	l := newLab(t)
	a, r, b := mustNode(t, l, "a"), mustNode(t, l, "router"), mustNode(t, l, "b")
	if _, err := l.LinkWith(LinkOptions{A: a, B: r,
		AAddrs: []netip.Prefix{netip.MustParsePrefix("198.51.100.2/30"), netip.MustParsePrefix("fd00:a::2/64")},
		BAddrs: []netip.Prefix{netip.MustParsePrefix("198.51.100.1/30"), netip.MustParsePrefix("fd00:a::1/64")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.LinkWith(LinkOptions{A: b, B: r, AName: "eth0", BName: "down-b",
		AAddrs: []netip.Prefix{netip.MustParsePrefix("198.51.100.6/30"), netip.MustParsePrefix("fd00:b::2/64")},
		BAddrs: []netip.Prefix{netip.MustParsePrefix("198.51.100.5/30"), netip.MustParsePrefix("fd00:b::1/64")}}); err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		n   *Node
		dst string
		via string
	}{
		{a, "198.51.100.4/30", "198.51.100.1"},
		{a, "", "fd00:a::1"}, // default route
		{b, "", "198.51.100.5"},
		{b, "fd00:a::/64", "fd00:b::1"},
	} {
		var dst netip.Prefix
		if x.dst != "" {
			dst = netip.MustParsePrefix(x.dst)
		}
		if err := x.n.AddRoute(dst, netip.MustParseAddr(x.via)); err != nil {
			t.Fatal(err)
		}
	}
	ping(t, a.Netns, netip.MustParseAddr("198.51.100.6"))
	ping(t, a.Netns, netip.MustParseAddr("fd00:b::2"))
	ping(t, b.Netns, netip.MustParseAddr("fd00:a::2"))
	if out, err := b.Exec(context.Background(), "ip", "-o", "link", "show", "eth0"); err != nil || !strings.Contains(string(out), "eth0") {
		t.Fatalf("named interface: %v %s", err, out)
	}
}

func TestPodNetnsAndDo(t *testing.T) {
	l := newLab(t)
	n := mustNode(t, l, "n1")
	pod, err := l.AddPodNetns("pod1")
	if err != nil {
		t.Fatal(err)
	}
	if pod.Path() != "/var/run/netns/"+l.Prefix()+"-pod1" {
		t.Fatalf("Path = %q", pod.Path())
	}
	if l.Netns("pod1") != pod {
		t.Fatal("Lab.Netns did not find the pod")
	}
	if _, err := l.Link(n, pod, netip.MustParsePrefix("203.0.113.1/24"), netip.MustParsePrefix("203.0.113.2/24")); err != nil {
		t.Fatal(err)
	}

	// A listener opened inside the pod, dialed from inside the node.
	var ln net.Listener
	if err := pod.Do(func() (err error) {
		ln, err = net.Listen("tcp", "203.0.113.2:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_, _ = io.WriteString(c, "hi from pod\n")
			c.Close()
		}
	}()
	var got string
	if err := n.Do(func() error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		got, err = bufio.NewReader(c).ReadString('\n')
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got != "hi from pod\n" {
		t.Fatalf("got %q", got)
	}
	// The calling thread is back in its namespace afterwards.
	runtime.LockOSThread()
	before := threadNetns(t)
	if err := pod.Do(func() error {
		if threadNetns(t) == before {
			return errors.New("Do did not switch the thread")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	after := threadNetns(t)
	runtime.UnlockOSThread()
	if before != after {
		t.Fatalf("thread left in netns %s, was %s", after, before)
	}
	// Errors from fn come back unchanged.
	sentinel := errors.New("sentinel")
	if err := pod.Do(func() error { return sentinel }); !errors.Is(err, sentinel) {
		t.Fatalf("Do error = %v", err)
	}
}

func TestExecAndProcs(t *testing.T) {
	l := newLab(t)
	n := mustNode(t, l, "n1")
	ctx := context.Background()

	_, err := n.Exec(ctx, "sh", "-c", "echo boom-output >&2; exit 3")
	if err == nil || !strings.Contains(err.Error(), "boom-output") || !strings.Contains(err.Error(), n.FullName()) {
		t.Fatalf("Exec error should carry output and netns: %v", err)
	}
	if out, err := n.Exec(ctx, "sh", "-c", "echo $"+EnvPrefix); err != nil || strings.TrimSpace(string(out)) != l.Prefix() {
		t.Fatalf("env: %q %v", out, err)
	}

	// Kill takes the whole process group.
	p, err := n.Start(ctx, "sh", "-c", "echo st\"\"arted; sleep 1000 & sleep 1000 & wait")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return strings.Contains(p.Log(), "started") && len(groupMembers(p.Pid())) >= 3 })
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if !p.Exited() {
		t.Fatal("not exited after Kill")
	}
	waitFor(t, func() bool { return len(groupMembers(p.Pid())) == 0 })

	// Stop: SIGTERM is enough for sleep.
	p2, err := n.Start(ctx, "sleep", "1000")
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.Stop(); err != nil {
		t.Fatal(err)
	}
	var ee *exec.ExitError
	if err := p2.Wait(); !errors.As(err, &ee) {
		t.Fatalf("Wait after Stop = %v", err)
	}

	// Stop of a process that ignores SIGTERM kills it and says so.
	p3, err := n.Start(ctx, "sh", "-c", "trap '' TERM; echo rea\"\"dy; while :; do sleep 0.1; done")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return strings.Contains(p3.Log(), "ready") })
	if err := p3.StopTimeout(300 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("StopTimeout = %v", err)
	}

	// A cancelled context kills the process.
	cctx, cancel := context.WithCancel(ctx)
	p4, err := n.Start(cctx, "sleep", "1000")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-p4.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("process survived its context")
	}

	// The process really runs in the namespace.
	p5, err := n.Start(ctx, "sh", "-c", "ip -o link show; sleep 1000")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return strings.Contains(p5.Log(), "lo:") })
	if strings.Contains(p5.Log(), "eth0") || len(l.Procs()) != 5 {
		t.Fatalf("log %q, %d procs", p5.Log(), len(l.Procs()))
	}
	// p5 stays running: Close must kill it.
}

func TestCloseRemovesEverything(t *testing.T) {
	skipUnlessRoot(t)
	if err := EnsureBPFFS(); err != nil {
		t.Fatal(err)
	}
	l, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	a, b := mustNode(t, l, "a"), mustNode(t, l, "b")
	pod, err := l.AddPodNetns("pod")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Link(a, b, aV4, bV4); err != nil {
		t.Fatal(err)
	}
	host, err := l.LinkWith(LinkOptions{B: pod, AAddrs: []netip.Prefix{netip.MustParsePrefix("203.0.113.1/24")}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(host.AName, l.Prefix()) {
		t.Fatalf("host link %q lacks the prefix", host.AName)
	}
	if err := os.MkdirAll(filepath.Join(a.PinDir(), "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	p, err := a.Start(context.Background(), "sleep", "1000")
	if err != nil {
		t.Fatal(err)
	}
	dir := l.Dir()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	assertGone(t, l.Prefix(), []int{p.Pid()})
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("lab dir %s still there: %v", dir, err)
	}
	if _, err := l.AddNode("c"); err == nil {
		t.Fatal("AddNode after Close succeeded")
	}
}

func TestParallelLabsDoNotCollide(t *testing.T) {
	l1, l2 := newLab(t), newLab(t)
	if l1.Prefix() == l2.Prefix() {
		t.Fatal("same prefix")
	}
	for _, l := range []*Lab{l1, l2} {
		a, b := mustNode(t, l, "a"), mustNode(t, l, "b")
		if _, err := l.Link(a, b, aV4, bV4); err != nil {
			t.Fatal(err)
		}
	}
	if err := l1.Close(); err != nil {
		t.Fatal(err)
	}
	ping(t, l2.Netns("a"), bV4.Addr())
}

// TestCleanupPrefixCrashedRun starts a helper process that builds a lab and
// dies without closing it, then removes the leftovers by prefix.
func TestCleanupPrefixCrashedRun(t *testing.T) {
	skipUnlessRoot(t)
	if err := EnsureBPFFS(); err != nil {
		t.Fatal(err)
	}
	prefix, pids := runCrashingHelper(t, true)
	assertPresent(t, prefix)
	if err := CleanupPrefix(prefix); err != nil {
		t.Fatal(err)
	}
	assertGone(t, prefix, pids)
}

// TestCleanupStale: a non-detached lab whose owner died is removed by the next
// New, while a live lab is untouched.
func TestCleanupStale(t *testing.T) {
	live := newLab(t)
	a, b := mustNode(t, live, "a"), mustNode(t, live, "b")
	if _, err := live.Link(a, b, aV4, bV4); err != nil {
		t.Fatal(err)
	}
	if err := EnsureBPFFS(); err != nil {
		t.Fatal(err)
	}
	prefix, pids := runCrashingHelper(t, false)
	assertPresent(t, prefix)
	l2 := newLab(t) // runs CleanupStale
	_ = l2
	assertGone(t, prefix, pids)
	ping(t, a.Netns, bV4.Addr())
}

func TestContainsWordPrefix(t *testing.T) {
	for _, c := range []struct {
		s, p string
		more int
		want bool
	}{
		{"nsenter\x00--net=/var/run/netns/ilab12ab-n1", "ilab", 4, true},
		{"ilab12ab", "ilab", 4, true},
		{"--available", "ilab", 4, false},
		{"-ilabel", "ilab", 4, false},
		{"x\x00ilab12ab-n1", "ilab12ab", 0, true},
		{"xilab12ab", "ilab12ab", 0, false},
	} {
		if got := containsWordPrefix([]byte(c.s), []byte(c.p), c.more); got != c.want {
			t.Errorf("containsWordPrefix(%q, %q) = %v", c.s, c.p, got)
		}
	}
}

// The helper (the test binary re-executed with helperEnv set): a lab left
// behind by a process that dies without Close.
const helperEnv = "ISTHMUS_LAB_TEST_HELPER"

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		crashedRunHelper(mode)
		return
	}
	os.Exit(m.Run())
}

func crashedRunHelper(mode string) {
	fail := func(err error) { fmt.Println("error:", err); os.Exit(2) }
	l, err := New(Options{Detached: mode == "detached", NoStaleCleanup: true})
	if err != nil {
		fail(err)
	}
	n1, err := l.AddNode("n1")
	if err != nil {
		fail(err)
	}
	pod, err := l.AddPodNetns("pod")
	if err != nil {
		fail(err)
	}
	if _, err := l.Link(n1, pod, aV4, bV4); err != nil {
		fail(err)
	}
	if _, err := l.LinkWith(LinkOptions{B: n1}); err != nil {
		fail(err)
	}
	if err := os.MkdirAll(n1.PinDir(), 0o700); err != nil {
		fail(err)
	}
	if err := os.MkdirAll(WireGuardSockDir, 0o755); err != nil {
		fail(err)
	}
	if err := os.WriteFile(filepath.Join(WireGuardSockDir, l.Prefix()+"wg0.sock"), nil, 0o600); err != nil {
		fail(err)
	}
	var pids []string
	p, err := n1.Start(context.Background(), "sleep", "1000")
	if err != nil {
		fail(err)
	}
	pids = append(pids, strconv.Itoa(p.Pid()))
	// A process outside the lab's namespaces, found by its command line, in
	// its own session so it outlives this helper.
	c := exec.Command("sh", "-c", "sleep 1000; : "+l.Prefix())
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		fail(err)
	}
	pids = append(pids, strconv.Itoa(c.Process.Pid))
	fmt.Printf("ready %s %s\n", l.Prefix(), strings.Join(pids, ","))
	time.Sleep(time.Hour) // killed by the parent
}

func runCrashingHelper(t *testing.T, detached bool) (string, []int) {
	t.Helper()
	mode := "attached"
	if detached {
		mode = "detached"
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	_ = cmd.Process.Kill() // the crash
	_ = cmd.Wait()
	f := strings.Fields(line)
	if err != nil || len(f) != 3 || f[0] != "ready" {
		t.Fatalf("helper: %q %v", line, err)
	}
	var pids []int
	for _, s := range strings.Split(f[2], ",") {
		pid, _ := strconv.Atoi(s)
		pids = append(pids, pid)
	}
	t.Cleanup(func() { _ = CleanupPrefix(f[1]) })
	return f[1], pids
}

func leftovers(prefix string) []string {
	var found []string
	for _, g := range []string{
		filepath.Join(NetnsDir, prefix+"*"),
		filepath.Join(PinRoot, prefix+"*"),
		filepath.Join(WireGuardSockDir, prefix+"*"),
		filepath.Join(os.TempDir(), prefix+"-*"),
		filepath.Join(ownerDir, prefix+"*"),
	} {
		m, _ := filepath.Glob(g)
		found = append(found, m...)
	}
	links, _ := netlink.LinkList()
	for _, lk := range links {
		if strings.HasPrefix(lk.Attrs().Name, prefix) {
			found = append(found, "link "+lk.Attrs().Name)
		}
	}
	return found
}

func assertPresent(t *testing.T, prefix string) {
	t.Helper()
	got := strings.Join(leftovers(prefix), " ")
	for _, want := range []string{"-n1", "-pod", "wg0.sock", "link " + prefix + "h1", ".json"} {
		if !strings.Contains(got, want) {
			t.Fatalf("crashed run should have left %q; found %s", want, got)
		}
	}
}

func assertGone(t *testing.T, prefix string, pids []int) {
	t.Helper()
	if left := leftovers(prefix); len(left) > 0 {
		t.Fatalf("leftovers of %s: %v", prefix, left)
	}
	for _, pid := range pids {
		waitFor(t, func() bool { return !procRunning(pid) })
	}
}

func threadNetns(t *testing.T) string {
	t.Helper()
	s, err := os.Readlink(fmt.Sprintf("/proc/self/task/%d/ns/net", syscall.Gettid()))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// groupMembers lists the live processes whose process group is pgid.
func groupMembers(pgid int) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if g, err := syscall.Getpgid(pid); err == nil && g == pgid && procRunning(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAddClusterServerOnlyTakesNoNodes(t *testing.T) {
	l := newLab(t)
	_, err := l.AddCluster(context.Background(), 1, ClusterOptions{ServerOnly: true, Nodes: 1})
	if err == nil || !strings.Contains(err.Error(), "ServerOnly with 1 nodes") {
		t.Fatalf("AddCluster(ServerOnly, Nodes 1) = %v, want an error", err)
	}
	if ns := l.Netns("c1-rtr"); ns != nil {
		t.Fatalf("the refused cluster left its router %s", ns.FullName())
	}
}

// A process outlives the thread that asked for it: Linux sends a child's
// Pdeathsig when the thread that forked it ends, and a goroutine that ends
// locked to its thread (one that entered a namespace and did not come
// back) ends that thread. Start and Exec fork from the lab's spawner
// thread instead. Four goroutines ask, so that at least three run on
// threads that end (the runtime keeps the main thread).
func TestProcessOutlivesTheThreadThatStartedIt(t *testing.T) {
	l := newLab(t)
	n := mustNode(t, l, "n1")
	ctx := context.Background()
	type result struct {
		p   *Proc
		err error
	}
	results := make(chan result, 4)
	for range 4 {
		go func() {
			runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
			p, err := n.Start(ctx, "sleep", "1000")
			results <- result{p, err}
		}()
	}
	var procs []*Proc
	for range 4 {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		procs = append(procs, r.p)
	}
	// The asking threads are gone (or going) now; give a SIGKILL time to land.
	time.Sleep(500 * time.Millisecond)
	for i, p := range procs {
		if p.Exited() {
			t.Errorf("process %d died with the thread that started it: %v", i, p.Wait())
		}
	}
	for _, p := range procs {
		if err := p.Kill(); err != nil {
			t.Error(err)
		}
	}
}
