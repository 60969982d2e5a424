package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os/exec"
	"runtime"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/nlbatch"
)

// rtnlProbe times one rtnetlink request that takes the kernel's RTNL lock
// (lo set up, in a network namespace of its own, so it touches nothing
// else) again and again: how long any request of a pod's plumbing waits
// for that lock, one for the whole host, at that moment.
type rtnlProbe struct {
	netns string
	stop  chan struct{}
	done  chan struct{}
	lat   []time.Duration
	err   error
	start time.Time
	span  time.Duration // from the first request to the stop
}

func startRTNLProbe(every time.Duration) (*rtnlProbe, error) {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	p := &rtnlProbe{netns: "isthprobe-" + hex.EncodeToString(b), stop: make(chan struct{}), done: make(chan struct{})}
	if out, err := exec.Command("ip", "netns", "add", p.netns).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", p.netns, err, out)
	}
	ns, err := netns.GetFromName(p.netns)
	if err != nil {
		p.remove()
		return nil, err
	}
	ready := make(chan error, 1)
	go func() {
		defer close(p.done)
		defer ns.Close()
		// The thread goes back to the node's namespace before it is
		// unlocked: a goroutine that ends locked ends its thread too, and
		// the lab's processes started from that thread would get SIGKILL
		// (their Pdeathsig).
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ready <- err
			return
		}
		defer orig.Close()
		defer func() {
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
		}()
		if err := netns.Set(ns); err != nil {
			ready <- err
			return
		}
		s, err := nlbatch.Open(0)
		if err != nil {
			ready <- err
			return
		}
		defer s.Close()
		p.start = time.Now()
		defer func() { p.span = time.Since(p.start) }()
		ready <- nil
		m := nl.NewIfInfomsg(unix.AF_UNSPEC)
		m.Index, m.Flags, m.Change = 1, unix.IFF_UP, unix.IFF_UP
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(every):
			}
			t0 := time.Now()
			if err := s.Do(nlbatch.New("set lo up", unix.RTM_NEWLINK, 0, m)); err != nil {
				p.err = err
				return
			}
			p.lat = append(p.lat, time.Since(t0))
		}
	}()
	if err := <-ready; err != nil {
		<-p.done
		p.remove()
		return nil, err
	}
	return p, nil
}

// Stop ends the probe and returns the latencies it measured.
func (p *rtnlProbe) Stop() ([]time.Duration, error) {
	close(p.stop)
	<-p.done
	p.remove()
	return p.lat, p.err
}

// stalled is the share of the probe's span it spent in requests that
// waited longer than over: the percentiles count a long stall once, as one
// request, however long it held every other request up.
func (p *rtnlProbe) stalled(over time.Duration) float64 {
	var sum time.Duration
	for _, l := range p.lat {
		if l > over {
			sum += l
		}
	}
	if p.span <= 0 {
		return 0
	}
	return float64(sum) / float64(p.span)
}

func (p *rtnlProbe) remove() { _ = exec.Command("ip", "netns", "del", p.netns).Run() }
