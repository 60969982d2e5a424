package connectivity

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Stream is one TCP connection from a pod's namespace to an echo listener
// in another pod's namespace, with a small round trip every 10 ms: what a
// rolling update of the agents must not interrupt. It records the longest
// time without a round trip.
type Stream struct {
	ln     net.Listener
	conn   net.Conn
	done   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	stall  time.Duration
	last   time.Time // the latest round trip
	echoed int
	err    error
}

// StartStream listens on dst's port in dstNetns (a path), dials dst from
// srcNetns and starts the round trips.
func StartStream(ctx context.Context, srcNetns, dstNetns string, dst netip.AddrPort) (*Stream, error) {
	ln, err := ListenIn(dstNetns, fmt.Sprintf(":%d", dst.Port()))
	if err != nil {
		return nil, err
	}
	s := &Stream{ln: ln, done: make(chan struct{}), last: time.Now()}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	if s.conn, err = DialIn(ctx, srcNetns, dst, 5*time.Second); err != nil {
		ln.Close()
		s.wg.Wait()
		return nil, err
	}
	s.wg.Add(1)
	go s.run()
	return s, nil
}

func (s *Stream) run() {
	defer s.wg.Done()
	msg := []byte("isthmus-stream-0123456789\n")
	buf := make([]byte, len(msg))
	for {
		select {
		case <-s.done:
			return
		case <-time.After(10 * time.Millisecond):
		}
		_ = s.conn.SetDeadline(time.Now().Add(30 * time.Second))
		_, err := s.conn.Write(msg)
		if err == nil {
			_, err = io.ReadFull(s.conn, buf)
		}
		now := time.Now()
		s.mu.Lock()
		if err != nil {
			select {
			case <-s.done:
			default:
				s.err = err
			}
			s.mu.Unlock()
			return
		}
		if gap := now.Sub(s.last); gap > s.stall {
			s.stall = gap
		}
		s.echoed++
		s.last = now
		s.mu.Unlock()
	}
}

// Result returns the longest time without a round trip so far (one still
// going on included), the round trips and the stream's error (also "no
// round trip" when there was none).
func (s *Stream) Result() (stall time.Duration, roundTrips int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if gap := time.Since(s.last); gap > s.stall {
		s.stall = gap
	}
	err = s.err
	if err == nil && s.echoed == 0 {
		err = errors.New("no round trip")
	}
	return s.stall, s.echoed, err
}

// Stop ends the stream and the listener.
func (s *Stream) Stop() {
	close(s.done)
	s.conn.Close()
	s.ln.Close()
	s.wg.Wait()
}
