package l2

import (
	"context"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Announcer keeps one responder per interface that has addresses to
// answer for.
type Announcer struct {
	opts Options
	log  *slog.Logger

	mu   sync.Mutex
	resp map[string]*Responder
	// closed keeps the counters of responders already closed, so the
	// totals never go back.
	closed Counters
}

// NewAnnouncer returns an announcer with no responders.
func NewAnnouncer(o Options, log *slog.Logger) *Announcer {
	return &Announcer{opts: o, log: log, resp: map[string]*Responder{}}
}

// Sync makes the responders answer exactly want (interface -> addresses):
// responders of interfaces not in want are closed, new ones opened. The
// errors are per interface (one that cannot answer does not stop the
// others); a family that does not work on an interface is reported too.
func (a *Announcer) Sync(want map[string][]netip.Addr) map[string]error {
	a.mu.Lock()
	defer a.mu.Unlock()
	errs := map[string]error{}
	for name, r := range a.resp {
		if len(want[name]) == 0 {
			a.closeLocked(name, r)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(want)) {
		addrs := want[name]
		if len(addrs) == 0 {
			continue
		}
		r, ok := a.resp[name]
		if !ok {
			var err error
			if r, err = Open(name, a.opts, a.log); err != nil {
				errs[name] = err
				continue
			}
			if l, err := linkByIndex(r.ifi.Index); err == nil {
				r.SetEnabled(l.Carrier)
			}
			a.resp[name] = r
		}
		if r.Err6 != nil && slices.ContainsFunc(addrs, netip.Addr.Is6) {
			r.RetryNDP()
		}
		r.SetAddrs(addrs)
		for _, ad := range addrs {
			if ad.Is4() && r.Err4 != nil {
				errs[name] = r.Err4
			}
			if ad.Is6() && r.Err6 != nil {
				errs[name] = r.Err6
			}
		}
	}
	return errs
}

func (a *Announcer) closeLocked(name string, r *Responder) {
	if err := r.Close(); err != nil {
		a.log.Warn("l2: close responder", "interface", name, "err", err)
	}
	c := r.Counters()
	a.closed.ARPReplies += c.ARPReplies
	a.closed.NAReplies += c.NAReplies
	a.closed.Gratuitous += c.Gratuitous
	a.closed.Ignored += c.Ignored
	a.closed.SendErrors += c.SendErrors
	delete(a.resp, name)
}

// Announce re-sends a burst for every address answered for.
func (a *Announcer) Announce() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.resp {
		r.Announce(r.Addrs())
	}
}

// Answering returns the interfaces that answer now and their addresses.
func (a *Announcer) Answering() map[string][]netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[string][]netip.Addr{}
	for name, r := range a.resp {
		if r.Enabled() {
			out[name] = r.Addrs()
		}
	}
	return out
}

// Stats are the totals of every responder, open or closed.
type Stats struct {
	Counters
	Interfaces int // open responders
}

// Stats returns the totals.
func (a *Announcer) Stats() Stats {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := Stats{Counters: a.closed, Interfaces: len(a.resp)}
	for _, r := range a.resp {
		c := r.Counters()
		s.ARPReplies += c.ARPReplies
		s.NAReplies += c.NAReplies
		s.Gratuitous += c.Gratuitous
		s.Ignored += c.Ignored
		s.SendErrors += c.SendErrors
		if c.LastAnswers.After(s.LastAnswers) {
			s.LastAnswers = c.LastAnswers
		}
	}
	return s
}

// Close closes every responder.
func (a *Announcer) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, r := range a.resp {
		a.closeLocked(name, r)
	}
}

// Run watches the node's links until ctx ends. A responder whose interface
// loses carrier (or goes down) stops answering before onChange is called;
// onChange runs after every link change, so the caller can give up the
// addresses and re-elect. If the watch fails it is restarted.
func (a *Announcer) Run(ctx context.Context, onChange func()) {
	for ctx.Err() == nil {
		ch := make(chan netlink.LinkUpdate, 64)
		done := make(chan struct{})
		err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
			ErrorCallback: func(err error) { a.log.Warn("l2: link watch", "err", err) },
		})
		if err != nil {
			a.log.Warn("l2: cannot watch links; retrying", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		a.watch(ctx, ch, onChange)
		close(done)
	}
}

func (a *Announcer) watch(ctx context.Context, ch <-chan netlink.LinkUpdate, onChange func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			a.linkChanged(u)
			onChange()
		}
	}
}

// linkChanged applies a link's new carrier state to its responder.
func (a *Announcer) linkChanged(u netlink.LinkUpdate) {
	attrs := u.Link.Attrs()
	up := carrier(attrs) && u.Header.Type != unix.RTM_DELLINK
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.resp {
		if r.ifi.Index != attrs.Index {
			continue
		}
		if r.Enabled() != up {
			a.log.Info("l2: interface carrier changed", "interface", r.Name(), "carrier", up)
		}
		r.SetEnabled(up)
	}
}
