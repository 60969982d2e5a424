package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
)

// The bigtcp section: pod to pod across two nodes in the clear, BIG TCP on
// (the agents' default, auto) against off, in two clusters of the same lab
// built the same way but for the agents' flags. Single-stream TCP per
// family and request/response transactions with 80 KB responses, each on
// one long-lived connection per side, measured in slices of 250 ms with
// on and off taking turns: on these shared 2-core machines a burst of
// someone else's work lasts seconds, and whole runs of iperf3 one after
// the other let it land on one side only (a run with both sides off then
// "gains" 50 %). The client and server are below (netperf, which has a
// request/response test, is not in Debian 12's main).

var bigtcpRounds = flag.Int("bigtcp-rounds", 3, "bigtcp: measurements of -duration/2 per setup and workload, interleaved on/off (the figures are medians)")

const (
	rrRequest  = 100
	rrResponse = 80_000
	rrPort     = 7200
	streamPort = 7201
)

// bigtcpSide is one cluster: BIG TCP on or off.
type bigtcpSide struct {
	tag            string
	client, server *lab.Pod
	streams        map[bool]*streamConn // by IPv6
	rr             *rrConn
	bytes, secs    map[bool]float64 // streamed, by IPv6
	cpu            float64          // of the stream's sending and receiving threads, both families
	tx, txSecs     float64          // request/response transactions and their time
}

func bigtcpBench(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	t0 := time.Now()
	on, err := bigtcpSetup(ctx, l, 1, "on", nil)
	if err != nil {
		return fmt.Errorf("bigtcp (on): %w", err)
	}
	off, err := bigtcpSetup(ctx, l, 2, "off", []string{"--ipv6-big-tcp", "off", "--ipv4-big-tcp", "off"})
	if err != nil {
		return fmt.Errorf("bigtcp (off): %w", err)
	}
	progress("bigtcp: 2 clusters up in %s", time.Since(t0).Round(time.Second))
	if *bigtcpRounds < 1 {
		return fmt.Errorf("-bigtcp-rounds %d: want at least 1", *bigtcpRounds)
	}
	sides := []*bigtcpSide{on, off}
	slices := int(*duration / 2 / benchSlice)
	for range *bigtcpRounds {
		for _, v6 := range []bool{true, false} {
			for i := range slices {
				for _, s := range turns(sides, i) {
					if err := s.streamSlice(v6); err != nil {
						return fmt.Errorf("bigtcp %s stream: %w", s.tag, err)
					}
				}
			}
		}
		for i := range slices {
			for _, s := range turns(sides, i) {
				n, d, err := s.rr.run(benchSlice)
				if err != nil {
					return fmt.Errorf("bigtcp %s request/response: %w", s.tag, err)
				}
				s.tx += float64(n)
				s.txSecs += d.Seconds()
			}
		}
	}
	gbps := func(s *bigtcpSide, v6 bool) float64 { return s.bytes[v6] * 8 / s.secs[v6] / 1e9 }
	for _, v6 := range []bool{true, false} {
		fam := map[bool]string{true: "ipv6", false: "ipv4"}[v6]
		g1, g0 := gbps(on, v6), gbps(off, v6)
		line("bigtcp-"+fam+"-stream-on", g1, "Gbit/s", "info: one TCP stream pod to pod across two nodes, BIG TCP on")
		line("bigtcp-"+fam+"-stream-off", g0, "Gbit/s", "info: the same with --"+fam+"-big-tcp=off")
		line("bigtcp-"+fam+"-stream-gain", g1/g0, "ratio", ">= 1.20")
	}
	r1, r0 := on.tx/on.txSecs, off.tx/off.txSecs
	line("bigtcp-rr-80k-on", r1, "trans/s", fmt.Sprintf("info: one connection, %d-byte requests, %d-byte responses, IPv6, BIG TCP on", rrRequest, rrResponse))
	line("bigtcp-rr-80k-off", r0, "trans/s", "info: the same, BIG TCP off")
	line("bigtcp-rr-80k-gain", r1/r0, "ratio", ">= 1.2")
	perGB := func(s *bigtcpSide) float64 { return s.cpu / ((s.bytes[true] + s.bytes[false]) / 1e9) }
	line("bigtcp-cpu-on", perGB(on), "s/GB", "info: utime+stime of the stream's sending and receiving threads per GB, both families, BIG TCP on")
	line("bigtcp-cpu-off", perGB(off), "s/GB", "info: the same, BIG TCP off")
	return nil
}

// bigtcpSetup builds cluster index of two nodes with agentArgs, a client
// pod on the first and a server pod (iperf3 and the request/response
// server) on the second, and checks that BIG TCP is what the side says.
func bigtcpSetup(ctx context.Context, l *lab.Lab, index int, tag string, agentArgs []string) (*bigtcpSide, error) {
	c, err := l.AddCluster(ctx, index, lab.ClusterOptions{Nodes: 2, AgentArgs: agentArgs})
	if err != nil {
		return nil, err
	}
	s := &bigtcpSide{tag: tag, streams: map[bool]*streamConn{}, bytes: map[bool]float64{}, secs: map[bool]float64{}}
	if s.client, err = c.Agents[0].AddPod(ctx, "bt-client-"+tag, "default", map[string]string{"app": "client"}); err != nil {
		return nil, err
	}
	if s.server, err = c.Agents[1].AddPod(ctx, "bt-server-"+tag, "default", map[string]string{"app": "server"}); err != nil {
		return nil, err
	}
	if err := serveRR(ctx, s.server.Netns, rrPort); err != nil {
		return nil, err
	}
	sinks, err := serveSink(ctx, s.server.Netns, streamPort)
	if err != nil {
		return nil, err
	}
	for _, a := range c.Agents {
		out, err := a.CLI(ctx, "status", "-o", "json")
		if err != nil {
			return nil, err
		}
		var st api.Status
		if err := json.Unmarshal(out, &st); err != nil {
			return nil, err
		}
		if st.BigTCP == nil {
			return nil, fmt.Errorf("%s: no BIG TCP status", a.Node.Name())
		}
		for _, path := range st.BigTCP.Paths {
			if path.Path == api.BigTCPPathCrossNode && path.On != (tag == "on") {
				return nil, fmt.Errorf("%s: cross-node %s BIG TCP on=%v, this side is %s: %s", a.Node.Name(), path.Family, path.On, tag, path.Reason)
			}
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := dialRR(s.client.Netns, netip.AddrPortFrom(s.server.IPv6, rrPort))
		if err == nil {
			_, _, err = c.run(100 * time.Millisecond)
			c.Close()
		}
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("client does not reach the server: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if s.rr, err = dialRR(s.client.Netns, netip.AddrPortFrom(s.server.IPv6, rrPort)); err != nil {
		return nil, err
	}
	context.AfterFunc(ctx, func() { s.rr.Close() })
	for _, v6 := range []bool{true, false} {
		if s.streams[v6], err = dialStream(ctx, s.client.Netns, netip.AddrPortFrom(s.server.Addr(v6), streamPort), sinks); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// benchSlice is how long one side runs before the other's turn.
const benchSlice = 250 * time.Millisecond

// turns is the order of the sides in slice i: alternating, so neither
// always goes first.
func turns(sides []*bigtcpSide, i int) []*bigtcpSide {
	if i%2 == 0 {
		return sides
	}
	return []*bigtcpSide{sides[1], sides[0]}
}

// streamSlice streams for one slice and adds the bytes, the time and the
// CPU time of the sending and the receiving thread.
func (s *bigtcpSide) streamSlice(v6 bool) error {
	c := s.streams[v6]
	cpu0, err := threadCPU(c.tids)
	if err != nil {
		return err
	}
	n, d, err := c.run(benchSlice)
	if err != nil {
		return err
	}
	cpu1, err := threadCPU(c.tids)
	if err != nil {
		return err
	}
	s.bytes[v6] += float64(n)
	s.secs[v6] += d.Seconds()
	s.cpu += cpu1 - cpu0
	return nil
}

// threadCPU sums utime and stime of threads of this process
// (/proc/self/task/<tid>/stat: the thread's own, where /proc/<tid>/stat
// would count the whole process).
func threadCPU(tids []int) (float64, error) {
	var ticks int64
	for _, tid := range tids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
		if err != nil {
			return 0, err
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) < 13 {
			return 0, fmt.Errorf("task %d stat: too few fields", tid)
		}
		for _, v := range f[11:13] { // fields 14 and 15
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("task %d stat: %w", tid, err)
			}
			ticks += n
		}
	}
	return float64(ticks) / userHZ, nil
}

// serveSink accepts stream connections and reads them to the end, each on
// a thread of its own whose ID it sends on the returned channel (for its
// CPU time).
func serveSink(ctx context.Context, ns *lab.Netns, port int) (<-chan int, error) {
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		return nil, err
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	tids := make(chan int, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				defer c.Close()
				tids <- unix.Gettid()
				_, _ = io.CopyBuffer(io.Discard, c, make([]byte, 1<<20))
			}()
		}
	}()
	return tids, nil
}

// streamConn is one stream: writes come from one goroutine locked to its
// thread (in the client pod's netns), told how long to write each time.
type streamConn struct {
	tids []int // the sender's and the receiver's threads
	work chan time.Duration
	done chan streamResult
}

type streamResult struct {
	n   int64
	d   time.Duration
	err error
}

func dialStream(ctx context.Context, ns *lab.Netns, dst netip.AddrPort, sinks <-chan int) (*streamConn, error) {
	s := &streamConn{work: make(chan time.Duration), done: make(chan streamResult)}
	ready := make(chan error, 1)
	go func() {
		_ = ns.Do(func() error { // locks the thread, in the pod's netns
			c, err := net.DialTimeout("tcp", dst.String(), 2*time.Second)
			if err != nil {
				ready <- err
				return nil
			}
			defer c.Close()
			s.tids = append(s.tids, unix.Gettid())
			ready <- nil
			buf := make([]byte, 1<<20)
			for {
				var d time.Duration
				select {
				case d = <-s.work:
				case <-ctx.Done():
					return nil
				}
				start := time.Now()
				_ = c.SetWriteDeadline(start.Add(d + 5*time.Second))
				var n int64
				var err error
				for time.Since(start) < d && err == nil {
					var k int
					k, err = c.Write(buf)
					n += int64(k)
				}
				s.done <- streamResult{n: n, d: time.Since(start), err: err}
			}
		})
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	select {
	case tid := <-sinks:
		s.tids = append(s.tids, tid)
	case <-time.After(5 * time.Second):
		return nil, fmt.Errorf("the sink at %s did not take the stream", dst)
	}
	return s, nil
}

// run streams for d and returns the bytes written and the time it took.
func (s *streamConn) run(d time.Duration) (int64, time.Duration, error) {
	s.work <- d
	r := <-s.done
	return r.n, r.d, r.err
}

// serveRR answers every rrRequest-byte request on a connection with
// rrResponse bytes, until the connection ends; it runs until ctx ends.
func serveRR(ctx context.Context, ns *lab.Netns, port int) error {
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		return err
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	resp := make([]byte, rrResponse)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req := make([]byte, rrRequest)
				for {
					if _, err := io.ReadFull(c, req); err != nil {
						return
					}
					if _, err := c.Write(resp); err != nil {
						return
					}
				}
			}()
		}
	}()
	return nil
}

// rrConn is a client connection of the request/response workload.
type rrConn struct {
	net.Conn
	req, resp []byte
}

func dialRR(ns *lab.Netns, dst netip.AddrPort) (*rrConn, error) {
	var c net.Conn
	if err := ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", dst.String(), 2*time.Second)
		return err
	}); err != nil {
		return nil, err
	}
	return &rrConn{Conn: c, req: make([]byte, rrRequest), resp: make([]byte, rrResponse)}, nil
}

// run does transactions one after the other for d and returns how many
// and how long they took.
func (c *rrConn) run(d time.Duration) (int, time.Duration, error) {
	start := time.Now()
	_ = c.SetDeadline(start.Add(d + 5*time.Second))
	n := 0
	for time.Since(start) < d {
		if _, err := c.Write(c.req); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, c.resp); err != nil {
			return 0, 0, err
		}
		n++
	}
	if n == 0 {
		return 0, 0, errors.New("no transaction completed")
	}
	return n, time.Since(start), nil
}
