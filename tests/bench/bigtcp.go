package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// The bigtcp section: pod to pod across two nodes in the clear, BIG TCP on
// (the agents' default, auto) against off, in two clusters of the same lab
// built the same way but for the agents' flags. Rounds interleave on and
// off so drift on the shared machine hits both: single-stream iperf3 per
// family, and request/response transactions with 80 KB responses (the
// client and server are below: netperf is not in Debian 12's main).

var bigtcpRounds = flag.Int("bigtcp-rounds", 3, "bigtcp: measurements of -duration/2 per setup and workload, interleaved on/off (the figures are medians)")

const (
	rrRequest  = 100
	rrResponse = 80_000
	rrPort     = 7200
)

// bigtcpSide is one cluster: BIG TCP on or off.
type bigtcpSide struct {
	tag            string
	client, server *lab.Pod
	serverPid      int
	gbps           map[bool][]float64 // by IPv6
	tps            []float64
	cpu, bytes     float64 // iperf3 client and server, both families
}

func bigtcpBench(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	l, err := lab.New(lab.Options{Logf: func(string, ...any) {}, Binaries: labtest.Binaries, CloseOnSignal: true})
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
	for range *bigtcpRounds {
		for _, v6 := range []bool{true, false} {
			for _, s := range []*bigtcpSide{on, off} {
				if err := s.stream(ctx, v6); err != nil {
					return fmt.Errorf("bigtcp %s stream: %w", s.tag, err)
				}
			}
		}
		// Request/response in slices of 250 ms, on and off alternating, so
		// that a burst of the machine's other work hits both alike.
		conns := map[*bigtcpSide]*rrConn{}
		for _, s := range []*bigtcpSide{on, off} {
			c, err := dialRR(s.client.Netns, netip.AddrPortFrom(s.server.IPv6, rrPort))
			if err != nil {
				return fmt.Errorf("bigtcp %s request/response: %w", s.tag, err)
			}
			defer c.Close()
			conns[s] = c
		}
		n, busy := map[*bigtcpSide]int{}, map[*bigtcpSide]time.Duration{}
		for i := range int(*duration / 2 / rrSlice) {
			order := []*bigtcpSide{on, off}
			if i%2 == 1 {
				order = []*bigtcpSide{off, on}
			}
			for _, s := range order {
				k, d, err := conns[s].run(rrSlice)
				if err != nil {
					return fmt.Errorf("bigtcp %s request/response: %w", s.tag, err)
				}
				n[s] += k
				busy[s] += d
			}
		}
		for _, s := range []*bigtcpSide{on, off} {
			s.tps = append(s.tps, float64(n[s])/busy[s].Seconds())
		}
	}
	for _, s := range []*bigtcpSide{on, off} {
		progress("bigtcp %s: ipv6 %.2f, ipv4 %.2f Gbit/s; rr %.0f/s", s.tag, s.gbps[true], s.gbps[false], s.tps)
	}
	for _, v6 := range []bool{true, false} {
		fam := map[bool]string{true: "ipv6", false: "ipv4"}[v6]
		g1, g0 := median(on.gbps[v6]), median(off.gbps[v6])
		line("bigtcp-"+fam+"-stream-on", g1, "Gbit/s", "info: single stream pod to pod across two nodes, BIG TCP on")
		line("bigtcp-"+fam+"-stream-off", g0, "Gbit/s", "info: the same with --"+fam+"-big-tcp=off")
		line("bigtcp-"+fam+"-stream-gain", g1/g0, "ratio", ">= 1.20")
	}
	r1, r0 := median(on.tps), median(off.tps)
	line("bigtcp-rr-80k-on", r1, "trans/s", fmt.Sprintf("info: one connection, %d-byte requests, %d-byte responses, IPv6, BIG TCP on", rrRequest, rrResponse))
	line("bigtcp-rr-80k-off", r0, "trans/s", "info: the same, BIG TCP off")
	line("bigtcp-rr-80k-gain", r1/r0, "ratio", ">= 1.2")
	line("bigtcp-cpu-on", on.cpu/(on.bytes/1e9), "s/GB", "info: utime+stime of iperf3 client and server per GB received, both families, BIG TCP on")
	line("bigtcp-cpu-off", off.cpu/(off.bytes/1e9), "s/GB", "info: the same, BIG TCP off")
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
	s := &bigtcpSide{tag: tag, gbps: map[bool][]float64{}}
	if s.client, err = c.Agents[0].AddPod(ctx, "bt-client-"+tag, "default", map[string]string{"app": "client"}); err != nil {
		return nil, err
	}
	if s.server, err = c.Agents[1].AddPod(ctx, "bt-server-"+tag, "default", map[string]string{"app": "server"}); err != nil {
		return nil, err
	}
	p, err := s.server.Start(ctx, "iperf3", "-s")
	if err != nil {
		return nil, err
	}
	s.serverPid = p.Pid()
	if err := serveRR(ctx, s.server.Netns, rrPort); err != nil {
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
	return s, nil
}

// stream runs one single-stream iperf3 of -duration/2 and adds its
// Gbit/s, bytes and the CPU time of client and server.
func (s *bigtcpSide) stream(ctx context.Context, v6 bool) error {
	secs := strconv.Itoa(int((*duration / 2).Seconds()))
	var out []byte
	var cpuClient float64
	var err error
	cpu0, err := cpuSeconds([]int{s.serverPid})
	if err != nil {
		return err
	}
	for range 5 {
		cmd := s.client.Command(ctx, "iperf3", "-c", s.server.Addr(v6).String(), "-t", secs, "-J")
		if out, err = cmd.Output(); err == nil {
			if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
				cpuClient = time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
			}
			break
		}
		time.Sleep(300 * time.Millisecond) // the server may still be busy with the last test
	}
	if err != nil {
		return err
	}
	cpu1, err := cpuSeconds([]int{s.serverPid})
	if err != nil {
		return err
	}
	var r struct {
		End struct {
			SumReceived struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return fmt.Errorf("iperf3 output: %w", err)
	}
	s.gbps[v6] = append(s.gbps[v6], r.End.SumReceived.BitsPerSecond/1e9)
	s.bytes += float64(r.End.SumReceived.Bytes)
	s.cpu += cpuClient + cpu1 - cpu0
	return nil
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

// rrSlice is how long one side runs transactions before the other's turn.
const rrSlice = 250 * time.Millisecond

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
