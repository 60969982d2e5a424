package l2

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	gl2 "github.com/isthmus-mesh/isthmus/gateway/l2"
)

// Defaults of Config.
const (
	DefaultHeartbeatPort     = 7473
	DefaultHeartbeatInterval = 100 * time.Millisecond
	DefaultDeadAfter         = 350 * time.Millisecond // three missed heartbeats
	DefaultLeaseTTL          = 3 * time.Second
	// leaseMargin: a leader stops answering this long before its lease
	// could expire in etcd, so it is silent before others may see its
	// record gone.
	leaseMargin = 700 * time.Millisecond
	// reannounceAfter: when a member appears, a leader announces its
	// addresses again this much later, after any burst the newcomer sent
	// before it heard us (it stops within a heartbeat interval).
	reannounceAfter = 200 * time.Millisecond
	// electEvery bounds how late a dead peer is noticed after DeadAfter.
	electEvery = 25 * time.Millisecond
)

// Config configures the announcements of one node.
type Config struct {
	Node, Cluster string
	NodeLabels    map[string]string
	// KV returns the cluster's etcd client once connected; nil means
	// standalone mode (this node leads everything its policies select).
	KV func() (*kvstore.Client, error)
	// NodeIPs are the addresses peers send heartbeats to (published in
	// the node's L2 record).
	NodeIPs           func() []netip.Addr
	HeartbeatPort     int
	HeartbeatInterval time.Duration
	DeadAfter         time.Duration
	LeaseTTL          time.Duration
	Announce          gl2.Options
	Log               *slog.Logger
}

func (c *Config) defaults() {
	if c.HeartbeatPort == 0 {
		c.HeartbeatPort = DefaultHeartbeatPort
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if c.DeadAfter == 0 {
		c.DeadAfter = DefaultDeadAfter
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
}

// record is a node's L2 record in etcd, under its own lease.
type record struct {
	V      int          `json:"v"`
	Addrs  []netip.Addr `json:"addrs"` // where heartbeats reach it
	Port   int          `json:"port"`
	TTLms  int64        `json:"ttlMs"` // of its lease
	Member Member       `json:"member"`
	Leads  []netip.Addr `json:"leads,omitempty"`
	// Key is the Ed25519 public key its heartbeats are signed with.
	Key []byte `json:"key,omitempty"`
}

// peer is another node as this one knows it.
type peer struct {
	rec       record
	firstSeen time.Time // the record appeared (or came back)
	lastHeard time.Time
	hb        Member // from the last heartbeat
	lastSeq   uint64 // of the last heartbeat counted (signed ones)
}

// Manager runs the election and the responders of one node.
type Manager struct {
	cfg Config
	log *slog.Logger
	ann *gl2.Announcer

	wake chan struct{}

	hbKey ed25519.PrivateKey // signs this node's heartbeats
	hbSeq atomic.Uint64      // their sequence numbers
	// rejected counts heartbeats from known peers' addresses that did not
	// verify (a forged or replayed heartbeat, or a key not yet seen).
	rejected atomic.Uint64

	mu       sync.Mutex
	in       Input
	peers    map[string]*peer
	lease    *kvstore.Lease
	leaseID  kvstore.LeaseID // the lease the record was last written under
	leaseErr error
	written  []byte // the record's value as last written
	// listed: the peers' records were listed; wroteAt: this node's record
	// was first written under its lease. A node leads only DeadAfter after
	// both, once every live peer had the time to be heard: else a
	// restarted agent counts itself alone, leads every address and
	// announces them, taking them from their leaders for a moment.
	listed, wroteAt time.Time
	leading         map[netip.Addr]time.Time
	takeovers       uint64
	members         []string
	status          api.L2Status
	hbErr           error

	// The node's interfaces as last listed (see links).
	linkMu    sync.Mutex
	linkCache []gl2.Link
	linksAt   time.Time                  // zero: list again
	listLinks func() ([]gl2.Link, error) // gl2.Links; tests count the calls
}

// linkCacheMaxAge bounds how long a listing of the interfaces is used
// when the link watch said nothing (it may have been resubscribing).
const linkCacheMaxAge = time.Second

// policyLinks is links when there is an L2 announcement policy to match
// them against, else none: only a policy looks at the interfaces (see
// makePlan), and listing them is a netlink dump of every link of the node,
// each pod's veth included, which the link watch invalidates whenever a
// pod comes or goes. A node that announces nothing does not pay for it.
func (m *Manager) policyLinks() ([]gl2.Link, error) {
	m.mu.Lock()
	none := len(m.in.Policies) == 0
	m.mu.Unlock()
	if none {
		return nil, nil
	}
	return m.links()
}

// links returns the node's interfaces from a cache the link watch
// invalidates (and at most linkCacheMaxAge old): the election runs every
// 25 ms and the heartbeats every 100 ms, which must not dump every link
// of the node from the kernel each time.
func (m *Manager) links() ([]gl2.Link, error) {
	m.linkMu.Lock()
	defer m.linkMu.Unlock()
	if !m.linksAt.IsZero() && time.Since(m.linksAt) < linkCacheMaxAge {
		return m.linkCache, nil
	}
	ls, err := m.listLinks()
	if err != nil {
		return nil, err // not cached: the next call tries again
	}
	m.linkCache, m.linksAt = ls, time.Now()
	return ls, nil
}

// linksChanged is the link watch's callback: list again, elect again.
func (m *Manager) linksChanged() {
	m.linkMu.Lock()
	m.linksAt = time.Time{}
	m.linkMu.Unlock()
	m.kick()
}

// New returns a manager; Run starts it.
func New(cfg Config) *Manager {
	cfg.defaults()
	// The heartbeat key lives as long as the process: a restarted agent
	// publishes a new one, which voids every heartbeat of the old.
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(fmt.Sprintf("l2: heartbeat key: %v", err)) // crypto/rand does not fail on Linux
	}
	return &Manager{cfg: cfg, log: cfg.Log, ann: gl2.NewAnnouncer(cfg.Announce, cfg.Log),
		wake: make(chan struct{}, 1), peers: map[string]*peer{}, leading: map[netip.Addr]time.Time{}, listLinks: gl2.Links, hbKey: key}
}

// SetInput gives the manager the current policies and services (from the
// agent's reconcile); it re-elects at once.
func (m *Manager) SetInput(in Input) {
	m.mu.Lock()
	m.in = in
	m.mu.Unlock()
	m.kick()
}

func (m *Manager) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *Manager) clusterMode() bool { return m.cfg.KV != nil }

// Run elects and answers until ctx ends; then it answers nothing and, in
// cluster mode, revokes its lease so others take over at once.
func (m *Manager) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	defer m.ann.Close()
	wg.Go(func() { m.ann.Run(ctx, m.linksChanged) })
	if m.clusterMode() {
		conn, err := listenHeartbeats(m.cfg.HeartbeatPort)
		if err != nil {
			m.mu.Lock()
			m.hbErr = fmt.Errorf("heartbeat port %d: %w", m.cfg.HeartbeatPort, err)
			m.mu.Unlock()
			m.log.Error("l2: cannot open the heartbeat socket: this node will not lead", "err", err)
		} else {
			// Closed when Run returns (before wg.Wait, defers run last
			// in first out), which ends receive's blocking read. Not with
			// context.AfterFunc: its stop, deferred, could win the race
			// with the cancellation and leave the read blocked forever.
			defer conn.Close()
			wg.Go(func() { m.receive(conn) })
			wg.Go(func() { m.send(ctx, conn) })
		}
		wg.Go(func() { m.runKV(ctx) })
	}
	t := time.NewTicker(electEvery)
	defer t.Stop()
	for {
		m.elect()
		select {
		case <-ctx.Done():
			m.ann.Sync(nil)
			return
		case <-t.C:
		case <-m.wake:
		}
	}
}

// leaseHeld reports whether this node may lead: standalone, or its record
// is in etcd under a lease that cannot have expired yet.
func (m *Manager) leaseHeldLocked(now time.Time) bool {
	if !m.clusterMode() {
		return true
	}
	if m.lease == nil || m.hbErr != nil || m.leaseID != m.lease.ID() {
		return false
	}
	if m.listed.IsZero() || now.Sub(m.listed) < m.cfg.DeadAfter || now.Sub(m.wroteAt) < m.cfg.DeadAfter {
		return false
	}
	return m.lease.Expires().Sub(now) > leaseMargin
}

// aliveLocked returns the peers that count as candidates: those whose
// record is in etcd and that were heard within DeadAfter, or whose record
// outlived their last heartbeat by twice their lease TTL and more (so they
// still renew it: alive, only unheard — heartbeats are blocked between
// us; etcd is the authority then, and every node readmits them alike).
func (m *Manager) aliveLocked(now time.Time) []Member {
	var out []Member
	for name, p := range m.peers {
		heard := now.Sub(p.lastHeard) < m.cfg.DeadAfter
		since := p.lastHeard
		if p.firstSeen.After(since) {
			since = p.firstSeen
		}
		grace := 2*time.Duration(p.rec.TTLms)*time.Millisecond + time.Second
		switch {
		case heard:
			mb := p.hb
			mb.Node = name
			out = append(out, mb)
		case now.Sub(since) > grace:
			mb := p.rec.Member
			mb.Node = name
			out = append(out, mb)
		}
	}
	return out
}

// elect computes the leaders and makes the responders answer for what
// this node leads, on the interfaces of the policy that covers each.
func (m *Manager) elect() {
	links, linkErr := m.policyLinks()
	m.mu.Lock()
	now := time.Now()
	p := makePlan(m.in, m.cfg.Node, m.cfg.NodeLabels, links)
	members := m.aliveLocked(now)
	held := m.leaseHeldLocked(now)
	if held {
		members = append(members, p.self)
	}
	leaders := Elect(p.addrs, members)
	want := map[string][]netip.Addr{}
	leads := map[netip.Addr]bool{}
	for _, a := range p.addrs {
		if leaders[a.Addr] != m.cfg.Node {
			continue
		}
		leads[a.Addr] = true
		for _, ifc := range p.ifaces[a.Policy] {
			want[ifc] = append(want[ifc], a.Addr)
		}
	}
	var names []string
	for _, mb := range members {
		names = append(names, mb.Node)
	}
	slices.Sort(names)
	grew := gained(m.members, names)
	m.members = names
	var taken []netip.Addr
	for a := range leads {
		if _, ok := m.leading[a]; !ok {
			m.leading[a] = now
			m.takeovers++
			taken = append(taken, a)
		}
	}
	for a := range m.leading {
		if !leads[a] {
			delete(m.leading, a)
		}
	}
	m.status = m.statusLocked(p, leaders, members, held)
	if linkErr != nil {
		m.status.Errors = append(m.status.Errors, linkErr.Error())
	}
	m.mu.Unlock()

	errs := m.ann.Sync(want)
	if len(taken) > 0 {
		m.log.Info("l2: leading", "addresses", taken, "members", names)
	}
	if grew && len(leads) > 0 {
		// A node came back (or we just started and hear the others) that
		// may have announced our addresses while it could not hear us,
		// and may still be sending its burst until it hears us: announce
		// them again once that burst is over.
		time.AfterFunc(reannounceAfter, m.ann.Announce)
	}
	m.mu.Lock()
	for _, ifc := range slices.Sorted(maps.Keys(errs)) {
		m.status.Errors = append(m.status.Errors, errs[ifc].Error())
	}
	m.mu.Unlock()
}

// gained reports whether next (sorted) holds a name prev (sorted) does not.
func gained(prev, next []string) bool {
	for _, n := range next {
		if _, ok := slices.BinarySearch(prev, n); !ok {
			return true
		}
	}
	return false
}

func (m *Manager) statusLocked(p plan, leaders map[netip.Addr]string, members []Member, held bool) api.L2Status {
	st := api.L2Status{Mode: "standalone", LeaseHeld: held, Members: m.members, Policies: p.policies, Takeovers: m.takeovers}
	if m.clusterMode() {
		st.Mode = "cluster"
		st.Heartbeat = fmt.Sprintf("udp/%d every %v, dead after %v, Ed25519-signed", m.cfg.HeartbeatPort, m.cfg.HeartbeatInterval, m.cfg.DeadAfter)
		st.RejectedHeartbeats = m.rejected.Load()
	}
	if m.leaseErr != nil {
		st.LeaseErr = m.leaseErr.Error()
	}
	if m.hbErr != nil {
		st.Errors = append(st.Errors, m.hbErr.Error())
	}
	for _, a := range p.addrs {
		la := api.L2Address{Address: a.Addr.String(), Service: a.Service, Policy: a.Policy, Leader: leaders[a.Addr], Candidates: candidates(a, members)}
		if since, ok := m.leading[a.Addr]; ok {
			s := since
			la.Since = &s
			la.Interfaces = p.ifaces[a.Policy]
			st.Leaderships++
		}
		st.Addresses = append(st.Addresses, la)
	}
	return st
}

// Status returns the last election's view with the responders' counters.
func (m *Manager) Status() *api.L2Status {
	m.mu.Lock()
	st := m.status
	st.Addresses = slices.Clone(st.Addresses)
	m.mu.Unlock()
	c := m.ann.Stats()
	st.ARPReplies, st.NAReplies, st.Gratuitous = c.ARPReplies, c.NAReplies, c.Gratuitous
	return &st
}

// send sends this node's heartbeat to every peer, every interval, while
// it holds its lease (a node without it is not a candidate).
func (m *Manager) send(ctx context.Context, conn *net.UDPConn) {
	t := time.NewTicker(m.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		links, _ := m.policyLinks()
		m.mu.Lock()
		held := m.leaseHeldLocked(time.Now())
		self := makePlan(m.in, m.cfg.Node, m.cfg.NodeLabels, links).self
		var dsts []netip.AddrPort
		for _, p := range m.peers {
			if len(p.rec.Addrs) > 0 {
				dsts = append(dsts, netip.AddrPortFrom(p.rec.Addrs[0], uint16(p.rec.Port)))
			}
		}
		m.mu.Unlock()
		if !held {
			continue
		}
		b, err := encodeHeartbeat(m.cfg.Cluster, self, m.hbSeq.Add(1), m.hbKey)
		if err != nil || len(b) > maxHeartbeat {
			m.log.Warn("l2: heartbeat too large or not encodable", "bytes", len(b), "err", err)
			continue
		}
		for _, d := range dsts {
			_, _ = conn.WriteToUDPAddrPort(b, d)
		}
	}
}

// receive takes heartbeats from known peers, from one of the addresses
// their record publishes.
func (m *Manager) receive(conn *net.UDPConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		hb, payload, sig, err := decodeHeartbeat(buf[:n])
		if err != nil || hb.Cluster != m.cfg.Cluster || hb.Node == m.cfg.Node {
			continue
		}
		m.mu.Lock()
		p, ok := m.peers[hb.Node]
		if ok && slices.Contains(p.rec.Addrs, unmap(from.Addr())) {
			if err := verifyHeartbeat(hb, payload, sig, p.rec.Key, p.lastSeq); err != nil {
				m.mu.Unlock()
				if m.rejected.Add(1)%100 == 1 {
					m.log.Warn("l2: dropping a heartbeat that does not verify", "node", hb.Node, "from", from, "err", err)
				}
				continue
			}
			if payload != nil {
				p.lastSeq = hb.Seq
			}
			first := time.Since(p.lastHeard) >= m.cfg.DeadAfter
			p.lastHeard = time.Now()
			p.hb = hb.Member
			m.mu.Unlock()
			if first {
				m.kick()
			}
			continue
		}
		m.mu.Unlock()
	}
}

// runKV holds this node's lease and record, and watches the others'.
func (m *Manager) runKV(ctx context.Context) {
	var c *kvstore.Client
	for {
		var err error
		if c, err = m.cfg.KV(); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
	var lease *kvstore.Lease
	for lease == nil {
		var err error
		if lease, err = c.GrantLease(ctx, m.cfg.LeaseTTL); err != nil {
			m.setLeaseErr(err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
	}
	defer func() {
		// Others take over at once instead of after the TTL.
		m.mu.Lock()
		m.leaseID = 0
		m.mu.Unlock()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = lease.Close(rctx)
	}()
	m.mu.Lock()
	m.lease = lease
	m.mu.Unlock()
	lease.OnRegrant(func(context.Context, kvstore.LeaseID) { m.kick() })

	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { m.watchPeers(ctx, c) })
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		m.publish(ctx, c, lease)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// publish writes the node's record when it changed or the lease was
// re-granted.
func (m *Manager) publish(ctx context.Context, c *kvstore.Client, lease *kvstore.Lease) {
	links, _ := m.policyLinks()
	m.mu.Lock()
	rec := record{V: 1, Port: m.cfg.HeartbeatPort, TTLms: lease.TTL().Milliseconds(),
		Member: makePlan(m.in, m.cfg.Node, m.cfg.NodeLabels, links).self, Leads: slices.SortedFunc(maps.Keys(m.leading), netip.Addr.Compare)}
	rec.Member.Node = ""
	rec.Key = m.hbKey.Public().(ed25519.PublicKey)
	if m.cfg.NodeIPs != nil {
		for _, a := range m.cfg.NodeIPs() {
			rec.Addrs = append(rec.Addrs, a.Unmap())
		}
	}
	b, _ := json.Marshal(rec)
	id := lease.ID()
	same := m.leaseID == id && string(b) == string(m.written)
	m.mu.Unlock()
	if same {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	err := c.PutLeased(wctx, records.L2Key(m.cfg.Cluster, m.cfg.Node), b, lease)
	cancel()
	m.setLeaseErr(err)
	if err != nil {
		m.log.Warn("l2: cannot write this node's L2 record: not leading", "err", err)
		return
	}
	m.mu.Lock()
	first := m.leaseID != id
	if first {
		m.wroteAt = time.Now()
		time.AfterFunc(m.cfg.DeadAfter, m.kick)
	}
	m.leaseID, m.written = id, b
	m.mu.Unlock()
	if first {
		m.kick()
	}
}

func (m *Manager) setLeaseErr(err error) {
	m.mu.Lock()
	m.leaseErr = err
	m.mu.Unlock()
}

// watchPeers keeps m.peers equal to the other nodes' records.
func (m *Manager) watchPeers(ctx context.Context, c *kvstore.Client) {
	prefix := records.L2ClusterPrefix(m.cfg.Cluster)
	for ev := range c.WatchPrefix(ctx, prefix) {
		if ev.Type == kvstore.EventListDone {
			m.mu.Lock()
			if m.listed.IsZero() {
				m.listed = time.Now()
				time.AfterFunc(m.cfg.DeadAfter, m.kick)
			}
			m.mu.Unlock()
			continue
		}
		node, ok := strings.CutPrefix(ev.Key, prefix)
		if !ok || node == m.cfg.Node {
			continue
		}
		m.mu.Lock()
		switch ev.Type {
		case kvstore.EventDelete:
			delete(m.peers, node)
		default:
			var rec record
			if err := json.Unmarshal(ev.Value, &rec); err != nil || records.ValidateNodeName(node) != nil {
				m.log.Warn("l2: ignoring an invalid L2 record", "key", ev.Key, "err", err)
				m.mu.Unlock()
				continue
			}
			p, ok := m.peers[node]
			if !ok {
				p = &peer{firstSeen: time.Now()}
				m.peers[node] = p
			}
			if !bytes.Equal(p.rec.Key, rec.Key) {
				p.lastSeq = 0 // a new incarnation counts from 1
			}
			p.rec = rec
		}
		m.mu.Unlock()
		m.kick()
	}
}
