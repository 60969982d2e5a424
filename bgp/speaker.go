package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	api "github.com/osrg/gobgp/v3/api"
	"github.com/osrg/gobgp/v3/pkg/server"
)

// importPolicy names the global import policy: local paths only.
const importPolicy = "isthmus-export-only"

// Speaker is the node's BGP speaker. Its methods are safe for concurrent
// use; Reconcile, Detach and Withdraw are serialised.
type Speaker struct {
	log    *slog.Logger
	events *events

	mu  sync.Mutex
	srv *server.BgpServer // nil while stopped
	cur Config            // what srv holds (Paths unused: see paths)
	// peers are the peers as configured in GoBGP, by address.
	peers map[netip.Addr]Peer
	// paths are the announced paths with the UUIDs GoBGP gave them.
	paths map[netip.Prefix]installed
	// want are the paths to announce, and pending the prefixes of want or
	// paths not converged yet (changed, or failed last time): a run looks
	// at those only, so its cost is the change, not the table.
	want    map[netip.Prefix]Path
	pending map[netip.Prefix]struct{}
	// restarted: no session has been opened yet by this process, so the
	// first ones say "restarting, forwarding kept" (the R and F bits):
	// the peer keeps the routes it holds from our previous life until our
	// End-of-RIB instead of dropping them when the session comes up.
	restarted bool
	// restarting are the peers added with the R bit whose session has
	// not been seen up since (see rearm).
	restarting map[netip.Addr]bool
}

type installed struct {
	path Path
	uuid []byte
}

// New returns a stopped speaker; the first Reconcile with an ASN starts
// it.
func New(log *slog.Logger) *Speaker {
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "bgp")
	s := &Speaker{log: log, events: newEvents(log), peers: map[netip.Addr]Peer{}, paths: map[netip.Prefix]installed{},
		want: map[netip.Prefix]Path{}, pending: map[netip.Prefix]struct{}{}, restarted: true, restarting: map[netip.Addr]bool{}}
	// GoBGP logs "sync finished" from its event loop, which the API
	// calls of rearm need free.
	s.events.syncFinished = func() { go s.rearm() }
	return s
}

// Reconcile converges the speaker to want: it starts, restarts (another
// ASN, router ID or listen port) or stops GoBGP, and adds, updates and
// deletes peers and paths by difference. It returns the first error after
// trying everything; what failed is retried by the next call.
func (s *Speaker) Reconcile(ctx context.Context, want Config) error {
	if err := want.Validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	wantBy := make(map[netip.Prefix]Path, len(want.Paths))
	for _, p := range want.Paths {
		wantBy[p.Prefix] = p
		if have, ok := s.want[p.Prefix]; !ok || !have.Equal(p) {
			s.pending[p.Prefix] = struct{}{}
		}
	}
	for pfx := range s.want {
		if _, ok := wantBy[pfx]; !ok {
			s.pending[pfx] = struct{}{}
		}
	}
	s.want = wantBy
	return s.reconcileLocked(ctx, want)
}

// ReconcileChanges is Reconcile for a caller that tracks its paths by
// difference: want.Paths is ignored; the paths are those of the last call
// with set added or replaced and the prefixes of del withdrawn (a set
// path with a repeated prefix: the last wins). It costs the changes (and
// what failed before), not every path.
func (s *Speaker) ReconcileChanges(ctx context.Context, want Config, set []Path, del []netip.Prefix) error {
	want.Paths = nil
	s.mu.Lock()
	defer s.mu.Unlock()
	// The changes are taken even when want is refused below: they are
	// the caller's and it does not give them again.
	var errs []error
	for _, pfx := range del {
		if _, ok := s.want[pfx]; ok {
			delete(s.want, pfx)
			s.pending[pfx] = struct{}{}
		}
	}
	for _, p := range set {
		if !p.Prefix.IsValid() || p.Prefix.Masked() != p.Prefix {
			errs = append(errs, fmt.Errorf("bgp: path %v is not a prefix", p.Prefix))
			continue
		}
		if have, ok := s.want[p.Prefix]; !ok || !have.Equal(p) {
			s.want[p.Prefix] = p
			s.pending[p.Prefix] = struct{}{}
		}
	}
	if err := want.Validate(); err != nil {
		return errors.Join(append(errs, err)...)
	}
	if !want.Enabled() && len(s.want) > 0 {
		return errors.Join(append(errs, errors.New("bgp: paths without a local ASN"))...)
	}
	return errors.Join(append(errs, s.reconcileLocked(ctx, want))...)
}

func (s *Speaker) reconcileLocked(ctx context.Context, want Config) error {
	if s.srv != nil && (!want.Enabled() || want.ASN != s.cur.ASN || want.RouterID != s.cur.RouterID || want.ListenPort != s.cur.ListenPort) {
		if want.Enabled() {
			s.log.Info("local AS, router ID or listen port changed: restarting the speaker (sessions reset)",
				"asn", want.ASN, "routerID", want.RouterID, "oldASN", s.cur.ASN, "oldRouterID", s.cur.RouterID)
		}
		s.stopLocked(ctx)
		if !want.Enabled() {
			s.log.Info("speaker stopped: peers were told (Cease) and withdraw our routes")
		}
	}
	if !want.Enabled() {
		return nil
	}
	if s.srv == nil {
		if err := s.startLocked(ctx, want); err != nil {
			return err
		}
	}
	// Paths first: a session can only open after its peer is added, so a
	// restarted speaker's first End-of-RIB (at the latest a deferral time
	// after the session came up) always follows every path of this call,
	// however many there are.
	errPaths := s.syncPaths(ctx)
	errPeers := s.syncPeers(ctx, want.Peers)
	return errors.Join(errPaths, errPeers)
}

// startLocked starts GoBGP with the global settings of c and the import
// policy that rejects everything.
func (s *Speaker) startLocked(ctx context.Context, c Config) error {
	srv := server.NewBgpServer(server.LoggerOption(s.events))
	// Serve is GoBGP's event loop; it has no way to end, so a stopped
	// speaker leaves it idle (one goroutine per start).
	go srv.Serve()
	listen := int32(-1) // -1: GoBGP binds no port
	if c.ListenPort != 0 {
		listen = int32(c.ListenPort)
	}
	err := srv.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn: c.ASN, RouterId: c.RouterID.String(), ListenPort: listen,
	}})
	if err != nil {
		return fmt.Errorf("bgp: start speaker (AS %d, router ID %s): %w", c.ASN, c.RouterID, err)
	}
	// Export only: the global import policy, which every path entering
	// the global RIB passes (our own too), accepts local paths and
	// rejects the rest, so whatever a peer sends stays in its Adj-RIB-In.
	err = srv.AddPolicy(ctx, &api.AddPolicyRequest{Policy: &api.Policy{
		Name: importPolicy,
		Statements: []*api.Statement{{
			Name:       importPolicy + "-local",
			Conditions: &api.Conditions{RouteType: api.Conditions_ROUTE_TYPE_LOCAL},
			Actions:    &api.Actions{RouteAction: api.RouteAction_ACCEPT},
		}},
	}})
	if err == nil {
		err = srv.SetPolicyAssignment(ctx, &api.SetPolicyAssignmentRequest{Assignment: &api.PolicyAssignment{
			Name: "global", Direction: api.PolicyDirection_IMPORT, DefaultAction: api.RouteAction_REJECT,
			Policies: []*api.Policy{{Name: importPolicy}},
		}})
	}
	if err != nil {
		_ = srv.StopBgp(ctx, &api.StopBgpRequest{})
		return fmt.Errorf("bgp: set the global import policy (local paths only): %w", err)
	}
	s.srv, s.cur = srv, Config{ASN: c.ASN, RouterID: c.RouterID, ListenPort: c.ListenPort}
	s.log.Info("speaker started", "asn", c.ASN, "routerID", c.RouterID, "listenPort", c.ListenPort)
	return nil
}

// stopLocked stops GoBGP with a Cease to every peer: they drop our routes.
func (s *Speaker) stopLocked(ctx context.Context) {
	if s.srv == nil {
		return
	}
	_ = s.srv.StopBgp(ctx, &api.StopBgpRequest{})
	s.srv, s.cur = nil, Config{}
	clear(s.peers)
	clear(s.restarting)
	clear(s.paths)
	for pfx := range s.want {
		s.pending[pfx] = struct{}{} // announced again at the next start
	}
	s.events.forgetAll()
}

// Withdraw stops the speaker deliberately: every peer gets a Cease and
// drops our routes at once. A later Reconcile starts it again.
func (s *Speaker) Withdraw(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		s.stopLocked(ctx)
		s.log.Info("speaker stopped: peers were told (Cease) and withdraw our routes")
	}
	return nil
}

// Detach ends the speaker for a process exit or restart without telling
// the peers: the TCP connections are shut down at the socket first, so no
// NOTIFICATION can leave, and the peers, as graceful restart helpers, keep
// our routes for the restart time. The speaker is stopped afterwards.
func (s *Speaker) Detach(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv == nil {
		return
	}
	var remotes []netip.AddrPort
	for _, p := range s.peers {
		remotes = append(remotes, netip.AddrPortFrom(p.Address, p.port()))
	}
	n, err := shutdownConnections(remotes, s.cur.ListenPort)
	if err != nil {
		s.log.Warn("detach: could not shut every session down silently; peers may see a Cease", "err", err)
	}
	s.stopLocked(ctx)
	s.log.Info("detached: sessions closed without a notification, peers keep our routes for their restart time", "sessions", n)
}
