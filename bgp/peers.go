package bgp

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	api "github.com/osrg/gobgp/v3/api"
)

func (p Peer) port() uint16 {
	if p.Port == 0 {
		return 179
	}
	return p.Port
}

func family(a netip.Addr) *api.Family {
	if a.Is4() {
		return &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}
	}
	return &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST}
}

func seconds(d time.Duration) uint64 { return uint64(d / time.Second) }

// apiPeer is p as GoBGP takes it. restarting sets the Restart State and
// Forwarding bits of the graceful restart capability.
func apiPeer(p Peer, restarting bool) *api.Peer {
	retry := seconds(p.ConnectRetry)
	if retry == 0 {
		retry = 5
	}
	ap := &api.Peer{
		Conf: &api.PeerConf{NeighborAddress: p.Address.String(), PeerAsn: p.ASN, AuthPassword: p.Password},
		Timers: &api.Timers{Config: &api.TimersConfig{
			ConnectRetry: retry, HoldTime: seconds(p.HoldTime), KeepaliveInterval: seconds(p.Keepalive),
			// GoBGP waits 30 s after a reset by default before it dials
			// again; the connect retry time is what the user chose.
			IdleHoldTimeAfterReset: retry,
		}},
		Transport: &api.Transport{RemotePort: uint32(p.port())},
		AfiSafis:  []*api.AfiSafi{{Config: &api.AfiSafiConfig{Family: family(p.Address), Enabled: true}}},
	}
	if p.MultihopTTL > 1 {
		ap.EbgpMultihop = &api.EbgpMultihop{Enabled: true, MultihopTtl: uint32(p.MultihopTTL)}
	}
	if p.GracefulRestart {
		ap.GracefulRestart = &api.GracefulRestart{
			Enabled: true, RestartTime: uint32(seconds(p.RestartTime)), LocalRestarting: restarting,
			// After a restart GoBGP holds its updates back until every
			// peer sent End-of-RIB, at most this long; we import nothing,
			// so there is nothing worth waiting for.
			//
			// GoBGP v3 ends "restarting" for every neighbour at the
			// first End-of-RIB a restarted speaker receives, also for
			// one whose session is not up yet; Speaker.rearm gives such
			// a neighbour its R bit back.
			DeferralTime: 1,
		}
		ap.AfiSafis[0].MpGracefulRestart = &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}}
	}
	return ap
}

// syncPeers adds, replaces and deletes peers so that GoBGP holds want.
// A peer whose password could not be read is kept out (its status says
// why).
func (s *Speaker) syncPeers(ctx context.Context, want []Peer) error {
	wantBy := map[netip.Addr]Peer{}
	for _, p := range want {
		wantBy[p.Address] = p
	}
	s.events.setWanted(wantBy)
	var errs []error
	for _, addr := range slices.SortedFunc(maps.Keys(s.peers), netip.Addr.Compare) {
		w, ok := wantBy[addr]
		if ok && w == s.peers[addr] && w.PasswordError == "" {
			continue
		}
		// Removed, changed or now unusable: a deliberate change, so the
		// Cease (and the peer's withdrawal) is right.
		if err := s.srv.DeletePeer(ctx, &api.DeletePeerRequest{Address: addr.String()}); err != nil {
			errs = append(errs, fmt.Errorf("bgp: delete peer %s: %w", addr, err))
			continue
		}
		delete(s.peers, addr)
		delete(s.restarting, addr)
		if !ok {
			s.log.Info("peer removed", "peer", addr)
		}
	}
	for _, addr := range slices.SortedFunc(maps.Keys(wantBy), netip.Addr.Compare) {
		p := wantBy[addr]
		if _, ok := s.peers[addr]; ok || p.PasswordError != "" {
			continue
		}
		if err := s.srv.AddPeer(ctx, &api.AddPeerRequest{Peer: apiPeer(p, s.restarted)}); err != nil {
			errs = append(errs, fmt.Errorf("bgp: add peer %s: %w", addr, err))
			continue
		}
		s.peers[addr] = p
		if s.restarted && p.GracefulRestart {
			s.restarting[addr] = true
		}
		s.log.Info("peer configured", "peer", addr, "asn", p.ASN, "port", p.port(), "md5", p.Password != "",
			"gracefulRestart", p.GracefulRestart, "restarting", s.restarted && p.GracefulRestart)
	}
	s.restarted = false
	return errors.Join(errs...)
}

// Session states as PeerStatus.State shows them.
const (
	StateIdle        = "idle"
	StateConnect     = "connect"
	StateActive      = "active"
	StateOpenSent    = "opensent"
	StateOpenConfirm = "openconfirm"
	StateEstablished = "established"
	// StateNotConfigured: the peer is wanted but kept out of the
	// speaker (a password file that cannot be read).
	StateNotConfigured = "not-configured"
)

// PeerStatus is one peer as the speaker sees it.
type PeerStatus struct {
	Address  netip.Addr
	Port     uint16
	ASN      uint32
	LocalASN uint32
	State    string
	// Since is when the session came up (established) or went down.
	Since time.Time
	// LastError is the latest reason the session failed or went down: a
	// NOTIFICATION received or sent (with its code), a connect error, an
	// expired hold timer, or a password file that cannot be read.
	LastError   string
	LastErrorAt time.Time
	Received    uint64 // prefixes received (all rejected by the import policy)
	Advertised  uint64 // prefixes announced to the peer
	Flaps       uint32 // times the session went down after being established
	MD5         bool
	// GracefulRestart is on for the session (restart time in RestartTime).
	GracefulRestart bool
	RestartTime     time.Duration
}

// Peers returns the wanted peers with their session state, by address.
func (s *Speaker) Peers(ctx context.Context) []PeerStatus {
	s.mu.Lock()
	srv, asn := s.srv, s.cur.ASN
	var paths4, paths6 uint64
	for pfx := range s.paths {
		if pfx.Addr().Is4() {
			paths4++
		} else {
			paths6++
		}
	}
	s.mu.Unlock()
	live := map[netip.Addr]*api.Peer{}
	if srv != nil {
		// Not EnableAdvertised: GoBGP would build every path for every
		// peer per call. Without export policies an established session
		// carries every path of its family, which is what is counted.
		_ = srv.ListPeer(ctx, &api.ListPeerRequest{}, func(p *api.Peer) {
			if a, err := netip.ParseAddr(p.GetConf().GetNeighborAddress()); err == nil {
				live[a] = p
			}
		})
	}
	var out []PeerStatus
	for _, w := range s.events.wantedPeers() {
		st := PeerStatus{Address: w.Address, Port: w.port(), ASN: w.ASN, LocalASN: asn, State: StateNotConfigured,
			MD5: w.Password != "" || w.PasswordError != "", GracefulRestart: w.GracefulRestart}
		if w.GracefulRestart {
			st.RestartTime = w.RestartTime
		}
		if p, ok := live[w.Address]; ok {
			ps := p.GetState()
			st.State = sessionState(ps.GetSessionState())
			st.Flaps = ps.GetFlops()
			ts := p.GetTimers().GetState()
			if st.State == StateEstablished {
				st.Since = ts.GetUptime().AsTime()
			} else if d := ts.GetDowntime(); d != nil && d.GetSeconds() > 0 {
				st.Since = d.AsTime()
			}
			for _, af := range p.GetAfiSafis() {
				st.Received += af.GetState().GetReceived()
			}
			if st.State == StateEstablished {
				st.Advertised = paths6
				if w.Address.Is4() {
					st.Advertised = paths4
				}
			}
		}
		st.LastError, st.LastErrorAt = s.events.lastError(w.Address)
		out = append(out, st)
	}
	return out
}

func sessionState(s api.PeerState_SessionState) string {
	switch s {
	case api.PeerState_IDLE:
		return StateIdle
	case api.PeerState_CONNECT:
		return StateConnect
	case api.PeerState_ACTIVE:
		return StateActive
	case api.PeerState_OPENSENT:
		return StateOpenSent
	case api.PeerState_OPENCONFIRM:
		return StateOpenConfirm
	case api.PeerState_ESTABLISHED:
		return StateEstablished
	}
	return strings.ToLower(s.String())
}

// rearm runs after GoBGP's "sync finished": a restarted speaker received
// End-of-RIB from every established peer and cleared "restarting" for
// every neighbour. GoBGP v3 counts a neighbour whose session is not up
// yet as done (fixed in v4.6.0, osrg/gobgp#3432), so that neighbour's
// OPEN would go out without the Restart State and Forwarding bits and its
// router would drop our stale routes at session start (RFC 4724 4.2) and
// learn them again a moment later: with an IPv4 and an IPv6 neighbour,
// the one that connects second loses its family for a moment on nearly
// every restart. Such a neighbour, not past Active (no OPEN sent), is
// added again as restarting; one whose OPEN went out (with the bits) or
// whose session is up is left alone.
func (s *Speaker) rearm() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv == nil || len(s.restarting) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	states := map[string]api.PeerState_SessionState{}
	err := s.srv.ListPeer(ctx, &api.ListPeerRequest{}, func(p *api.Peer) {
		if p.Conf != nil && p.State != nil {
			states[p.Conf.NeighborAddress] = p.State.SessionState
		}
	})
	if err != nil {
		s.log.Warn("graceful restart: list peers", "err", err)
		return
	}
	for _, addr := range slices.SortedFunc(maps.Keys(s.restarting), netip.Addr.Compare) {
		switch states[addr.String()] {
		case api.PeerState_OPENSENT, api.PeerState_OPENCONFIRM, api.PeerState_ESTABLISHED:
			delete(s.restarting, addr)
			continue
		}
		p := s.peers[addr]
		err := s.srv.DeletePeer(ctx, &api.DeletePeerRequest{Address: addr.String()})
		if err == nil {
			err = s.srv.AddPeer(ctx, &api.AddPeerRequest{Peer: apiPeer(p, true)})
		}
		if err != nil {
			// The next Reconcile adds it (without the bits).
			delete(s.peers, addr)
			delete(s.restarting, addr)
			s.log.Warn("graceful restart: could not mark a peer not up yet as restarting again", "peer", addr, "err", err)
			continue
		}
		s.log.Info("graceful restart: a peer not up yet when the others finished their sync is marked restarting again", "peer", addr)
	}
}
