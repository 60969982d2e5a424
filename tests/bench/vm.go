package main

// The external-workload benchmark (section "vm", tracker issue 16): two
// encrypted clusters of two nodes, connected; a host behind the fabric
// router joins c1 with a one-time token.
//
//   - vm-join-to-first-packet: from the start of `isthmus-agent --join`
//     (enrollment, WireGuard, etcd, peers) to the first answered TCP
//     connection from the host to a pod in the other cluster (c2).
//   - vm-revoke-to-cut: a TCP echo conversation from the host to that pod
//     (a message every 10 ms); from the start of `isthmus vm revoke` to the
//     last echo that came back, plus the 10 ms of the next probe.
//
// -vm-rounds rounds of both (revoke, re-enroll with a new token and a new
// state dir); the figure is the median, stderr shows every round.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

var vmRounds = flag.Int("vm-rounds", 3, "vm: rounds of join and revoke (the figures are their medians)")

const vmProbe = 10 * time.Millisecond

func vmBench(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	opts := lab.ClusterOptions{Nodes: 2, Encryption: "wireguard"}
	c1, err := l.AddCluster(ctx, 1, opts)
	if err != nil {
		return err
	}
	c2, err := l.AddCluster(ctx, 2, opts)
	if err != nil {
		return err
	}
	if err := lab.Connect(ctx, c1, c2); err != nil {
		return err
	}
	pod, err := c2.Agents[1].AddPod(ctx, "echo", "default", map[string]string{"app": "echo"})
	if err != nil {
		return err
	}
	ln, err := serveEcho(pod.Netns, 7007)
	if err != nil {
		return err
	}
	defer ln.Close()
	dst := netip.AddrPortFrom(pod.IPv4, 7007)
	vm, err := c1.AddVMHost(ctx, 1, "bench", map[string]string{"app": "bench"})
	if err != nil {
		return err
	}
	var joins, cuts []float64
	for round := range *vmRounds {
		tok, err := vm.CreateToken(ctx, 5*time.Minute)
		if err != nil {
			return err
		}
		if vm.Agent != nil {
			// A fresh enrollment: the revoked credential and key go.
			if err := os.RemoveAll(vm.Agent.StateDir); err != nil {
				return err
			}
		}
		t0 := time.Now()
		a, err := vm.Join(ctx, tok)
		if err != nil {
			return err
		}
		for {
			c, err := dialFrom(vm.NS(), dst, 100*time.Millisecond)
			if err == nil {
				c.Close()
				break
			}
			if time.Since(t0) > time.Minute {
				return fmt.Errorf("vm: no answer from %s within a minute of --join: %v", dst, err)
			}
			time.Sleep(vmProbe)
		}
		join := time.Since(t0)
		last, stop, err := echoLoop(vm.NS(), dst)
		if err != nil {
			return err
		}
		// Revoke while the stream flows: a fresh tunnel can stall a
		// segment for one retransmission while the handshakes settle.
		flowing := time.Now().Add(10 * time.Second)
		for time.Since(last()) > 3*vmProbe {
			if time.Now().After(flowing) {
				stop()
				return fmt.Errorf("vm: the echo stream does not flow (last echo %s ago)", time.Since(last()))
			}
			time.Sleep(vmProbe / 2)
		}
		t1 := time.Now()
		if _, err := c1.CLI(ctx, "vm", "revoke", vm.Name); err != nil {
			stop()
			return err
		}
		time.Sleep(3 * time.Second)
		stop()
		cut := max(last().Sub(t1), 0) + vmProbe
		progress("vm round %d: join to first packet %s, revoke to cut %s", round+1, join.Round(time.Millisecond), cut.Round(time.Millisecond))
		joins, cuts = append(joins, join.Seconds()), append(cuts, cut.Seconds())
		if err := a.Proc.Stop(); err != nil {
			progress("vm: stopping the revoked host's agent: %v", err)
		}
	}
	line("vm-join-to-first-packet", median(joins), "s", "<= 3")
	line("vm-revoke-to-cut", median(cuts), "s", "<= 2")
	return nil
}

func dialFrom(ns *lab.Netns, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", dst.String(), timeout)
		return err
	})
	return c, err
}

// serveEcho echoes every connection to port in ns.
func serveEcho(ns *lab.Netns, port int) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return ln, nil
}

// echoLoop sends a message every vmProbe over one connection and returns
// when the last echo came back.
func echoLoop(ns *lab.Netns, dst netip.AddrPort) (last func() time.Time, stop func(), err error) {
	c, err := dialFrom(ns, dst, 2*time.Second)
	if err != nil {
		return nil, nil, err
	}
	var at atomic.Int64
	at.Store(time.Now().UnixNano())
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 8)
		for {
			_ = c.SetDeadline(time.Now().Add(100 * time.Millisecond))
			if _, err := c.Write([]byte("isthmus!")); err != nil && !isTimeoutErr(err) {
				return
			}
			if _, err := io.ReadFull(c, buf); err == nil {
				at.Store(time.Now().UnixNano())
			} else if !isTimeoutErr(err) {
				return
			}
			time.Sleep(vmProbe)
		}
	}()
	return func() time.Time { return time.Unix(0, at.Load()) }, func() { c.Close(); <-done }, nil
}

func isTimeoutErr(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
