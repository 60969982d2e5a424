package l2

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
	"github.com/mdlayher/packet"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Options tune the announcements.
type Options struct {
	// Burst is how many gratuitous ARPs / unsolicited NAs announce an
	// address a node takes over (default 3), BurstInterval the gap between
	// them (default 50ms): the first goes out at once, the others cover a
	// lost frame.
	Burst         int
	BurstInterval time.Duration
	// Refresh, when > 0, re-announces every led address this often.
	Refresh time.Duration
}

func (o Options) withDefaults() Options {
	if o.Burst <= 0 {
		o.Burst = 3
	}
	if o.BurstInterval <= 0 {
		o.BurstInterval = 50 * time.Millisecond
	}
	return o
}

// Counters are what a responder sent.
type Counters struct {
	ARPReplies  uint64 // answers to ARP requests
	NAReplies   uint64 // answers to neighbour solicitations
	Gratuitous  uint64 // gratuitous ARPs and unsolicited NAs
	Ignored     uint64 // requests for addresses not led, or while without carrier
	SendErrors  uint64
	LastAnswers time.Time
}

// Responder answers for a set of addresses on one interface.
type Responder struct {
	ifi  *net.Interface
	opts Options
	log  *slog.Logger

	arp *arp.Client  // nil: IPv4 not answered here (Err4 says why)
	nd  *packet.Conn // solicitations in, advertisements out; nil: no IPv6
	grp *ndp.Conn    // solicited-node group memberships
	// Err4 and Err6 say why a family is not answered on this interface.
	Err4, Err6 error

	addrs   atomic.Pointer[map[netip.Addr]bool]
	enabled atomic.Bool

	mu     sync.Mutex // SetAddrs, joined, stats, nd and grp once opened
	joined map[netip.Addr]bool
	tried6 time.Time // the last attempt to open nd and grp
	stats  Counters

	done chan struct{}
	wg   sync.WaitGroup
}

// Open starts a responder on the interface named name. It answers nothing
// until SetAddrs gives it addresses. A family whose socket cannot be
// opened is reported in Err4/Err6; Open fails only if neither works or the
// interface may never answer.
func Open(name string, o Options, log *slog.Logger) (*Responder, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return nil, fmt.Errorf("interface %s: %w", name, err)
	}
	if l, err := linkByIndex(ifi.Index); err == nil && l.Unusable != "" {
		return nil, fmt.Errorf("interface %s: %s: never answers ARP or NDP", name, l.Unusable)
	}
	r := &Responder{ifi: ifi, opts: o.withDefaults(), log: log.With("interface", name), joined: map[netip.Addr]bool{}, done: make(chan struct{})}
	empty := map[netip.Addr]bool{}
	r.addrs.Store(&empty)
	r.enabled.Store(true)

	if r.arp, err = arp.Dial(ifi); err != nil {
		r.Err4 = fmt.Errorf("ARP on %s: %w", name, err)
		r.arp = nil
	}
	r.Err6 = r.openNDP()
	if r.arp == nil && r.nd == nil {
		return nil, errors.Join(r.Err4, r.Err6)
	}
	if r.arp != nil {
		r.wg.Go(r.serveARP)
	}
	if r.nd != nil {
		nd := r.nd
		r.wg.Go(func() { r.serveNDP(nd) })
	}
	if r.opts.Refresh > 0 {
		r.wg.Go(r.refresh)
	}
	return r, nil
}

// openNDP opens the solicitation socket and the group socket. The group
// socket binds to the interface's link-local address, which does not
// exist or is still tentative (duplicate address detection) for a second
// or two after the interface comes up: RetryNDP opens it later.
func (r *Responder) openNDP() error {
	r.tried6 = time.Now()
	nd, err := packet.Listen(r.ifi, packet.Raw, etherTypeIPv6, &packet.Config{Filter: nsFilter})
	if err != nil {
		return fmt.Errorf("NDP on %s: %w", r.ifi.Name, err)
	}
	grp, _, err := ndp.Listen(r.ifi, ndp.LinkLocal)
	if err != nil {
		nd.Close()
		return fmt.Errorf("NDP on %s: join groups: %w", r.ifi.Name, err)
	}
	// The group socket only holds memberships; it reads nothing.
	var f ipv6.ICMPFilter
	f.SetAll(true)
	_ = grp.SetICMPFilter(&f)
	ignoreOutgoing(nd)
	r.nd, r.grp = nd, grp
	return nil
}

// ndpRetryEvery bounds how often RetryNDP opens the sockets again.
const ndpRetryEvery = 100 * time.Millisecond

// RetryNDP opens the IPv6 side of a responder whose Open could not (see
// openNDP), at most every ndpRetryEvery. It reports whether IPv6 is
// answered now; the next SetAddrs announces the IPv6 addresses as new.
func (r *Responder) RetryNDP() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.nd != nil {
		return true
	}
	if r.closed() || time.Since(r.tried6) < ndpRetryEvery {
		return false
	}
	if r.Err6 = r.openNDP(); r.Err6 != nil {
		return false
	}
	r.log.Info("l2: NDP answers on the interface now")
	nd := r.nd
	r.wg.Go(func() { r.serveNDP(nd) })
	return true
}

// ignoreOutgoing keeps our own advertisements out of the socket (Linux
// 4.20 and later; on older kernels the source MAC check in serveNDP does).
func ignoreOutgoing(c *packet.Conn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
	})
}

// Name is the interface's name.
func (r *Responder) Name() string { return r.ifi.Name }

// MAC is the hardware address the responder answers with.
func (r *Responder) MAC() net.HardwareAddr { return r.ifi.HardwareAddr }

// SetEnabled turns answering on and off (carrier). It takes effect for the
// next packet read.
func (r *Responder) SetEnabled(on bool) { r.enabled.Store(on) }

// Enabled reports whether the responder answers.
func (r *Responder) Enabled() bool { return r.enabled.Load() }

// Addrs returns the addresses answered for.
func (r *Responder) Addrs() []netip.Addr {
	var out []netip.Addr
	for a := range *r.addrs.Load() {
		out = append(out, a)
	}
	return out
}

// SetAddrs makes addrs the addresses answered for. Addresses that are new
// are announced with a burst of gratuitous ARPs / unsolicited NAs (the
// first frame before SetAddrs returns). IPv6 addresses get their
// solicited-node group joined first, so the first solicitation after the
// announcement is received.
func (r *Responder) SetAddrs(addrs []netip.Addr) {
	r.mu.Lock()
	defer r.mu.Unlock()
	next := make(map[netip.Addr]bool, len(addrs))
	var added []netip.Addr
	cur := *r.addrs.Load()
	for _, a := range addrs {
		a = a.Unmap()
		if (a.Is4() && r.arp == nil) || (a.Is6() && r.nd == nil) {
			continue
		}
		next[a] = true
		if !cur[a] {
			added = append(added, a)
		}
	}
	// Groups: join before answering, leave once removed (a group shared by
	// two addresses stays while one of them does).
	want := map[netip.Addr]bool{}
	for a := range next {
		if a.Is6() {
			if g, err := ndp.SolicitedNodeMulticast(a); err == nil {
				want[g] = true
			}
		}
	}
	for g := range want {
		if !r.joined[g] {
			if err := r.grp.JoinGroup(g); err != nil {
				r.log.Warn("l2: join solicited-node group", "group", g, "err", err)
				continue
			}
			r.joined[g] = true
		}
	}
	r.addrs.Store(&next)
	for g := range r.joined {
		if !want[g] {
			if err := r.grp.LeaveGroup(g); err != nil {
				r.log.Warn("l2: leave solicited-node group", "group", g, "err", err)
			}
			delete(r.joined, g)
		}
	}
	if len(added) > 0 {
		r.announceLocked(added)
		r.wg.Go(func() { r.burst(added) })
	}
}

// Announce sends one burst for addrs (those still answered for), e.g.
// after a peer returned that may have announced them meanwhile.
func (r *Responder) Announce(addrs []netip.Addr) {
	r.mu.Lock()
	r.announceLocked(addrs)
	r.mu.Unlock()
	r.wg.Go(func() { r.burst(addrs) })
}

// burst sends the remaining frames of an announcement.
func (r *Responder) burst(addrs []netip.Addr) {
	for i := 1; i < r.opts.Burst; i++ {
		select {
		case <-r.done:
			return
		case <-time.After(r.opts.BurstInterval):
		}
		r.mu.Lock()
		r.announceLocked(addrs)
		r.mu.Unlock()
	}
}

func (r *Responder) refresh() {
	t := time.NewTicker(r.opts.Refresh)
	defer t.Stop()
	for {
		select {
		case <-r.done:
			return
		case <-t.C:
		}
		r.mu.Lock()
		r.announceLocked(r.Addrs())
		r.mu.Unlock()
	}
}

// announceLocked sends one gratuitous ARP or unsolicited NA per address
// still answered for, if the interface has carrier.
func (r *Responder) announceLocked(addrs []netip.Addr) {
	if !r.enabled.Load() {
		return
	}
	cur := *r.addrs.Load()
	for _, a := range addrs {
		if !cur[a] {
			continue
		}
		var err error
		if a.Is4() {
			err = r.gratuitousARP(a)
		} else {
			err = r.unsolicitedNA(a)
		}
		if err != nil {
			r.stats.SendErrors++
			r.log.Warn("l2: announce", "addr", a, "err", err)
			continue
		}
		r.stats.Gratuitous++
	}
}

// gratuitousARP is a request with sender and target the address: Linux
// hosts update an existing entry from it at once (it overrides the
// neighbour lock time, a plain reply would not).
func (r *Responder) gratuitousARP(a netip.Addr) error {
	p, err := arp.NewPacket(arp.OperationRequest, r.ifi.HardwareAddr, a, ethernet.Broadcast, a)
	if err != nil {
		return err
	}
	p.TargetHardwareAddr = net.HardwareAddr{0, 0, 0, 0, 0, 0}
	return r.arp.WriteTo(p, ethernet.Broadcast)
}

func (r *Responder) unsolicitedNA(a netip.Addr) error {
	f, err := advertisement(r.ifi.HardwareAddr, a, allNodes, allNodesMAC, false)
	if err != nil {
		return err
	}
	_, err = r.nd.WriteTo(f, &packet.Addr{HardwareAddr: allNodesMAC})
	return err
}

// answers reports whether a is answered for now.
func (r *Responder) answers(a netip.Addr) bool {
	return r.enabled.Load() && (*r.addrs.Load())[a]
}

func (r *Responder) serveARP() {
	for {
		p, _, err := r.arp.Read()
		if err != nil {
			if r.closed() {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			r.log.Warn("l2: read ARP", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if p.Operation != arp.OperationRequest || p.SenderHardwareAddr.String() == r.ifi.HardwareAddr.String() {
			continue // replies, and our own gratuitous ARPs
		}
		if p.SenderIP == p.TargetIP {
			continue // someone else's announcement, not a question
		}
		if !r.answers(p.TargetIP) {
			r.count(func(c *Counters) { c.Ignored++ })
			continue
		}
		err = r.arp.Reply(p, r.ifi.HardwareAddr, p.TargetIP)
		r.count(func(c *Counters) {
			if err != nil {
				c.SendErrors++
				return
			}
			c.ARPReplies++
			c.LastAnswers = time.Now()
		})
	}
}

func (r *Responder) serveNDP(nd *packet.Conn) {
	buf := make([]byte, 1600)
	for {
		n, _, err := nd.ReadFrom(buf)
		if err != nil {
			if r.closed() {
				return
			}
			r.log.Warn("l2: read NDP", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		s, err := parseNS(buf[:n])
		if err != nil || s.srcMAC.String() == r.ifi.HardwareAddr.String() {
			continue
		}
		if !r.answers(s.target) {
			r.count(func(c *Counters) { c.Ignored++ })
			continue
		}
		dst, dstMAC, solicited := s.answerTo()
		f, err := advertisement(r.ifi.HardwareAddr, s.target, dst, dstMAC, solicited)
		if err == nil {
			_, err = nd.WriteTo(f, &packet.Addr{HardwareAddr: dstMAC})
		}
		r.count(func(c *Counters) {
			if err != nil {
				c.SendErrors++
				return
			}
			c.NAReplies++
			c.LastAnswers = time.Now()
		})
	}
}

func (r *Responder) count(f func(*Counters)) {
	r.mu.Lock()
	f(&r.stats)
	r.mu.Unlock()
}

// Counters returns what the responder sent so far.
func (r *Responder) Counters() Counters {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats
}

func (r *Responder) closed() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// Close stops answering at once and releases the sockets (leaving the
// groups).
func (r *Responder) Close() error {
	r.enabled.Store(false)
	r.mu.Lock()
	close(r.done)
	var errs []error
	if r.arp != nil {
		errs = append(errs, r.arp.Close())
	}
	if r.nd != nil {
		errs = append(errs, r.nd.Close(), r.grp.Close())
	}
	r.mu.Unlock()
	r.wg.Wait()
	return errors.Join(errs...)
}
