package e2e

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
)

// The agent is killed with SIGKILL and started again while TCP streams run
// through the datapath (pod to pod, and through a service VIP under a
// policy): the streams never see a reset and keep moving while no agent
// runs; afterwards the agent knows the same pods with the same addresses,
// hands out no address twice, and still enforces the policy and the service.
func TestAgentRestartKeepsFlows(t *testing.T) {
	n := startNode(t)
	client := n.addPod("client", map[string]string{"app": "client"})
	server := n.addPod("server", map[string]string{"app": "server"})
	other := n.addPod("other", map[string]string{"app": "other"})
	serveTCP(t, server.Netns, 8080, echo)
	// Three backends: a service flow that lost its conntrack entry would
	// likely be sent to another backend, which answers with a reset.
	for _, name := range []string{"server-2", "server-3"} {
		serveTCP(t, n.addPod(name, map[string]string{"app": "server"}).Netns, 8080, echo)
	}

	step(t, "apply NetworkPolicy server-from-client and Service svc (-> app=server:8080)")
	n.apply(serverPolicy + "---\n" + `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: svc
spec:
  vips: [10.96.0.20, "fd00:96::20"]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: server}
`)
	vip4 := netip.MustParseAddrPort("10.96.0.20:80")
	vip6 := netip.MustParseAddrPort("[fd00:96::20]:80")
	direct := netip.AddrPortFrom(server.IPv4, 8080)
	for _, dst := range []netip.AddrPort{direct, vip4, vip6} {
		if err := eventually(5*time.Second, func() error { return tcpEcho(client.Netns, dst) }); err != nil {
			t.Fatalf("client -> %s before the restart: %v", dst, err)
		}
	}
	if err := connectTimesOut(other.Netns, direct, deniedDial); err != nil {
		t.Fatalf("before the restart: %v", err)
	}
	step(t, "a pod comes and goes before the restart")
	gone := n.addPod("gone", map[string]string{"app": "gone"})
	n.isthmus("endpoint", "del", "gone")
	before := n.endpoints()
	state := n.snapshot()

	step(t, "start two streams: client -> server %s, client -> service %s", direct, vip6)
	streams := []*stream{startStream(t, client.Netns, direct), startStream(t, client.Netns, vip6)}
	waitProgress := func(what string, d time.Duration) {
		t.Helper()
		marks := make([]int64, len(streams))
		for i, s := range streams {
			marks[i] = s.echoed.Load()
		}
		time.Sleep(d)
		for i, s := range streams {
			if err := s.progressedSince(marks[i]); err != nil {
				t.Errorf("%s: %v", what, err)
			}
		}
	}
	event := func(what string) {
		for _, s := range streams {
			s.event(what)
		}
	}
	waitProgress("before the kill", 2*time.Second)

	drops := dropCounts(n.status())
	step(t, "kill the agent with SIGKILL")
	event("kill")
	if err := n.agent.Proc.Kill(); err != nil {
		t.Fatal(err)
	}
	event("agent dead")
	waitProgress("while no agent runs", 3*time.Second)
	if _, err := n.agent.CLI(n.ctx, "status"); err == nil {
		t.Fatal("the CLI still reaches an agent after it was killed")
	}

	step(t, "start the agent again")
	event("start")
	restart := time.Now()
	if err := n.agent.Start(n.ctx); err != nil {
		t.Fatal(err)
	}
	event("agent answers")
	t.Logf("agent answered %v after start", time.Since(restart).Round(time.Millisecond))
	waitProgress("after the restart", 4*time.Second)

	for _, s := range streams {
		if err := s.finish(); err != nil {
			t.Errorf("stream %s: %v", s.dst, err)
		}
		t.Logf("stream %s: %s", s.dst, s.report())
	}
	if t.Failed() {
		t.FailNow()
	}
	step(t, "the datapath dropped nothing meanwhile")
	if now := dropCounts(n.status()); !maps.Equal(now, drops) {
		t.Errorf("drop counters rose while the agent was killed and restarted: before %v, after %v", drops, now)
	}

	step(t, "the agent knows the same pods with the same addresses")
	after := n.endpoints()
	if got, want := endpointAddrs(after), endpointAddrs(before); !maps.Equal(got, want) {
		t.Errorf("endpoints after the restart:\n%v\nwant (before):\n%v", got, want)
	}

	step(t, "objects, endpoints, identities and datapath entries are as before the kill")
	n.checkUnchanged(t, state)

	step(t, "a new pod gets addresses no other pod has, nor had just now")
	late := n.addPod("late", map[string]string{"app": "late"})
	for _, e := range before {
		for _, ip := range e.IPs {
			if ip == late.IPv4 || ip == late.IPv6 {
				t.Errorf("new pod late got %s, which pod %s already has", ip, e.Name)
			}
		}
	}
	for _, ip := range []netip.Addr{gone.IPv4, gone.IPv6} {
		if ip == late.IPv4 || ip == late.IPv6 {
			t.Errorf("new pod late got %s, which the deleted pod gone had just before the restart (IPAM hands out released addresses last)", ip)
		}
	}

	step(t, "the policy and the service are still in force")
	if err := connectTimesOut(other.Netns, direct, deniedDial); err != nil {
		t.Errorf("after the restart: %v", err)
	}
	if err := connectTimesOut(late.Netns, direct, deniedDial); err != nil {
		t.Errorf("after the restart, from a new pod: %v", err)
	}
	for _, dst := range []netip.AddrPort{direct, vip4, vip6} {
		if err := eventually(enforceWithin, func() error { return tcpEcho(client.Netns, dst) }); err != nil {
			t.Errorf("client -> %s after the restart: %v", dst, err)
		}
	}
}

// stream is a TCP connection to an echo server that the client writes to at
// a steady rate while a reader counts the bytes echoed back.
type stream struct {
	dst    netip.AddrPort
	conn   *net.TCPConn
	start  time.Time
	stop   chan struct{}
	wg     sync.WaitGroup
	sent   atomic.Int64
	echoed atomic.Int64

	mu       sync.Mutex
	writeErr error
	readErr  error
	lastRead time.Time
	maxGap   time.Duration // longest wait for echoed data
	gapEnd   time.Time     // when it ended
	events   []string      // what the test did when, for failure reports
}

const (
	streamChunk    = 4 << 10
	streamInterval = 10 * time.Millisecond // ~400 KB/s
	// streamMinProgress is what each phase must see echoed at least: a
	// fraction of the nominal rate, so that a loaded machine passes and a
	// stalled or broken flow does not.
	streamMinProgress = 64 << 10
	// streamMaxGap is the longest the echo may stop. Without drops TCP has
	// nothing to wait for; one lost segment costs a 200 ms retransmission
	// timeout, several in a row grow it to seconds.
	streamMaxGap = 3 * time.Second
)

func startStream(t *testing.T, ns *lab.Netns, dst netip.AddrPort) *stream {
	t.Helper()
	c, err := dialTCP(ns, dst, 2*time.Second)
	if err != nil {
		t.Fatalf("stream to %s: %v", dst, err)
	}
	now := time.Now()
	s := &stream{dst: dst, conn: c.(*net.TCPConn), start: now, stop: make(chan struct{}), lastRead: now}
	t.Cleanup(func() { s.conn.Close() })
	s.wg.Add(2)
	go s.write()
	go s.read()
	return s
}

func (s *stream) write() {
	defer s.wg.Done()
	buf := payload("stream|", streamChunk)
	tick := time.NewTicker(streamInterval)
	defer tick.Stop()
	for {
		select {
		case <-s.stop:
			err := s.conn.CloseWrite()
			s.mu.Lock()
			s.writeErr = err
			s.mu.Unlock()
			return
		case <-tick.C:
		}
		// A write blocks only while the path stalls; 15 s is far beyond
		// what any phase of the test allows.
		_ = s.conn.SetWriteDeadline(time.Now().Add(15 * time.Second))
		n, err := s.conn.Write(buf)
		s.sent.Add(int64(n))
		if err != nil {
			s.mu.Lock()
			s.writeErr = err
			s.mu.Unlock()
			return
		}
	}
}

func (s *stream) read() {
	defer s.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		_ = s.conn.SetReadDeadline(time.Now().Add(15 * time.Second))
		n, err := s.conn.Read(buf)
		now := time.Now()
		s.mu.Lock()
		if n > 0 {
			if gap := now.Sub(s.lastRead); gap > s.maxGap {
				s.maxGap, s.gapEnd = gap, now
			}
			s.lastRead = now
		}
		if err != nil && !errors.Is(err, io.EOF) {
			s.readErr = err
		}
		s.mu.Unlock()
		s.echoed.Add(int64(n))
		if err != nil {
			return
		}
	}
}

// event records that the test did something now.
func (s *stream) event(what string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, fmt.Sprintf("%s at %v", what, time.Since(s.start).Round(time.Millisecond)))
}

func (s *stream) errs() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	if s.writeErr != nil {
		errs = append(errs, fmt.Errorf("write: %w", s.writeErr))
	}
	if s.readErr != nil {
		errs = append(errs, fmt.Errorf("read: %w", s.readErr))
	}
	return errors.Join(errs...)
}

// report says how the stream went, for the log and for failures.
func (s *stream) report() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	gapAt := "-"
	if !s.gapEnd.IsZero() {
		gapAt = fmt.Sprintf("%v-%v", s.gapEnd.Add(-s.maxGap).Sub(s.start).Round(time.Millisecond), s.gapEnd.Sub(s.start).Round(time.Millisecond))
	}
	return fmt.Sprintf("%v since start: sent %d bytes, echoed %d; longest wait for the echo %v (at %s); %s",
		time.Since(s.start).Round(time.Millisecond), s.sent.Load(), s.echoed.Load(), s.maxGap.Round(time.Millisecond), gapAt, strings.Join(s.events, ", "))
}

// progressedSince checks that nothing failed and that at least
// streamMinProgress bytes were echoed since the echo count was mark.
func (s *stream) progressedSince(mark int64) error {
	if err := s.errs(); err != nil {
		return fmt.Errorf("stream %s: %w [%s]", s.dst, err, s.report())
	}
	if got := s.echoed.Load() - mark; got < streamMinProgress {
		return fmt.Errorf("stream %s: only %d bytes echoed, want at least %d [%s]", s.dst, got, streamMinProgress, s.report())
	}
	return nil
}

// finish stops writing, waits for the echo of everything sent, and reports
// any error, a short echo, or a stall of streamMaxGap or more.
func (s *stream) finish() error {
	close(s.stop)
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		s.conn.Close()
		<-done
		return fmt.Errorf("the echo of the last bytes did not arrive within 10 s")
	}
	if err := s.errs(); err != nil {
		return err
	}
	if sent, echoed := s.sent.Load(), s.echoed.Load(); sent != echoed {
		return fmt.Errorf("sent %d bytes but %d came back", sent, echoed)
	}
	s.mu.Lock()
	gap := s.maxGap
	s.mu.Unlock()
	if gap >= streamMaxGap {
		return fmt.Errorf("the echo stopped for %v", gap.Round(time.Millisecond))
	}
	return nil
}

// dropCounts returns the datapath's drop counters by reason.
func dropCounts(st api.Status) map[string]uint64 {
	out := map[string]uint64{}
	for _, m := range st.Metrics {
		if m.Drop {
			out[m.Reason] = m.Packets
		}
	}
	return out
}

// endpointAddrs maps "namespace/name" to the endpoint's sorted addresses.
func endpointAddrs(eps []api.Endpoint) map[string]string {
	out := map[string]string{}
	for _, e := range eps {
		ips := slices.Clone(e.IPs)
		slices.SortFunc(ips, func(a, b netip.Addr) int { return a.Compare(b) })
		out[e.Namespace+"/"+e.Name] = fmt.Sprint(ips)
	}
	return out
}
