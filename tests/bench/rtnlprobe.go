package main

import (
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/nlbatch"
	"github.com/isthmus-mesh/isthmus/lab"
)

// rtnlProbe times one rtnetlink request that takes the kernel's RTNL lock
// (lo set up, in a network namespace of its own, so it touches nothing
// else) again and again: how long any request of a pod's plumbing waits
// for that lock, one for the whole host, at that moment.
type rtnlProbe struct {
	stop chan struct{}
	done chan struct{}
	lat  []time.Duration
	err  error
	span time.Duration // from the first request to the stop
}

// startRTNLProbe runs the probe in ns (a namespace of the lab's, which
// removes it) every so often until Stop.
func startRTNLProbe(ns *lab.Netns, every time.Duration) (*rtnlProbe, error) {
	p := &rtnlProbe{stop: make(chan struct{}), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		defer close(p.done)
		started := false
		// Do returns the thread to the node's namespace and unlocks it: a
		// thread that ended here would take the lab processes it started
		// with it (their Pdeathsig).
		err := ns.Do(func() error {
			s, err := nlbatch.Open(0)
			if err != nil {
				return err
			}
			defer s.Close()
			started = true
			ready <- nil
			start := time.Now()
			defer func() { p.span = time.Since(start) }()
			m := nl.NewIfInfomsg(unix.AF_UNSPEC)
			m.Index, m.Flags, m.Change = 1, unix.IFF_UP, unix.IFF_UP
			for {
				select {
				case <-p.stop:
					return nil
				case <-time.After(every):
				}
				t0 := time.Now()
				if err := s.Do(nlbatch.New("set lo up", unix.RTM_NEWLINK, 0, m)); err != nil {
					return err
				}
				p.lat = append(p.lat, time.Since(t0))
			}
		})
		if !started {
			ready <- err
			return
		}
		p.err = err
	}()
	if err := <-ready; err != nil {
		<-p.done
		return nil, err
	}
	return p, nil
}

// Stop ends the probe and returns the latencies it measured.
func (p *rtnlProbe) Stop() ([]time.Duration, error) {
	close(p.stop)
	<-p.done
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
